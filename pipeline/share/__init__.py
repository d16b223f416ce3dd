"""Results out: metrics and W&B tracking, the exported model folder, its card, plots."""

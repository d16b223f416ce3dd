"""The training run: its loop, step, progress, run folder, checkpoints, optimizers."""

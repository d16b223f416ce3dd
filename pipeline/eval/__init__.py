"""Frozen-feature evaluation: features, probes, the online probe during training."""

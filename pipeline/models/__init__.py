"""Encoders: timm backbones, the DIM encoder head, receptive fields, step-speed options."""

"""Images in: shard specs and manifests, WebDataset streams, augmentation, shard writing."""

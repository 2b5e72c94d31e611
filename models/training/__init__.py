"""Training: the config (arcface_torch style), data (manifests, public-set readers, splits,
augmentation, sampler), the training loop and site adaptation."""

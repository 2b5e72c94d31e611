"""Training: the config (arcface_torch style), data (a package: manifests, public-set readers, splits,
loading, label cleaning, augmentation, sampler), the training loop and site adaptation."""

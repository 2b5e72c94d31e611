"""From embeddings to decisions: calibration (thresholds, probability map), cohort score
normalisation (AS-norm) and site calibration."""

"""From embeddings to decisions, in numpy only: calibration (thresholds, probability map), cohort
score normalisation (AS-norm) and :mod:`~models.scoring.decide` (the cosine, the pair scorer, score
floors, operating points, FAR parsing) that the service, the audit and the risk report share."""

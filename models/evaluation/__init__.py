"""Measuring: verification and retrieval metrics with patient-bootstrap intervals, evaluating a
checkpoint on a manifest, and the helpers the benchmarks share."""

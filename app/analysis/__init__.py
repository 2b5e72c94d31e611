"""Offline analysis of image sets: the corpus (embedded images), the audit and the
re-identification risk report."""

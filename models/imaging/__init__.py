"""Radiographs in: one decoder for DICOM / PNG / JPEG / TIFF (header-only where that is enough), the
preparation every network input goes through, the quality gate, and synthetic phantoms for tests."""

"""models/imaging/phantom.py: deterministic, identity-bearing phantoms, written as PNG or DICOM sets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.imaging.phantom import PhantomSpec, make_patient, render_study, write_phantom_set
from models.imaging.preprocess import PreprocessConfig, decode_image, prepare


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_phantom() -> None:
    assert make_patient(7) == make_patient(7)
    assert make_patient(7) != make_patient(8)
    patient = make_patient(7)
    assert isinstance(patient, PhantomSpec) and patient.patient_id == "phantom-000007"
    a, b = render_study(patient, 3, size=96), render_study(make_patient(7), 3, size=96)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (96, 96) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0.05


def test_studies_of_one_patient_are_not_identical() -> None:
    patient = make_patient(11)
    studies = [render_study(patient, k, size=96) for k in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(studies[i] - studies[j]).mean() > 0.01


def test_patients_differ_more_than_studies_of_one_patient() -> None:
    config = PreprocessConfig(size=64)
    images = [
        [prepare(render_study(make_patient(seed), k, size=128), config) for k in range(3)]
        for seed in range(8)
    ]
    within = [_corr(s[i], s[j]) for s in images for i in range(3) for j in range(i + 1, 3)]
    between = [_corr(images[p][0], images[q][1]) for p in range(8) for q in range(8) if p != q]
    assert np.mean(within) > np.mean(between) + 0.05
    # the nearest other study is usually the same patient's (what a re-identification model exploits)
    flat = [(p, img) for p, s in enumerate(images) for img in s]
    hits = 0
    for i, (p, img) in enumerate(flat):
        scores = [(_corr(img, other), q) for j, (q, other) in enumerate(flat) if j != i]
        hits += max(scores)[1] == p
    assert hits / len(flat) > 0.5


def test_render_validates_arguments() -> None:
    with pytest.raises(ValueError):
        render_study(make_patient(0), 0, size=8)
    with pytest.raises(ValueError):
        make_patient(-1)


def test_write_png_set(tmp_path: Path) -> None:
    manifest = write_phantom_set(tmp_path / "set", 4, 3, size=64, fmt="png", seed=2)
    assert manifest == tmp_path / "set" / "manifest.csv"
    rows = _read_manifest(manifest)
    assert len(rows) == 12
    assert list(rows[0]) == ["path", "patient_id", "view", "sex", "age", "offset_days", "split"]
    patients = {row["patient_id"] for row in rows}
    assert len(patients) == 4
    for pid in patients:
        mine = [row for row in rows if row["patient_id"] == pid]
        assert len({row["split"] for row in mine}) == 1  # patient-disjoint splits
        offsets = [int(row["offset_days"]) for row in mine]
        assert offsets[0] == 0 and offsets == sorted(offsets)
    assert {row["split"] for row in rows} <= {"train", "val", "test"}
    assert {row["view"] for row in rows} == {"PA"} and {row["sex"] for row in rows} <= {"F", "M"}
    first = manifest.parent / rows[0]["path"]
    image = decode_image(first)
    assert image.source_format == "png" and image.pixels.shape == (64, 64)
    patient = make_patient(2 * 100_000)
    assert rows[0]["patient_id"] == patient.patient_id
    expected = render_study(patient, 0, size=64)
    np.testing.assert_allclose(image.pixels / 65535.0, expected, atol=1.0 / 65535)


def test_write_dicom_set(tmp_path: Path) -> None:
    manifest = write_phantom_set(tmp_path / "a", 2, 2, size=48, fmt="dicom", seed=5)
    rows = _read_manifest(manifest)
    assert len(rows) == 4 and all(row["path"].endswith(".dcm") for row in rows)
    sop_uids = set()
    for row in rows:
        path = manifest.parent / row["path"]
        image = decode_image(path)  # CR passes the modality check
        assert image.source_format == "dicom" and image.pixels.shape == (48, 48)
        assert image.identifiers["PatientID"] == row["patient_id"]
        assert image.identifiers["ViewPosition"] == "PA"
        assert image.pixel_spacing is not None
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
        assert str(ds.PatientName) == f"PHANTOM^{row['patient_id']}"
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 4
    again = write_phantom_set(tmp_path / "b", 2, 2, size=48, fmt="dicom", seed=5)
    for row in rows:
        assert (manifest.parent / row["path"]).read_bytes() == (again.parent / row["path"]).read_bytes()


def test_write_set_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_phantom_set(tmp_path, 2, 2, fmt="jpeg")
    with pytest.raises(ValueError):
        write_phantom_set(tmp_path, 0, 2)
    with pytest.raises(ValueError):
        write_phantom_set(tmp_path, 2, 0)

"""``cxr-reid data SOURCE ROOT``: miniature copies of each public set's layout and metadata (the real
file names, column names and value conventions; a few tiny images) and a DICOM folder become manifests
with the right patients, files and views, every row left out counted with its reason; and
``cxr-reid train`` without data says how to get it."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from PIL import Image

from app.cli import main
from models.data import Sample, read_manifest

CHESTXRAY14_HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly"]
MIMIC_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
PADCHEST_HEADER = [
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Labels",
]


def _image(path: Path) -> None:
    """A tiny grey image in the format its name says (PNG or JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a metadata CSV, gzipped when the name ends in .gz (as PhysioNet and BIMCV ship it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _data(*args: str) -> int:
    return main(["data", *args, "--no-progress"])


def _by_path(samples: list[Sample], root: Path) -> dict[str, Sample]:
    return {Path(s.path).relative_to(root.resolve()).as_posix(): s for s in samples}


def test_chestxray14_kaggle_layout_and_a_partial_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "nih"
    rows = [
        ["00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA", 2682, 2749, 0.143, 0.143],
        ["00000001_001.png", "No Finding", 1, 1, 58, "M", "AP", 2894, 2729, 0.143, 0.143],
        ["00000002_000.png", "No Finding", 0, 2, 81, "F", "PA", 2500, 2048, 0.171, 0.171],
        ["00000003_000.png", "Hernia", 0, 3, 74, "F", "PA", 2500, 2048, 0.168, 0.168],  # not downloaded
    ]
    _csv(root / "Data_Entry_2017_v2020.csv", CHESTXRAY14_HEADER, rows)
    _image(root / "images_001" / "images" / "00000001_000.png")  # Kaggle: one folder per archive
    _image(root / "images_001" / "images" / "00000001_001.png")
    _image(root / "images_002" / "images" / "00000002_000.png")
    out = tmp_path / "sets" / "chestxray14" / "manifest.csv"
    assert _data("chestxray14", str(root), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "3 images of 2 patients, 1 with 2 or more images" in text
    assert "4 rows read from Data_Entry_2017_v2020.csv; 1 left out" in text
    assert "1 image file not found under ROOT" in text
    samples = _by_path(read_manifest(out), root)
    assert set(samples) == {
        "images_001/images/00000001_000.png",
        "images_001/images/00000001_001.png",
        "images_002/images/00000002_000.png",
    }
    first = samples["images_001/images/00000001_001.png"]
    assert first.patient_id == "chestxray14:1" and first.view == "AP" and first.follow_up == 1
    assert first.sex == "M" and first.age == 58


def test_chexpert_keeps_frontals_from_train_and_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "download" / "CheXpert-v1.0-small"
    train_dir, valid_dir = "CheXpert-v1.0-small/train", "CheXpert-v1.0-small/valid"  # the CSV's prefixes
    train = [
        [f"{train_dir}/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", 1, ""],
        [f"{train_dir}/patient00001/study2/view1_frontal.jpg", "Female", 68, "Frontal", "PA", "", 1],
        [f"{train_dir}/patient00001/study2/view2_lateral.jpg", "Female", 68, "Lateral", "", "", 1],
        [f"{train_dir}/patient00002/study1/view1_frontal.jpg", "Male", 87, "Frontal", "AP", "", ""],
    ]
    valid = [[f"{valid_dir}/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "AP", 1, 0]]
    _csv(small / "train.csv", CHEXPERT_HEADER, train)
    _csv(small / "valid.csv", CHEXPERT_HEADER, valid)
    for row in train + valid:
        _image(small.parent / str(row[0]))
    # ROOT as the folder holding CheXpert-v1.0-small, or that folder itself: the same manifest
    for n, root in enumerate((small.parent, small)):
        out = tmp_path / f"sets{n}" / "chexpert" / "manifest.csv"
        assert _data("chexpert", str(root), "--out", str(out)) == 0
        text = capsys.readouterr().out
        assert "4 images of 3 patients, 1 with 2 or more images" in text
        assert "5 rows read from train.csv, valid.csv; 1 left out:" in text and "1 lateral view" in text
        samples = _by_path(read_manifest(out), small)
        assert "train/patient00001/study2/view2_lateral.jpg" not in samples
        again = samples["train/patient00001/study2/view1_frontal.jpg"]
        assert again.patient_id == "chexpert:patient00001" and again.view == "PA"
        assert again.offset_days == 2 and again.sex == "Female" and again.age == 68
        assert samples["valid/patient64541/study1/view1_frontal.jpg"].patient_id == "chexpert:patient64541"
    # --views all keeps the lateral, as L
    out = tmp_path / "all" / "chexpert" / "manifest.csv"
    assert _data("chexpert", str(small.parent), "--out", str(out), "--views", "all") == 0
    views = {s.view for s in read_manifest(out)}
    assert views == {"AP", "PA", "L"}


def test_mimic_cxr_jpg_gzipped_metadata_and_view_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.1.0"
    rows = [
        [
            "d1",
            "10000032",
            "50414267",
            "CHEST (PA AND LAT)",
            "PA",
            3056,
            2544,
            21800506,
            213014.531,
            "CHEST (PA AND LAT)",
            "postero-anterior",
            "Erect",
        ],
        [
            "d2",
            "10000032",
            "50414267",
            "CHEST (PA AND LAT)",
            "LATERAL",
            3056,
            2544,
            21800506,
            213014.531,
            "CHEST (PA AND LAT)",
            "lateral",
            "Erect",
        ],
        [
            "d3",
            "10000032",
            "53189527",
            "CHEST (PORTABLE AP)",
            "AP",
            2705,
            2539,
            21800626,
            165500.312,
            "CHEST (PORTABLE AP)",
            "antero-posterior",
            "",
        ],
        [
            "d4",
            "10000764",
            "57375967",
            "CHEST (PA AND LAT)",
            "AP AXIAL",
            2544,
            3056,
            21321015,
            84900.0,
            "CHEST (PA AND LAT)",
            "",
            "",
        ],
        ["d5", "10000764", "57375967", "", "", 2544, 3056, 21321015, 84900.0, "", "", ""],
        [
            "d6",
            "10000898",
            "50771383",
            "CHEST (PA AND LAT)",
            "PA",
            3056,
            2544,
            21320926,
            141411.0,
            "CHEST (PA AND LAT)",
            "postero-anterior",
            "Erect",
        ],
    ]
    _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_HEADER, rows)
    for dicom_id, subject, study, *_ in rows:
        _image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg")
    out = tmp_path / "sets" / "mimic" / "manifest.csv"
    assert _data("mimic-cxr-jpg", str(root), "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["patients"] == 2 and report["patients_with_2plus"] == 1
    assert report["refused"] == {"lateral view": 1, "not a frontal view (AP AXIAL)": 1, "no view given": 1}
    samples = _by_path(read_manifest(out), root)
    assert set(samples) == {
        "files/p10/p10000032/s50414267/d1.jpg",
        "files/p10/p10000032/s53189527/d3.jpg",
        "files/p10/p10000898/s50771383/d6.jpg",
    }
    later = samples["files/p10/p10000032/s53189527/d3.jpg"]
    assert later.patient_id == "mimic:10000032" and later.view == "AP" and later.offset_days == 51


def test_padchest_projection_and_patient_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "padchest"
    patient_a, patient_b = "839860488694292331637988235681460987", "313572750430997347502932654319389875"
    rows = [
        [
            "216840111366964012283393834152009033102258826_02-059-019.png",
            0,
            20090311,
            "s1",
            patient_a,
            "1933.0",
            "M",
            "['POSTEROANTERIOR']",
            "PA",
            "Manual review of DICOM fields",
            "['normal']",
        ],
        [
            "216840111366964012283393834152009033140208626_02-059-104.png",
            0,
            20090311,
            "s1",
            patient_a,
            "1933.0",
            "M",
            "['LATERAL']",
            "L",
            "Manual review of DICOM fields",
            "['normal']",
        ],
        [
            "216840111366964012373310883942009170084120009_00-097-074.png",
            1,
            20090620,
            "s2",
            patient_a,
            "1933.0",
            "M",
            "['ANTEROPOSTERIOR']",
            "AP_horizontal",
            "recalculated from the image",
            "['cardiomegaly']",
        ],
        [
            "216840111366964012558082906712009301143450268_00-075-157.png",
            1,
            20091028,
            "s3",
            patient_b,
            "1960.0",
            "F",
            "None",
            "COSTAL",
            "recalculated from the image",
            "['rib fracture']",
        ],
        [
            "216840111366964012989926673512011074122523403_00-163-058.png",
            1,
            20110315,
            "s4",
            patient_b,
            "1960.0",
            "F",
            "None",
            "UNK",
            "recalculated from the image",
            "['normal']",
        ],
        [
            "216840111366964012989926673512011083134050913_00-168-009.png",
            1,
            20110324,
            "s5",
            patient_b,
            "1960.0",
            "F",
            "['POSTEROANTERIOR']",
            "PA",
            "Manual review of DICOM fields",
            "['normal']",
        ],
    ]
    _csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", PADCHEST_HEADER, rows)
    for row in rows:
        _image(root / str(row[1]) / str(row[0]))  # one folder per image zip, named by ImageDir
    out = tmp_path / "sets" / "padchest" / "manifest.csv"
    assert _data("padchest", str(root), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "3 images of 2 patients, 1 with 2 or more images" in text
    for reason in ("1 lateral view", "1 not a frontal view (COSTAL)", "1 not a frontal view (UNK)"):
        assert reason in text
    samples = _by_path(read_manifest(out), root)
    horizontal = samples[f"1/{rows[2][0]}"]
    assert horizontal.patient_id == f"padchest:{patient_a}" and horizontal.view == "AP_horizontal"
    assert horizontal.offset_days == 101 and horizontal.age == 76 and horizontal.sex == "M"
    assert samples[f"1/{rows[5][0]}"].patient_id == f"padchest:{patient_b}"


def test_dicom_folder_by_patient_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site-export"
    pixels = np.full((16, 16), 1000, dtype=np.uint16)
    files = {
        "a/1.dcm": {"PatientID": "A", "ViewPosition": "PA", "StudyDate": "20240101"},
        "a/2.dcm": {"PatientID": "A", "ViewPosition": "", "StudyDate": "20240111"},  # blank: kept
        "a/3.dcm": {"PatientID": "A", "ViewPosition": "LL", "StudyDate": "20240111"},
        "b/IM0001": {"PatientID": "B", "ViewPosition": "AP"},  # DICOM files often have no extension
        "b/IM0002": {"ViewPosition": "AP"},  # no PatientID
        "c/1.dcm": {"PatientID": "bad\x01id", "ViewPosition": "PA"},  # an id the gallery refuses
    }
    for name, elements in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        dicom_dataset(pixels, Modality="CR", **elements).save_as(path, enforce_file_format=True)
    (root / "b" / "notes.txt").write_text("not an image")
    out = tmp_path / "sets" / "site" / "manifest.csv"
    assert _data("dicom", str(root), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "3 images of 2 patients, 1 with 2 or more images" in text
    for reason in ("1 lateral view", "1 no PatientID", "1 not a DICOM file", "1 patient id contains control"):
        assert reason in text
    samples = _by_path(read_manifest(out), root)
    assert set(samples) == {"a/1.dcm", "a/2.dcm", "b/IM0001"}
    assert samples["a/2.dcm"].patient_id == "site:A" and samples["a/2.dcm"].offset_days == 10
    assert samples["a/1.dcm"].view == "PA" and samples["b/IM0001"].patient_id == "site:B"


def test_what_is_missing_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    root = tmp_path / "empty"
    root.mkdir()
    out = tmp_path / "sets" / "x" / "manifest.csv"
    assert _data("padchest", str(root), "--out", str(out)) == 2
    assert "no PADCHEST_chest_x_ray_images_labels_160K*.csv.gz" in caplog.text
    assert "https://bimcv.cipf.es/bimcv-projects/padchest/" in caplog.text and "--metadata" in caplog.text
    # metadata without its images: say where the first image was looked for
    caplog.clear()
    _csv(root / "Data_Entry_2017.csv", CHESTXRAY14_HEADER, [["00000009_000.png", "", 0, 9, 30, "M", "PA"]])
    assert _data("chestxray14", str(root), "--out", str(out)) == 2
    assert "none of the 1 images named in Data_Entry_2017.csv" in caplog.text
    assert "unpack the image archives there; nothing written" in caplog.text
    assert _data("chexpert", str(tmp_path / "nope"), "--out", str(out)) == 2
    assert "no such folder" in caplog.text
    assert not out.exists()


def test_train_without_data_says_how_to_get_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    config = tmp_path / "configs" / "mine.toml"
    config.parent.mkdir()
    config.write_text('[data]\nmanifests = ["../../shared/data/some-set/manifest.csv"]\n')
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    message = caplog.text
    assert (
        f"training data not found: {(tmp_path.parent / 'shared/data/some-set/manifest.csv').resolve()}"
        in message
    )
    assert "cxr-reid data SOURCE ROOT --out sets/NAME/manifest.csv" in message
    assert "--manifest sets/NAME/manifest.csv" in message and "docs/train-your-own-data.md" in message
    assert not (tmp_path / "run").exists()


def test_a_renamed_metadata_file_is_given_with_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "nih"
    rows = [[f"0000000{n}_00{k}.png", "No Finding", k, n, 40, "F", "PA"] for n in (1, 2) for k in (0, 1)]
    metadata = _csv(tmp_path / "elsewhere" / "nih-labels.csv", CHESTXRAY14_HEADER[:7], rows)
    for row in rows:
        _image(root / "images" / str(row[0]))  # the NIH download: every archive unpacks into images/
    out = tmp_path / "sets" / "nih" / "manifest.csv"
    assert _data("chestxray14", str(root), "--out", str(out)) == 2  # not under ROOT by its name
    assert _data("chestxray14", str(root), "--out", str(out), "--metadata", str(metadata)) == 0
    assert "4 images of 2 patients, 2 with 2 or more images" in capsys.readouterr().out
    assert {s.patient_id for s in read_manifest(out)} == {"nih:1", "nih:2"}

"""Readers of the public chest X-ray sets' own metadata (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG,
PadChest), so a user who downloaded one needs no hand-written manifest: each returns the same
:class:`Sample` list :func:`~models.data.manifests.read_manifest` gives, patient ids namespaced by
the set, every row as the set gives it (:mod:`~models.data.sources` chooses views and finds files).
A metadata file may be read as shipped, gzipped (``.csv.gz``: MIMIC-CXR-JPG, PadChest) or not.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from models.data.manifests import ManifestError, Sample, optional_float, study_day


def read_chestxray14(data_entry_csv: str | os.PathLike, images_dir: str | os.PathLike) -> list[Sample]:
    """NIH ChestX-ray14 ``Data_Entry_2017.csv`` (Image Index, Follow-up #, Patient ID, ...)."""
    images = Path(images_dir).resolve()
    samples = []
    with _open_csv(data_entry_csv) as handle:
        for row in csv.DictReader(handle):
            age = re.sub(r"[^0-9.]", "", row.get("Patient Age", ""))
            samples.append(
                Sample(
                    path=str(images / row["Image Index"]),
                    patient_id=f"chestxray14:{int(row['Patient ID'])}",
                    dataset="chestxray14",
                    view=(row.get("View Position") or None),
                    sex=(row.get("Patient Gender") or None),
                    age=optional_float(age),
                    follow_up=optional_float(row.get("Follow-up #")),
                )
            )
    return samples


_CHEXPERT_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")


def read_chexpert(csv_path: str | os.PathLike, root: str | os.PathLike) -> list[Sample]:
    """CheXpert ``train.csv`` / ``valid.csv``: the patient is in the path (``patient00001/study1/``).

    ``root`` is the folder the CSV's ``Path`` column is relative to (the one holding
    ``CheXpert-v1.0[-small]/``). The study number orders a patient's images in time. ``Frontal/Lateral``
    decides the kind of view: a lateral is ``L``, a frontal its ``AP/PA`` (None where that is blank).
    """
    base = Path(root).resolve()
    samples = []
    with _open_csv(csv_path) as handle:
        for row in csv.DictReader(handle):
            match = _CHEXPERT_PATIENT.search(row["Path"])
            if not match:
                raise ManifestError(f"{csv_path}: cannot find the patient in path {row['Path']!r}")
            view = "L" if row.get("Frontal/Lateral") == "Lateral" else row.get("AP/PA")
            samples.append(
                Sample(
                    path=str(base / row["Path"]),
                    patient_id=f"chexpert:{match.group(1)}",
                    dataset="chexpert",
                    view=view or None,
                    sex=row.get("Sex") or None,
                    age=optional_float(row.get("Age")),
                    offset_days=optional_float(match.group(2).removeprefix("study")),
                )
            )
    return samples


def read_mimic_cxr(metadata_csv: str | os.PathLike, root: str | os.PathLike) -> list[Sample]:
    """MIMIC-CXR-JPG ``mimic-cxr-2.0.0-metadata.csv``: files/p10/p10000032/s5.../<dicom_id>.jpg."""
    base = Path(root).resolve()
    with _open_csv(metadata_csv) as handle:
        rows = list(csv.DictReader(handle))
    first_date: dict[str, int] = {}
    for row in rows:
        day = study_day(row.get("StudyDate", ""))
        if day is not None:
            subject = row["subject_id"]
            first_date[subject] = min(first_date.get(subject, day), day)
    samples = []
    for row in rows:
        subject, study = row["subject_id"], row["study_id"]
        day = study_day(row.get("StudyDate", ""))
        path = base / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{row['dicom_id']}.jpg"
        samples.append(
            Sample(
                path=str(path),
                patient_id=f"mimic-cxr:{subject}",
                dataset="mimic-cxr",
                view=row.get("ViewPosition") or None,
                offset_days=None if day is None else float(day - first_date[subject]),
            )
        )
    return samples


def read_padchest(labels_csv: str | os.PathLike, images_dir: str | os.PathLike) -> list[Sample]:
    """PadChest ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]``: ``ImageID`` in the
    folder ``ImageDir`` (one per image archive) under ``images_dir``; ``PatientID`` is the identity,
    ``Projection`` the view (PA, AP, AP_horizontal, L, COSTAL, EXCLUDE, UNK); ``StudyDate_DICOM`` gives
    days since the patient's first study, ``PatientBirth`` (a year) the age at the study."""
    images = Path(images_dir).resolve()
    with _open_csv(labels_csv) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    missing = sorted({"ImageID", "PatientID", "Projection"} - set(reader.fieldnames or []))
    if missing:
        raise ManifestError(f"{labels_csv}: not PadChest's labels CSV, no column(s) {', '.join(missing)}")
    first_date: dict[str, int] = {}
    for row in rows:
        day = study_day(row.get("StudyDate_DICOM", ""))
        if day is not None:
            patient = row["PatientID"]
            first_date[patient] = min(first_date.get(patient, day), day)
    samples = []
    for row in rows:
        patient, day = row["PatientID"].strip(), study_day(row.get("StudyDate_DICOM", ""))
        folder = (row.get("ImageDir") or "").strip().split(".")[0]
        birth = optional_float(row.get("PatientBirth"))
        year = date.fromordinal(day).year if day is not None else None
        samples.append(
            Sample(
                path=str(images / folder / row["ImageID"]),
                patient_id=f"padchest:{patient}",
                dataset="padchest",
                view=(row.get("Projection") or "").strip() or None,
                sex=(row.get("PatientSex_DICOM") or "").strip() or None,
                age=None if birth is None or year is None else float(year - int(birth)),
                offset_days=None if day is None or not patient else float(day - first_date[patient]),
            )
        )
    return samples


@contextmanager
def _open_csv(path: str | os.PathLike) -> Iterator[io.TextIOBase]:
    """A metadata CSV as text, gunzipped when its name ends in ``.gz`` (how PhysioNet and BIMCV ship it)."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", newline="", encoding="utf-8-sig") as handle:
            yield handle  # type: ignore[misc]
    else:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            yield handle

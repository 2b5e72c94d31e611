"""Readers of the public chest X-ray sets' own metadata (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG),
so a user who downloaded one needs no hand-written manifest: each returns the same :class:`Sample`
list :func:`~models.data.manifests.read_manifest` gives, patient ids namespaced by the set.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from models.data.manifests import ManifestError, Sample, optional_float


def read_chestxray14(data_entry_csv: str | os.PathLike, images_dir: str | os.PathLike) -> list[Sample]:
    """NIH ChestX-ray14 ``Data_Entry_2017.csv`` (Image Index, Follow-up #, Patient ID, ...)."""
    images = Path(images_dir).resolve()
    samples = []
    with open(data_entry_csv, newline="", encoding="utf-8-sig") as handle:
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
    ``CheXpert-v1.0[-small]/``). The study number orders a patient's images in time.
    """
    base = Path(root).resolve()
    samples = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            match = _CHEXPERT_PATIENT.search(row["Path"])
            if not match:
                raise ManifestError(f"{csv_path}: cannot find the patient in path {row['Path']!r}")
            view = row.get("AP/PA") or ("L" if row.get("Frontal/Lateral") == "Lateral" else None)
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
    rows = []
    with open(metadata_csv, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    first_date: dict[str, int] = {}
    for row in rows:
        day = _mimic_day(row.get("StudyDate", ""))
        if day is not None:
            subject = row["subject_id"]
            first_date[subject] = min(first_date.get(subject, day), day)
    samples = []
    for row in rows:
        subject, study = row["subject_id"], row["study_id"]
        day = _mimic_day(row.get("StudyDate", ""))
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


def _mimic_day(value: str) -> int | None:
    """MIMIC's shifted StudyDate (YYYYMMDD) as a day number, for time gaps only."""
    from datetime import date

    value = value.strip().split(".")[0]
    if len(value) != 8 or not value.isdigit():
        return None
    return date(int(value[:4]), int(value[4:6]), int(value[6:])).toordinal()

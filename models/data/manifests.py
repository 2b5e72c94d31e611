"""Manifests: the CSV contract every identity-labelled set is read through, and the sample it yields.

Manifest contract (DESIGN.md): a CSV with at least ``path,patient_id``; ``path`` is relative to
the CSV's folder; optional ``view,sex,age,offset_days,follow_up,split`` (``offset_days``: days since
the patient's first study; ``follow_up``: a visit number, for sets that number visits instead).
Several manifests combine into one training set with patient ids kept apart per set
(``<set>:<patient_id>``), because ``p1`` of one hospital is not ``p1`` of another. A folder of DICOM
files reads as a manifest too (:func:`read_dicom_folder`). :class:`Sample` and
:class:`ManifestError` live here because every other room of :mod:`models.data` speaks them.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from models.imaging.dicom import read_dicom

SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest cannot be read as the contract says."""


@dataclass
class Sample:
    """One image with its identity and the metadata the metrics break down by."""

    path: str  # absolute
    patient_id: str  # namespaced: "<dataset>:<id>"
    dataset: str
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    offset_days: float | None = None  # days since the patient's first study
    follow_up: float | None = None  # visit number, where a set numbers visits instead of dating them
    split: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def dataset_name(manifest: str | os.PathLike) -> str:
    """A set is named after the folder its manifest lives in."""
    return Path(manifest).resolve().parent.name


def optional_float(value: str | None) -> float | None:
    """A CSV cell as a number; empty or unreadable cells are None (the public-set readers use it too)."""
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError:
        return None


def study_day(value: str | None) -> int | None:
    """A DICOM-style StudyDate (YYYYMMDD; MIMIC's are shifted) as a day number, for time gaps only;
    None when blank or not a date."""
    value = (value or "").strip().split(".")[0]
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:])).toordinal()
    except ValueError:
        return None


#: Sets whose manifests put ChestX-ray14's "Follow-up #" (a visit number: 0, 1, 2, ...) in the
#: ``offset_days`` column. It orders a patient's images but counts visits, not days, so it is read
#: as ``follow_up``. Matched by the start of the set's (folder) name.
FOLLOW_UP_NUMBER_SETS: tuple[str, ...] = ("nih-cxr14", "chestxray14")


def read_manifest(manifest: str | os.PathLike, *, namespace: str | None = None) -> list[Sample]:
    """Read a manifest CSV; paths resolve against the CSV's folder."""
    manifest_path = Path(manifest)
    if manifest_path.is_dir():
        inside = manifest_path / "manifest.csv"
        hint = f"did you mean {inside}?" if inside.is_file() else "give the CSV file inside it"
        raise ManifestError(
            f"{manifest_path} is a folder, not a manifest: {hint} (a CSV with columns path,patient_id)"
        )
    if not manifest_path.is_file():
        raise ManifestError(
            f"manifest not found: {manifest_path} (a CSV with columns path,patient_id; "
            "its paths are relative to the CSV's folder)"
        )
    name = namespace if namespace is not None else dataset_name(manifest_path)
    root = manifest_path.resolve().parent
    samples: list[Sample] = []
    with manifest_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = [name for name in reader.fieldnames or [] if name]
        missing = {"path", "patient_id"} - set(found)
        if missing:
            header = ", ".join(found) if found else "nothing"
            delimiter = next((d for d in ";\t|" if len(found) == 1 and d in found[0]), None)
            hint = (
                f"; the header looks {'tab' if delimiter == chr(9) else repr(delimiter)}-separated: "
                "save it comma-separated"
                if delimiter
                else "; the first line must name the columns"
            )
            raise ManifestError(
                f"{manifest_path}: missing column(s) {', '.join(sorted(missing))}; found {header}{hint}"
            )
        known = {"path", "patient_id", "view", "sex", "age", "offset_days", "follow_up", "split"}
        visits_in_offset = name.startswith(FOLLOW_UP_NUMBER_SETS)
        for line, row in enumerate(reader, start=2):
            path, patient = (row.get("path") or "").strip(), (row.get("patient_id") or "").strip()
            if not path or not patient:
                raise ManifestError(f"{manifest_path}:{line}: empty path or patient_id")
            split = (row.get("split") or "").strip() or None
            if split is not None and split not in SPLITS:
                raise ManifestError(f"{manifest_path}:{line}: split must be one of {SPLITS}, got {split!r}")
            samples.append(
                Sample(
                    path=str((root / path).resolve()),
                    patient_id=f"{name}:{patient}",
                    dataset=name,
                    view=(row.get("view") or "").strip() or None,
                    sex=(row.get("sex") or "").strip() or None,
                    age=optional_float(row.get("age")),
                    offset_days=None if visits_in_offset else optional_float(row.get("offset_days")),
                    follow_up=optional_float(
                        row.get("follow_up") or (row.get("offset_days") if visits_in_offset else None)
                    ),
                    split=split,
                    extra={k: v for k, v in row.items() if k not in known and k and v},
                )
            )
    if not samples:
        raise ManifestError(f"{manifest_path}: no rows")
    return samples


def check_files_exist(samples: Sequence[Sample], manifest: str | os.PathLike) -> None:
    """Raise ManifestError naming the missing images (and how paths resolve) before any work starts."""
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        folder = Path(manifest).resolve().parent
        raise ManifestError(
            f"{manifest}: {len(missing)} of {len(samples)} image(s) not found, e.g. {missing[0]}; "
            f"its paths are relative to the CSV's folder ({folder}): fix the paths or move the CSV"
        )


def read_dicom_folder(folder: str | os.PathLike) -> tuple[list[Sample], int]:
    """Every DICOM file under ``folder`` as a sample filed under its PatientID (:func:`walk_dicom_folder`);
    returns the samples and the number of files left out (not DICOM, or no PatientID)."""
    samples, refused = walk_dicom_folder(folder)
    return samples, sum(refused.values())


#: Why a file of a DICOM folder is left out (the keys of :func:`walk_dicom_folder`'s counts).
NOT_DICOM, NO_PATIENT_ID = "not a DICOM file", "no PatientID"


def walk_dicom_folder(
    folder: str | os.PathLike, *, progress: bool = False
) -> tuple[list[Sample], Counter[str]]:
    """Every DICOM file under ``folder`` (recursively, hidden files skipped) as a sample filed under
    its PatientID, namespaced by the folder's name like a manifest's set, with its ViewPosition,
    PatientSex and days since the patient's first StudyDate; returns the samples and the files left
    out, counted by reason. Only those header fields are read, so a large archive scans quickly."""
    from pydicom.errors import InvalidDicomError
    from tqdm.auto import tqdm

    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"no such folder: {root}")
    name = root.resolve().name
    samples: list[Sample] = []
    days: list[int | None] = []
    refused: Counter[str] = Counter()
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    tags = ["PatientID", "ViewPosition", "PatientSex", "StudyDate"]
    for path in tqdm(paths, desc=f"reading {name}", unit="file", disable=not progress):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            ds = read_dicom(path, header_only=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            refused[NOT_DICOM] += 1
            continue
        patient = str(ds.get("PatientID", "") or "").strip()
        if not patient:
            refused[NO_PATIENT_ID] += 1
            continue
        samples.append(
            Sample(
                path=str(path.resolve()),
                patient_id=f"{name}:{patient}",
                dataset=name,
                view=str(ds.get("ViewPosition", "") or "").strip() or None,
                sex=str(ds.get("PatientSex", "") or "").strip() or None,
            )
        )
        days.append(study_day(str(ds.get("StudyDate", "") or "")))
    if not samples:
        raise ManifestError(f"{root}: no DICOM file with a PatientID under this folder")
    first: dict[str, int] = {}
    for sample, day in zip(samples, days, strict=True):
        if day is not None:
            first[sample.patient_id] = min(first.get(sample.patient_id, day), day)
    for sample, day in zip(samples, days, strict=True):
        if day is not None:
            sample.offset_days = float(day - first[sample.patient_id])
    return samples, refused


def read_manifests(manifests: Sequence[str | os.PathLike]) -> list[Sample]:
    """Combine several manifests; patient ids stay apart because each is namespaced by its set."""
    names = [dataset_name(m) for m in manifests]
    if len(set(names)) != len(names):
        raise ManifestError(f"two manifests share a folder name, so their patient ids would mix: {names}")
    return [sample for manifest in manifests for sample in read_manifest(manifest)]


def write_manifest(samples: Sequence[Sample], path: str | os.PathLike) -> Path:
    """Write samples as a manifest whose paths are relative to its folder where possible."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    root = target.resolve().parent
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "view", "sex", "age", "offset_days", "follow_up", "split"])
        for s in samples:
            rel = os.path.relpath(s.path, root)
            patient = (
                s.patient_id.split(":", 1)[1] if s.patient_id.startswith(f"{s.dataset}:") else s.patient_id
            )
            writer.writerow(
                [
                    rel,
                    patient,
                    s.view or "",
                    s.sex or "",
                    _fmt(s.age),
                    _fmt(s.offset_days),
                    _fmt(s.follow_up),
                    s.split or "",
                ]
            )
    return target


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


def summarise(samples: Sequence[Sample]) -> dict[str, object]:
    """Counts a model card and a checkpoint's training summary report."""
    per_set: dict[str, dict[str, int]] = {}
    for name in sorted({s.dataset for s in samples}):
        subset = [s for s in samples if s.dataset == name]
        counts: dict[str, int] = defaultdict(int)
        for s in subset:
            counts[s.patient_id] += 1
        per_set[name] = {
            "images": len(subset),
            "patients": len(counts),
            "patients_with_2plus": sum(1 for c in counts.values() if c >= 2),
        }
    return {"images": len(samples), "patients": len({s.patient_id for s in samples}), "sets": per_set}


def samples_to_dicts(samples: Sequence[Sample]) -> list[dict]:
    """Samples as plain dicts (for JSON reports)."""
    return [asdict(s) for s in samples]

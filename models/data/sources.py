"""A set as it was downloaded, made a manifest: what ``cxr-reid data SOURCE ROOT`` runs.

The public sets carry identity in their own metadata (:mod:`~models.data.public_sets` reads it). This
room finds that metadata under the folder a user downloaded to, finds each image however the archives
were unpacked, keeps the views the model is for (frontal, by each set's own convention: the model
never learnt lateral-to-frontal matching), and counts every row it leaves out by reason, so a user
sees what was dropped and why. A folder of DICOM files reads by PatientID through the one DICOM
walker (:func:`~models.data.manifests.walk_dicom_folder`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.data.manifests import NO_PATIENT_ID, ManifestError, Sample, walk_dicom_folder
from models.data.public_sets import read_chestxray14, read_chexpert, read_mimic_cxr, read_padchest

#: Views kept by ``views="frontal"``: posteroanterior and anteroposterior, PadChest's AP of a patient
#: lying down (``AP_horizontal``) included.
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP_HORIZONTAL"})
#: Views read as laterals (ChestX-ray14 has none; CheXpert ``L``; MIMIC ``LATERAL``/``LL``/``RL``;
#: PadChest ``L``).
LATERAL_VIEWS = frozenset({"L", "LL", "RL", "LATERAL", "XTABLE LATERAL"})
VIEW_CHOICES = ("frontal", "all")

#: Reasons a row is left out (the keys of :attr:`SourceScan.refused`, besides the view reasons).
IMAGE_NOT_FOUND = "image file not found under ROOT"
NO_VIEW = "no view given"
LATERAL = "lateral view"


@dataclass(frozen=True)
class Source:
    """One kind of set ``cxr-reid data`` reads: its name on the command line, where it comes from,
    and how it is found under ROOT."""

    name: str
    title: str
    url: str
    metadata: tuple[str, ...]  # glob patterns of its metadata file(s), under ROOT or one folder down
    #: does a row without a view stay under ``views="frontal"``? Yes where the set gives no view for
    #: frontals (a DICOM folder often has no ViewPosition), no where a blank means "not known".
    blank_view_is_frontal: bool


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            "chestxray14",
            "NIH ChestX-ray14",
            "https://nihcc.app.box.com/v/ChestXray-NIHCC",
            ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"),
            blank_view_is_frontal=False,
        ),
        Source(
            "chexpert",
            "CheXpert",
            "https://stanfordmlgroup.github.io/competitions/chexpert/",
            ("train.csv", "valid.csv"),
            blank_view_is_frontal=True,  # Frontal/Lateral is always given; a frontal may lack AP/PA
        ),
        Source(
            "mimic-cxr-jpg",
            "MIMIC-CXR-JPG",
            "https://physionet.org/content/mimic-cxr-jpg/",
            ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"),
            blank_view_is_frontal=False,
        ),
        Source(
            "padchest",
            "PadChest",
            "https://bimcv.cipf.es/bimcv-projects/padchest/",
            (
                "PADCHEST_chest_x_ray_images_labels_160K*.csv.gz",
                "PADCHEST_chest_x_ray_images_labels_160K*.csv",
            ),
            blank_view_is_frontal=False,
        ),
        Source(
            "dicom",
            "a folder of DICOM files (identity: PatientID)",
            "",
            (),
            blank_view_is_frontal=True,
        ),
    )
}


@dataclass
class SourceScan:
    """What a scan found: the samples kept, the rows left out by reason, the metadata files read."""

    source: str
    samples: list[Sample]
    refused: Counter[str] = field(default_factory=Counter)
    metadata: list[Path] = field(default_factory=list)
    rows: int = 0  # rows (or files) read in all


def view_refusal(view: str | None, *, blank_is_frontal: bool) -> str | None:
    """Why a row is not a frontal view (None: it is one)."""
    if view is None or not view.strip():
        return None if blank_is_frontal else NO_VIEW
    kind = view.strip().upper()
    if kind in FRONTAL_VIEWS:
        return None
    if kind in LATERAL_VIEWS:
        return LATERAL
    return f"not a frontal view ({view.strip()})"


def scan_source(
    source: str,
    root: str | os.PathLike,
    *,
    metadata: str | os.PathLike | None = None,
    views: str = "frontal",
    progress: bool = False,
) -> SourceScan:
    """Read the set ``source`` downloaded under ``root`` (its metadata found there unless ``metadata``
    names the file), keep ``views`` ("frontal" or "all") whose image files are there; raises
    :class:`ManifestError` saying what was expected where nothing usable is found."""
    if source not in SOURCES:
        raise ManifestError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if views not in VIEW_CHOICES:
        raise ManifestError(f"views must be one of {VIEW_CHOICES}, got {views!r}")
    base = Path(root)
    if not base.is_dir():
        raise ManifestError(f"no such folder: {base} (ROOT: the folder the set was downloaded to)")
    spec = SOURCES[source]
    if source == "dicom":
        if metadata is not None:
            raise ManifestError("a DICOM folder has no metadata file: its identity is each file's PatientID")
        samples, refused = walk_dicom_folder(base, progress=progress)
        scan = SourceScan(source, samples, refused, rows=len(samples) + sum(refused.values()))
    else:
        files = [Path(metadata)] if metadata is not None else find_metadata(spec, base)
        for file in files:
            if not file.is_file():
                raise ManifestError(f"no such metadata file: {file}")
        samples = [sample for file in files for sample in _READERS[source](file, base)]
        scan = SourceScan(source, samples, metadata=files, rows=len(samples))
        scan.samples = [s for s in samples if s.patient_id.split(":", 1)[1].strip()]
        if len(scan.samples) < len(samples):
            scan.refused[NO_PATIENT_ID] += len(samples) - len(scan.samples)
        _locate_images(scan, base, progress=progress)
    if views == "frontal":
        kept = []
        for sample in scan.samples:
            reason = view_refusal(sample.view, blank_is_frontal=spec.blank_view_is_frontal)
            if reason is None:
                kept.append(sample)
            else:
                scan.refused[reason] += 1
        scan.samples = kept
    if not scan.samples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in scan.refused.most_common())
        raise ManifestError(f"{base}: no {spec.title} image left to write ({reasons or 'no rows'})")
    return scan


def find_metadata(spec: Source, root: Path) -> list[Path]:
    """The set's metadata file(s) under ``root`` or one folder down (an archive unpacked into its own
    folder, e.g. ``CheXpert-v1.0-small/train.csv``); for sets with alternatives (ChestX-ray14's 2020
    and original CSV) the first pattern found wins, except CheXpert, whose train and valid both count."""
    found: list[Path] = []
    for pattern in spec.metadata:
        matches = sorted(root.glob(pattern)) or sorted(root.glob(f"*/{pattern}"))
        if matches:
            found.append(matches[0])
            if spec.name != "chexpert":
                break
    if not found:
        names = " or ".join(spec.metadata)
        raise ManifestError(
            f"{root}: no {names} here or one folder down; is ROOT the folder {spec.title} was downloaded "
            f"to ({spec.url})? Give the file with --metadata if it was renamed"
        )
    return found


def _read_chexpert(csv_path: Path, root: Path) -> list[Sample]:
    """CheXpert's ``Path`` column starts with the archive's folder (``CheXpert-v1.0-small/train/...``):
    it is relative to the folder that holds that folder, whichever of ROOT and the CSV's is given."""
    base = csv_path.resolve().parent.parent
    samples = read_chexpert(csv_path, base)
    if samples and not os.path.isfile(samples[0].path):
        alternative = read_chexpert(csv_path, csv_path.resolve().parent)
        if os.path.isfile(alternative[0].path):
            return alternative
    return samples


_READERS: dict[str, Callable[[Path, Path], list[Sample]]] = {
    "chestxray14": lambda csv_path, root: read_chestxray14(csv_path, root / "images"),
    "chexpert": _read_chexpert,
    "mimic-cxr-jpg": lambda csv_path, root: read_mimic_cxr(
        csv_path, root if (root / "files").is_dir() else csv_path.resolve().parent
    ),
    "padchest": read_padchest,
}

#: Sets whose images are named uniquely by file name and spread over archive folders (ChestX-ray14's
#: ``images_001/images/``, PadChest's ``0/``..``54/``): an image is looked up by name under ROOT.
_FOUND_BY_NAME = frozenset({"chestxray14", "padchest"})


def _locate_images(scan: SourceScan, root: Path, *, progress: bool) -> None:
    """Point each sample at its file, or leave it out as not found; a set none of whose images is
    there is an error naming where the first was looked for."""
    from tqdm.auto import tqdm

    by_name: dict[str, str] = {}
    if scan.source in _FOUND_BY_NAME:
        by_name = _index_files(root, progress=progress)
    kept = []
    for sample in tqdm(scan.samples, desc="checking images", unit="image", disable=not progress):
        if scan.source in _FOUND_BY_NAME:
            found = by_name.get(Path(sample.path).name)
            if found is None:
                scan.refused[IMAGE_NOT_FOUND] += 1
                continue
            sample.path = found
        elif not os.path.isfile(sample.path):
            scan.refused[IMAGE_NOT_FOUND] += 1
            continue
        kept.append(sample)
    if scan.samples and not kept:
        raise ManifestError(
            f"none of the {len(scan.samples):,} images named in {scan.metadata[0].name} is under {root} "
            f"(the first: {scan.samples[0].path}); unpack the image archives there"
        )
    scan.samples = kept


def _index_files(root: Path, *, progress: bool) -> dict[str, str]:
    """Every image file under ``root`` by file name (hidden folders skipped; the first of a name wins)."""
    from tqdm.auto import tqdm

    found: dict[str, str] = {}
    with tqdm(desc=f"indexing {root.name}", unit="file", disable=not progress) as bar:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.lower().endswith((".png", ".jpg", ".jpeg")) and name not in found:
                    found[name] = os.path.abspath(os.path.join(folder, name))
            bar.update(len(files))
    return found

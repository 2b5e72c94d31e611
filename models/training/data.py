"""Identity-labelled image sets: manifests, public-set readers, splits, augmentation, sampling.

Manifest contract (DESIGN.md): a CSV with at least ``path,patient_id``; ``path`` is relative to
the CSV's folder; optional ``view,sex,age,offset_days,follow_up,split`` (``offset_days``: days since
the patient's first study; ``follow_up``: a visit number, for sets that number visits instead).
Several manifests combine into one training set with patient ids kept apart per set
(``<set>:<patient_id>``), because ``p1`` of one hospital is not ``p1`` of another.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.imaging.dicom import read_dicom
from models.imaging.preprocess import ImageDecodeError, PreprocessConfig, load_for_model

log = logging.getLogger(__name__)

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


def _optional_float(value: str | None) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        return float(value)
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
                    age=_optional_float(row.get("age")),
                    offset_days=None if visits_in_offset else _optional_float(row.get("offset_days")),
                    follow_up=_optional_float(
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
    """Every DICOM file under ``folder`` (recursively, hidden files skipped) as a sample filed under
    its PatientID, namespaced by the folder's name like a manifest's set; returns the samples and
    the number of files left out (not DICOM, or no PatientID). Only the header is read."""
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"no such folder: {root}")
    name = root.resolve().name
    samples, skipped = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            ds = read_dicom(path, header_only=True, specific_tags=["PatientID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        patient = str(ds.get("PatientID", "") or "").strip()
        if not patient:
            skipped += 1
            continue
        samples.append(Sample(path=str(path.resolve()), patient_id=f"{name}:{patient}", dataset=name))
    if not samples:
        raise ManifestError(f"{root}: no DICOM file with a PatientID under this folder")
    return samples, skipped


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


# --- readers for the metadata of the large public sets users bring -----------------------------


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
                    age=_optional_float(age),
                    follow_up=_optional_float(row.get("Follow-up #")),
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
                    age=_optional_float(row.get("Age")),
                    offset_days=_optional_float(match.group(2).removeprefix("study")),
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


# --- patient-disjoint splits ----------------------------------------------------------------------


def split_of(patient_id: str, *, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split a patient belongs to, from a hash: stable across runs, machines and set sizes."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(
    samples: Sequence[Sample],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    keep_existing: bool = True,
) -> list[Sample]:
    """Give every sample its patient's split; a manifest's own ``split`` column wins if asked."""
    for sample in samples:
        if keep_existing and sample.split:
            continue
        sample.split = split_of(
            sample.patient_id, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    by_patient: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        by_patient[sample.patient_id].add(sample.split or "")
    mixed = [p for p, splits in by_patient.items() if len(splits) > 1]
    if mixed:
        raise ManifestError(
            f"patients in more than one split (leak): {mixed[:5]}{'...' if len(mixed) > 5 else ''}"
        )
    return list(samples)


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


# --- image cache ------------------------------------------------------------------------------------


def load_images(
    samples: Sequence[Sample],
    config: PreprocessConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Decode and prepare every image once, as uint8 (N, size, size), cached on disk by content key.

    Training and evaluation read the same prepared pixels, so each epoch costs no decoding.
    """
    key = hashlib.sha256(repr((config.to_dict(), [s.path for s in samples])).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"images-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        cached = np.load(cache_file)
        if cached.shape[0] == len(samples):
            return cached

    def load(sample: Sample) -> np.ndarray:
        try:
            return np.round(load_for_model(sample.path, config) * 255).astype(np.uint8)
        except (ImageDecodeError, OSError) as exc:
            raise ManifestError(f"cannot read {sample.path}: {exc}") from exc

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        arrays = list(
            tqdm(
                pool.map(load, samples), total=len(samples), desc="decode", disable=not progress, leave=False
            )
        )
    stacked = np.stack(arrays) if arrays else np.zeros((0, config.size, config.size), np.uint8)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")  # DDP ranks may write at once
        np.save(tmp, stacked)
        os.replace(tmp, cache_file)
    return stacked


# --- label cleaning ---------------------------------------------------------------------------------

#: Pixel correlation (32 x 32, z-scored) at which two prepared images count as the same picture. At
#: 0.985 covid-collection's figure re-uses (one radiograph published under two case ids) are found and
#: no pair of different children in kermany-paediatric is (0.97 already merges look-alikes there).
NEAR_DUPLICATE_CORRELATION = 0.985


def near_duplicate_pairs(
    images: np.ndarray, *, threshold: float = NEAR_DUPLICATE_CORRELATION, side: int = 32
) -> np.ndarray:
    """(M, 2) index pairs i < j of prepared uint8 images (N, H, W) that are the same picture up to
    rescaling, re-encoding and small intensity changes; blockwise, so memory stays O(N * block)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    small = F.adaptive_avg_pool2d(x, (side, side)).reshape(len(images), -1)
    small = small - small.mean(1, keepdim=True)
    small = small / small.norm(dim=1, keepdim=True).clamp(min=1e-6)
    pairs = []
    block = 1024
    for start in range(0, len(small), block):
        scores = small[start : start + block] @ small.T
        i, j = torch.nonzero(scores >= threshold, as_tuple=True)
        i = i + start
        keep = i < j
        pairs.append(torch.stack([i[keep], j[keep]], 1))
    return torch.cat(pairs).numpy() if pairs else np.zeros((0, 2), np.int64)


def merge_duplicate_identities(samples: Sequence[Sample], images: np.ndarray) -> dict[str, str]:
    """Patient ids of one set that share a near-identical image are one patient (a figure published
    under two case ids). Returns ``{old id: merged id}`` (the smallest id of each group) for the ids
    that change; the caller applies it."""
    parent: dict[str, str] = {}

    def root(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    for i, j in near_duplicate_pairs(images):
        a, b = samples[i], samples[j]
        if a.dataset != b.dataset or a.patient_id == b.patient_id:
            continue
        ra, rb = root(a.patient_id), root(b.patient_id)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {p: root(p) for p in parent if root(p) != p}


# --- augmentation ---------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Radiograph augmentation; no horizontal flip by default (anatomy is asymmetric)."""

    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random-resized-crop area fraction
    brightness: float = 0.15
    contrast: float = 0.25
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_prob: float = 0.2
    noise_std: float = 0.03
    erase_prob: float = 0.5  # random erasing: defeats burnt-in letters, arrows and borders
    erase_area: tuple[float, float] = (0.02, 0.15)
    hflip_prob: float = 0.0
    # Domain generalisation: what differs between hospitals, simulated so no site's look is learnt.
    lowres_prob: float = 0.0  # down-sample to a random side in [lowres_min, size] px and back up
    lowres_min: int = 64
    equalize_prob: float = 0.0  # histogram equalisation (another site's contrast rendering)
    overlay_prob: float = 0.0  # burnt-in marks: text, an arrow, a border or a ruler

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch (N, 1, H, W) in [0, 1] with per-image random parameters; returns [0, 1]."""
    n, _, height, width = batch.shape
    device = batch.device
    # Geometry: one affine warp combines rotation, scale, shift and a random-resized crop.
    angle = _uniform(n, -config.rotation_deg, config.rotation_deg, generator, device) * math.pi / 180
    crop = _uniform(n, *config.crop_scale, generator, device).sqrt()
    zoom = _uniform(n, *config.scale, generator, device)
    extent = crop / zoom  # fraction of the image the output window covers
    max_shift = (1 - crop).clamp(min=0) + config.shift
    tx = _uniform(n, -1, 1, generator, device) * max_shift
    ty = _uniform(n, -1, 1, generator, device) * max_shift
    cos, sin = torch.cos(angle) * extent, torch.sin(angle) * extent
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if config.hflip_prob > 0:
        flip = torch.rand(n, generator=generator, device=device) < config.hflip_prob
        theta[flip, :, 0] *= -1
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Intensity: gamma, contrast around the mean, brightness.
    gamma = torch.exp(_uniform(n, math.log(config.gamma[0]), math.log(config.gamma[1]), generator, device))
    out = out.clamp(0, 1) ** gamma.view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, device).view(n, 1, 1, 1)
    brightness = _uniform(n, -config.brightness, config.brightness, generator, device).view(n, 1, 1, 1)
    out = (out - mean) * contrast + mean + brightness

    if config.blur_prob > 0:
        blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        pick = (torch.rand(n, generator=generator, device=device) < config.blur_prob).view(n, 1, 1, 1)
        out = torch.where(pick, blurred, out)
    if config.noise_std > 0:
        sigma = _uniform(n, 0, config.noise_std, generator, device).view(n, 1, 1, 1)
        out = out + torch.randn(out.shape, generator=generator, device=device) * sigma
    if config.lowres_prob > 0:
        out = _degrade_resolution(out, config, generator)
    if config.equalize_prob > 0:
        pick = torch.rand(n, generator=generator, device=device) < config.equalize_prob
        out = torch.where(pick.view(n, 1, 1, 1), equalize_batch(out.clamp(0, 1)), out)
    if config.overlay_prob > 0:
        out = _overlay_marks(out, config.overlay_prob, generator)
    if config.erase_prob > 0:
        out = _random_erase(out, config, generator)
    return out.clamp(0, 1)


def _degrade_resolution(
    batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Down-sample picked images to a random side (area) and back up (bilinear): a 64 px archive,
    a thumbnail-sized export or a soft detector look like this at the model's input size."""
    n, _, height, width = batch.shape
    device = batch.device
    low = min(config.lowres_min, height)
    picks = torch.rand(n, generator=generator, device=device) < config.lowres_prob
    sides = torch.randint(low, height + 1, (n,), generator=generator, device=device)
    out = batch.clone()
    side_of = sides.tolist()  # one device sync, not one per picked image
    for i in torch.nonzero(picks).flatten().tolist():
        side = side_of[i]
        if side >= height:
            continue
        small = F.interpolate(batch[i : i + 1], size=(side, max(1, side * width // height)), mode="area")
        out[i : i + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return out


def equalize_batch(batch: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation of each image of (N, 1, H, W) in [0, 1] over its non-zero pixels: the
    same map as :func:`models.imaging.preprocess.equalize_histogram`, batched."""
    n = batch.shape[0]
    flat = batch.reshape(n, -1)
    inside = flat > 0
    position = flat * bins
    index = position.long().clamp(max=bins - 1)
    offsets = torch.arange(n, device=batch.device).unsqueeze(1) * bins
    counts = torch.bincount((offsets + index)[inside], minlength=n * bins).view(n, bins).float()
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    below = share.cumsum(1) - share
    mapped = below.gather(1, index) + (position - index) * share.gather(1, index)
    return torch.where(inside, mapped, torch.zeros_like(flat)).view_as(batch)


#: uniform draws one burnt-in mark may use (a border uses the most: 8 with its colour)
_OVERLAY_DRAWS = 10


def _overlay_marks(batch: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Burn one mark into each picked image, white or black: a block of glyph-like text in a corner
    band, an arrow, a border on one to four sides, or a ruler with ticks along an edge. Sites and
    paper figures carry such marks; a model must not learn them as identity."""
    n, _, height, width = batch.shape
    device = batch.device

    ys = torch.linspace(0, 1, height, device=device).view(height, 1)
    xs = torch.linspace(0, 1, width, device=device).view(1, width)
    out = batch.clone()
    picks = torch.nonzero(torch.rand(n, generator=generator, device=device) < prob).flatten().tolist()
    # Every scalar a mark needs is drawn in one call and read on the host: one device sync per batch,
    # not one per draw (on a GPU, per-draw syncs made this loop the slowest part of a training step).
    draws = torch.rand(len(picks), _OVERLAY_DRAWS, generator=generator, device=device).tolist()
    for i, row in zip(picks, draws, strict=True):
        stream = iter(row)

        def uniform(low: float, high: float, stream: Iterator[float] = stream) -> float:
            return next(stream) * (high - low) + low

        kind = min(3, int(uniform(0, 4)))
        if kind == 0:  # text: a random glyph grid in a box near an edge
            rows, chars = 5, int(uniform(2, 9))
            glyphs = (torch.rand(1, 1, rows, 4 * chars, generator=generator, device=device) < 0.45).float()
            glyphs[..., 3::4] = 0  # a blank column between characters
            box_h = max(3, int(height * uniform(0.04, 0.09)))
            box_w = min(width - 1, max(4, int(box_h * chars * 0.8)))
            top = int(uniform(0, height - box_h)) if uniform(0, 1) < 0.3 else int(uniform(0, 0.12) * height)
            left = int(uniform(0, width - box_w))
            mask = torch.zeros(height, width, dtype=torch.bool, device=device)
            patch = F.interpolate(glyphs, size=(box_h, box_w), mode="nearest")[0, 0] > 0.5
            mask[top : top + box_h, left : left + box_w] = patch
        elif kind == 1:  # arrow: a shaft and a head, 10-30% of the image long
            x0, y0 = uniform(0.1, 0.9), uniform(0.1, 0.9)
            angle, length = uniform(0, 2 * math.pi), uniform(0.1, 0.3)
            dx, dy = math.cos(angle) * length, math.sin(angle) * length
            t = (((xs - x0) * dx + (ys - y0) * dy) / (length**2)).clamp(0, 1)
            distance = torch.sqrt((xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2)
            head = torch.sqrt((xs - x0 - dx) ** 2 + (ys - y0 - dy) ** 2)
            mask = (distance < uniform(0.004, 0.012)) | (head < length * 0.18) & (t > 0.75)
        elif kind == 2:  # border on 1-4 sides
            band = uniform(0.02, 0.08)
            sides = [uniform(0, 1) < 0.6 for _ in range(4)]
            sides[min(3, int(uniform(0, 4)))] = True
            mask = torch.zeros(height, width, dtype=torch.bool, device=device)
            for side, edge in zip(sides, (ys < band, ys > 1 - band, xs < band, xs > 1 - band), strict=True):
                if side:
                    mask = mask | edge
        else:  # ruler: a line along an edge with ticks every few per cent
            position, spacing = uniform(0.03, 0.12), uniform(0.02, 0.05)
            tick = (torch.remainder(xs, spacing) < spacing * 0.2) & (ys > position) & (ys < position + 0.025)
            line = (ys - position).abs() < 0.004
            mask = tick | line
            if uniform(0, 1) < 0.5:
                mask = mask.flip(0)
        value = 1.0 if uniform(0, 1) < 0.75 else 0.0
        out[i, 0] = torch.where(mask, torch.full_like(out[i, 0], value), out[i, 0])
    return out


def _random_erase(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Blank one random rectangle per picked image (Zhong et al. 2017) with its mean intensity."""
    n, _, height, width = batch.shape
    device = batch.device
    pick = torch.rand(n, generator=generator, device=device) < config.erase_prob
    area = _uniform(n, *config.erase_area, generator, device)
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), generator, device))
    h = (area * aspect).sqrt().clamp(max=1.0)
    w = (area / aspect).sqrt().clamp(max=1.0)
    y0 = torch.rand(n, generator=generator, device=device) * (1 - h)
    x0 = torch.rand(n, generator=generator, device=device) * (1 - w)
    ys = torch.linspace(0, 1, height, device=device).view(1, height, 1)
    xs = torch.linspace(0, 1, width, device=device).view(1, 1, width)
    inside = (
        (ys >= y0.view(n, 1, 1))
        & (ys <= (y0 + h).view(n, 1, 1))
        & (xs >= x0.view(n, 1, 1))
        & (xs <= (x0 + w).view(n, 1, 1))
        & pick.view(n, 1, 1)
    ).unsqueeze(1)
    fill = batch.mean(dim=(1, 2, 3), keepdim=True).expand_as(batch)
    return torch.where(inside, fill, batch)


# --- P x K sampling ---------------------------------------------------------------------------------


class PKSampler:
    """Batches of P patients x K images, so every batch holds genuine pairs.

    Patients with fewer than K images are drawn with replacement (a one-image patient gives K
    views of one image: an instance-discrimination positive, and a class/negative for the rest).
    Each epoch visits every patient once, or, with ``batches_per_epoch``, draws that many batches
    from cycled permutations of the patients (so epochs of sets of different sizes have the same
    length and one schedule fits them all). With ``world_size > 1`` (torchrun DDP) every rank
    draws the same epoch plan from the shared seed and keeps every ``world_size``-th batch.

    ``groups`` (one per image, e.g. its data set) balances the groups instead: an epoch keeps its
    length (one draw per patient) but gives every group an equal share of the draws, cycling
    through a small group's patients several times and through a large one's only partly (so a
    small group's patient can fall twice into one batch: more positives, no harm). Without it a set
    with most of the patients fills most of the batches.
    """

    def __init__(
        self,
        labels: Sequence[int],
        patients_per_batch: int,
        images_per_patient: int,
        *,
        groups: Sequence[str] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 0,
    ) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.by_label[int(label)].append(index)
        self.labels = sorted(self.by_label)
        self.labels_by_group: dict[str, list[int]] = {}
        if groups is not None:
            if len(groups) != len(labels):
                raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
            group_of = {int(label): str(group) for label, group in zip(labels, groups, strict=True)}
            for label in self.labels:
                self.labels_by_group.setdefault(group_of[label], []).append(label)
        self.p, self.k = patients_per_batch, images_per_patient
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def _epoch_order(self, rng: np.random.Generator, draws: int) -> np.ndarray:
        """``draws`` patients in order: cycled permutations, or equal shares per group."""
        if len(self.labels_by_group) < 2:
            return _cycled_permutations(self.labels, draws, rng)
        share = -(-draws // len(self.labels_by_group))
        chosen = [
            _cycled_permutations(self.labels_by_group[group], share, rng)
            for group in sorted(self.labels_by_group)
        ]
        return rng.permutation(np.concatenate(chosen))[:draws]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank: ``batches_per_epoch`` when set, else one draw per patient."""
        if self.batches_per_epoch > 0:
            return max(1, self.batches_per_epoch // self.world_size)
        return len(self.labels) // self.p // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        n_batches = len(self)
        order = self._epoch_order(rng, n_batches * self.world_size * self.p)
        for batch_index in range(n_batches):
            global_index = batch_index * self.world_size + self.rank
            chosen = order[global_index * self.p : (global_index + 1) * self.p]
            batch: list[int] = []
            for label in chosen:
                pool = self.by_label[int(label)]
                replace = len(pool) < self.k
                batch.extend(int(i) for i in rng.choice(pool, size=self.k, replace=replace))
            yield batch


def _cycled_permutations(members: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws from ``members``: whole permutations, the last one cut short."""
    cycles = max(1, -(-count // max(1, len(members))))
    return np.concatenate([rng.permutation(members) for _ in range(cycles)])[:count]


def samples_to_dicts(samples: Sequence[Sample]) -> list[dict]:
    return [asdict(s) for s in samples]

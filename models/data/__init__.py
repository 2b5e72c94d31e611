"""Identity-labelled image sets, one room per job:

- :mod:`~models.data.manifests`: the manifest CSV contract, :class:`Sample`,
  :class:`ManifestError`, reading one or several manifests or a DICOM folder, writing one, counts.
- :mod:`~models.data.public_sets`: readers of the public CXR sets' own metadata
  (ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest).
- :mod:`~models.data.sources`: a set as downloaded (or a DICOM folder) made a manifest's samples:
  metadata found, images located, frontal views kept, every row left out counted by reason.
- :mod:`~models.data.splits`: patient-disjoint train / val / test splits from a hash.
- :mod:`~models.data.loading`: decoding and preparing a sample list once, cached on disk.
- :mod:`~models.data.labels`: label cleaning (near-duplicate images under two patient ids).
- :mod:`~models.data.augmentation`: batch augmentation, domain generalisation included.
- :mod:`~models.data.sampler`: the P x K batch sampler.

The names used outside the package are re-exported here, so ``from models.data import X``
is the way in for the CLI, the service, evaluation, training, benches and tests; each is defined
once, in its room.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from models.data.manifests import (
    FOLLOW_UP_NUMBER_SETS,
    SPLITS,
    ManifestError,
    Sample,
    check_files_exist,
    dataset_name,
    read_dicom_folder,
    read_manifest,
    read_manifests,
    samples_to_dicts,
    summarise,
    walk_dicom_folder,
    write_manifest,
)
from models.data.public_sets import read_chestxray14, read_chexpert, read_mimic_cxr, read_padchest
from models.data.sampler import PKSampler
from models.data.sources import SOURCES, VIEW_CHOICES, SourceScan, scan_source
from models.data.splits import SPLIT_CHOICES, assign_splits, split_of

if TYPE_CHECKING:
    from models.data.augmentation import AugmentConfig, augment, equalize_batch
    from models.data.labels import (
        NEAR_DUPLICATE_CORRELATION,
        merge_duplicate_identities,
        near_duplicate_pairs,
    )
    from models.data.loading import load_images

# The rooms that need torch are imported on first use, so that reading manifests (and building the
# CLI's parser: ``cxr-reid --help``) does not pay torch's import.
_NEEDS_TORCH = {
    "AugmentConfig": "augmentation",
    "augment": "augmentation",
    "equalize_batch": "augmentation",
    "NEAR_DUPLICATE_CORRELATION": "labels",
    "merge_duplicate_identities": "labels",
    "near_duplicate_pairs": "labels",
    "load_images": "loading",
}


def __getattr__(name: str) -> Any:
    if name in _NEEDS_TORCH:
        return getattr(import_module(f"models.data.{_NEEDS_TORCH[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FOLLOW_UP_NUMBER_SETS",
    "NEAR_DUPLICATE_CORRELATION",
    "SOURCES",
    "SPLITS",
    "SPLIT_CHOICES",
    "VIEW_CHOICES",
    "AugmentConfig",
    "ManifestError",
    "PKSampler",
    "Sample",
    "SourceScan",
    "assign_splits",
    "augment",
    "check_files_exist",
    "dataset_name",
    "equalize_batch",
    "load_images",
    "merge_duplicate_identities",
    "near_duplicate_pairs",
    "read_chestxray14",
    "read_chexpert",
    "read_dicom_folder",
    "read_manifest",
    "read_manifests",
    "read_mimic_cxr",
    "read_padchest",
    "samples_to_dicts",
    "scan_source",
    "split_of",
    "summarise",
    "walk_dicom_folder",
    "write_manifest",
]

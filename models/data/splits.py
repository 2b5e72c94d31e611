"""Patient-disjoint splits: a patient's split comes from a hash of its id, so it is stable across
runs, machines and set sizes, and no patient's images ever fall into two splits (a leak).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from models.data.manifests import ManifestError, Sample

# Which images an evaluation reads: "auto" is the test patients of a set the model trained on and every
# image of a set it never saw; "all" every image; the others one split of the hash.
SPLIT_CHOICES = ("auto", "all", "train", "val", "test")


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

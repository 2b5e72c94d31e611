"""Label cleaning: near-duplicate images (one picture filed under two patient ids, e.g. a figure
published twice) are found by pixel correlation, and their ids merged into one patient before
splitting and training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.data.manifests import Sample

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

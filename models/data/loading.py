"""Loading: every image of a sample list decoded and prepared once (a pool of decode workers),
cached on disk by content key, so training and evaluation read the same pixels and an epoch costs
no decoding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from models.data.manifests import ManifestError, Sample
from models.imaging.preprocess import ImageDecodeError, PreprocessConfig, load_for_model


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

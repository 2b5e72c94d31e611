"""Candidate defences for an "anonymised" release, and their cost in image fidelity (``cxr-reid risk``).

A defence is applied to a released image's decoded pixels before the model's own preparation (the
real decode and prepare path), so the risk report measures linkability on what a recipient would
get. Its cost is measured on the same images: PSNR and a global (one-window) SSIM of the defended
model input against the original model input. "crop" approximates cropping to the lung fields by a
central box (a fixed fraction of each side); its fidelity compares the original with the image
blacked out outside that box, i.e. what a recipient no longer sees.

Here because it is a self-contained piece of image processing (numpy and PIL) with its own tests;
``app/analysis/risk.py`` chooses the defences (``--defences``) and links what this embeds.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from app.service.decoding import decode_source
from app.service.enrollment import decode_workers
from app.service.errors import InvalidInputError
from models.imaging.preprocess import Radiograph
from models.net.embedder import Embedder

log = logging.getLogger(__name__)


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """The (n, n) matrix of a 1-D Gaussian blur with reflected edges (one matmul per axis: fast for
    the decoded sizes the model asks for, and numpy only)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.zeros((n, n), dtype=np.float32)
    rows = np.arange(n)
    for offset, weight in zip(range(-radius, radius + 1), taps, strict=True):
        cols = rows + offset
        cols = np.where(cols < 0, -cols - 1, cols)
        cols = np.where(cols >= n, 2 * n - cols - 1, cols)
        np.add.at(matrix, (rows, np.clip(cols, 0, n - 1)), weight)
    return matrix


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float image, ``sigma`` in pixels."""
    if sigma <= 0:
        return pixels.astype(np.float32, copy=True)
    p = np.asarray(pixels, dtype=np.float32)
    return _gaussian_matrix(p.shape[0], sigma) @ p @ _gaussian_matrix(p.shape[1], sigma).T


@dataclass(frozen=True)
class Defence:
    """One candidate defence at one strength; ``apply`` gives (what the model sees, what fidelity is
    measured on) from a decoded radiograph."""

    name: str
    family: str
    strength: float
    label: str

    def apply(self, image: Radiograph, seed: int) -> tuple[Radiograph, Radiograph]:
        pixels = np.asarray(image.pixels, dtype=np.float32)
        h, w = pixels.shape[:2]
        if self.family == "blur":
            out = replace(image, pixels=gaussian_blur(pixels, self.strength * max(h, w)))
            return out, out
        if self.family == "noise":
            lo, hi = np.percentile(pixels, [1, 99])
            rng = np.random.default_rng(seed)
            noise = rng.standard_normal(pixels.shape).astype(np.float32) * np.float32(
                self.strength * max(float(hi - lo), 1e-6)
            )
            out = replace(image, pixels=pixels + noise)
            return out, out
        if self.family == "lowres":
            side = int(self.strength)
            if max(h, w) <= side:
                return image, image
            scale = side / max(h, w)
            small = Image.fromarray(pixels, mode="F").resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX
            )
            # the released file is small; the stored geometry stays, so the model letterboxes it alike
            out = replace(image, pixels=np.asarray(small, dtype=np.float32), original_shape=image.shape)
            return out, out
        if self.family == "crop":
            keep_h, keep_w = max(1, round(h * self.strength)), max(1, round(w * self.strength))
            top, left = (h - keep_h) // 2, (w - keep_w) // 2
            box = (slice(top, top + keep_h), slice(left, left + keep_w))
            cropped = replace(image, pixels=np.ascontiguousarray(pixels[box]), original_shape=None)
            masked = np.full_like(pixels, float(pixels.min()))
            masked[box] = pixels[box]
            return cropped, replace(image, pixels=masked)
        raise ValueError(f"unknown defence family {self.family!r}")  # pragma: no cover


def defence_catalogue(model_side: int) -> dict[str, Defence]:
    """Every defence at its strengths, by name (``model_side``: the model's input side, for "lowres")."""
    half, quarter = max(8, model_side // 2), max(8, model_side // 4)
    items = [
        Defence("blur-1", "blur", 0.01, "Gaussian blur, sigma 1% of the image side"),
        Defence("blur-2", "blur", 0.02, "Gaussian blur, sigma 2% of the image side"),
        Defence("noise-5", "noise", 0.05, "Gaussian noise, sd 5% of the grey range (1st-99th centile)"),
        Defence("noise-15", "noise", 0.15, "Gaussian noise, sd 15% of the grey range (1st-99th centile)"),
        Defence("lowres-half", "lowres", half, f"resolution cut to {half} px on the long side"),
        Defence("lowres-quarter", "lowres", quarter, f"resolution cut to {quarter} px on the long side"),
        Defence("crop-75", "crop", 0.75, "crop to the lung fields: the central 75% of each side"),
        Defence("crop-55", "crop", 0.55, "crop to the lung fields: the central 55% of each side"),
    ]
    return {d.name: d for d in items}


DEFENCE_FAMILIES = ("blur", "noise", "lowres", "crop")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two model inputs in [0, 1]; inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def global_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM over the whole image as one window (Wang et al. 2004 constants, data range 1): a cheap,
    numpy-only fidelity figure; the usual windowed SSIM is lower on local damage."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    c1, c2 = 0.01**2, 0.03**2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = float(np.mean((x - mx) * (y - my)))
    return float(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


@dataclass
class DefendedSet:
    """The released images' embeddings under one defence, and its fidelity per image."""

    defence: Defence
    vectors: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray


def embed_defended(
    embedder: Embedder,
    paths: Sequence[Path],
    usable: np.ndarray,
    defences: Sequence[Defence],
    *,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
) -> list[DefendedSet]:
    """Decode every usable released image once, apply each defence to its decoded pixels, prepare
    and embed the result as the service would (``decode_source``, ``prepare``, ``embed_prepared``)."""
    n, d = len(paths), len(defences)
    vectors = np.zeros((d, n, embedder.dim), dtype=np.float32)
    psnrs = np.full((d, n), np.nan)
    ssims = np.full((d, n), np.nan)
    config = embedder.preprocess_config

    def work(i: int) -> list[tuple[np.ndarray, float, float]] | None:
        try:
            data = Path(paths[i]).read_bytes()
            radiograph = decode_source(data, max_pixels=max_pixels, name="the file", config=config)
            original = embedder.prepare(radiograph)
            seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
            out = []
            for k, defence in enumerate(defences):
                for_model, for_fidelity = defence.apply(radiograph, seed + k)
                shown = embedder.prepare(for_fidelity)
                out.append((embedder.prepare(for_model), psnr(original, shown), global_ssim(original, shown)))
            return out
        except (OSError, InvalidInputError, ValueError) as exc:
            log.warning("%s: left out of the defences: %s", paths[i], exc)
            return None

    todo = [i for i in range(n) if usable[i]]
    workers = decode_workers()
    bar = tqdm(total=len(todo), desc="defences", unit="img", disable=not progress or not d)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="risk-defence") as pool:
        for start in range(0, len(todo), batch_size * workers):
            chunk = todo[start : start + batch_size * workers]
            results = [(i, r) for i, r in zip(chunk, pool.map(work, chunk), strict=True) if r is not None]
            for k in range(d):
                for part in range(0, len(results), batch_size):
                    batch = results[part : part + batch_size]
                    embedded = embedder.embed_prepared(np.stack([r[k][0] for _, r in batch]))
                    for (i, r), vector in zip(batch, embedded, strict=True):
                        vectors[k, i], psnrs[k, i], ssims[k, i] = vector, r[k][1], r[k][2]
            bar.update(len(chunk))
    bar.close()
    return [DefendedSet(defences[k], vectors[k], psnrs[k], ssims[k]) for k in range(d)]

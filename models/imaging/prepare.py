"""Radiograph -> model input: the model's input contract (:class:`PreprocessConfig`, stored in every
checkpoint), :func:`prepare` (resize, percentile window, optional equalisation, pad or crop),
:func:`to_tensor` and :func:`load_for_model` (decode at the resolution the contract needs, then
prepare). Training, evaluation and the service all go through here, so a contract means the same
thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from models.imaging.decode import decode_image
from models.imaging.radiograph import ImageDecodeError, Radiograph, luma

#: Test-time views as (zoom, shift x, shift y), shifts in fractions of the side, in the order they are
#: added: ``PreprocessConfig(tta=k)`` averages the plain view with the first k of these. Mild crops
#: and shifts of the thorax, the geometry that differs between sites' positioning and collimation.
TTA_VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.1, 0.0, 0.0),
    (1.0, 0.04, 0.0),
    (1.0, -0.04, 0.0),
    (1.0, 0.0, 0.04),
)


#: Decoding at the needed resolution: a decoder may hand ``prepare`` an image reduced by a power of
#: two (JPEG 2000 resolution levels, JPEG DCT scaling, block means) as long as the side ``prepare``
#: scales by stays at least this many times the model's input, so its anti-aliased resize still has
#: the detail to work from. ``bench/decode.py`` compares it with full-resolution decoding: at 2, one
#: of the 561 covid-collection images (512 px, halved) moved to cosine 0.9968 (AUC -0.0001); at 3
#: images up to 767 px decode as before and a 2,000 px radiograph still decodes at a quarter.
OVERSAMPLE = 3


@dataclass(frozen=True)
class PreprocessConfig:
    """The model's input contract; saved in every checkpoint so serving matches training."""

    size: int = 128  # square model input side, pixels
    fit: str = "pad"  # "pad" (keep whole image, letterbox) or "crop" (centre crop)
    low_percentile: float = 0.5  # robust intensity window
    high_percentile: float = 99.5
    equalize: bool = False  # histogram-equalise after the window: one contrast whatever the scanner
    tta: int = 0  # test-time augmentation: extra views averaged into the embedding (see TTA_VIEWS)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        if not 0 <= self.tta <= len(TTA_VIEWS):
            raise ValueError(f"tta must be 0..{len(TTA_VIEWS)} extra views, got {self.tta!r}")
        if self.fit not in ("pad", "crop"):
            raise ValueError(f"fit must be 'pad' or 'crop', got {self.fit!r}")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError(
                "need 0 <= low_percentile < high_percentile <= 100, "
                f"got {self.low_percentile} and {self.high_percentile}"
            )

    def reduction(self, height: int, width: int) -> int:
        """The largest power-of-two factor an image of ``height`` x ``width`` may be decoded smaller by,
        keeping the side ``prepare`` scales by at least :data:`OVERSAMPLE` times the model's input."""
        side = max(height, width) if self.fit == "pad" else min(height, width)
        factor = 1
        while side // (2 * factor) >= OVERSAMPLE * self.size:
            factor *= 2
        return factor

    def to_dict(self) -> dict:
        """Plain dict for checkpoints and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so a mismatched contract never loads."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {', '.join(unknown)}")
        return cls(**d)


def load_for_model(
    source: bytes | str | os.PathLike, config: PreprocessConfig, **decode_kwargs
) -> np.ndarray:
    """Decode (at the resolution ``config`` needs) and prepare in one call: what a data loader does."""
    return prepare(decode_image(source, config=config, **decode_kwargs), config)


def prepare(image: Radiograph | np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Float32 (size, size) in [0, 1]: resize keeping aspect, percentile window, then pad or crop.

    The percentile window is measured on the resized image (before padding): the same statistics at a
    fraction of the cost of sorting a full-resolution radiograph, and robust to burned-in text and
    collimator edges. Padding is 0, i.e. the darkest value, like the air around a patient.
    """
    pixels = _array_to_grey(np.asarray(image.pixels if isinstance(image, Radiograph) else image))
    if pixels.ndim != 2 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    size = config.size
    # The letterbox follows the stored image's aspect, not that of a reduced decode (whose sides are
    # rounded): the same file gives the same geometry at any decode resolution.
    height, width = image.shape if isinstance(image, Radiograph) else pixels.shape
    scale = size / (max(height, width) if config.fit == "pad" else min(height, width))
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    if config.fit == "crop":
        new_h, new_w = max(new_h, size), max(new_w, size)

    resized = _resize(pixels, new_h, new_w)
    if not np.isfinite(resized).all():  # rare: a float array with NaN/inf handed in directly
        resized = _resize(_finite(np.asarray(pixels, dtype=np.float32)), new_h, new_w)

    lo, hi = np.percentile(resized, [config.low_percentile, config.high_percentile])
    if hi > lo:
        scaled = (resized - np.float32(lo)) * np.float32(1.0 / (hi - lo))
        np.clip(scaled, 0.0, 1.0, out=scaled)
    else:  # constant image: nothing to show, and no division by zero
        scaled = np.zeros_like(resized)
    if config.equalize:
        scaled = equalize_histogram(scaled)

    if config.fit == "pad":
        out = np.zeros((size, size), dtype=np.float32)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[top : top + new_h, left : left + new_w] = scaled
    else:
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out = np.ascontiguousarray(scaled[top : top + size, left : left + size])
    return out


def equalize_histogram(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation of a [0, 1] image over its non-zero pixels (zero stays zero: it is the
    padding and the air below the window), so sites whose scanners render contrast differently
    reach the model with one intensity distribution. Each value maps to the share of pixels below
    it, linear within its bin; ``models.data.augmentation.equalize_batch`` is the same map for
    training batches."""
    out = np.zeros_like(image, dtype=np.float32)
    inside = image > 0
    values = image[inside].astype(np.float64)
    if values.size == 0:
        return out
    position = values * bins
    index = np.minimum(position.astype(np.int64), bins - 1)
    share = np.bincount(index, minlength=bins) / values.size
    below = np.cumsum(share) - share
    out[inside] = (below[index] + (position - index) * share[index]).astype(np.float32)
    return out


def _resize(pixels: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Anti-aliased bilinear resize of a float image (Pillow 'F'; reducing_gap=3 keeps it fair and fast)."""
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    if src.shape == (new_h, new_w):
        return src.copy()
    im = Image.fromarray(src)
    out = im.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(out, dtype=np.float32).copy()


def _array_to_grey(arr: np.ndarray) -> np.ndarray:
    """Accept HxW, HxWx1 and HxWx3/4 arrays so callers can pass what they have."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = luma(arr)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    return np.asarray(arr, dtype=np.float32)


def to_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, S, S) or (S, S) in [0, 1] -> (N, 1, S, S) float32 normalised to [-1, 1] as (x - 0.5) / 0.5."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(torch.float32)
    else:
        arr = np.asarray(batch, dtype=np.float32)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C")
        t = torch.from_numpy(arr)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    elif not (t.ndim == 4 and t.shape[1] == 1):
        raise ValueError(f"expected (S, S), (N, S, S) or (N, 1, S, S), got shape {tuple(t.shape)}")
    return (t - 0.5) / 0.5


def _finite(pixels: np.ndarray) -> np.ndarray:
    """Replace NaN/inf (only float sources can hold them) so percentiles and resizing stay sane."""
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        finite = pixels[np.isfinite(pixels)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        pixels = np.nan_to_num(pixels, nan=lo, posinf=hi, neginf=lo)
    return np.ascontiguousarray(pixels, dtype=np.float32)

"""Bytes -> :class:`~models.imaging.radiograph.Radiograph`: the one decoder for every format.

DICOM goes through pydicom (uncompressed, RLE, JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000
through the pylibjpeg plugins; see :mod:`models.imaging.decode_dicom`), PNG / JPEG / TIFF through
Pillow (here). The format is taken from the file's magic bytes (:func:`sniff_format`), never from
its name. Every way an input can be unusable raises
:class:`~models.imaging.radiograph.ImageDecodeError` with a message a person can act on; the HTTP
layer turns it into a 4xx. :func:`header_pixels` reads the declared size without decoding, for the
service's decode budget.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from models.imaging.decode_dicom import decode_dicom, dicom_header_pixels
from models.imaging.dicom import looks_like_dicom
from models.imaging.radiograph import ImageDecodeError, Radiograph, finite_float32, luma, reduce_mean

if TYPE_CHECKING:
    from models.imaging.prepare import PreprocessConfig

logger = logging.getLogger(__name__)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def decode_image(
    source: bytes | str | os.PathLike,
    *,
    max_pixels: int = 50_000_000,
    check_modality: bool = True,
    config: PreprocessConfig | None = None,
) -> Radiograph:
    """Decode a DICOM, PNG, JPEG or TIFF file (path or bytes) into a :class:`Radiograph`.

    ``max_pixels`` is checked against the header before any pixel is decoded, so a small file that
    claims a huge image (a decompression bomb) is refused cheaply. ``check_modality`` refuses DICOM
    objects whose Modality is not a projection radiograph (CR, DX, DR, RG). With ``config`` the image
    may be decoded smaller, down to what that model input needs (:meth:`PreprocessConfig.reduction`);
    ``Radiograph.shape`` still gives the stored size.
    """
    data, name = _read_source(source)
    if not data:
        raise ImageDecodeError(f"{name} is empty")
    kind = sniff_format(data)
    if kind == "dicom":
        return decode_dicom(data, name, max_pixels=max_pixels, check_modality=check_modality, config=config)
    if kind in ("png", "jpeg", "tiff"):
        return _decode_pillow(data, name, kind, max_pixels=max_pixels, config=config)
    if _looks_like_text(data):
        raise ImageDecodeError(f"{name} is text, not an image (expected DICOM, PNG, JPEG or TIFF)")
    raise ImageDecodeError(f"{name} is not a recognised image format (expected DICOM, PNG, JPEG or TIFF)")


#: Peak bytes per pixel that decoding plus ``prepare`` hold, measured with tracemalloc plus Pillow's
#: own buffer on 7000 x 7000 images: grey PNG 6, 16-bit DICOM 9, RGB PNG 11.6. What a decode budget
#: reserves per pixel the header declares (``header_pixels``).
DECODE_BYTES_PER_PIXEL = 12


def header_pixels(data: bytes) -> int | None:
    """Pixels the file's header declares (all frames and samples), read without decoding them; None
    when the header cannot be read (the decoder will then refuse the file with the reason)."""
    kind = sniff_format(data)
    try:
        if kind in ("png", "jpeg", "tiff"):
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                return width * height * max(1, len(im.getbands())) * int(getattr(im, "n_frames", 1))
        if kind == "dicom":
            return dicom_header_pixels(data)
    except Exception:  # noqa: BLE001 - any unreadable header: the decoder says why
        return None
    return None


def sniff_format(data: bytes) -> str | None:
    """Name the format from magic bytes ("dicom", "png", "jpeg", "tiff") or None; names lie, bytes don't."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"  # first: a DICOM preamble may itself be a TIFF header (dual-format files)
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_TIFF_MAGICS):
        return "tiff"
    if looks_like_dicom(data):
        return "dicom"
    return None


def _read_source(source: bytes | str | os.PathLike) -> tuple[bytes, str]:
    """Bytes plus a name for messages; a path that cannot be read is bad input, not a crash."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "the image data"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.read_bytes(), f"'{path}'"
        except OSError as exc:
            raise ImageDecodeError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    raise TypeError(f"source must be bytes or a path, got {type(source).__name__}")


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def _decode_pillow(
    data: bytes, name: str, kind: str, *, max_pixels: int, config: PreprocessConfig | None
) -> Radiograph:
    pil_format = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[kind]
    try:
        im = Image.open(io.BytesIO(data), formats=[pil_format])  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name} is too large to decode safely ({exc})") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{name} is not a readable {kind.upper()} file ({exc})") from exc
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"{name} is an empty image ({width} x {height} pixels)")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"{name} declares {height} x {width} pixels, more than the limit of {max_pixels:,}"
            )
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            raise ImageDecodeError(f"{name} holds {frames} frames; a radiograph has one")
        factor = config.reduction(height, width) if config is not None else 1
        try:
            if factor > 1 and kind == "jpeg":  # DCT scaling: the decoder itself skips the detail
                im.draft(im.mode, (-(-width // factor), -(-height // factor)))
            im.load()
            factor //= round(width / im.size[0])  # what the codec reduced already
            decoded_size = im.size
            im = ImageOps.exif_transpose(im) if kind != "png" else im
            rotated = im.size != decoded_size  # EXIF orientation turned it by 90 degrees
            pixels = _pillow_to_grey(im)
            if factor > 1:
                pixels = reduce_mean(pixels, factor)
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(f"{name} is a damaged or truncated {kind.upper()} file ({exc})") from exc
    logger.debug("decoded %s %s: %dx%d as %dx%d", kind, name, width, height, *pixels.shape[::-1])
    stored = (width, height) if rotated else (height, width)
    return Radiograph(
        pixels=pixels,
        source_format=kind,
        pixel_spacing=None,
        identifiers={},
        original_shape=stored if pixels.shape != stored else None,
    )


def _pillow_to_grey(im: Image.Image) -> np.ndarray:
    """Float32 HxW grey from any Pillow mode, keeping 16-bit and float precision; alpha dropped."""
    mode = im.mode
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        pixels = np.asarray(im).astype(np.float32)
    elif mode == "1":
        pixels = np.asarray(im, dtype=np.float32)
    elif mode in ("LA", "La"):
        pixels = np.asarray(im.getchannel(0), dtype=np.float32)
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        pixels = luma(np.asarray(im))
    elif mode in ("P", "PA"):
        pixels = luma(np.asarray(im.convert("RGB")))
    else:  # CMYK, YCbCr, LAB, ...
        pixels = luma(np.asarray(im.convert("RGB")))
    if pixels.ndim != 2:
        raise ImageDecodeError(f"unexpected decoded shape {pixels.shape} for mode {mode}")
    return finite_float32(pixels)

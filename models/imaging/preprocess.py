"""File -> :class:`Radiograph` -> model input: the one place that defines what the network sees.

Training, evaluation and the service all call :func:`decode_image` and :func:`prepare`, so a model's
input contract (:class:`PreprocessConfig`, stored in its checkpoint) means the same thing everywhere.

Decoding reads DICOM through pydicom (uncompressed, RLE, JPEG baseline/extended/lossless, JPEG-LS and
JPEG 2000 through the pylibjpeg plugins) and PNG / JPEG / TIFF through Pillow. The format is taken from
the file's magic bytes, never from its name. Every way an input can be unusable raises
:class:`ImageDecodeError` with a message a person can act on; the HTTP layer turns it into a 4xx.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from models.imaging.dicom import looks_like_dicom, read_dicom

logger = logging.getLogger(__name__)

__all__ = [
    "ImageDecodeError",
    "PreprocessConfig",
    "Radiograph",
    "decode_image",
    "load_for_model",
    "prepare",
    "to_tensor",
]

#: Modalities that hold projection radiographs; anything else is refused unless check_modality=False.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})

#: DICOM attributes copied into Radiograph.identifiers. No names or birth dates, by design.
IDENTIFIER_KEYWORDS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ViewPosition",
    "PatientID",
    "StudyDate",
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
# ITU-R BT.601 luma, the weights Pillow's convert("L") uses, so colour files grey the same either way.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


class ImageDecodeError(ValueError):
    """The input cannot be turned into a radiograph; the message says why in plain words."""


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


@dataclass
class Radiograph:
    """A decoded image in display orientation (bone bright), before any model-specific scaling."""

    pixels: np.ndarray  # float32 HxW, MONOCHROME2 orientation, any range
    source_format: str  # "dicom" | "png" | "jpeg" | "tiff" | "array"
    pixel_spacing: tuple[float, float] | None = None  # (row, column) mm, when the file says
    identifiers: dict[str, str] = field(default_factory=dict)  # DICOM only, see IDENTIFIER_KEYWORDS
    original_shape: tuple[int, int] | None = None  # (rows, columns) of the file when decoded smaller

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the image as stored, whatever resolution it was decoded at."""
        return self.original_shape or (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


# --------------------------------------------------------------------------------------------------
# decoding


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
        return _decode_dicom(data, name, max_pixels=max_pixels, check_modality=check_modality, config=config)
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
            ds = read_dicom(data, header_only=True)
            frames = _int_or(ds.get("NumberOfFrames", 1), 1)
            samples = _int_or(ds.get("SamplesPerPixel", 1), 1)
            return _int_or(ds.get("Rows", 0), 0) * _int_or(ds.get("Columns", 0), 0) * max(1, frames) * samples
    except Exception:  # noqa: BLE001 - any unreadable header: the decoder says why
        return None
    return None


def load_for_model(
    source: bytes | str | os.PathLike, config: PreprocessConfig, **decode_kwargs
) -> np.ndarray:
    """Decode (at the resolution ``config`` needs) and prepare in one call: what a data loader does."""
    return prepare(decode_image(source, config=config, **decode_kwargs), config)


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


def _decode_dicom(
    data: bytes, name: str, *, max_pixels: int, check_modality: bool, config: PreprocessConfig | None
) -> Radiograph:
    from pydicom.errors import InvalidDicomError

    try:
        ds = read_dicom(data)
    except InvalidDicomError as exc:
        raise ImageDecodeError(f"{name} is not a valid DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on damaged streams
        raise ImageDecodeError(f"{name} is a damaged or truncated DICOM file ({exc})") from exc
    if len(ds) == 0 or not any(k in ds for k in ("PixelData", "SOPClassUID", "Modality", "Rows")):
        raise ImageDecodeError(f"{name} is not a DICOM image (no image attributes found)")

    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = _sop_class_name(ds)
        raise ImageDecodeError(
            f"{name} is a DICOM object without pixel data"
            f"{f' ({what})' if what else ''}{f', Modality {modality}' if modality else ''}: not an image"
        )
    if "PixelData" not in ds:
        raise ImageDecodeError(f"{name} holds floating-point pixel data, which radiographs never use")
    if check_modality and modality not in RADIOGRAPH_MODALITIES:
        raise ImageDecodeError(
            f"{name} has Modality {modality or '(missing)'}; only projection radiographs "
            f"({', '.join(sorted(RADIOGRAPH_MODALITIES))}) are accepted (pass check_modality=False to "
            "accept other modalities)"
        )

    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = _int_or(ds.get("NumberOfFrames", 1), 1)
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(f"{name} declares an empty image ({rows} x {cols} pixels)")
    if frames > 1:
        raise ImageDecodeError(f"{name} is a multi-frame DICOM ({frames} frames); a radiograph has one frame")
    if rows * cols > max_pixels:
        raise ImageDecodeError(
            f"{name} declares {rows} x {cols} pixels, more than the limit of {max_pixels:,}"
        )

    tsyntax = _transfer_syntax(ds)
    _check_decoder(tsyntax, name)
    factor = config.reduction(rows, cols) if config is not None and _linear_grey(ds) else 1
    arr = _decode_j2k_reduced(ds, tsyntax, factor, name) if factor > 1 else None
    try:
        arr = ds.pixel_array if arr is None else arr
    except (NotImplementedError, RuntimeError) as exc:
        ts_name = getattr(tsyntax, "name", str(tsyntax))
        raise ImageDecodeError(f"{name}: cannot decode transfer syntax {ts_name}: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{name} has damaged or truncated pixel data ({exc})") from exc
    except BaseException as exc:
        # Decoder plug-ins written in Rust (pylibjpeg-rle, -openjpeg) turn a panic on a malformed
        # stream into pyo3's PanicException, a BaseException: still damaged data, not a crash.
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise ImageDecodeError(f"{name} has damaged pixel data (the decoder failed: {exc})") from exc

    if factor > 1 and arr.shape == (rows, cols):  # not reduced by the codec: block means instead
        arr = _reduce_mean(arr, factor)
    pixels = _dicom_display_pixels(ds, arr, name)
    identifiers = {}
    for keyword in IDENTIFIER_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            identifiers[keyword] = str(value).strip()
    logger.debug(
        "decoded DICOM %s: %dx%d %s %s", name, cols, rows, modality, getattr(tsyntax, "name", tsyntax)
    )
    return Radiograph(
        pixels=pixels,
        source_format="dicom",
        pixel_spacing=_pixel_spacing(ds),
        identifiers=identifiers,
        original_shape=(rows, cols) if pixels.shape != (rows, cols) else None,
    )


def _linear_grey(ds) -> bool:
    """Whether the stored values reach the display through linear maps only (rescale, a linear window,
    MONOCHROME1 inversion): then a block mean taken before them equals one taken after, up to the
    window's clipping, and the image may be decoded smaller. LUT sequences and sigmoid windows index
    or bend individual values, so those images are decoded at full size."""
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return (
        _int_or(ds.get("SamplesPerPixel", 1), 1) == 1
        and "ModalityLUTSequence" not in ds
        and "VOILUTSequence" not in ds
        and function != "SIGMOID"
    )


_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})


def _decode_j2k_reduced(ds, tsyntax: object, factor: int, name: str) -> np.ndarray | None:
    """A JPEG 2000 frame decoded at a lower resolution level (its wavelet low-pass band: anti-aliased
    by construction, and several times faster to decode than the full image), reduced by at most
    ``factor``; ``None`` where the codestream does not allow it, so the caller decodes in full.

    Pillow decodes resolution levels (``reduce``) where pydicom's plug-ins cannot. It scales samples to
    16 bits, so the values are shifted back to the codestream's precision; signed data, or a precision
    other than BitsStored (which pydicom's decoders correct for), take the full path.
    """
    if str(tsyntax) not in _J2K_SYNTAXES or _int_or(ds.get("PixelRepresentation", 0), 0) != 0:
        return None
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        header = _j2k_header(frame)
        if header is None:
            return None
        levels, precision, signed = header
        if signed or precision != _int_or(ds.get("BitsStored", 0), 0) or precision > 16:
            return None
        arr, steps = None, min(levels, factor.bit_length() - 1) + 1
        while arr is None and steps > 1:
            steps -= 1
            arr = _j2k_at_level(frame, steps)
        if arr is None or arr.ndim != 2:
            return None
        if arr.dtype == np.uint16 and precision < 16:
            arr = arr >> (16 - precision)
    except Exception as exc:  # noqa: BLE001 - any trouble here: the full decoder has the final word
        logger.debug("%s: no reduced JPEG 2000 decode (%s); decoding in full", name, exc)
        return None
    remaining = factor >> steps  # what the level did not reduce
    return _reduce_mean(arr, remaining) if remaining > 1 else arr


def _j2k_at_level(codestream: bytes, steps: int) -> np.ndarray | None:
    """The codestream decoded ``steps`` resolution levels down, or ``None`` if Pillow refuses that
    level (it does for some codestreams beyond the first level, at once: the next level up is tried)."""
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as im:
        im.reduce = steps
        try:
            im.load()
        except OSError:
            return None
        return np.asarray(im)


def _j2k_header(codestream: bytes) -> tuple[int, int, bool] | None:
    """(decomposition levels, bit precision, signed) of a single-component JPEG 2000 codestream, read
    from its SIZ and COD/COC marker segments; ``None`` if they are not where the standard puts them."""
    if not codestream.startswith(b"\xff\x4f\xff\x51"):
        return None
    pos, levels, precision, signed = 2, None, None, False
    while pos + 4 <= len(codestream):
        marker = codestream[pos : pos + 2]
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        body = codestream[pos + 4 : pos + 2 + length]
        if marker == b"\xff\x51":  # SIZ: Rsiz, 8 sizes, Csiz, then Ssiz per component
            if len(body) < 39 or int.from_bytes(body[34:36], "big") != 1:
                return None
            precision, signed = (body[36] & 0x7F) + 1, bool(body[36] & 0x80)
        elif marker == b"\xff\x52" and len(body) >= 6:  # COD: Scod, SGcod (4), SPcod levels
            levels = body[5] if levels is None else min(levels, body[5])
        elif marker == b"\xff\x53" and len(body) >= 3:  # COC for component 0: Ccoc, Scoc, levels
            levels = body[2] if levels is None else min(levels, body[2])
        elif marker == b"\xff\x90":  # SOT: the main header is over
            break
        pos += 2 + length
    if levels is None or precision is None:
        return None
    return levels, precision, signed


def _reduce_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Float32 means of ``factor`` x ``factor`` blocks (the last partial rows and columns dropped):
    an anti-aliased reduction in a few strided passes, about 4 ms for a 4-megapixel image where a
    reshape-mean takes 25."""
    height, width = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    src = pixels[:height, :width]
    rows = src[0::factor].astype(np.float32)
    for i in range(1, factor):
        rows += src[i::factor]
    out = np.ascontiguousarray(rows[:, 0::factor])
    for i in range(1, factor):
        out += rows[:, i::factor]
    out *= np.float32(1.0 / (factor * factor))
    return out


def _transfer_syntax(ds):
    """The file's transfer syntax; for a stream without file meta, the encoding pydicom detected."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            implicit, little = True, True
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return meta.TransferSyntaxUID


def _check_decoder(tsyntax: object, name: str) -> None:
    """Refuse a transfer syntax nobody can decode before touching the pixels, with its name."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(str(tsyntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise ImageDecodeError(
            f"{name} uses transfer syntax {uid.name} ({uid}), which is not supported for images"
        ) from exc
    if not decoder.is_available:
        raise ImageDecodeError(
            f"{name} uses transfer syntax {uid.name}, but no decoder plugin for it is installed "
            "(install pylibjpeg with its libjpeg, openjpeg and rle plugins)"
        )


def _dicom_display_pixels(ds, arr: np.ndarray, name: str) -> np.ndarray:
    """Apply Modality LUT, VOI LUT / window and MONOCHROME1 inversion; return float32 HxW.

    BitsStored is honoured by pydicom's decoders (unused high bits masked, signed values extended).
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = _int_or(ds.get("SamplesPerPixel", 1), 1)
    if samples > 1 or arr.ndim == 3:
        # Colour secondary captures of radiographs exist; pydicom has already converted YBR to RGB.
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ImageDecodeError(f"{name} has an unexpected pixel array shape {arr.shape}")
        return _luma(arr)
    if arr.ndim != 2:
        raise ImageDecodeError(f"{name} has an unexpected pixel array shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise ImageDecodeError(f"{name} has unsupported PhotometricInterpretation {photometric}")

    pixels = _modality_lut(ds, arr, name)
    pixels = _voi(ds, pixels, name)
    pixels = _finite_float32(pixels, name)
    if photometric == "MONOCHROME1":  # low values are bright: flip within the image's own range
        pixels = (float(pixels.max()) + float(pixels.min())) - pixels
    return pixels


def _modality_lut(ds, arr: np.ndarray, name: str) -> np.ndarray:
    """Stored values -> modality units. Rescale is done in float32 here: pydicom's float64 path costs
    several times more on a 10-megapixel radiograph; a Modality LUT Sequence goes through pydicom."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception as exc:
            logger.warning("%s: ignoring unusable Modality LUT (%s)", name, exc)
    pixels = arr.astype(np.float32)
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as exc:
        logger.warning("%s: ignoring unusable rescale slope/intercept (%s)", name, exc)
        return pixels
    if slope != 1.0:
        pixels *= np.float32(slope)
    if intercept != 0.0:
        pixels += np.float32(intercept)
    return pixels


def _voi(ds, pixels: np.ndarray, name: str) -> np.ndarray:
    """Apply the first VOI LUT or window. A linear window is a clip to its bounds (the affine part is
    redone by prepare's percentile scaling), which is far cheaper than pydicom's float64 windowing;
    VOI LUT sequences and SIGMOID windows go through pydicom's apply_voi_lut."""
    from pydicom.pixels import apply_voi_lut

    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not has_lut and not has_window:
        return pixels
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if has_lut or function == "SIGMOID":
        # a LUT is indexed by integer modality values; a float array would make pydicom warn and guess
        voi_input = np.rint(pixels).astype(np.int64) if has_lut else pixels
        try:
            return np.asarray(apply_voi_lut(voi_input, ds, index=0, prefer_lut=True), dtype=np.float32)
        except Exception as exc:
            logger.warning("%s: ignoring unusable VOI LUT / window (%s)", name, exc)
            return pixels
    try:
        center = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
    except (TypeError, ValueError, IndexError) as exc:
        logger.warning("%s: ignoring unusable window (%s)", name, exc)
        return pixels
    if function == "LINEAR_EXACT" and width > 0:
        lo, hi = center - width / 2, center + width / 2
    elif width >= 1:
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        logger.warning("%s: ignoring window with width %s", name, width)
        return pixels
    if hi <= lo:
        # a one-value window keeps only "above or below centre"; keep that rather than a flat image
        return np.where(pixels > lo, np.float32(1), np.float32(0))
    return np.clip(pixels, np.float32(lo), np.float32(hi), out=pixels)


def _first(value: object) -> object:
    """First value of a possibly multi-valued DICOM element."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return value[0]
    return value


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing, as (row, column) mm; zero or garbage means unknown."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0:
            return row, col
    return None


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    if uid is None:
        return ""
    return str(getattr(uid, "name", uid))


def _int_or(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


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
                pixels = _reduce_mean(pixels, factor)
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
        pixels = _luma(np.asarray(im))
    elif mode in ("P", "PA"):
        pixels = _luma(np.asarray(im.convert("RGB")))
    else:  # CMYK, YCbCr, LAB, ...
        pixels = _luma(np.asarray(im.convert("RGB")))
    if pixels.ndim != 2:
        raise ImageDecodeError(f"unexpected decoded shape {pixels.shape} for mode {mode}")
    return _finite_float32(pixels)


_LUMA_ROWS = 256  # rows converted at a time: a float32 copy of the whole colour image is never held


def _luma(arr: np.ndarray) -> np.ndarray:
    """Grey float32 HxW from colour HxWx3/4, a block of rows at a time (peak memory: the output plus
    one block, instead of three float32 planes of the whole image)."""
    out = np.empty(arr.shape[:2], dtype=np.float32)
    for start in range(0, arr.shape[0], _LUMA_ROWS):
        block = arr[start : start + _LUMA_ROWS, :, :3]
        out[start : start + _LUMA_ROWS] = np.asarray(block, dtype=np.float32) @ _LUMA
    return out


def _finite_float32(pixels: np.ndarray, name: str = "the image data") -> np.ndarray:
    """The decoded pixels as contiguous float32, refused when they hold NaN or infinity: such a
    file is damaged, not a radiograph (only float TIFFs and float DICOM can)."""
    if pixels.dtype.kind == "f":
        bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
        if bad:
            raise ImageDecodeError(
                f"{name} holds {bad:,} NaN or infinite pixel value(s): not a usable radiograph"
            )
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _finite(pixels: np.ndarray) -> np.ndarray:
    """Replace NaN/inf (only float sources can hold them) so percentiles and resizing stay sane."""
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        finite = pixels[np.isfinite(pixels)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        pixels = np.nan_to_num(pixels, nan=lo, posinf=hi, neginf=lo)
    return np.ascontiguousarray(pixels, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# input quality gate

#: What an image must have to be embedded by the service (``check_usable``): anything less has no
#: anatomy to tell patients apart by, and all such images would match each other.
MIN_SIDE = 32  # pixels on the shorter side; the smallest real set here is 64 x 64
MAX_ASPECT = 4.0  # longer side / shorter side; chest radiographs are near 1
MIN_GREY_LEVELS = 16  # distinct values in a sample of at most 256 x 256 pixels
_SAMPLE_SIDE = 256


def check_usable(image: Radiograph, name: str = "the image") -> None:
    """Refuse a decoded image with no usable content: too small, a strip, blank or nearly constant.

    The bar: every radiograph of the project's data sets and the DICOM test files pass; a blank or
    one-colour image, a 1 x 1 image or a 1 x 100000 strip does not.
    """
    height, width = image.shape
    short, long = min(height, width), max(height, width)
    if short < MIN_SIDE:
        raise ImageDecodeError(
            f"{name} is {height} x {width} pixels; a radiograph needs at least {MIN_SIDE} on each side"
        )
    if long > MAX_ASPECT * short:
        raise ImageDecodeError(
            f"{name} is {height} x {width} pixels, {long / short:.1f} times longer than wide; a "
            f"radiograph is at most {MAX_ASPECT:g} times"
        )
    step = max(1, -(-max(image.pixels.shape[:2]) // _SAMPLE_SIDE))
    levels = np.unique(image.pixels[::step, ::step]).size
    if levels < MIN_GREY_LEVELS:
        raise ImageDecodeError(
            f"{name} is blank or nearly constant ({levels} grey level(s)): there is no anatomy to identify a "
            "patient by"
        )


# --------------------------------------------------------------------------------------------------
# model input


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
    it, linear within its bin; ``models.training.data.equalize_batch`` is the same map for
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
        arr = _luma(arr)
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

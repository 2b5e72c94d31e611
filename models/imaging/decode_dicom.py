"""DICOM pixel data -> :class:`~models.imaging.radiograph.Radiograph`: the modality check, transfer
syntaxes and their decoders (JPEG 2000 at a reduced resolution level where the model needs no
more), Modality LUT, VOI LUT / window and MONOCHROME1 inversion, and the identifiers kept.

The data set itself is read by :func:`models.imaging.dicom.read_dicom` (the one DICOM reader);
:func:`models.imaging.decode.decode_image` sends DICOM bytes here after sniffing them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from models.imaging.dicom import read_dicom
from models.imaging.radiograph import ImageDecodeError, Radiograph, finite_float32, luma, reduce_mean

if TYPE_CHECKING:
    from models.imaging.prepare import PreprocessConfig

logger = logging.getLogger(__name__)

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


def decode_dicom(
    data: bytes, name: str, *, max_pixels: int, check_modality: bool, config: PreprocessConfig | None
) -> Radiograph:
    """DICOM bytes (sniffed by :func:`models.imaging.decode.decode_image`) as a :class:`Radiograph`,
    or :class:`ImageDecodeError` naming ``name`` and why: not an image, not a projection radiograph
    (with ``check_modality``), multi-frame, over ``max_pixels``, or a codec that cannot decode it."""
    from pydicom.errors import InvalidDicomError

    try:
        ds = read_dicom(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:  # refused by the reader (a deflate bomb): the reason, with the name
        raise ImageDecodeError(f"{name}: {exc}") from exc
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
            f"({', '.join(sorted(RADIOGRAPH_MODALITIES))}) are accepted: send the radiograph itself, or, "
            "if this file is one, correct its Modality attribute (0008,0060)"
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
    _check_frame_size(ds, tsyntax, rows, cols, name)
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
        arr = reduce_mean(arr, factor)
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

#: Encapsulated syntaxes whose frames say their own size, and in which marker segment: decoders
#: allocate what the codestream says, not what the header says. (RLE frames are decoded to the
#: header's size; the deflated syntax is bounded where it is read, in :mod:`models.imaging.dicom`.)
_FRAME_CODECS = {
    **dict.fromkeys(
        [
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
        ],
        "JPEG",
    ),
    **dict.fromkeys(["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"], "JPEG-LS"),
    **dict.fromkeys(
        [
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.4.92",
            "1.2.840.10008.1.2.4.93",
            "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.202",
            "1.2.840.10008.1.2.4.203",
        ],
        "JPEG 2000",
    ),
}


def _check_frame_size(ds, tsyntax: object, rows: int, cols: int, name: str) -> None:
    """Refuse, before any decoder runs, a compressed frame whose codestream is larger than the header's
    Rows x Columns (or holds more components than SamplesPerPixel): the decoders allocate what the
    codestream declares, so a 2.5 KB file declaring 256 x 256 could carry a 16000 x 16000 frame and
    take a gigabyte before the shape is checked. A frame whose size cannot be read is refused too:
    no decoder could decode it."""
    codec = _FRAME_CODECS.get(str(tsyntax))
    if codec is None:
        return
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise ImageDecodeError(f"{name} has damaged pixel data (no readable frame: {exc})") from exc
    size = frame_size(frame, codec)
    if size is None:
        raise ImageDecodeError(
            f"{name} has damaged pixel data: its {codec} frame does not declare a readable size"
        )
    height, width, components = size
    samples = max(1, _int_or(ds.get("SamplesPerPixel", 1), 1))
    if height > rows or width > cols or components > samples:
        several = components > samples
        raise ImageDecodeError(
            f"{name} holds a {codec} frame of {height} x {width} pixels"
            f"{f' with {components} components' if several else ''}, larger than the {rows} x {cols}"
            f"{f' with {samples} per pixel' if several else ''} its header declares: refused before "
            "decoding (a decompression bomb, or a damaged file)"
        )


#: JPEG start-of-frame markers (ITU T.81 B.1.1.3: SOF0-SOF15 less DHT, JPG and DAC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})


def frame_size(frame: bytes, codec: str) -> tuple[int, int, int] | None:
    """(height, width, components) a JPEG, JPEG-LS or JPEG 2000 frame declares in its own header
    (SOF / SOF55 marker segment, or SIZ), read without decoding; None when it declares none (or a
    JPEG height of 0, left to a DNL marker after the scan)."""
    if codec == "JPEG 2000":
        return _j2k_size(frame)
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # a scan, or the end, before any frame header
            return None
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            body = frame[pos + 4 : pos + 2 + length]
            if length < 8 or len(body) < 6:
                return None
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            return (height, width, body[5]) if height > 0 else None
        if length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) of a JPEG 2000 codestream's SIZ segment, the codestream bare or in
    a JP2 file's contiguous codestream box (the form decoders also accept)."""
    codestream = frame if frame.startswith(b"\xff\x4f") else _jp2_codestream(frame)
    if codestream is None or not codestream.startswith(b"\xff\x4f\xff\x51"):
        return None
    body = codestream[6:]  # SIZ after SOC, its marker and length: Rsiz, then the sizes
    if len(body) < 36:
        return None
    x, y, x0, y0 = (int.from_bytes(body[i : i + 4], "big") for i in (2, 6, 10, 14))
    components = int.from_bytes(body[34:36], "big")
    if x <= x0 or y <= y0:
        return None
    return y - y0, x - x0, components


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contents of a JP2 file's first top-level contiguous codestream box ("jp2c"), or None."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        header = 8
        if length == 1 and pos + 16 <= len(data):  # 64-bit length follows
            length, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        elif length == 0:  # to the end of the file
            length = len(data) - pos
        if kind == b"jp2c":
            return data[pos + header : pos + length]
        if length < header:
            return None
        pos += length
    return None


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
    return reduce_mean(arr, remaining) if remaining > 1 else arr


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
        return luma(arr)
    if arr.ndim != 2:
        raise ImageDecodeError(f"{name} has an unexpected pixel array shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise ImageDecodeError(f"{name} has unsupported PhotometricInterpretation {photometric}")

    pixels = _modality_lut(ds, arr, name)
    pixels = _voi(ds, pixels, name)
    pixels = finite_float32(pixels, name)
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


def dicom_header_pixels(data: bytes) -> int:
    """Pixels a DICOM header declares (rows x columns x frames x samples), read without the pixel
    data; raises what :func:`~models.imaging.dicom.read_dicom` raises on an unreadable header."""
    ds = read_dicom(data, header_only=True)
    frames = _int_or(ds.get("NumberOfFrames", 1), 1)
    samples = _int_or(ds.get("SamplesPerPixel", 1), 1)
    return _int_or(ds.get("Rows", 0), 0) * _int_or(ds.get("Columns", 0), 0) * max(1, frames) * samples

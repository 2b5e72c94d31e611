"""Fuzzing the decoder (issue 10): random bytes and mutated real DICOM/PNG/JPEG files either decode
to a usable image or are refused with ``InvalidInputError`` (a 422 at the API) - never another
exception, never unbounded time. Two mutators aim at the decompression bombs of the hardening issue:
deflated data sets edited before they are deflated, some padded to inflate past what their header
declares, and compressed frames (JPEG, JPEG-LS, JPEG 2000) whose own header claims another size.

The default run is short (CI); `CXR_REID_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_decoder.py`
is the long one.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless
from test_decode_bombs import _encapsulated, _explicit_le, _file_meta, _header, _zeros_deflated

from app.service.decoding import decode_source
from app.service.errors import InvalidInputError, PayloadTooLargeError
from models.imaging.decode_dicom import frame_size
from models.imaging.dicom import DEFLATE_ALLOWANCE
from models.imaging.preprocess import PreprocessConfig, prepare

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("CXR_REID_FUZZ_EXAMPLES", "150"))
MAX_PIXELS = 4_000_000  # small, so a mutated header claiming a huge image is refused cheaply
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,  # ms per input: anything slower is a hang worth knowing about
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 150,  # CI is reproducible; the long run explores
)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (96, 80)).astype("<u2")
    dicom = io.BytesIO()
    dicom_dataset(pixels, Modality="CR", PatientID="P").save_as(dicom, enforce_file_format=True)
    png, jpeg = io.BytesIO(), io.BytesIO()
    grey = Image.fromarray((pixels >> 4).astype(np.uint8))
    grey.save(png, format="PNG")
    grey.convert("RGB").save(jpeg, format="JPEG", quality=80)
    seeds = [
        dicom.getvalue(),
        png.getvalue(),
        jpeg.getvalue(),
        (ROOT / "examples/radiographs/child-a-1.jpeg").read_bytes(),
    ]
    rle = dicom_dataset(pixels, Modality="CR", PatientID="P")
    rle.compress(RLELossless)  # an encapsulated (compressed) DICOM
    buffer = io.BytesIO()
    rle.save_as(buffer, enforce_file_format=True)
    return [*seeds, buffer.getvalue()]


SEEDS = _seeds()


def _decode_or_refuse(data: bytes) -> None:
    try:
        radiograph = decode_source(data, max_pixels=MAX_PIXELS, name="'fuzz'")
    except (InvalidInputError, PayloadTooLargeError):
        return
    out = prepare(radiograph, PreprocessConfig(size=64))  # what the service does next
    assert out.shape == (64, 64) and np.isfinite(out).all()


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _decode_or_refuse(data)


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_real_files(seed: int, edits: list[tuple[float, int]], cut: float | None) -> None:
    data = bytearray(SEEDS[seed])
    for where, byte in edits:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    _decode_or_refuse(bytes(data))


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_the_seeds_themselves_decode(seed: int) -> None:
    decode_source(SEEDS[seed], max_pixels=MAX_PIXELS, name="'seed'")


def test_a_decoder_panic_is_damaged_data_not_a_crash() -> None:
    """Found by the long run: one byte changed in an RLE stream makes pylibjpeg-rle (Rust) panic,
    and pyo3 raises PanicException, a BaseException that would escape every `except Exception`."""
    data = bytearray(SEEDS[-1])
    data[len(data) - 5692] = 182
    with pytest.raises(InvalidInputError, match="damaged pixel data"):
        decode_source(bytes(data), max_pixels=MAX_PIXELS, name="'rle.dcm'")


# --------------------------------------------------------------------------------------------------
# deflated data sets: mutated before deflating (so the edits reach the parser), some padded past
# what their header declares


def _deflated_seed() -> tuple[object, bytes]:
    pixels = np.random.default_rng(1).integers(0, 4096, (96, 80)).astype("<u2")
    ds = dicom_dataset(pixels, Modality="CR", PatientID="P")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # fixed
    return ds, _explicit_le(ds)


DEFLATED_DS, DEFLATED_BODY = _deflated_seed()
DEFLATED_META = _file_meta(DEFLATED_DS, "1.2.840.10008.1.2.1.99")


def _deflate(body: bytes, grow: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = compressor.compress(body)
    if grow:  # (FFFC,FFFC) Data Set Trailing Padding: zeros that deflate to almost nothing
        out += compressor.compress(b"\xfc\xff\xfc\xffOB\x00\x00" + grow.to_bytes(4, "little"))
        out += compressor.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(grow, compressor)
    return DEFLATED_META + out + compressor.flush()


def test_the_deflated_seed_decodes() -> None:
    decode_source(_deflate(DEFLATED_BODY, 0), max_pixels=MAX_PIXELS, name="'deflated'")


#: A broken deflated data set may be parsed as up to DEFLATE_ALLOWANCE bytes of tiny elements (zeros),
#: a second or two each: the default run takes fewer of those; the long run all it is given.
DEFLATED_FUZZ = settings(FUZZ, max_examples=EXAMPLES if EXAMPLES > 150 else 30)


@DEFLATED_FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    grow=st.sampled_from([0, 0, 1000, DEFLATE_ALLOWANCE + (1 << 20), 64 << 20]),
)
def test_mutated_deflated_data_sets(edits: list[tuple[float, int]], cut: float | None, grow: int) -> None:
    body = bytearray(DEFLATED_BODY)
    for where, byte in edits:
        body[int(where * len(body))] = byte
    if cut is not None:
        body = body[: int(cut * len(body))]
    data = _deflate(bytes(body), grow)
    if grow > DEFLATE_ALLOWANCE and not edits and cut is None:  # past what the header allows: refused
        with pytest.raises(InvalidInputError):
            decode_source(data, max_pixels=MAX_PIXELS, name="'fuzz'")
        return
    _decode_or_refuse(data)


# --------------------------------------------------------------------------------------------------
# encapsulated frames that claim another size than the header (or whose header bytes are mutated)


def _frame_seeds() -> dict[str, tuple[str, object, bytes]]:
    pixels = np.random.default_rng(2).integers(0, 4096, (48, 40)).astype("<u2")
    seeds = {}
    for syntax in (JPEG2000Lossless, JPEGLSLossless):
        ds = dicom_dataset(pixels, Modality="CR", PatientID="P")
        ds.compress(syntax)
        seeds[str(syntax)] = (syntax, ds, next(generate_frames(ds.PixelData, number_of_frames=1)))
    grey = Image.fromarray((pixels >> 4).astype(np.uint8))
    jpeg = io.BytesIO()
    grey.save(jpeg, format="JPEG", quality=90)
    ds = _header(48, 40)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    seeds["jpeg"] = (JPEGBaseline8Bit, ds, jpeg.getvalue())
    return seeds


def _j2k_resized(codestream: bytes, height: int, width: int) -> bytes:
    """A JPEG 2000 codestream with its SIZ image and tile size set to ``height`` x ``width``."""
    out = bytearray(codestream)
    for offset, value in ((8, width), (12, height), (24, width), (28, height)):
        out[offset : offset + 4] = value.to_bytes(4, "big")
    return bytes(out)


def _jpeg_resized(frame: bytes, height: int, width: int) -> bytes:
    """A JPEG or JPEG-LS frame with its first SOF segment set to ``height`` x ``width``."""
    out = bytearray(frame)
    pos = 2
    while pos + 4 <= len(out) and out[pos + 1] not in (0xC0, 0xC1, 0xC3, 0xF7):
        pos += 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
    out[pos + 5 : pos + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


FRAME_SEEDS = _frame_seeds()


@pytest.mark.parametrize("seed", list(FRAME_SEEDS))
def test_the_frame_seeds_decode(seed: str) -> None:
    syntax, ds, frame = FRAME_SEEDS[seed]
    decode_source(_encapsulated(ds, syntax, frame), max_pixels=MAX_PIXELS, name="'seed'")


@FUZZ
@given(
    seed=st.sampled_from(list(FRAME_SEEDS)),
    size=st.one_of(st.none(), st.tuples(st.integers(0, 65535), st.integers(0, 65535))),
    edits=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), max_size=4),
)
def test_mutated_encapsulated_frames(
    seed: str, size: tuple[int, int] | None, edits: list[tuple[int, int]]
) -> None:
    syntax, ds, frame = FRAME_SEEDS[seed]
    codec = "JPEG 2000" if syntax == JPEG2000Lossless else "JPEG"
    if size is not None:
        frame = (_j2k_resized if codec == "JPEG 2000" else _jpeg_resized)(frame, *size)
    data = bytearray(frame)
    for where, byte in edits:  # the marker segments, where the size is read
        if where < len(data):
            data[where] = byte
    declared = frame_size(bytes(data), codec)
    file = _encapsulated(ds, syntax, bytes(data))
    if declared is not None and (declared[0] > ds.Rows or declared[1] > ds.Columns):
        with pytest.raises(InvalidInputError, match="larger than"):
            decode_source(file, max_pixels=MAX_PIXELS, name="'fuzz'")
        return
    _decode_or_refuse(file)

"""Fuzzing the decoder (issue 10): random bytes and mutated real DICOM/PNG/JPEG files either decode
to a usable image or are refused with ``InvalidInputError`` (a 422 at the API) - never another
exception, never unbounded time.

The default run is short (CI); `CXR_REID_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz_decoder.py`
is the long one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import RLELossless

from app.service.decoding import decode_source
from app.service.errors import InvalidInputError, PayloadTooLargeError
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

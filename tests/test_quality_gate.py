"""The input quality gate: images with no usable content are refused with the reason; real
radiographs pass (the repository's examples, pydicom-data's chest CR and DICOM test files)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from PIL import Image

from app.service.decoding import decode_source
from app.service.errors import InvalidInputError
from models.imaging.preprocess import MIN_GREY_LEVELS, MIN_SIDE, ImageDecodeError, Radiograph, check_usable

ROOT = Path(__file__).resolve().parents[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    dicom_dataset(array, Modality="CR", PatientID="P").save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _float_tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.float32), mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


rng = np.random.default_rng(0)
NAN_TIFF = rng.random((256, 256)).astype(np.float32) * 1000
NAN_TIFF[:8, :8] = np.nan
NEAR_CONSTANT = (128 + rng.integers(-1, 2, (256, 256))).astype(np.uint8)  # 3 grey levels of noise


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_png(np.zeros((512, 512), np.uint8)), "blank or nearly constant (1 grey level(s))"),
        (_png(np.full((512, 512), 255, np.uint8)), "blank or nearly constant"),
        (_png(NEAR_CONSTANT), "blank or nearly constant (3 grey level(s))"),
        (_dicom(np.zeros((256, 256), "<u2")), "blank or nearly constant"),
        (_png(np.full((1, 1), 7, np.uint8)), f"1 x 1 pixels; a radiograph needs at least {MIN_SIDE}"),
        (_png(rng.integers(0, 255, (1, 100_000), dtype=np.uint8)), "1 x 100000 pixels"),
        (_png(rng.integers(0, 255, (64, 1000), dtype=np.uint8)), "15.6 times longer than wide"),
        (_float_tiff(NAN_TIFF), "holds 64 NaN or infinite pixel value(s)"),
    ],
    ids=["black", "white", "near-constant", "zero-dicom", "1x1", "strip", "wide", "nan-tiff"],
)
def test_degenerate_images_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidInputError, match="'up.img': the image data") as caught:
        decode_source(data, max_pixels=50_000_000, name="'up.img'")
    assert reason in str(caught.value)


def test_real_radiographs_pass() -> None:
    for path in sorted((ROOT / "examples" / "radiographs").glob("*.jpeg")):
        decode_source(path, max_pixels=50_000_000, name=path.name)  # no InvalidInputError
    pydicom_data = pytest.importorskip("pydicom.data")
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm"):  # chest / hand CR
        decode_source(pydicom_data.get_testdata_file(name), max_pixels=50_000_000, name=name)


def test_the_gate_counts_levels_on_a_sample_of_a_large_image() -> None:
    noise = rng.integers(0, 1000, (3000, 4000)).astype(np.float32)
    check_usable(Radiograph(pixels=noise, source_format="array"))
    with pytest.raises(ImageDecodeError, match="nearly constant"):
        check_usable(Radiograph(pixels=noise % (MIN_GREY_LEVELS - 1), source_format="array"))


def test_api_refuses_a_blank_upload_with_422_and_enrols_nothing(make_client) -> None:  # noqa: ANN001
    client = make_client()
    blank = _png(np.zeros((512, 512), np.uint8))
    response = client.post("/images", files={"file": ("blank.png", blank)}, data={"patient_id": "p1"})
    assert response.status_code == 422
    assert "'blank.png'" in response.json()["detail"] and "no anatomy" in response.json()["detail"]
    assert client.get("/images").json()["total"] == 0
    pair = client.post("/verify", files={"file_a": ("a.png", blank), "file_b": ("b.png", blank)})
    assert pair.status_code == 422

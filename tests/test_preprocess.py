"""models/imaging (decode, decode_dicom, prepare, through preprocess.py): every format and transfer
syntax decodes, bad input fails clearly, prepare() and to_tensor() keep the model input contract."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from models.imaging.preprocess import (
    ImageDecodeError,
    PreprocessConfig,
    Radiograph,
    decode_image,
    load_for_model,
    prepare,
    sniff_format,
    to_tensor,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------------------------------
# helpers


def _pattern(rows: int = 48, cols: int = 40, maximum: int = 4000, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus texture, uint16, so lossy codecs stay close and windows bite."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    base = (x / cols * 0.6 + y / rows * 0.4) * maximum * 0.8
    return (base + rng.integers(0, maximum // 5, (rows, cols))).astype(np.uint16)


def _noise_u8(rows: int, cols: int) -> np.ndarray:
    """Incompressible bytes, so a cut file is really cut."""
    return np.random.default_rng(5).integers(0, 256, (rows, cols), dtype=np.uint8)


def _dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str | None = "CR",
    bits_stored: int | None = None,
    signed: bool = False,
    **attrs: object,
) -> Dataset:
    """A single-frame greyscale image dataset with file meta (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P-0001"
    ds.PatientName = "DOE^JANE"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240102"
    ds.ViewPosition = "PA"
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits_allocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _dicom_bytes(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit_vr, little_endian=little_endian)
    return buf.getvalue()


def _pil_bytes(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _testdata(name: str) -> str:
    """A pydicom / pydicom-data test file that is present locally (no download), else skip."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception as exc:  # pragma: no cover - depends on the installed data packages
        pytest.skip(f"{name} unavailable: {exc}")
    if not path or not Path(path).is_file():
        pytest.skip(f"{name} not installed locally (pydicom-data)")
    return str(path)


# --------------------------------------------------------------------------------------------------
# DICOM: transfer syntaxes


@pytest.mark.parametrize(
    ("tsyntax", "implicit", "little"),
    [
        (ExplicitVRLittleEndian, False, True),
        (ImplicitVRLittleEndian, True, True),
        (ExplicitVRBigEndian, False, False),
    ],
    ids=["explicit-le", "implicit-le", "explicit-be"],
)
def test_uncompressed_syntaxes_decode_exactly(tsyntax, implicit: bool, little: bool) -> None:
    pixels = _pattern()
    ds = _dataset(pixels)
    ds.file_meta.TransferSyntaxUID = tsyntax
    if not little:
        ds.PixelData = pixels.astype(">u2").tobytes()
    try:
        data = _dicom_bytes(ds, implicit_vr=implicit, little_endian=little)
    except Exception as exc:  # pragma: no cover - pydicom may drop big endian writing
        pytest.skip(f"pydicom cannot write {tsyntax.name}: {exc}")
    image = decode_image(data)
    assert image.source_format == "dicom"
    assert image.pixels.dtype == np.float32 and image.pixels.shape == pixels.shape
    np.testing.assert_array_equal(image.pixels, pixels.astype(np.float32))


@pytest.mark.parametrize("tsyntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda t: t.name)
def test_lossless_compressed_syntaxes_decode_exactly(tsyntax, tmp_path: Path) -> None:
    if tsyntax == JPEGLSLossless:
        pytest.importorskip("jpeg_ls", reason="JPEG-LS encoding needs pyjpegls (decoding does not)")
    pixels = _pattern()
    ds = _dataset(pixels, bits_stored=12)
    try:
        ds.compress(tsyntax)
    except (NotImplementedError, RuntimeError) as exc:  # pragma: no cover - encoder plugin missing
        pytest.skip(f"no {tsyntax.name} encoder: {exc}")
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = decode_image(path)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == tsyntax
    np.testing.assert_array_equal(image.pixels, pixels.astype(np.float32))


def test_jpeg_baseline_dicom_decodes_close_to_original() -> None:
    pixels = (_pattern(maximum=255) // 2).astype(np.uint8) + 40
    jpeg = _pil_bytes(Image.fromarray(pixels), "JPEG", quality=95)
    ds = _dataset(pixels)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    image = decode_image(_dicom_bytes(ds))
    assert image.pixels.shape == pixels.shape
    assert np.abs(image.pixels - pixels.astype(np.float32)).mean() < 3.0


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE from another encoder
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),  # JPEG lossless process 14 SV1
        ("JPEG-LL.dcm", None),  # JPEG lossless, 16 bit
        ("SC_rgb_jpeg_dcmtk.dcm", None),  # JPEG baseline, colour -> grey
    ],
)
def test_real_compressed_files_decode(name: str, reference: str | None) -> None:
    image = decode_image(_testdata(name), check_modality=False)
    assert image.pixels.ndim == 2 and image.pixels.dtype == np.float32
    assert image.pixels.size > 0 and np.isfinite(image.pixels).all()
    assert image.pixels.max() > image.pixels.min()
    if reference is not None:
        expected = decode_image(_testdata(reference), check_modality=False)
        np.testing.assert_array_equal(image.pixels, expected.pixels)


@pytest.fixture(scope="module")
def rg1_prepared() -> dict[str, tuple[Radiograph, np.ndarray]]:
    """The real chest CR (MONOCHROME1, 15 bits) in its three encodings, decoded once."""
    out = {}
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        image = decode_image(_testdata(name))
        out[name] = (image, prepare(image, PreprocessConfig(size=128)))
    return out


def test_real_chest_cr_decodes_alike_in_all_encodings(rg1_prepared) -> None:
    uncompressed, reference = rg1_prepared["RG1_UNCR.dcm"]
    assert uncompressed.pixels.shape == (1955, 1841)
    assert uncompressed.identifiers["PatientID"] == "9RG1"
    assert uncompressed.identifiers["ViewPosition"] == "PA"
    assert "PatientName" not in uncompressed.identifiers
    assert uncompressed.pixel_spacing is None  # the file says 0.0 \ 0.0: unknown, not zero
    _, lossless = rg1_prepared["RG1_J2KR.dcm"]
    np.testing.assert_array_equal(lossless, reference)
    _, lossy = rg1_prepared["RG1_J2KI.dcm"]
    assert np.abs(lossy - reference).mean() < 0.01


def test_real_chest_cr_is_shown_bone_bright(rg1_prepared) -> None:
    """MONOCHROME1 inverted: the spine (centre column) is brighter than the lung fields beside it."""
    _, prepared = rg1_prepared["RG1_UNCR.dcm"]
    rows = slice(40, 90)
    spine = prepared[rows, 60:68].mean()
    lungs = (prepared[rows, 30:45].mean() + prepared[rows, 83:98].mean()) / 2
    assert spine > lungs


# --------------------------------------------------------------------------------------------------
# decoding at the resolution the model needs

MODEL_INPUT = PreprocessConfig(size=128)


def test_reduction_keeps_the_scaled_side_above_the_oversampling_floor() -> None:
    assert MODEL_INPUT.reduction(1955, 1841) == 4  # 489 px long side, >= 3 x 128
    assert MODEL_INPUT.reduction(767, 600) == 1  # halving would leave 383 < 384
    assert MODEL_INPUT.reduction(768, 600) == 2
    assert PreprocessConfig(size=128, fit="crop").reduction(4000, 700) == 1  # crop scales the short side


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_real_cr_decoded_smaller_prepares_like_full_resolution(rg1_prepared, name: str) -> None:
    """Block means (uncompressed) and a JPEG 2000 resolution level (the lossless and lossy files)
    give the model nearly the same input as a full decode, with the stored shape kept."""
    full, reference = rg1_prepared[name]
    small = decode_image(_testdata(name), config=MODEL_INPUT)
    assert small.pixels.shape[0] < 600 and small.shape == (1955, 1841) == full.shape
    # same intensity scale: a JPEG 2000 level comes back from Pillow in 16 bits and is shifted back
    assert small.pixels.mean() == pytest.approx(full.pixels.mean(), rel=0.02)
    assert np.abs(prepare(small, MODEL_INPUT) - reference).mean() < 0.01


def test_jpeg_2000_level_needs_a_codestream_it_can_trust(rg1_prepared) -> None:
    """BitsStored other than the codestream's precision takes pydicom's full decode (which corrects
    for it); the image still decodes, smaller by block means."""
    ds = pydicom.dcmread(_testdata("RG1_J2KR.dcm"))
    ds.BitsStored = 16
    image = decode_image(_dicom_bytes(ds), config=MODEL_INPUT)
    assert image.shape == (1955, 1841) and image.pixels.shape == (488, 460)  # whole 4 x 4 blocks


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_uses_dct_scaling_and_keeps_its_shape(orientation: int) -> None:
    pixels = np.asarray(
        Image.fromarray(_pattern(100, 90, maximum=255).astype(np.uint8)).resize((1800, 2000)), np.uint8
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pil_bytes(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    full, small = decode_image(data), decode_image(data, config=MODEL_INPUT)
    assert small.pixels.size * 16 <= full.pixels.size * 1.01
    assert small.shape == full.shape == ((2000, 1800) if orientation == 1 else (1800, 2000))
    assert np.abs(prepare(small, MODEL_INPUT) - prepare(full, MODEL_INPUT)).mean() < 0.01


def test_small_images_decode_as_before() -> None:
    data = _pil_bytes(Image.fromarray(_pattern(700, 500)), "PNG")
    image = decode_image(data, config=MODEL_INPUT)
    assert image.original_shape is None and image.pixels.shape == (700, 500)


# --------------------------------------------------------------------------------------------------
# DICOM: pixel semantics


def test_monochrome1_is_inverted() -> None:
    pixels = _pattern(40, 40)
    mono2 = decode_image(_dicom_bytes(_dataset(pixels)))
    mono1 = decode_image(_dicom_bytes(_dataset(pixels, photometric="MONOCHROME1")))
    p = pixels.astype(np.float32)
    np.testing.assert_allclose(mono1.pixels, p.max() + p.min() - p)
    config = PreprocessConfig(size=32, fit="crop")
    np.testing.assert_allclose(prepare(mono1, config), 1.0 - prepare(mono2, config), atol=1e-4)


def test_rescale_slope_and_intercept_applied() -> None:
    pixels = _pattern()
    ds = _dataset(pixels, RescaleSlope="2", RescaleIntercept="-1024")
    image = decode_image(_dicom_bytes(ds))
    np.testing.assert_allclose(image.pixels, pixels.astype(np.float32) * 2 - 1024)


def test_window_center_width_applied() -> None:
    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    ds = _dataset(pixels, WindowCenter="2000", WindowWidth="1001")
    out = decode_image(_dicom_bytes(ds)).pixels
    low, high = pixels < 1500, pixels >= 2500  # DICOM linear window: [1499.5, 2499.5]
    inside = ~low & ~high
    assert np.ptp(out[low]) == 0 and np.ptp(out[high]) == 0  # clipped outside the window
    assert out[low].max() < out[inside].min() and out[inside].max() < out[high].min()
    assert (np.diff(out[0]) >= 0).all()


def test_sigmoid_window_and_voi_lut_sequence_applied() -> None:
    pixels = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (4, 1))
    sigmoid = decode_image(
        _dicom_bytes(_dataset(pixels, WindowCenter="128", WindowWidth="64", VOILUTFunction="SIGMOID"))
    ).pixels
    assert (np.diff(sigmoid[0]) >= 0).all() and sigmoid[0, -1] > sigmoid[0, 0]

    ds = _dataset(pixels)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "OW", np.arange(255, -1, -1, dtype="<u2").tobytes())  # an inverting LUT
    ds.VOILUTSequence = [item]
    out = decode_image(_dicom_bytes(ds)).pixels
    np.testing.assert_array_equal(out, 255 - pixels.astype(np.float32))


def test_bad_window_is_ignored_not_fatal() -> None:
    pixels = _pattern()
    out = decode_image(_dicom_bytes(_dataset(pixels, WindowCenter="100", WindowWidth="0"))).pixels
    np.testing.assert_array_equal(out, pixels.astype(np.float32))


def test_bits_stored_respected() -> None:
    values = _pattern(maximum=4000)
    dirty = values | np.uint16(0xF000)  # junk in the 4 unused high bits
    out = decode_image(_dicom_bytes(_dataset(dirty, bits_stored=12))).pixels
    np.testing.assert_array_equal(out, values.astype(np.float32))
    signed = np.full((4, 4), 0x0800, dtype=np.uint16)  # 12-bit two's complement: -2048
    out = decode_image(_dicom_bytes(_dataset(signed, bits_stored=12, signed=True))).pixels
    assert (out == -2048).all()


def test_pixel_spacing_and_identifiers_recorded() -> None:
    pixels = _pattern()
    image = decode_image(_dicom_bytes(_dataset(pixels, PixelSpacing=[0.2, 0.25])))
    assert image.pixel_spacing == pytest.approx((0.2, 0.25))
    assert image.identifiers["PatientID"] == "P-0001"
    assert image.identifiers["StudyDate"] == "20240102"
    assert set(image.identifiers) <= {
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "ViewPosition",
        "PatientID",
        "StudyDate",
    }
    imager = decode_image(_dicom_bytes(_dataset(pixels, ImagerPixelSpacing=[0.139, 0.139])))
    assert imager.pixel_spacing == pytest.approx((0.139, 0.139))
    assert decode_image(_dicom_bytes(_dataset(pixels))).pixel_spacing is None


def test_dicom_without_preamble_reads() -> None:
    pixels = _pattern()
    full = _dicom_bytes(_dataset(pixels))
    assert full[128:132] == b"DICM"
    for data in (full[132:], full[128:]):  # meta group first / "DICM" first
        np.testing.assert_array_equal(decode_image(data).pixels, pixels.astype(np.float32))
    for implicit in (True, False):  # bare dataset, no file meta at all
        ds = _dataset(pixels)
        del ds.file_meta
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=True)
        assert buf.getvalue()[128:132] != b"DICM"
        np.testing.assert_array_equal(decode_image(buf.getvalue()).pixels, pixels.astype(np.float32))


def test_format_comes_from_bytes_not_name(tmp_path: Path) -> None:
    png = _pil_bytes(Image.fromarray(np.zeros((8, 8), np.uint8)), "PNG")
    assert sniff_format(png) == "png"
    (tmp_path / "looks.dcm").write_bytes(png)
    assert decode_image(tmp_path / "looks.dcm").source_format == "png"
    (tmp_path / "looks.png").write_bytes(_dicom_bytes(_dataset(_pattern())))
    assert decode_image(str(tmp_path / "looks.png")).source_format == "dicom"
    assert sniff_format(_pil_bytes(Image.new("L", (8, 8)), "JPEG")) == "jpeg"
    assert sniff_format(_pil_bytes(Image.new("L", (8, 8)), "TIFF")) == "tiff"


# --------------------------------------------------------------------------------------------------
# DICOM: refused objects


def test_multiframe_refused() -> None:
    frames = np.stack([_pattern(seed=i) for i in range(3)])
    ds = _dataset(frames[0], NumberOfFrames=3)
    ds.PixelData = frames.astype("<u2").tobytes()
    with pytest.raises(ImageDecodeError, match="multi-frame"):
        decode_image(_dicom_bytes(ds))


@pytest.mark.parametrize(
    ("sop_class", "modality"),
    [("1.2.840.10008.5.1.4.1.1.88.11", "SR"), ("1.2.840.10008.5.1.4.1.1.11.1", "PR")],
    ids=["structured-report", "presentation-state"],
)
def test_objects_without_pixels_refused(sop_class: str, modality: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    with pytest.raises(ImageDecodeError, match="without pixel data"):
        decode_image(_dicom_bytes(ds))
    with pytest.raises(ImageDecodeError, match="without pixel data"):
        decode_image(_dicom_bytes(ds), check_modality=False)


def test_modality_check_is_switchable() -> None:
    data = _dicom_bytes(_dataset(_pattern(), modality="CT"))
    with pytest.raises(ImageDecodeError, match="Modality CT"):
        decode_image(data)
    assert decode_image(data, check_modality=False).pixels.shape == (48, 40)
    for modality in ("CR", "DX", "DR", "RG"):
        decode_image(_dicom_bytes(_dataset(_pattern(), modality=modality)))
    with pytest.raises(ImageDecodeError, match="missing"):
        decode_image(_dicom_bytes(_dataset(_pattern(), modality=None)))


def test_unsupported_transfer_syntax_refused() -> None:
    ds = _dataset(_pattern())
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(ImageDecodeError, match="transfer syntax"):
        decode_image(_dicom_bytes(ds))


def test_truncated_and_empty_dicom_refused() -> None:
    data = _dicom_bytes(_dataset(_pattern(200, 200)))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="empty image"):
        decode_image(_dicom_bytes(_dataset(np.zeros((0, 4), np.uint16))))


def test_dicom_bomb_refused_from_header() -> None:
    ds = _dataset(_pattern(4, 4))
    ds.Rows = ds.Columns = 60000  # the header lies; only 32 bytes of pixels follow
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(_dicom_bytes(ds))
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(_dicom_bytes(_dataset(_pattern(48, 40))), max_pixels=1000)


# --------------------------------------------------------------------------------------------------
# Pillow formats


def test_png_8_and_16_bit() -> None:
    grey8 = (_pattern(maximum=255) % 256).astype(np.uint8)
    out = decode_image(_pil_bytes(Image.fromarray(grey8), "PNG"))
    assert out.source_format == "png" and out.pixel_spacing is None and out.identifiers == {}
    np.testing.assert_array_equal(out.pixels, grey8.astype(np.float32))
    grey16 = _pattern(maximum=60000)
    im16 = Image.fromarray(grey16)
    assert im16.mode.startswith("I;16")
    out16 = decode_image(_pil_bytes(im16, "PNG"))
    np.testing.assert_array_equal(out16.pixels, grey16.astype(np.float32))


def test_jpeg_and_tiff() -> None:
    grey = (_pattern(maximum=200) % 256).astype(np.uint8)
    jpeg = decode_image(_pil_bytes(Image.fromarray(grey), "JPEG", quality=95))
    assert jpeg.source_format == "jpeg" and jpeg.pixels.shape == grey.shape
    assert np.abs(jpeg.pixels - grey).mean() < 3
    grey16 = _pattern(maximum=60000)
    tiff = decode_image(_pil_bytes(Image.fromarray(grey16), "TIFF"))
    assert tiff.source_format == "tiff"
    np.testing.assert_array_equal(tiff.pixels, grey16.astype(np.float32))
    floats = np.linspace(-1, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    np.testing.assert_array_equal(decode_image(_pil_bytes(Image.fromarray(floats), "TIFF")).pixels, floats)


def test_colour_and_alpha_reduced_to_grey() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = decode_image(_pil_bytes(Image.fromarray(rgb), "PNG")).pixels
    assert out.shape == (30, 20)
    np.testing.assert_allclose(out, luma, atol=1e-3)
    rgba = np.concatenate([rgb, np.zeros((30, 20, 1), np.uint8)], axis=2)  # fully transparent
    np.testing.assert_allclose(decode_image(_pil_bytes(Image.fromarray(rgba), "PNG")).pixels, luma, atol=1e-3)
    for mode in ("LA", "P", "1"):
        im = Image.fromarray(rgb).convert(mode)
        assert decode_image(_pil_bytes(im, "PNG")).pixels.shape == (30, 20)
    assert decode_image(_pil_bytes(Image.fromarray(rgb), "JPEG")).pixels.shape == (30, 20)
    assert decode_image(_pil_bytes(Image.fromarray(rgb).convert("CMYK"), "TIFF")).pixels.shape == (30, 20)


def test_jpeg_exif_orientation_honoured() -> None:
    im = Image.fromarray(np.zeros((30, 20), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_pil_bytes(im, "JPEG", exif=exif.tobytes()))
    assert out.pixels.shape == (20, 30)


def test_pillow_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _pil_bytes(Image.new("L", (1200, 1000)), "PNG")
    from PIL import ImageFile

    def _no_load(self):  # noqa: ANN001, ANN202 - the size check must come first
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_load)
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(data, max_pixels=1_000_000)


def test_multipage_tiff_refused() -> None:
    pages = [Image.new("L", (8, 8), v) for v in (0, 100)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageDecodeError, match="frames"):
        decode_image(buf.getvalue())


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (_pil_bytes(Image.fromarray(_noise_u8(64, 64)), "PNG")[:2000], "PNG"),
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a recognised"),
        (b"patient_id,path\nP1,a.png\n" * 20, "text"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "JPEG"),
    ],
    ids=["empty", "truncated-png", "random", "text", "png-header-only", "jpeg-header-only"],
)
def test_bad_bytes_raise_typed_error(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_bad_paths_raise_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "missing.png")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(tmp_path / "empty.dcm")
    assert issubclass(ImageDecodeError, ValueError)


def test_random_bytes_never_taken_for_dicom() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        data = rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes()
        with pytest.raises(ImageDecodeError):
            decode_image(data)


# --------------------------------------------------------------------------------------------------
# prepare / to_tensor / config


@pytest.mark.parametrize("fit", ["pad", "crop"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (64, 64), (7, 3)], ids=str)
def test_prepare_shape_and_range(fit: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = Radiograph(rng.normal(1000, 300, shape).astype(np.float32), "array", None, {})
    out = prepare(image, PreprocessConfig(size=64, fit=fit))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.9


def test_prepare_pads_with_zero_and_crops_to_centre() -> None:
    portrait = np.full((200, 100), 5.0, dtype=np.float32)
    portrait[:, 50:] = 10.0  # two halves: the window maps them to 0 and 1
    padded = prepare(portrait, PreprocessConfig(size=64, fit="pad"))
    assert (padded[:, :16] == 0).all() and (padded[:, 48:] == 0).all()  # letterbox left and right
    assert padded[:, 16:30].max() == 0.0 and padded[:, 34:48].min() == 1.0  # 2 px of blended edge
    landscape = portrait.T.copy()
    padded_t = prepare(landscape, PreprocessConfig(size=64, fit="pad"))
    assert (padded_t[:16] == 0).all() and (padded_t[48:] == 0).all()
    cropped = prepare(portrait, PreprocessConfig(size=64, fit="crop"))
    assert cropped[:, :31].max() == 0.0 and cropped[:, 33:].min() == 1.0  # full width kept


def test_prepare_percentile_window_is_robust() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.uniform(100, 200, (256, 256)).astype(np.float32)
    pixels[0, 0] = 1e6  # a single hot pixel must not squash the rest
    out = prepare(pixels, PreprocessConfig(size=128, fit="crop"))
    assert 0.3 < float(out.mean()) < 0.7


def test_prepare_degenerate_inputs() -> None:
    with np.errstate(all="raise"):
        constant = prepare(np.full((50, 40), 7.0, np.float32), PreprocessConfig(size=32))
    assert constant.shape == (32, 32) and np.isfinite(constant).all()
    with_nan = np.ones((40, 40), np.float32)
    with_nan[:20] = 0
    with_nan[5, 5] = np.nan
    with_nan[6, 6] = np.inf
    out = prepare(with_nan, PreprocessConfig(size=32))
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert prepare(np.ones((8, 8, 3), np.uint8), PreprocessConfig(size=16)).shape == (16, 16)
    with pytest.raises(ImageDecodeError):
        prepare(np.zeros((0, 5), np.float32), PreprocessConfig(size=16))
    with pytest.raises(ImageDecodeError):
        prepare(np.zeros((2, 3, 4, 5), np.float32), PreprocessConfig(size=16))


def test_load_for_model_is_decode_then_prepare(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(_dicom_bytes(_dataset(_pattern(), modality="CT")))
    config = PreprocessConfig(size=32)
    out = load_for_model(path, config, check_modality=False)
    np.testing.assert_array_equal(out, prepare(decode_image(path, check_modality=False), config))


def test_to_tensor_shapes_and_normalisation() -> None:
    single = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    t = to_tensor(single)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0, 0].numpy(), [[-1.0, 0.0], [1.0, -0.5]])
    batch = np.stack([single, single])
    assert to_tensor(batch).shape == (2, 1, 2, 2)
    assert to_tensor(torch.from_numpy(batch)).shape == (2, 1, 2, 2)
    assert to_tensor(to_tensor(batch) * 0.5 + 0.5).shape == (2, 1, 2, 2)
    readonly = batch.copy()
    readonly.flags.writeable = False
    assert to_tensor(readonly).shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(batch[0], single)  # input untouched
    with pytest.raises(ValueError):
        to_tensor(np.zeros((2, 3, 4, 4), np.float32))


def test_config_round_trip_and_validation() -> None:
    config = PreprocessConfig(size=96, fit="crop", low_percentile=1.0, high_percentile=99.0)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    assert PreprocessConfig().to_dict() == {
        "size": 128,
        "fit": "pad",
        "low_percentile": 0.5,
        "high_percentile": 99.5,
        "equalize": False,
        "tta": 0,
    }
    # checkpoints written before a field existed load with its default
    assert PreprocessConfig.from_dict({"size": 160, "fit": "pad"}) == PreprocessConfig(size=160)
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict({"size": 64, "colour": True})
    for bad in ({"size": 0}, {"fit": "stretch"}, {"low_percentile": 60, "high_percentile": 50}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)

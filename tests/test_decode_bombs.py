"""Decompression bombs inside DICOM (the hardening issue, items 1 and 2): a deflated data set that
inflates far past what its header declares, and a compressed frame whose codestream is far larger
than the header's Rows x Columns. Both are refused with an :class:`ImageDecodeError` (a 422 at the
API) before the memory is taken: peak growth is measured in a child process (``ru_maxrss``), with
margins wide enough not to depend on the machine's load.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_dataset
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)

from app.service.decoding import decode_uploads
from app.service.errors import InvalidInputError
from models.imaging.decode import decode_image, header_pixels
from models.imaging.dicom import read_dicom
from models.imaging.preprocess import ImageDecodeError, PreprocessConfig

GIB = 1 << 30
MIB = 1 << 20
_PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


# --------------------------------------------------------------------------------------------------
# hostile files, built small and fast


def _header(rows: int = 256, cols: int = 256, **elements: object) -> object:
    """A CR image header (16-bit MONOCHROME2) without pixel data."""
    ds = dicom_dataset(None, Modality="CR", PatientID="P-BOMB", **elements)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _explicit_le(ds) -> bytes:  # noqa: ANN001
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _file_meta(ds, syntax: str) -> bytes:  # noqa: ANN001
    ds.file_meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


def _zeros_deflated(size: int, compressor) -> bytes:  # noqa: ANN001
    """``size`` zero bytes through ``compressor``, fast: a full flush makes every 16 MiB block of zeros
    compress to the same bytes, so one is compressed and repeated."""
    block = 16 * MIB
    chunk = b"\x00" * block
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first == again
    whole, rest = divmod(size, block)
    out = first * whole
    if rest:
        out += compressor.compress(b"\x00" * rest) + compressor.flush(zlib.Z_FULL_FLUSH)
    return out


def deflated_dicom(
    *, pixel_bytes: int = 256 * 256 * 2, private_bytes: int = 0, trailing_bytes: int = 0
) -> bytes:
    """A Deflated Explicit VR Little Endian file declaring 256 x 256 x 16 bits; its Pixel Data holds
    ``pixel_bytes`` zeros (honest: 128 KiB), after a private OB element of ``private_bytes`` zeros
    (a bomb in the header) and before a trailing padding element of ``trailing_bytes`` zeros."""
    ds = _header()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(_explicit_le(ds))
    if private_bytes:  # (0029,0010) LO creator, then (0029,1010) OB
        creator = b"BOMB"
        body += compressor.compress(b"\x29\x00\x10\x00LO" + len(creator).to_bytes(2, "little") + creator)
        body += compressor.compress(b"\x29\x00\x10\x10OB\x00\x00" + private_bytes.to_bytes(4, "little"))
        body += compressor.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(private_bytes, compressor)
    body += compressor.compress(_PIXEL_TAG + b"OW\x00\x00" + pixel_bytes.to_bytes(4, "little"))
    body += compressor.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(pixel_bytes, compressor)
    if trailing_bytes:  # (FFFC,FFFC) Data Set Trailing Padding
        body += compressor.compress(b"\xfc\xff\xfc\xffOB\x00\x00" + trailing_bytes.to_bytes(4, "little"))
        body += compressor.flush(zlib.Z_FULL_FLUSH) + _zeros_deflated(trailing_bytes, compressor)
    body += compressor.flush()
    return _file_meta(ds, DeflatedExplicitVRLittleEndian) + body


def _encapsulated(ds, syntax: str, frame: bytes) -> bytes:  # noqa: ANN001
    """``ds`` with ``frame`` as its one encapsulated frame, as a file."""
    frame += b"\x00" * (len(frame) % 2)
    item = b"\xfe\xff\x00\xe0" + len(frame).to_bytes(4, "little") + frame
    pixel = (
        _PIXEL_TAG
        + b"OB\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # empty basic offset table
        + item
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimiter
    )
    return _file_meta(ds, syntax) + _explicit_le(ds) + pixel


def j2k_frame(size: int) -> bytes:
    """A JPEG 2000 codestream of a ``size`` x ``size`` 16-bit image, a few hundred bytes whatever the
    size: one tile, no wavelet levels, one layer, and every code-block empty (an all-zero image).
    The SIZ and COD marker segments are written by hand; OpenJPEG decodes it in full."""
    siz = (
        (0).to_bytes(2, "big")  # Rsiz
        + size.to_bytes(4, "big") * 2  # Xsiz, Ysiz
        + (0).to_bytes(4, "big") * 2  # XOsiz, YOsiz
        + size.to_bytes(4, "big") * 2  # XTsiz, YTsiz: one tile
        + (0).to_bytes(4, "big") * 2  # XTOsiz, YTOsiz
        + (1).to_bytes(2, "big")  # Csiz
        + bytes([15, 1, 1])  # 16-bit unsigned, no subsampling
    )
    # COD: Scod 0 (default precincts), LRCP, 1 layer, no MCT; 0 levels, 64x64 blocks, style 0, 5-3
    cod = bytes([0, 0]) + (1).to_bytes(2, "big") + bytes([0, 0, 4, 4, 0, 1])
    qcd = bytes([0x40, 17 << 3])  # no quantisation, 2 guard bits; one subband, exponent 17
    segments = b"".join(
        m + (len(body) + 2).to_bytes(2, "big") + body
        for m, body in ((b"\xff\x51", siz), (b"\xff\x52", cod), (b"\xff\x5c", qcd))
    )
    tile = b"\x00"  # one packet, empty: no code-block included
    sot = (0).to_bytes(2, "big") + (12 + 2 + len(tile)).to_bytes(4, "big") + bytes([0, 1])
    return (
        b"\xff\x4f"
        + segments
        + b"\xff\x90"
        + (10).to_bytes(2, "big")
        + sot
        + b"\xff\x93"
        + tile
        + b"\xff\xd9"
    )


def _set_jpeg_size(jpeg: bytes, rows: int, cols: int, marker: int) -> bytes:
    """``jpeg`` with its start-of-frame segment (``marker``) claiming ``rows`` x ``cols``."""
    pos = jpeg.index(bytes([0xFF, marker]))
    out = bytearray(jpeg)
    out[pos + 5 : pos + 7] = rows.to_bytes(2, "big")
    out[pos + 7 : pos + 9] = cols.to_bytes(2, "big")
    return bytes(out)


def jpeg_frame(size: int) -> bytes:
    """A small baseline JPEG whose SOF0 claims ``size`` x ``size`` (the scan runs short; decoders
    allocate the frame the SOF declares before they find that out)."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="JPEG", quality=90)
    return _set_jpeg_size(buffer.getvalue(), size, size, 0xC0)


def jpeg_ls_frame(size: int) -> bytes:
    """A small JPEG-LS frame whose SOF55 claims ``size`` x ``size``."""
    ds = dicom_dataset(np.full((16, 16), 100, np.uint16), Modality="CR")
    ds.compress(JPEGLSLossless)
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    return _set_jpeg_size(frame, size, size, 0xF7)


# --------------------------------------------------------------------------------------------------
# peak memory of one decode, in a child process

_CHILD = """
import json, resource, sys, tracemalloc
from models.imaging.decode import decode_image, header_pixels
from models.imaging.preprocess import ImageDecodeError, PreprocessConfig
warm, data = (open(p, 'rb').read() for p in sys.argv[1:3])
config = PreprocessConfig(size=64) if sys.argv[3] == 'config' else None
decode_image(warm, config=config, check_modality=False)  # imports and plug-ins loaded first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
try:
    header_pixels(data)
    decode_image(data, config=config)
    error = None
except ImageDecodeError as exc:
    error = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
traced = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps({'growth_mib': (after - before) / 1024, 'traced_mib': traced, 'error': error}))
"""


def peak_growth(tmp_path: Path, data: bytes, warm: bytes, *, config: bool = True) -> dict:
    """Peak growth (MiB) while a fresh process reads the header and decodes ``data``, after decoding
    ``warm`` (same codec, honest) so that imports and plug-ins are not counted: of its peak RSS
    (``growth_mib``; what codecs allocate in C included) and of what tracemalloc traced
    (``traced_mib``: Python objects and NumPy arrays), with the refusal's message (``error``)."""
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "warm").write_bytes(warm)
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(tmp_path / "warm"),
            str(tmp_path / "data"),
            "config" if config else "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# 1. deflated data sets


def test_an_honest_deflated_dicom_still_decodes() -> None:
    data = deflated_dicom()
    radiograph = decode_image(data, check_modality=True)
    assert radiograph.shape == (256, 256)
    assert header_pixels(data) == 256 * 256
    ds = read_dicom(data)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian  # as the file says
    assert len(ds.PixelData) == 256 * 256 * 2


def test_a_deflated_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    bomb = deflated_dicom(pixel_bytes=GIB)  # declares 256 x 256, inflates to 1 GiB
    assert len(bomb) < 2 * MIB
    with pytest.raises(ImageDecodeError, match="inflates to more than"):
        decode_image(bomb)
    measured = peak_growth(tmp_path, bomb, deflated_dicom())
    assert measured["error"] and "inflates to more than" in measured["error"]
    assert measured["growth_mib"] < 100 and measured["traced_mib"] < 100, measured


@pytest.mark.parametrize("where", ["header", "trailer"])
def test_deflated_bombs_outside_the_pixel_data_are_refused(tmp_path: Path, where: str) -> None:
    bomb = deflated_dicom(**{f"{'private' if where == 'header' else 'trailing'}_bytes": GIB})
    with pytest.raises(ImageDecodeError, match="inflates to more than"):
        decode_image(bomb)
    if where == "header":  # header-only reads (the decode budget, STOW-RS, sync) are bounded too
        with pytest.raises(ImageDecodeError, match="inflates to more than"):
            read_dicom(bomb, header_only=True)
        assert header_pixels(bomb) is None
        measured = peak_growth(tmp_path, bomb, deflated_dicom())
        assert measured["growth_mib"] < 100 and measured["traced_mib"] < 100, measured


def test_header_only_reads_of_a_deflated_bomb_stop_before_the_pixels(tmp_path: Path) -> None:
    bomb = deflated_dicom(pixel_bytes=GIB)
    ds = read_dicom(bomb, header_only=True)
    assert (ds.Rows, ds.Columns) == (256, 256) and "PixelData" not in ds
    assert header_pixels(bomb) == 256 * 256
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    assert read_dicom(path, header_only=True, specific_tags=["PatientID"]).PatientID == "P-BOMB"
    with pytest.raises(ImageDecodeError, match="inflates to more than"):
        read_dicom(path)


def test_a_deflated_header_declaring_more_than_the_limit_is_refused_before_inflating() -> None:
    ds = _header(rows=60000, cols=60000)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(
        _explicit_le(ds) + _PIXEL_TAG + b"OW\x00\x00" + (2 * GIB).to_bytes(4, "little")
    )
    data = _file_meta(ds, DeflatedExplicitVRLittleEndian) + body + compressor.flush()
    with pytest.raises(ImageDecodeError, match="limit"):
        decode_image(data)


def test_the_service_answers_the_deflated_bomb_with_invalid_input() -> None:
    from app.service.decoding import DecodeBudget, Upload

    budget = DecodeBudget(512 * MIB, wait_seconds=0.1)
    with pytest.raises(InvalidInputError, match="bomb.dcm.*inflates to more than"):
        decode_uploads(
            [Upload("bomb.dcm", deflated_dicom(pixel_bytes=GIB))],
            max_pixels=50_000_000,
            config=PreprocessConfig(size=64),
            budget=budget,
        )
    assert budget.in_use == 0


# --------------------------------------------------------------------------------------------------
# 2. compressed frames larger than the header declares


@pytest.mark.parametrize("config", [True, False], ids=["reduced", "full"])
def test_a_large_jpeg_2000_frame_is_refused_before_decoding(tmp_path: Path, config: bool) -> None:
    honest = _encapsulated(_header(64, 64), JPEG2000Lossless, j2k_frame(64))
    assert decode_image(honest).shape == (64, 64)  # the hand-written codestream decodes
    bomb = _encapsulated(_header(), JPEG2000Lossless, j2k_frame(16000))  # 256 x 256 declared
    assert len(bomb) < 4096
    with pytest.raises(ImageDecodeError, match="16000 x 16000"):
        decode_image(bomb, config=PreprocessConfig(size=64) if config else None)
    measured = peak_growth(tmp_path, bomb, honest, config=config)
    assert measured["error"] and "16000 x 16000" in measured["error"]
    assert measured["growth_mib"] < 100 and measured["traced_mib"] < 100, measured


@pytest.mark.parametrize(
    ("syntax", "frame"),
    [(JPEGBaseline8Bit, jpeg_frame), (JPEGLSLossless, jpeg_ls_frame)],
    ids=["jpeg", "jpeg-ls"],
)
def test_a_large_jpeg_frame_is_refused_before_decoding(syntax: str, frame) -> None:  # noqa: ANN001
    ds = _header()
    if syntax == JPEGBaseline8Bit:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    with pytest.raises(ImageDecodeError, match="12000 x 12000.*256 x 256"):
        decode_image(_encapsulated(ds, syntax, frame(12000)))


def test_a_jpeg_frame_without_a_readable_size_is_refused() -> None:
    ds = _header()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    with pytest.raises(ImageDecodeError, match="size"):
        decode_image(_encapsulated(ds, JPEGBaseline8Bit, b"\xff\xd8\xff\xd9"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_plain_jpeg_claiming_a_huge_size_is_refused_from_its_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import ImageFile

    def _no_load(self):  # noqa: ANN001, ANN202 - the size check must come first
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_load)
    with pytest.raises(ImageDecodeError, match="12000 x 12000"):
        decode_image(jpeg_frame(12000))  # 144 M pixels, over the default limit

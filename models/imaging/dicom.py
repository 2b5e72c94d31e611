"""The one DICOM reader: a file with its 128-byte preamble, one that kept "DICM" but lost the
preamble, and a bare data set (old or hand-made files) are all read the same way, whole or header
only. Decoding, the decode budget, STOW-RS, PACS sync, de-identification and folder manifests call
:func:`read_dicom`, so a file one of them accepts is a file all of them accept.

pydicom is imported lazily: callers that only ever see PNG or JPEG never load it.
"""

from __future__ import annotations

import copy
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

#: Bytes at the start of a file that tell its kind: the preamble, "DICM" and the first tag.
HEAD_BYTES = 132 + 8

_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM".split()
    + b"UC UI UL UN UR US UT UV".split()
)


def has_preamble(head: bytes) -> bool:
    """True when ``head`` (the file's first bytes) holds the 128-byte preamble and "DICM"."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def looks_like_dicom(head: bytes) -> bool:
    """True when ``head`` starts a DICOM stream in any of the three shapes :func:`read_dicom` reads."""
    return has_preamble(head) or head.startswith(b"DICM") or looks_like_bare_dataset(head)


def looks_like_bare_dataset(head: bytes) -> bool:
    """True for a DICOM stream without the 128-byte preamble and "DICM" (old or hand-made files).

    Such a stream starts with a small group-0002 or group-0008 tag, followed either by a VR (explicit
    VR) or by a plausible 4-byte length (implicit VR). Image formats have their own magic bytes, which
    never match, and random bytes almost never do; pydicom's own parse is the final check.
    """
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        element = int.from_bytes(head[2:4], order)
        if group not in (0x0002, 0x0008) or element > 0x0100:
            continue
        if head[4:6] in _DICOM_VRS:
            return True
        if order == "little" and int.from_bytes(head[4:8], "little") < min(len(head), 1 << 16):
            return True
    return False


def read_dicom(
    source: bytes | str | os.PathLike,
    *,
    header_only: bool = False,
    specific_tags: Sequence[str] | None = None,
    max_pixels: int | None = None,
) -> Any:
    """The pydicom ``Dataset`` of ``source`` (bytes, or a path read lazily): whole, or without its
    pixel data when ``header_only``; ``specific_tags`` reads only those (folder scans).

    Bytes are read with pydicom's ``force`` unless they carry the preamble (callers sniffed them
    already); a file on disk only when its head has the shape of a bare data set, so a folder scan
    skips PNGs and notes instead of parsing them as DICOM. Raises what pydicom raises on a damaged
    stream (``InvalidDicomError``, ``ValueError``, ``EOFError``, ...); callers turn that into their
    own error with the file's name.

    A deflated data set (Deflated Explicit VR Little Endian) is inflated here, as it is read, never
    past what its header declares (:func:`_read_deflated`): past that, or past ``max_pixels`` declared
    pixels, it is refused with an :class:`~models.imaging.radiograph.ImageDecodeError` (a
    decompression bomb) before the memory is taken.
    """
    options = {"header_only": header_only, "specific_tags": specific_tags, "max_pixels": max_pixels}
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if data.startswith(b"DICM"):  # preamble dropped but prefix kept: give pydicom what it expects
            data = b"\x00" * 128 + data
        return _read(io.BytesIO(data), force=not has_preamble(data), **options)
    path = Path(source)
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
        if head.startswith(b"DICM"):
            return _read(io.BytesIO(b"\x00" * 128 + head + handle.read()), force=False, **options)
        handle.seek(0)
        return _read(handle, force=not has_preamble(head) and looks_like_bare_dataset(head), **options)


#: What a deflated data set may inflate to beyond the pixel data its header declares: the header
#: itself (elements before the pixels, a real one is kilobytes to a few hundred) and any after them.
DEFLATE_ALLOWANCE = 8 << 20

_MIB = 1 << 20


def _read(
    fp: BinaryIO,
    *,
    force: bool,
    header_only: bool,
    specific_tags: Sequence[str] | None,
    max_pixels: int | None,
) -> Any:
    """Read ``fp`` as pydicom's ``dcmread`` would, except that a deflated data set is inflated under a
    cap. The file meta is read first, with pydicom's own reader, so that the transfer syntax seen
    here is the one ``dcmread`` would act on."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    kwargs: dict[str, Any] = {"stop_before_pixels": header_only, "force": force}
    if specific_tags is not None:
        kwargs["specific_tags"] = list(specific_tags)
    preamble = read_preamble(fp, force)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated(fp, preamble, meta, kwargs, max_pixels=max_pixels)
    fp.seek(0)
    return pydicom.dcmread(fp, **kwargs)


def _read_deflated(
    fp: BinaryIO, preamble: bytes | None, meta: Any, kwargs: dict[str, Any], *, max_pixels: int | None
) -> Any:
    """The data set after ``meta`` in ``fp`` (raw deflate), inflated as pydicom reads it.

    pydicom itself would inflate the whole stream in one call, before reading a single element, even
    for a header-only read: a megabyte of zeros can hold a gigabyte. Here pydicom is given the file
    meta re-written as Explicit VR Little Endian (what the inflated data set is) followed by a stream
    that inflates on demand (:class:`_InflatingStream`). The header (up to the pixel data) may inflate
    to :data:`DEFLATE_ALLOWANCE`; a whole read first reads that header, then allows the pixel data it
    declares (Rows x Columns x frames x samples x BitsAllocated) plus the allowance. The data set comes
    back with the file's own meta, so it is written back deflated, as it came.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    plain = copy.deepcopy(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in plain:
        del plain.FileMetaInformationGroupLength  # its length changed; pydicom does without
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_file_meta_info(encoded, plain, enforce_standard=False)
    prefix = (b"" if preamble is None else preamble + b"DICM") + encoded.getvalue()
    kwargs = {**kwargs, "force": True}

    stream = _InflatingStream(
        prefix, fp, cap=len(prefix) + DEFLATE_ALLOWANCE, what="a header may take before its pixel data"
    )
    try:
        if kwargs["stop_before_pixels"]:
            ds = pydicom.dcmread(stream, **kwargs)
        else:
            header = pydicom.dcmread(stream, **{**kwargs, "stop_before_pixels": True, "specific_tags": None})
            declared, what = _declared_pixel_bytes(header, max_pixels)
            stream.seek(0)
            stream.cap = stream.inflated + declared + DEFLATE_ALLOWANCE
            stream.what = what
            ds = pydicom.dcmread(stream, **kwargs)
        stream.check()  # in case pydicom caught the refusal somewhere on the way
    finally:
        stream.close()
    ds.file_meta = meta
    return ds


def _declared_pixel_bytes(header: Any, max_pixels: int | None) -> tuple[int, str]:
    """Bytes of pixel data ``header`` declares, and those words for a refusal; ImageDecodeError when
    it declares more than ``max_pixels`` pixels."""
    from models.imaging.radiograph import ImageDecodeError

    def number(keyword: str, default: int) -> int:
        try:
            return max(0, int(header.get(keyword, default)))
        except (TypeError, ValueError):
            return default

    rows, cols = number("Rows", 0), number("Columns", 0)
    frames, samples = max(1, number("NumberOfFrames", 1)), max(1, number("SamplesPerPixel", 1))
    bits = min(64, max(1, number("BitsAllocated", 16)))
    pixels = rows * cols * frames
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(
            f"its header declares {rows} x {cols} pixels{f' x {frames} frames' if frames > 1 else ''}, "
            f"more than the limit of {max_pixels:,}"
        )
    declared = -(-pixels * samples * bits // 8)
    frames_text = f" x {frames} frames" if frames > 1 else ""
    return declared, (
        f"its header declares ({rows} x {cols} pixels{frames_text} of {bits} bits, plus "
        f"{DEFLATE_ALLOWANCE // _MIB} MiB for the other elements)"
    )


class _InflatingStream:
    """A read-only, seekable stream for pydicom: ``prefix``, then the raw deflate stream read from
    ``source`` inflated on demand, never to more than ``cap`` bytes in all: past that it raises
    ImageDecodeError, having inflated at most one byte more. Chunks are small, so a read of a huge
    declared length fails at the cap instead of allocating it."""

    _CHUNK = 1 << 20

    def __init__(self, prefix: bytes, source: BinaryIO, *, cap: int, what: str) -> None:
        self._buffer = bytearray(prefix)
        self._source = source
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pos = 0
        self._ended = False
        self._refusal: Exception | None = None
        self.cap = cap
        self.what = what
        self.closed = False

    @property
    def inflated(self) -> int:
        return len(self._buffer)

    def _fill(self, end: int | None) -> None:
        """Inflate until the buffer holds ``end`` bytes (None: all), the stream ends, or the cap."""
        buffer, inflater = self._buffer, self._inflater
        while not self._ended and (end is None or len(buffer) < end):
            if len(buffer) > self.cap:
                self._refuse()
            data = inflater.unconsumed_tail or self._source.read(self._CHUNK)
            if not data:
                self._ended = True
                if not inflater.eof:
                    raise EOFError("the deflated data set is truncated (its deflate stream does not end)")
                break
            want = min(self.cap + 1 - len(buffer), self._CHUNK)
            buffer += inflater.decompress(data, want)
            if inflater.eof:
                self._ended = True
        if len(buffer) > self.cap:
            self._refuse()

    def _refuse(self) -> None:
        from models.imaging.radiograph import ImageDecodeError

        self._refusal = ImageDecodeError(
            f"the deflated data set inflates to more than {self.cap / _MIB:,.1f} MiB, more than "
            f"{self.what}: refused as a decompression bomb (send the image uncompressed, or "
            "with an image compression transfer syntax)"
        )
        raise self._refusal

    def check(self) -> None:
        if self._refusal is not None:
            raise self._refusal

    def read(self, size: int | None = -1) -> bytes:
        end = None if size is None or size < 0 else self._pos + size
        self._fill(end)
        stop = len(self._buffer) if end is None else min(end, len(self._buffer))
        with memoryview(self._buffer) as view:  # one copy, not two
            out = bytes(view[self._pos : stop])
        self._pos = max(self._pos, stop)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(None)
            base = len(self._buffer)
        else:
            base = self._pos if whence == 1 else 0
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        """Let the inflated bytes go (the data set holds its own copies of the values)."""
        self._buffer = bytearray()
        self.closed = True

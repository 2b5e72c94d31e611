"""The one DICOM reader: a file with its 128-byte preamble, one that kept "DICM" but lost the
preamble, and a bare data set (old or hand-made files) are all read the same way, whole or header
only. Decoding, the decode budget, STOW-RS, PACS sync, de-identification and folder manifests call
:func:`read_dicom`, so a file one of them accepts is a file all of them accept.

pydicom is imported lazily: callers that only ever see PNG or JPEG never load it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
) -> Any:
    """The pydicom ``Dataset`` of ``source`` (bytes, or a path read lazily): whole, or without its
    pixel data when ``header_only``; ``specific_tags`` reads only those (folder scans).

    Bytes are read with pydicom's ``force`` unless they carry the preamble (callers sniffed them
    already); a file on disk only when its head has the shape of a bare data set, so a folder scan
    skips PNGs and notes instead of parsing them as DICOM. Raises what pydicom raises on a damaged
    stream (``InvalidDicomError``, ``ValueError``, ``EOFError``, ...); callers turn that into their
    own error with the file's name.
    """
    import pydicom

    kwargs: dict[str, Any] = {"stop_before_pixels": header_only}
    if specific_tags is not None:
        kwargs["specific_tags"] = list(specific_tags)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if data.startswith(b"DICM"):  # preamble dropped but prefix kept: give pydicom what it expects
            data = b"\x00" * 128 + data
        return pydicom.dcmread(io.BytesIO(data), force=not has_preamble(data), **kwargs)
    path = Path(source)
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
        if head.startswith(b"DICM"):
            stream: Any = io.BytesIO(b"\x00" * 128 + head + handle.read())
            return pydicom.dcmread(stream, **kwargs)
        handle.seek(0)
        return pydicom.dcmread(
            handle, force=not has_preamble(head) and looks_like_bare_dataset(head), **kwargs
        )

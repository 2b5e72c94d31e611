"""What the gallery keeps of an upload: originals at rest without the patient's identity.

The stored original exists for one reason, ``cxr-reid reindex`` (re-embedding with a new model), which
needs the pixels and what decoding them takes, not who the patient is. A DICOM original is stored
de-identified with the DICOM PS3.15 Basic Application Confidentiality Profile: every attribute of
Table E.1-1 is removed (X), emptied (Z), given a dummy value (D) or a new UID (U), as the table says.
The table and its actions come from ``dicom-anonymizer`` (Kitware), which packages the standard's
table edition by edition; this module picks the newest edition it ships and only adds what the
gallery needs on top:

- the SOP, study and series instance UIDs are kept (the gallery row records them already, and they
  tie the file to its row and to the PACS); every other UID the profile replaces gets a new UID
  derived from the old one, so the same UID maps to the same replacement in every file, across
  restarts, without a growing mapping in memory;
- the profile is applied inside sequence items too (the library applies it to the top level), an
  X attribute is removed whatever its VR (the library writes a dummy date into X dates), and so are
  an attribute written with a VR the library has no empty or dummy value for (a name as OW) and a
  U attribute not written as a UID (the library would write a UID into it, and the file would not
  save);
- private tags are removed, and so are whole overlay (60xx) and curve (50xx) groups: burnt-in
  annotations can hold names, and an overlay without its data is left dangling otherwise;
- the file is marked ``PatientIdentityRemoved = YES`` with the profile's code (113100).

The pixel module, the LUTs, the photometric interpretation and the transfer syntax are not in the
table and are written back untouched, so the copy decodes to the same pixels (tests check it). The
gallery's own row keeps the labels the client gave.
"""

from __future__ import annotations

import io
import logging
import pkgutil
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from importlib.metadata import version

from dicomanonymizer import dicom_anonymization_databases
from dicomanonymizer import simpledicomanonymizer as profile
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models.imaging.dicom import read_dicom

log = logging.getLogger(__name__)

#: The library's name for a packaged edition of Table E.1-1 is ``dicomfields_<year><letter>``.
_TABLE_PREFIX = "dicomfields_"

#: Kept as they are: the gallery records them in its row (``index.records.ImageMetadata``).
KEPT_UIDS = frozenset(
    {
        (0x0008, 0x0018),  # SOP Instance UID
        (0x0002, 0x0003),  # Media Storage SOP Instance UID (the file meta's copy of it)
        (0x0020, 0x000D),  # Study Instance UID
        (0x0020, 0x000E),  # Series Instance UID
    }
)

#: Where the library may give a UI element a new UID (U, D and the combined actions): replaced by
#: ``_new_uid`` instead, so replacements are consistent without the library's process-wide mapping.
_REPLACING = frozenset(
    {
        profile.replace,
        profile.replace_UID,
        profile.empty_or_replace,
        profile.delete_or_replace,
        profile.delete_or_empty_or_replace,
        profile.delete_or_empty_or_replace_UID,
    }
)

_OVERLAY_GROUPS = (0x5000, 0x6000)  # curves and overlays, groups 50xx and 60xx

#: The profile's code in DeidentificationMethodCodeSequence (PS3.16 CID 7050).
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# The library keeps a module-level old -> new UID mapping for UIDs nested in sequences it replaces
# whole; one file at a time, and the mapping is cleared after each, so it neither grows nor leaks
# one file's UIDs into another's.
_LOCK = threading.Lock()

Action = Callable[[Dataset, tuple[int, ...]], None]


def profile_table() -> str:
    """The newest edition of Table E.1-1 that the installed ``dicom-anonymizer`` packages."""
    editions = [
        name
        for _, name, _ in pkgutil.iter_modules(dicom_anonymization_databases.__path__)
        if name.startswith(_TABLE_PREFIX)
    ]
    if not editions:
        raise RuntimeError("dicom-anonymizer packages no PS3.15 Table E.1-1: reinstall it")
    return max(editions)  # 2023 < 2024b < 2026c: the editions sort by name


@cache
def profile_actions() -> dict[str, list[tuple[int, ...]]]:
    """Table E.1-1 as the library packages it: action group (``X_TAGS``, ``Z_TAGS``, ``D_TAGS``,
    ``U_TAGS``, the combined ``X_Z_TAGS``...) -> tags, ``(group, element)`` or, for repeating
    groups, ``(group, element, group mask, element mask)``."""
    table = dicom_anonymization_database_selector(profile_table())
    return {name: list(tags) for name, tags in table.items() if name != "ALL_TAGS"}


def _new_uid(uid: str) -> str:
    """A UID derived from ``uid`` alone, the same in every file: ``2.25.`` and the name-based (SHA-1)
    UUID of the OID, as PS3.5 B.2 allows."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, uid).int}" if uid else uid


def _consistent_uids(action: Action) -> Action:
    """``action``, except that a UI element gets ``_new_uid`` of each of its values, and a U attribute
    written with another VR is removed (the library would write a UID into it whatever its VR)."""

    def apply(dataset: Dataset, tag: tuple[int, ...]) -> None:
        element = dataset.get(tag)
        if element is not None and element.VR == "UI":
            values = element.value if element.VM > 1 else [element.value]
            new = [_new_uid(str(v)) for v in values]
            element.value = new if element.VM > 1 else new[0]
        elif element is not None and action is profile.replace_UID:
            _remove(dataset, tag)
        else:
            action(dataset, tag)

    return apply


def _remove(dataset: Dataset, tag: tuple[int, ...]) -> None:
    """X: removed. (The library's own X writes a dummy 00010101 into dates instead.)"""
    if tag in dataset:
        del dataset[tag]


def _or_removed(action: Action) -> Action:
    """``action``, or the attribute removed where the library has no value for its VR (a table
    attribute written with an unusual VR, say a name as OW): never stored as it came."""

    def apply(dataset: Dataset, tag: tuple[int, ...]) -> None:
        try:
            action(dataset, tag)
        except NotImplementedError as exc:
            log.info("removed %s from a stored original: %s", tag, exc)
            _remove(dataset, tag)

    return apply


@cache
def _rules() -> dict[tuple[int, ...], Action]:
    """The library's actions for the table, with the gallery's UIDs kept, UIDs replaced
    consistently (see the module docstring), X attributes removed whatever their VR, and any
    attribute the library cannot empty or replace removed."""
    rules: dict[tuple[int, ...], Action] = profile.initialize_actions(profile_table())
    for tag, action in rules.items():
        if tag in KEPT_UIDS:
            rules[tag] = profile.keep
        elif action is profile.delete:
            rules[tag] = _remove
        elif action in _REPLACING:
            rules[tag] = _or_removed(_consistent_uids(action))
        else:
            rules[tag] = _or_removed(action)
    return rules


def deidentification_method() -> str:
    """What DeidentificationMethod says (LO: at most 64 characters)."""
    edition = profile_table().removeprefix(_TABLE_PREFIX)
    text = f"PS3.15 basic profile, Table E.1-1 of {edition}; instance UIDs kept"
    return text[:64]


def _nested_items(ds: Dataset) -> Iterator[Dataset]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _nested_items(item)


def _apply_profile(ds: Dataset) -> None:
    base = _rules()
    profile.anonymize_dataset(ds, base_rules_gen=lambda: dict(base), delete_private_tags=True)
    for item in _nested_items(ds):  # what is left of the sequences after the top-level pass
        profile.anonymize_dataset(item, base_rules_gen=lambda: dict(base), delete_private_tags=False)
    mapping = getattr(profile, "dictionary", None)
    if isinstance(mapping, dict):
        mapping.clear()


def stored_original(data: bytes, source_format: str) -> bytes:
    """The bytes the gallery stores for an upload: a DICOM without identifying attributes, other
    formats as they are (PNG/JPEG/TIFF carry no DICOM header; their metadata is not inspected)."""
    if source_format != "dicom":
        return data
    return deidentified_dicom(data)


def deidentified_dicom(data: bytes) -> bytes:
    """``data`` (a DICOM file or raw data set) written back through the basic profile."""
    try:
        ds = read_dicom(data)
    except (InvalidDicomError, ValueError, EOFError) as exc:  # decoded once already: unexpected
        raise ValueError(f"cannot re-read the DICOM upload to de-identify it: {exc}") from exc
    with _LOCK:
        _apply_profile(ds)
    for tag in [elem.tag for elem in ds if elem.tag.group & 0xFF00 in _OVERLAY_GROUPS]:
        del ds[tag]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = deidentification_method()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    log.debug("de-identified a DICOM with %s (dicom-anonymizer %s)", profile_table(), _library_version())
    buffer = io.BytesIO()
    ds.save_as(buffer)  # written like the original: same transfer syntax, pixel data untouched
    return buffer.getvalue()


@cache
def _library_version() -> str:
    return version("dicom-anonymizer")

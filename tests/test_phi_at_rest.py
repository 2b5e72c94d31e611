"""PHI at rest: stored DICOM originals go through the PS3.15 basic profile (every attribute of Table
E.1-1 removed, emptied or replaced, checked against the table the de-identification library
packages) but decode to the same pixels and keep the UIDs the gallery records; gallery files and
folders are the service user's only."""

from __future__ import annotations

import copy
import hashlib
import io
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_dataset
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from app.service.phi import (
    BASIC_PROFILE_CODE,
    KEPT_UIDS,
    deidentified_dicom,
    profile_actions,
    stored_original,
)
from models.imaging.preprocess import decode_image

IDENTITY = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-0042",
    "PatientBirthDate": "19600229",
    "PatientAddress": "1 Harbour Street",
    "InstitutionName": "St Elsewhere",
    "AccessionNumber": "ACC-777",
    "ReferringPhysicianName": "House^Gregory",
}


def _identified_dicom() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 4096, (128, 128)).astype("<u2")
    ds = dicom_dataset(pixels, Modality="CR", StudyInstanceUID="1.2.3.4", ViewPosition="PA", **IDENTITY)
    ds.add_new(0x00091001, "LO", "private note about Jane")  # a private tag
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_real_cr_files_lose_identity_and_keep_pixels(name: str) -> None:
    original = Path(get_testdata_file(name)).read_bytes()
    before = pydicom.dcmread(io.BytesIO(original))
    assert "PatientName" in before
    stripped = deidentified_dicom(original)
    after = pydicom.dcmread(io.BytesIO(stripped))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        assert before[keyword].value and after.get(keyword) != before[keyword].value, keyword
    assert str(before.PatientName).encode() not in stripped
    assert after.PatientIdentityRemoved == "YES"
    assert after.SOPInstanceUID == before.SOPInstanceUID and after.StudyInstanceUID == before.StudyInstanceUID
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(decode_image(stripped).pixels, decode_image(original).pixels)


def test_stored_original_only_changes_dicom() -> None:
    png = b"\x89PNG\r\n\x1a\n not really"
    assert stored_original(png, "png") is png
    stripped = stored_original(_identified_dicom(), "dicom")
    for value in IDENTITY.values():
        assert value.encode() not in stripped
    assert b"private note" not in stripped


# A value per VR for the attributes that carry no text; text VRs get a marker unique to the attribute.
_SAMPLES: dict[str, object] = {
    "DA": "19600229",
    "TM": "101112",
    "DT": "19600229101112",
    "AS": "063Y",
    "DS": "12.5",
    "IS": "7",
    "US": 7,
    "SS": 7,
    "UL": 7,
    "SL": 7,
    "FL": 7.5,
    "FD": 7.5,
    "UR": "http://marker.example/record",
}
_TEXT_VRS = {"AE", "CS", "SH", "LO", "PN", "ST", "LT", "UT", "UC"}
_BYTES_VRS = {"OB", "OW", "UN"}


def _profile_tags() -> dict[tuple[int, int], str]:
    """Table E.1-1 as packaged: tag -> action group, for the attributes a DICOM file can carry
    (group 0000 is the network command set; 0002 the file meta, whose one entry is kept)."""
    return {
        tag: action
        for action, tags in profile_actions().items()
        for tag in tags
        if len(tag) == 2 and tag[0] not in (0x0000, 0x0002)
    }


def _with_every_profile_attribute(base: Dataset, tags: dict[tuple[int, int], str]) -> bytes:
    """``base`` plus every attribute of ``tags`` it lacks, each with a value unique to it (an attribute
    newer than pydicom's dictionary is written as UN, as a writer that does not know it would)."""
    ds = copy.deepcopy(base)
    for n, tag in enumerate(sorted(tags)):
        if tag in ds:
            continue
        vr = dictionary_VR(tag).split(" or ")[0] if dictionary_has_tag(tag) else "UN"
        marker = f"MARKER{n:04d}"
        if vr == "SQ":
            item = Dataset()
            item.CodeMeaning = marker
            value: object = Sequence([item])
        elif vr == "UI":
            value = f"1.2.826.0.1.3680043.10.{n}"
        elif vr in _TEXT_VRS:
            value = marker
        elif vr in _BYTES_VRS:
            value = marker.encode()
        else:
            value = _SAMPLES[vr]
        ds.add_new(tag, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_every_basic_profile_attribute_is_removed_emptied_or_replaced() -> None:
    tags = _profile_tags()
    well_known = ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "InstitutionName",
                  "AccessionNumber", "ReferringPhysicianName", "OperatorsName", "StudyDate",
                  "DeviceSerialNumber", "FrameOfReferenceUID")  # fmt: skip
    assert {keyword_for_tag(tag) for tag in tags} >= set(well_known)  # it is the real table
    base = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    original = _with_every_profile_attribute(base, tags)
    before = pydicom.dcmread(io.BytesIO(original))
    stripped = deidentified_dicom(original)
    after = pydicom.dcmread(io.BytesIO(stripped))

    assert b"MARKER" not in stripped and b"marker.example" not in stripped
    checked = 0
    for tag, action in tags.items():
        if tag not in before:
            continue
        checked += 1
        name, old = keyword_for_tag(tag) or str(tag), before[tag].value
        new = after[tag].value if tag in after else None
        if action == "X_TAGS":
            assert tag not in after, f"X {name} still there"
        elif action == "Z_TAGS":  # zero length, or a dummy value of the VR (dates: 00010101)
            assert tag in after and new != old, f"Z {name}: {new!r}"
            assert after[tag].VR not in _TEXT_VRS or not new, f"Z {name}: {new!r}"
        elif action == "D_TAGS":
            assert tag in after and new not in (None, "", b"") and new != old, f"D {name}: {new!r}"
        elif action == "U_TAGS" and tag in KEPT_UIDS:
            assert new == old, f"{name} is what the gallery records: kept"
        elif action == "U_TAGS":
            assert new and new != old and UID(new).is_valid, f"U {name}: {new!r}"
        else:  # the combined actions (X/Z, X/D, Z/D, X/Z/D, X/Z/U*): one of them, never the value
            assert new != old, f"{action} {name} unchanged"
    assert checked >= len(tags) - len(base) and checked > 600  # the whole table went through
    np.testing.assert_array_equal(decode_image(stripped).pixels, decode_image(original).pixels)
    assert deidentified_dicom(original) == stripped  # deterministic: replacements are consistent


def test_uids_kept_or_replaced_consistently_across_files() -> None:
    shared_frame, shared_event = "1.2.826.0.1.3680043.10.500", "1.2.826.0.1.3680043.10.501"
    files = []
    for _ in range(2):
        pixels = np.zeros((64, 64), dtype="<u2")
        ds = dicom_dataset(pixels, Modality="CR", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.5",
                           FrameOfReferenceUID=shared_frame, IrradiationEventUID=shared_event)  # fmt: skip
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((ds, pydicom.dcmread(io.BytesIO(deidentified_dicom(buffer.getvalue())))))
    (a_in, a_out), (b_in, b_out) = files
    for before, after in files:  # what the gallery records, and the file meta's copy, are kept
        assert after.SOPInstanceUID == before.SOPInstanceUID == after.file_meta.MediaStorageSOPInstanceUID
        assert (after.StudyInstanceUID, after.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
    assert a_out.SOPInstanceUID != b_out.SOPInstanceUID
    assert a_out.FrameOfReferenceUID == b_out.FrameOfReferenceUID != shared_frame
    assert a_out.IrradiationEventUID == b_out.IrradiationEventUID != shared_event
    assert a_out.FrameOfReferenceUID != a_out.IrradiationEventUID


def test_nested_identity_overlays_and_private_tags_go_and_the_file_says_how() -> None:
    pixels = np.random.default_rng(1).integers(0, 4096, (96, 96)).astype("<u2")
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "R-10214", "SRT", "postero-anterior"
    view.PatientName = "Nested^Jane"  # a table attribute inside a sequence the table does not name
    view.InstitutionName = "Nested Hospital"
    ds = dicom_dataset(pixels, Modality="CR", ViewCodeSequence=[view], **IDENTITY)
    ds.add_new(0x60000010, "US", 96)  # an overlay: its rows, columns and bits
    ds.add_new(0x60000011, "US", 96)
    ds.add_new(0x60003000, "OW", b"\xff" * (96 * 96 // 8))
    ds.add_new(0x60004000, "LT", "Jane Doe, bed 4")  # overlay comments
    ds.add_new(0x50000022, "LO", "curve of Jane")  # a retired curve
    ds.add_new(0x00091010, "LO", "vendor note on Jane")  # a private tag, with its creator
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stripped = deidentified_dicom(buffer.getvalue())
    after = pydicom.dcmread(io.BytesIO(stripped))

    for text in ("Nested", "Jane", "ACME", *IDENTITY.values()):
        assert text.encode() not in stripped, text
    item = after.ViewCodeSequence[0]
    assert item.CodeMeaning == "postero-anterior" and not item.get("PatientName")  # the rest is kept
    assert not [e for e in after if e.tag.group & 0xFF00 in (0x5000, 0x6000) or e.tag.is_private]
    assert after.PatientIdentityRemoved == "YES" and "basic profile" in after.DeidentificationMethod
    code = after.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == BASIC_PROFILE_CODE
    np.testing.assert_array_equal(decode_image(stripped).pixels, pixels)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on values odd for their VR, on purpose
def test_table_attributes_in_odd_vrs_are_removed_and_the_image_still_enrols(
    make_client,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    pixels = np.random.default_rng(2).integers(0, 4096, (64, 64)).astype("<u2")
    ds = dicom_dataset(pixels, Modality="CR", PatientID="MRN-0099")
    odd = {
        0x0040A123: ("OW", b"Jane"),  # Person Name (D)
        0x00100010: ("AT", 0x00100010),  # Patient's Name (Z)
        0x00080090: ("OF", b"Hous"),  # Referring Physician's Name (Z)
        0x00200052: ("SS", 7),  # Frame of Reference UID (U)
        0x00081155: ("DS", "1.5"),  # Referenced SOP Instance UID (U)
    }
    for tag, (vr, value) in odd.items():
        ds.add_new(tag, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    upload = buffer.getvalue()
    after = pydicom.dcmread(io.BytesIO(deidentified_dicom(upload)))
    assert not [tag for tag in odd if tag in after]
    np.testing.assert_array_equal(decode_image(deidentified_dicom(upload)).pixels, pixels)
    client = make_client(tmp_path / "data")
    response = client.post("/images", files={"file": ("odd.dcm", upload)})
    assert response.status_code == 201, response.text
    client.__exit__(None, None, None)


# One value of each VR: any table attribute may come written with any of them.
_ANY_VR: dict[str, object] = {
    **_SAMPLES,
    **{vr: "x" for vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")},
    **{vr: 1 for vr in ("SV", "UV")},
    **{vr: b"abcdefgh" for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN")},
    "AT": 0x00100010,
    "UI": "1.2.3",
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on values odd for their VR, on purpose
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(set(_profile_tags()) - KEPT_UIDS)), st.sampled_from(list(_ANY_VR))),
        min_size=1,
        max_size=12,
        unique_by=lambda pair: pair[0],
    )
)
def test_any_table_attribute_in_any_vr_is_never_stored_as_it_came(attributes: list) -> None:
    ds = dicom_dataset(np.zeros((8, 8), dtype="<u2"), Modality="CR")
    buffer = io.BytesIO()
    try:
        for tag, vr in attributes:
            ds.add_new(tag, vr, _ANY_VR[vr])
        ds.save_as(buffer, enforce_file_format=True)
    except (TypeError, ValueError, OSError):  # pydicom cannot write that value in that VR
        assume(False)
    before = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    after = pydicom.dcmread(io.BytesIO(deidentified_dicom(buffer.getvalue())))
    for tag, vr in attributes:
        assert tag not in after or after[tag].value != before[tag].value, (tag, vr)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enrolled_dicom_is_stored_without_identity_in_private_files(make_client, tmp_path: Path) -> None:  # noqa: ANN001
    data_dir = tmp_path / "data"
    client = make_client(data_dir)
    upload = _identified_dicom()
    response = client.post("/images", files={"file": ("jane.dcm", upload)})
    assert response.status_code == 201, response.text
    image = response.json()["images"][0]["image"]
    assert (
        image["patient_id"] == "MRN-0042" and image["study_instance_uid"] == "1.2.3.4"
    )  # labels kept in the row
    assert image["sha256"] == hashlib.sha256(upload).hexdigest()  # names what the client sent
    (blob,) = [p for p in (data_dir / "images").rglob("*") if p.is_file()]
    stored = blob.read_bytes()
    for value in IDENTITY.values():
        assert value.encode() not in stored, value
    np.testing.assert_array_equal(decode_image(stored).pixels, decode_image(upload).pixels)
    client.__exit__(None, None, None)  # closing writes the FAISS file too

    assert _mode(data_dir) == 0o700 and _mode(data_dir / "images") == 0o700 and _mode(blob.parent) == 0o700
    for path in [blob, *data_dir.glob("gallery.sqlite*"), *data_dir.glob("faiss.index*"), data_dir / ".lock"]:
        assert _mode(path) == 0o600, path

"""What the gallery keeps of an upload: originals at rest without the patient's identity.

The stored original exists for one reason, ``cxr-reid reindex`` (re-embedding with a new model), which
needs the pixels and what decoding them takes, not who the patient is. A DICOM original is stored
without the attributes that identify the patient, staff or institution (the ones of the DICOM
PS3.15 basic de-identification profile that carry names, ids, dates, addresses and free text),
without private tags and overlays (burnt-in annotations can hold names), and marked
``PatientIdentityRemoved = YES``. The UIDs the gallery records (SOP, study, series instance) and
every attribute decoding uses (pixel module, modality and VOI LUTs, photometric interpretation,
transfer syntax) are kept. The gallery's own row keeps the labels the client gave.

Written here rather than with a de-identification library: the gallery's need is this one
fixed list, applied to files it has just decoded, and the decoder tests prove the copy decodes to
the same pixels.
"""

from __future__ import annotations

import io
import logging

from pydicom.errors import InvalidDicomError

from models.imaging.dicom import read_dicom

log = logging.getLogger(__name__)

#: Attributes removed from stored DICOM originals (identifying, per PS3.15 Annex E, basic profile).
IDENTIFYING_KEYWORDS = (
    # patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientReligiousPreference",
    "EthnicGroup",
    "Occupation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "AdditionalPatientHistory",
    "PatientComments",
    "ResponsiblePerson",
    "ReferencedPatientSequence",
    "InsurancePlanIdentification",
    # staff and institution
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "DeviceSerialNumber",
    # visit and study ids, dates and free text
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AcquisitionDateTime",
    "StudyDescription",
    "SeriesDescription",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
    "RequestAttributesSequence",
    "ImageComments",
    "DerivationDescription",
)

_OVERLAY_GROUPS = (0x5000, 0x6000)  # curves and overlays, groups 50xx and 60xx


def stored_original(data: bytes, source_format: str) -> bytes:
    """The bytes the gallery stores for an upload: a DICOM without identifying attributes, other
    formats as they are (PNG/JPEG/TIFF carry no DICOM header; their metadata is not inspected)."""
    if source_format != "dicom":
        return data
    return deidentified_dicom(data)


def deidentified_dicom(data: bytes) -> bytes:
    """``data`` (a DICOM file or raw data set) written back without identifying attributes."""
    try:
        ds = read_dicom(data)
    except (InvalidDicomError, ValueError, EOFError) as exc:  # decoded once already: unexpected
        raise ValueError(f"cannot re-read the DICOM upload to de-identify it: {exc}") from exc
    for keyword in IDENTIFYING_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    for tag in [elem.tag for elem in ds if elem.tag.group & 0xFF00 in _OVERLAY_GROUPS]:
        del ds[tag]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "cxr-reid: PS3.15 basic profile attributes removed"  # LO: <= 64 chars
    buffer = io.BytesIO()
    ds.save_as(buffer)  # written like the original: same transfer syntax, pixel data untouched
    return buffer.getvalue()

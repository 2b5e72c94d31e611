"""Write the example radiographs as DICOM files, the way a PACS would hold them.

``examples/radiographs/`` holds seven real chest X-rays of three children as JPEG. A PACS holds
DICOM, so the PACS walk-through (docs/pacs.md) needs the same pictures as CR instances with the
tags a PACS and cxr-reid read: PatientID, Study/Series/SOP Instance UIDs, Modality, ViewPosition,
BodyPartExamined, StudyDate. This script writes them to ``examples/dicom/`` (one study per image,
8-bit MONOCHROME2, the JPEG's grey pixels unchanged), and one deliberate misfile, child A's second
radiograph filed under child C, to ``examples/dicom/misfiled/``.

Every UID is derived from the source file's bytes (``pydicom.uid.generate_uid`` with that entropy),
so running the script again writes byte-identical files: the committed ones are what it makes.

    python examples/make_dicom.py            # rewrite examples/dicom/
    python examples/make_dicom.py --check    # exit 1 when a committed file differs from what it makes
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

log = logging.getLogger("make_dicom")

HERE = Path(__file__).resolve().parent
RADIOGRAPHS = HERE / "radiographs"
OUT = HERE / "dicom"
#: Computed Radiography Image Storage: the plainest projection-radiograph SOP class
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
#: the examples carry no real dates; each child's studies are one day apart from this one
FIRST_STUDY_DATE = dt.date(2024, 5, 1)


@dataclass(frozen=True)
class Example:
    """One DICOM file to write: which picture, filed under which patient, in which view."""

    image: str
    patient_id: str
    view: str
    out: str


def examples() -> list[Example]:
    """The seven children's radiographs filed correctly, and one misfile (A's second image under C).

    The Kermany set's images are anteroposterior (small children are imaged supine or held): AP.
    """
    filed = [
        Example(f"child-{c}-{n}.jpeg", f"child-{c.upper()}", "AP", f"child-{c}-{n}.dcm")
        for c, n in (("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3), ("c", 1), ("c", 2))
    ]
    misfile = Example("child-a-2.jpeg", "child-C", "AP", "misfiled/child-a-2-filed-as-child-c.dcm")
    return [*filed, misfile]


def _uid(digest: str, *parts: str) -> str:
    """A stable UID under pydicom's root, hashed from the picture's digest and what the UID names
    (``prefix=None`` would ignore the entropy and draw a random UUID)."""
    return generate_uid(entropy_srcs=[digest, *parts])


def dataset(example: Example, index: int) -> Dataset:
    """The DICOM dataset of one example: CR image storage, explicit VR little endian, 8-bit grey."""
    source = RADIOGRAPHS / example.image
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    grey = np.asarray(Image.open(source).convert("L"), dtype=np.uint8)
    # a study per image: the misfile is a study of its own, filed under the wrong patient
    study = _uid(digest, "study", example.patient_id)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(digest, "instance", example.patient_id)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = _uid(digest, "series", example.patient_id)
    ds.SpecificCharacterSet = "ISO_IR 100"
    date = (FIRST_STUDY_DATE + dt.timedelta(days=index)).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = f"EX{index + 1:04d}"
    ds.StudyID = str(index + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientID = example.patient_id
    ds.PatientName = f"Example^{example.patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = example.view
    ds.PatientOrientation = ""
    ds.StudyDescription = "Chest X-ray (example, CC BY 4.0, Kermany et al. 2018)"
    ds.SeriesDescription = f"CHEST {example.view}"
    ds.ImageComments = f"examples/radiographs/{example.image}"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = grey.tobytes()
    return ds


def encode(ds: Dataset) -> bytes:
    """The file's bytes: preamble, DICM prefix, file meta, dataset."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_all(out: Path = OUT, *, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) every example file; returns the paths that differ.

    A manifest (``manifest.csv``: path, patient_id, view, the source picture, the UIDs) is written
    beside them.
    """
    differ: list[Path] = []
    rows = []
    wanted: dict[Path, bytes] = {}
    for index, example in enumerate(examples()):
        ds = dataset(example, index)
        wanted[out / example.out] = encode(ds)
        rows.append(
            [
                example.out,
                example.patient_id,
                example.view,
                example.image,
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
            ]
        )
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["path", "patient_id", "view", "source", "study_uid", "series_uid", "sop_instance_uid"])
    writer.writerows(rows)
    wanted[out / "manifest.csv"] = manifest.getvalue().encode()
    for path, data in wanted.items():
        if path.exists() and path.read_bytes() == data:
            continue
        differ.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            log.info("wrote %s (%d bytes)", path.relative_to(out.parent), len(data))
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (default examples/dicom)")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a file differs from what it makes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    differ = write_all(args.out, check=args.check)
    if args.check and differ:
        log.error("out of date (run python examples/make_dicom.py): %s", ", ".join(map(str, differ)))
        return 1
    log.info("%s: %d file(s) %s", args.out, len(differ), "differ" if args.check else "written")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where training data comes from: ``data`` writes a manifest from a public set as downloaded
(ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest) or from a folder of DICOM files (by PatientID),
so ``train``, ``evaluate``, ``calibrate``, ``adapt``, ``audit`` and ``enroll`` can read it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import Counter
from pathlib import Path

from app.cli.common import Subparsers, log


def _cmd_data(args: argparse.Namespace) -> int:
    from index.records import clean_label
    from models.data import ManifestError, dataset_name, scan_source, summarise, write_manifest

    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        log.error("--out must name the manifest CSV to write (e.g. sets/%s/manifest.csv)", args.source)
        return 2
    try:
        scan = scan_source(
            args.source,
            args.root,
            metadata=args.metadata,
            views=args.views,
            progress=not (args.no_progress or args.json),
        )
    except ManifestError as exc:
        log.error("%s; nothing written", exc)
        return 2
    kept = []
    for sample in scan.samples:
        patient = sample.patient_id.split(":", 1)[1]
        try:
            clean_label(patient)  # the gallery's one rule for a patient id: what it would refuse later
        except ValueError as exc:
            scan.refused[f"patient id {exc}"] += 1
            continue
        kept.append(sample)
    if not kept:
        log.error("no image left to write: every patient id is refused; nothing written")
        return 2
    write_manifest(kept, out)
    counts = summarise(kept)
    name = dataset_name(out)
    report = {
        "manifest": str(out),
        "set": name,
        "source": args.source,
        "metadata": [str(path) for path in scan.metadata],
        "rows": scan.rows,
        "images": counts["images"],
        "patients": counts["patients"],
        "patients_with_2plus": sum(s["patients_with_2plus"] for s in counts["sets"].values()),
        "refused": dict(scan.refused.most_common()),
    }
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_format(report, scan.refused) + "\n")
    if not report["patients_with_2plus"]:
        log.warning(
            "no patient has two images in %s: a set needs patients seen more than once to train or "
            "measure re-identification",
            out,
        )
    return 0


def _format(report: dict, refused: Counter[str]) -> str:
    read_from = ", ".join(Path(p).name for p in report["metadata"]) or "the DICOM files"
    lines = [
        f"wrote {report['manifest']}: set {report['set']!r} (the manifest's folder names the set; "
        f"its patient ids read as {report['set']}:<id>)",
        f"  {report['images']:,} images of {report['patients']:,} patients, "
        f"{report['patients_with_2plus']:,} with 2 or more images",
        f"  {report['rows']:,} rows read from {read_from}; {sum(refused.values()):,} left out"
        + (":" if refused else ""),
    ]
    width = len(f"{max(refused.values()):,}") if refused else 0
    lines += [f"    {count:>{width},} {reason}" for reason, count in refused.most_common()]
    manifest = shlex.quote(report["manifest"])
    lines.append(
        f"next: cxr-reid train --config configs/default.toml --manifest {manifest} "
        f"(evaluate, calibrate and adapt take --manifest too)"
    )
    return "\n".join(lines)


def register(subparsers: Subparsers) -> None:
    """Add ``data`` to ``cxr-reid``."""
    from models.data import SOURCES, VIEW_CHOICES

    sources = "; ".join(f"{s.name}: {s.title}" + (f" ({s.url})" if s.url else "") for s in SOURCES.values())
    p = subparsers.add_parser(
        "data",
        help="write a manifest from a public set you downloaded, or from a DICOM folder",
        description="Write a manifest (path,patient_id,view,...) from a set as it was downloaded: "
        f"{sources}. Reports images, patients and patients with several images, and every row "
        "left out with the reason. Guide: docs/train-your-own-data.md.",
    )
    p.add_argument(
        "source", choices=list(SOURCES), metavar="SOURCE", help=f"the kind of set: {', '.join(SOURCES)}"
    )
    p.add_argument(
        "root", metavar="ROOT", help="the folder the set was downloaded and unpacked to, or the DICOM folder"
    )
    p.add_argument(
        "--out",
        required=True,
        help="the manifest CSV to write; its folder names the set (e.g. sets/chexpert/manifest.csv)",
    )
    p.add_argument(
        "--views",
        choices=VIEW_CHOICES,
        default="frontal",
        help="frontal: PA and AP only, by the set's own view column (default); all: every view",
    )
    p.add_argument(
        "--metadata", help="the set's metadata CSV, where it is not under ROOT by its published name"
    )
    p.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data)

"""Offline analysis of image sets, no gallery needed: ``audit`` (leakage across splits, mislabels,
duplicates and outliers in a labelled data set) and ``risk`` (how many images of a release link back
to identified ones, and what candidate defences cost). Each writes an HTML report.
"""

from __future__ import annotations

import argparse
import json
import sys

from app.cli.common import (
    Subparsers,
    add_batch_size_arg,
    add_device_arg,
    add_settings_args,
    load_embedder,
    log,
    settings_from,
)

#: Where each report goes without --out: a folder named after the command, in the working directory.
DEFAULT_OUT = {"audit": "cxr-reid-audit", "risk": "cxr-reid-risk"}


def _cmd_audit(args: argparse.Namespace) -> int:
    from app.analysis.audit import run_audit
    from app.analysis.audit_report import format_summary, write_outputs
    from app.analysis.corpus import CorpusError
    from app.reports import report_out_dir

    settings = settings_from(args)
    try:  # a run that fails takes back the --out folder it made: no half-made report is left
        with report_out_dir(args.out) as out_dir:
            embedder = load_embedder(settings)
            result = run_audit(
                embedder,
                args.sources,
                out_dir,
                far=args.far,
                threshold=args.threshold,
                default_far=settings.far,
                split_level=args.split_level,
                batch_size=args.batch_size,
                max_pixels=settings.max_pixels,
                progress=not (args.no_progress or args.json),
            )
            report = write_outputs(result, out_dir, embedder)
    except (CorpusError, OSError) as exc:
        log.error("audit could not run: %s", exc)
        return 2
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_summary(report, out_dir)) + "\n")
    return 0 if report["clean"] else 1


def _cmd_risk(args: argparse.Namespace) -> int:
    """Re-identification risk of a release against identified reference images (app/analysis/risk.py)."""
    from app.analysis.risk import RiskError, RiskInputs, run, summary_of

    settings = settings_from(args)
    embedder = load_embedder(settings)
    inputs = RiskInputs(
        release=args.release,
        reference=args.reference,
        out=args.out,
        fars=args.far,
        defences=args.defences,
        batch_size=args.batch_size,
        max_pixels=settings.max_pixels,
        progress=not (args.no_progress or args.json),
    )
    try:
        report = run(inputs, embedder)
    except RiskError as exc:
        log.error("%s", exc)
        return 2
    log.info("%s; report: %s/report.html", report["headline"], args.out)
    if args.json:
        sys.stdout.write(json.dumps(summary_of(report), indent=2) + "\n")
    return 0


def register(subparsers: Subparsers) -> None:
    """Add audit and risk to ``cxr-reid``."""
    p = subparsers.add_parser(
        "audit",
        help="audit a labelled data set: leakage across splits, mislabels, duplicate identities, "
        "duplicate files, outliers (HTML report; exit 1 on findings)",
        description="Embeds every image (cached in OUT/cache by file content and model id, so a re-run is "
        "cheap) and reports, as clusters: the same patient in several splits (by id, and by image under "
        "other ids), images that look like another person than their patient id says, different ids that "
        "look like one person, exact and near-exact duplicate files, and images that do not belong (broken, "
        "blank, inverted, laterals or other body parts, far outliers). Writes OUT/report.html, "
        "OUT/findings.csv and OUT/findings.json. Sources: manifests (CSV path,patient_id[,split]; several "
        "manifests without a split column: each file name is its split) or folders of images (patient id "
        "from DICOM PatientID). Exit 0 clean, 1 findings, 2 could not run.",
    )
    p.add_argument(
        "sources",
        metavar="MANIFEST_OR_FOLDER",
        nargs="+",
        help="the data set: manifests (CSV path,patient_id[,split]) or folders of images",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT["audit"],
        help="folder for report.html, findings.csv/.json and the embedding cache (default ./%(default)s)",
    )
    p.add_argument(
        "--far", help="false-accept rate of the same-patient decision (default: CXR_REID_FAR, 1e-3)"
    )
    p.add_argument("--threshold", type=float, help="explicit decision threshold instead of --far")
    p.add_argument(
        "--split-level",
        type=int,
        help="folders: the split is the name of the folder this many levels below the one given "
        "(0: its subfolders, e.g. data/train/..., data/test/...)",
    )
    add_batch_size_arg(p)
    p.add_argument("--json", action="store_true", help="print findings.json to stdout instead of the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_settings_args(p, data_dir=False)
    p.set_defaults(func=_cmd_audit)

    p = subparsers.add_parser(
        "risk",
        help="re-identification risk of an image release: how many images link back to identified ones",
        description="RELEASE and --reference are manifests (CSV path,patient_id, paths relative to it) or "
        "folders of images; the reference may also be a gallery's data dir (read only). Each released "
        "image's best reference match is a link when it reaches the model's threshold at a FAR; with "
        "patient ids on both sides the report measures the share of patients linked (exact 95% intervals; "
        "a sample too small to bound it is called so, with the reason) and the wrong links, without them "
        "it estimates the expected true links. Candidate "
        "defences (blur, noise, lower resolution, lung-field crop) are measured on the same images with "
        "their fidelity cost. Writes OUT/report.html and OUT/risk.json. Exit 0 done, 2 could not run.",
    )
    p.add_argument("release", metavar="RELEASE", help="the images to be released: manifest CSV or folder")
    p.add_argument(
        "--reference",
        required=True,
        help="identified images an attacker may hold: manifest CSV, folder, or a gallery data dir",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT["risk"],
        help="folder for report.html, risk.json and the embedding cache (default ./%(default)s)",
    )
    p.add_argument("--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs (default 1e-2,1e-3,1e-4)")
    p.add_argument(
        "--defences",
        default="all",
        help="all (default), none, or comma-separated families (blur, noise, lowres, crop) or names "
        "(blur-1, noise-15, lowres-half, crop-75, ...)",
    )
    add_batch_size_arg(p)
    p.add_argument("--json", action="store_true", help="print the summary of risk.json (no per-image rows)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_arg(p)
    add_settings_args(p, data_dir=False)
    p.set_defaults(func=_cmd_risk)

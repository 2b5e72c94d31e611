"""The outputs of ``cxr-reid audit``: ``findings.json``, ``findings.csv``, ``report.html`` and the
terminal summary, all from one :class:`app.analysis.audit.AuditResult`.

Image paths are written as the manifests give them (relative to each manifest's folder) or relative
to the folder given. The HTML shows at most ``HTML_FINDINGS`` findings with ``HTML_THUMBNAILS``
thumbnails each (the JSON and CSV hold every finding), so the page stays a few MB at any set size.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.analysis.audit import FINDING_TYPES, AuditResult
from app.analysis.corpus import load_for_display
from app.reports import (
    far_label,
    histogram_svg,
    package_version,
    png_data_uri,
    render,
    write_json,
    write_text,
)
from models.net.embedder import Embedder

HTML_FINDINGS = 300
HTML_THUMBNAILS = 8

TITLES = {
    "leakage": "Same patient in several splits",
    "mislabel": "Possible mislabels",
    "duplicate_identity": "Possible duplicate identities",
    "exact_duplicate": "Exact and near-exact duplicates",
    "outlier": "Images that do not belong",
}


def to_dict(result: AuditResult) -> dict[str, Any]:
    """Everything the audit found, JSON-ready (the content of findings.json)."""
    corpus = result.corpus
    images = corpus.images

    def image(i: int) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": images[i].shown,
            "source": images[i].source,
            "patient_id": images[i].patient_id,
            "split": images[i].split,
        }
        if corpus.errors[i]:
            entry["error"] = corpus.errors[i]
        return entry

    splits = dict(sorted(Counter(image.split or "(none)" for image in images).items()))
    return {
        "sources": sorted({image.source for image in images}),
        "model_id": corpus.model_id,
        "calibration": result.calibration,
        "threshold": result.threshold,
        "far": result.far,
        "images": len(corpus),
        "unusable": int((~corpus.ok).sum()),
        "patients": len({image.patient_id for image in images if image.patient_id is not None}),
        "splits": splits,
        "single_pair_bar": json_bar(result.stats["single_pair_bar"]),
        "counts": result.counts,
        "clean": result.clean,
        "findings": [
            {
                "id": f.id,
                "type": f.type,
                "kind": f.kind,
                "summary": f.summary,
                "confidence": round(f.confidence, 4),
                "patient_ids": sorted({images[i].patient_id for i in f.images if images[i].patient_id}),
                "splits": sorted({images[i].split for i in f.images if images[i].split}),
                "images": [{**image(i), "flagged": i in f.flagged} for i in f.images],
                "pairs": [
                    {"a": images[x].shown, "b": images[y].shown, "score": round(s, 6)} for x, y, s in f.pairs
                ],
            }
            for f in result.findings
        ],
    }


def json_bar(value: object) -> float | None:
    bar = float(value)  # type: ignore[arg-type]
    return bar if math.isfinite(bar) else None


def findings_csv(report: dict[str, Any]) -> str:
    """One row per image of each finding."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["finding", "type", "kind", "confidence", "flagged", "path", "patient_id", "split", "summary"]
    )
    for f in report["findings"]:
        for image in f["images"]:
            writer.writerow(
                [
                    f["id"],
                    f["type"],
                    f["kind"],
                    f["confidence"],
                    int(image["flagged"]),
                    image["path"],
                    image["patient_id"] or "",
                    image["split"] or "",
                    f["summary"],
                ]
            )
    return out.getvalue()


def write_outputs(result: AuditResult, out_dir: Path, embedder: Embedder) -> dict[str, Any]:
    """Write findings.json, findings.csv and report.html into ``out_dir``; returns the JSON dict."""
    report = to_dict(result)
    write_json(out_dir / "findings.json", report)
    write_text(out_dir / "findings.csv", findings_csv(report))
    write_text(out_dir / "report.html", render_html(result, report, embedder))
    return report


def render_html(result: AuditResult, report: dict[str, Any], embedder: Embedder) -> str:
    images = result.corpus.images
    thumbnails: dict[int, str] = {}

    def thumb(i: int) -> str:
        if i not in thumbnails:
            thumbnails[i] = (
                png_data_uri(load_for_display(images[i], embedder, side=112)) if result.corpus.ok[i] else ""
            )
        return thumbnails[i]

    shown = []
    for finding, entry in zip(result.findings[:HTML_FINDINGS], report["findings"], strict=False):
        # flagged images first: they are what the finding is about
        rows = sorted(finding.images, key=lambda i: (i not in finding.flagged, i))
        shown.append(
            {
                **entry,
                "best": max((p[2] for p in finding.pairs), default=None),
                "thumbs": [
                    {
                        "src": thumb(i),
                        "path": images[i].shown,
                        "patient_id": images[i].patient_id or "?",
                        "split": images[i].split or "",
                        "flagged": i in finding.flagged,
                    }
                    for i in rows[:HTML_THUMBNAILS]
                ],
                "more": max(0, len(rows) - HTML_THUMBNAILS),
            }
        )
    stats = result.stats
    markers = {"same-patient threshold": result.threshold}
    low = float(stats["mislabel_below"])
    if low < result.threshold:
        markers["mislabel below"] = low
    sampled, total = int(stats["impostors"].size), int(stats["impostor_pairs"])
    pairs_name = (
        "every pair of images of different patients"
        if sampled == total
        else f"random pairs of images of different patients (of {total:,})"
    )
    charts = [
        (
            "Scores: each image against its own patient's other images, and against the nearest "
            "other patient",
            histogram_svg(
                {
                    "best score to own patient": stats["own_best"],
                    "best score to another patient": stats["best_other"],
                    pairs_name: stats["impostors"],
                },
                markers=markers,
                x_label="decision score",
            ),
        ),
        (
            "Typicality: each image's mean score to its nearest images (outliers on the left)",
            histogram_svg({"typicality": stats["typicality"]}, x_label="mean score to nearest images"),
        ),
    ]
    return render(
        "audit.html.j2",
        version=package_version(),
        model_id=report["model_id"],
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        report=report,
        far_text=far_label(report["far"]) if report["far"] else "",
        titles=TITLES,
        types=FINDING_TYPES,
        findings=shown,
        hidden=max(0, len(result.findings) - HTML_FINDINGS),
        charts=charts,
    )


def format_summary(report: dict[str, Any], out_dir: Path, limit: int = 5) -> str:
    """The terminal summary: inputs, counts per type, the top findings, the verdict."""
    far = f"FAR {far_label(report['far'])}" if report["far"] else "explicit threshold"
    lines = [
        f"audit of {', '.join(report['sources'])} with model {report['model_id']}",
        f"  {report['images']} images of {report['patients']} patients; splits {report['splits']}",
        f"  same-patient threshold {report['threshold']:.4f} ({far}, "
        f"{report['calibration'].get('source', '?')} calibration)",
    ]
    for kind in FINDING_TYPES:
        entries = [f for f in report["findings"] if f["type"] == kind]
        lines.append(f"{len(entries):5d} {TITLES[kind].lower()}")
        lines.extend(f"        {f['id']}: {f['summary']}" for f in entries[:limit])
        if len(entries) > limit:
            lines.append(f"        ... {len(entries) - limit} more")
    if report["clean"]:
        lines.append("CLEAN: no findings (splits patient-disjoint, no duplicates, no outliers)")
    else:
        counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items() if v)
        lines.append(f"FINDINGS: {counts}")
    lines.append(f"report: {out_dir / 'report.html'} (all findings: findings.csv, findings.json)")
    return "\n".join(lines)

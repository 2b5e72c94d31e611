"""``cxr-reid audit``: prove a data set's splits are patient-disjoint, by labels and by anatomy.

Three findings, from one manifest:
- label leakage: one patient id in more than one split;
- cross-split pairs: two images in different splits that the model calls the same patient (the
  same person in train and test, whatever the labels say);
- duplicate identities: two images with different patient ids that the model calls the same patient
  (one person under two ids, or a mislabelled image), in any split.

The images are embedded into a throw-away gallery and paired with the same exact scoring and
decision rule the service uses (:meth:`app.services.ReidService.duplicates`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from index import DuplicatePair, Gallery
from models.embedder import Embedder

from .enrollment import BulkEnrolSummary, bulk_enrol, items_from_manifest
from .services import OperatingPoint, ReidService

log = logging.getLogger(__name__)


def audit_manifest(
    embedder: Embedder,
    manifest: str | os.PathLike,
    *,
    far: str | None = None,
    threshold: float | None = None,
    default_far: str = "1e-3",
    default_threshold: float | None = None,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``manifest`` and report leaks; ``clean`` is False when any split leaks.

    ``far`` / ``threshold`` pick the operating point; otherwise the service's default applies.
    """
    manifest = Path(manifest)
    items = items_from_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix="cxr-reid-audit-") as tmp:
        gallery = Gallery(Path(tmp), dim=embedder.dim, model_id=embedder.model_id, autosave_seconds=None)
        try:
            service = ReidService(
                embedder, gallery, default_far=default_far, default_threshold=default_threshold
            )
            point = service.operating_point(far=far, threshold=threshold)
            enrolled = bulk_enrol(
                embedder,
                gallery,
                items,
                collection="audit",
                batch_size=batch_size,
                max_pixels=max_pixels,
                progress=progress,
                skip_existing=False,
            )
            pairs = service.duplicates(point=point, collection="audit", conflicts_only=False).pairs
        finally:
            gallery.close()
    return build_report(
        items,
        enrolled,
        pairs,
        point,
        model_id=embedder.model_id,
        manifest=manifest,
        root=manifest.resolve().parent,
    )


def _where(path: str | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def build_report(
    items: list,
    enrolled: BulkEnrolSummary,
    pairs: list[DuplicatePair],
    point: OperatingPoint,
    *,
    model_id: str,
    manifest: Path,
    root: Path,
) -> dict[str, Any]:
    """The audit report as a JSON-able dict (see the module docstring for the three findings)."""
    splits_of: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        splits_of[item.patient_id][item.split or "(none)"] += 1
    label_leaks = [
        {"patient_id": pid, "splits": dict(sorted(counts.items()))}
        for pid, counts in sorted(splits_of.items())
        if len([s for s in counts if s != "(none)"]) > 1
    ]

    def image(record: Any) -> dict[str, Any]:
        return {
            "path": _where(record.source_path, root),
            "patient_id": record.patient_id,
            "split": record.split,
        }

    cross_split, duplicate_ids = [], []
    for pair in pairs:
        entry = {"a": image(pair.a), "b": image(pair.b), "score": round(pair.score, 6)}
        if pair.a.split and pair.b.split and pair.a.split != pair.b.split:
            cross_split.append({**entry, "same_patient_id": pair.a.patient_id == pair.b.patient_id})
        if pair.conflict:
            duplicate_ids.append(entry)
    return {
        "manifest": str(manifest),
        "model_id": model_id,
        "threshold": point.threshold,
        "far": point.far,
        "images": enrolled.enrolled,
        "failed": [{"path": _where(path, root), "reason": reason} for path, reason in enrolled.failed],
        "patients": len(splits_of),
        "splits": dict(sorted(Counter(item.split or "(none)" for item in items).items())),
        "label_leaks": label_leaks,
        "cross_split_pairs": cross_split,
        "duplicate_identities": duplicate_ids,
        "clean": not label_leaks and not cross_split,
    }


def format_summary(report: dict[str, Any], limit: int = 10) -> str:
    """A human-readable summary of :func:`build_report`'s output."""
    lines = [
        f"audit of {report['manifest']} with model {report['model_id']}",
        f"  {report['images']} images of {report['patients']} patients; splits {report['splits']}",
        f"  threshold {report['threshold']:.4f} (FAR {report['far']:.1e})",
    ]
    if report["failed"]:
        lines.append(f"  {len(report['failed'])} file(s) could not be read (see the log)")
    sections = (
        (
            "patient ids in more than one split (label leakage)",
            report["label_leaks"],
            lambda e: f"{e['patient_id']}: {e['splits']}",
        ),
        (
            "cross-split pairs the model calls the same patient",
            report["cross_split_pairs"],
            lambda e: (
                f"{e['score']:.4f}  {e['a']['path']} [{e['a']['split']}, {e['a']['patient_id']}]  <->  "
                f"{e['b']['path']} [{e['b']['split']}, {e['b']['patient_id']}]"
            ),
        ),
        (
            "pairs with different patient ids the model calls the same patient "
            "(possible duplicate identities)",
            report["duplicate_identities"],
            lambda e: (
                f"{e['score']:.4f}  {e['a']['path']} [{e['a']['patient_id']}]  <->  "
                f"{e['b']['path']} [{e['b']['patient_id']}]"
            ),
        ),
    )
    for title, entries, fmt in sections:
        lines.append(f"{len(entries)} {title}")
        lines.extend(f"    {fmt(e)}" for e in entries[:limit])
        if len(entries) > limit:
            lines.append(f"    ... {len(entries) - limit} more (--json for all)")
    lines.append("CLEAN: splits are patient-disjoint" if report["clean"] else "LEAKS FOUND")
    return "\n".join(lines)

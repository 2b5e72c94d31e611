"""Re-compute the model card's accuracy tables from ../shared/data.

For every set folder holding a ``manifest.csv`` under the data dir (sorted by name), or for the
manifests given with ``--manifest``, this runs ``models.evaluation.evaluate.evaluate(split="auto")``: the
held-out test patients of a set the checkpoint was trained on, every image of a set it never saw.
It prints two markdown tables (headline figures with 95% patient-bootstrap intervals, then the
view-pair and time-gap breakdowns) and can write the full results as JSON and per-set plots.

    python bench/accuracy.py [--model CKPT] [--data-dir ../shared/data] [--bootstrap 200]
                             [--plots DIR] [--json OUT.json] [--markdown OUT.md] [--manifest CSV ...]

Without the data (it is not part of the project) or without the shipped default checkpoint it says
so and exits 0: there is nothing to measure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.data import SPLIT_CHOICES
from models.evaluation.benchkit import NO_DATA, NOT_AVAILABLE, json_safe, markdown_table, num, with_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"  # "../shared/data" from the repo root


# ---------------------------------------------------------------------------------------------- formatting


def _tar(result: dict[str, Any], far: str) -> str:
    """TAR at a FAR, starred when there are fewer than 1/FAR impostor pairs (not resolvable)."""
    text = num(result.get(f"tar_at_far_{far}"))
    min_far = result.get("min_resolvable_far")
    if text != NOT_AVAILABLE and min_far is not None and float(far) < float(min_far):
        text += "*"
    return text


def _pairs(result: dict[str, Any]) -> str:
    """Genuine / impostor pairs; impostors marked when they are a sample of all pairs."""
    n, genuine, impostor = (
        result.get("n_images"),
        result.get("n_genuine_pairs"),
        result.get("n_impostor_pairs"),
    )
    if genuine is None or impostor is None:
        return NOT_AVAILABLE
    text = f"{genuine:,} / {impostor:,}"
    if n is not None and impostor < n * (n - 1) // 2 - genuine:
        text += " (sampled)"
    return text


HEADLINE_COLUMNS = (
    "set",
    "images evaluated",
    "images",
    "patients",
    "genuine / impostor pairs",
    "AUC [95% CI]",
    "EER [95% CI]",
    "TAR@FAR1e-2",
    "TAR@FAR1e-3",
    "TAR@FAR1e-4",
    "P@1 [95% CI]",
    "R-precision",
    "mAP@R",
)


def format_headline_table(results: Sequence[dict[str, Any]]) -> str:
    """One markdown row per evaluation result (the dicts ``models.evaluation.evaluate.evaluate`` returns)."""
    rows = [
        [
            str(r.get("dataset", "?")),
            str(r.get("split", "?")),
            f"{r['n_images']:,}" if r.get("n_images") is not None else NOT_AVAILABLE,
            f"{r['n_patients']:,}" if r.get("n_patients") is not None else NOT_AVAILABLE,
            _pairs(r),
            with_ci(r, "auc"),
            with_ci(r, "eer"),
            _tar(r, "1e-2"),
            _tar(r, "1e-3"),
            _tar(r, "1e-4"),
            with_ci(r, "precision_at_1"),
            num(r.get("r_precision")),
            num(r.get("map_at_r")),
        ]
        for r in results
    ]
    return markdown_table(HEADLINE_COLUMNS, rows)


BREAKDOWN_COLUMNS = (
    "set",
    "breakdown",
    "bucket",
    "genuine pairs",
    "impostor pairs (same bucket)",
    "AUC (same-bucket impostors)",
    "AUC (all impostors)",
    "TAR at the FAR 1e-3 threshold",
    "mean genuine score",
)
_BREAKDOWN_NAMES = {
    "view_pair": "view pair",
    "time_gap_days": "time gap (days)",
    "follow_up_gap": "follow-up gap (visits)",
}


def format_breakdown_table(results: Sequence[dict[str, Any]]) -> str | None:
    """View-pair and time-gap rows of every result that has them; None when none has any."""
    rows = []
    for r in results:
        for kind, label in _BREAKDOWN_NAMES.items():
            for bucket, b in ((r.get("breakdown") or {}).get(kind) or {}).items():
                impostors = b.get("n_impostor_pairs")
                rows.append(
                    [
                        str(r.get("dataset", "?")),
                        label,
                        str(bucket),
                        f"{b.get('n_genuine_pairs', 0):,}",
                        f"{impostors:,}" if impostors is not None else "all",
                        num(b.get("auc")) if kind == "view_pair" else "-",
                        num(b.get("auc_vs_all_impostors")),
                        num(b.get("tar_at_far_1e-3")),
                        num(b.get("mean_genuine_score")),
                    ]
                )
    return markdown_table(BREAKDOWN_COLUMNS, rows) if rows else None


def format_tables(results: Sequence[dict[str, Any]], *, title: str | None = None) -> str:
    """Both tables as one markdown document (headline first), with the notes they need."""
    parts = [title] if title else []
    parts.append(format_headline_table(results))
    notes = [
        "Intervals: 95% percentile intervals over patient-level bootstrap resamples.",
        "`*`: fewer than 1/FAR impostor pairs, so that TAR is not resolvable at that FAR.",
    ]
    if any("(sampled)" in _pairs(r) for r in results):
        notes.append(
            "`(sampled)`: impostor pairs are a uniform random sample of all different-patient pairs."
        )
    parts.append("\n".join(notes))
    breakdown = format_breakdown_table(results)
    if breakdown:
        parts.append(
            "Breakdowns (buckets with at least 5 genuine pairs; TAR uses the overall FAR 1e-3 threshold):\n\n"
            + breakdown
        )
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- running
def shown_path(path: Path) -> str:
    """``path`` relative to the repository root, so no report names the machine it ran on."""
    return os.path.relpath(Path(path).resolve(), REPO_ROOT)


def find_manifests(data_dir: Path) -> list[Path]:
    """``<data_dir>/<set>/manifest.csv`` for every set folder, sorted by set name."""
    if not data_dir.is_dir():
        return []
    return sorted(p / "manifest.csv" for p in data_dir.iterdir() if (p / "manifest.csv").is_file())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Re-compute the model card's accuracy tables from the real sets.",
    )
    parser.add_argument("--model", help="checkpoint (default: the shipped models/weights/default.pt)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder of set folders, each with manifest.csv (default: ../shared/data from the repo root)",
    )
    parser.add_argument(
        "--manifest",
        action="append",
        help="evaluate this manifest instead of scanning the data dir (repeatable)",
    )
    parser.add_argument("--bootstrap", type=int, default=200, help="patient bootstrap resamples (0 = no CIs)")
    parser.add_argument(
        "--split",
        default="auto",
        choices=SPLIT_CHOICES,
        help="which images (default auto: test patients of trained sets, all images of unseen sets)",
    )
    parser.add_argument("--plots", help="write DIR/<set>/roc.png and score_histogram.png")
    parser.add_argument("--json", help="write all results (with CIs and breakdowns) to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this markdown file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.manifest:
        manifests = [Path(m) for m in args.manifest]
        missing = [str(m) for m in manifests if not m.is_file()]
        if missing:
            print(f"error: manifest not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        source = "manifests " + ", ".join(shown_path(m) for m in manifests)
    else:
        data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
        shown = args.data_dir or "../shared/data"
        if not data_dir.is_dir():
            print(f"{shown} not found: {NO_DATA}")
            return 0
        manifests = find_manifests(data_dir)
        if not manifests:
            print(f"{shown} holds no set folder with a manifest.csv: {NO_DATA}")
            return 0
        source = f"data dir {shown_path(data_dir)}"

    from models.net.embedder import DEFAULT_CHECKPOINT, Embedder  # torch: imported only when there is work

    if args.model is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.is_file():
            print(
                f"default checkpoint {shown_path(checkpoint)} not found: nothing to measure; "
                "pass --model CKPT or ship the default model first"
            )
            return 0
    else:
        checkpoint = Path(args.model)
        if not checkpoint.is_file():
            print(f"error: checkpoint not found: {checkpoint}", file=sys.stderr)
            return 2

    from models.evaluation.evaluate import evaluate

    model_id = Embedder.from_checkpoint(checkpoint).model_id
    progress = sys.stderr.isatty()
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for manifest in manifests:
        name = manifest.resolve().parent.name
        print(f"evaluating {name} ({shown_path(manifest)}) ...", file=sys.stderr, flush=True)
        try:
            result = evaluate(
                manifest,
                model=checkpoint,
                split=args.split,
                bootstrap=args.bootstrap,
                plots_dir=Path(args.plots) / name if args.plots else None,
                progress=progress,
            )
        except (ValueError, OSError) as exc:  # too few images / pairs in the split, unreadable files
            errors.append({"dataset": name, "manifest": shown_path(manifest), "error": str(exc)})
            print(f"  {name}: failed: {exc}", file=sys.stderr)
            continue
        results.append(result)

    title = (
        f"Accuracy of model `{model_id}` ({shown_path(checkpoint)}) on {source}; split={args.split}, "
        f"{args.bootstrap} bootstrap resamples; {dt.date.today().isoformat()}"
    )
    report = format_tables(results, title=title) if results else title + "\n\nno set could be evaluated\n"
    if errors:
        report += "\nFailed:\n" + "".join(f"- {e['dataset']}: {e['error']}\n" for e in errors)
    print(report, end="")

    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report, encoding="utf-8")
    if args.json:
        payload = {
            "model": shown_path(checkpoint),
            "model_id": model_id,
            "source": source,
            "split": args.split,
            "bootstrap": args.bootstrap,
            "date": dt.date.today().isoformat(),
            "results": results,
            "errors": errors,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(json_safe(payload), indent=2, allow_nan=False), encoding="utf-8"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

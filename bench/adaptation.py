"""What a site gains by `cxr-reid adapt`, measured at sites the network never saw.

For each leave-one-site-out fold (a checkpoint trained without that site's sets, e.g. the GPU
recipe's ``runs/gpu/<recipe>/holdout-<site>/model.pt``), the site's patients are split in halves
(``models.training.site.half_split``, ``--halvings`` seeds). Half A is what the hospital has labelled, half B
its other patients. On half B:

1. **base**: the fold's network as shipped (its own thresholds: the FAR they deliver there);
2. **base + calibration**: ``fit_site_calibration`` on half A with AS-norm (what ``cxr-reid
   calibrate`` does), applied to half B;
3. **adapted + calibration**: ``models.training.adapt.adapt`` on half A (which holds back part of A to
   prove itself and calibrates there), applied to half B. Where adapt declines (exit 1), the site
   keeps row 2, and the row says so;
4. the learning curve: row 3 with 25 / 50 / 100% of half A's patients (``--fractions``).

Figures: AUC, TAR at FAR 1e-2 and 1e-3 at the thresholds each row would use, the FAR those thresholds
deliver on half B, P@1; the mean over halvings with the mean of the per-halving 95% patient-bootstrap
intervals. Goals (issue 20): after adaptation AUC >= 0.95, TAR@FAR1e-2 >= 0.60 and the delivered FAR
within 2x of the promised one, on every unseen set.

    python bench/adaptation.py --folds runs/gpu/cxr-reid-ir18w32-224/holdout-*/model.pt
    python bench/adaptation.py --folds ... --halvings 2 --fractions 1.0 --json out.json

Resumable: each (fold, halving, fraction) result is cached as JSON under ``--out`` (default
``runs/adaptation``); a rerun computes only what is missing. Without the data it says so, exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Sample, read_manifest
from models.evaluation.evaluate import embed_samples
from models.evaluation.metrics import evaluate_embeddings, pair_scores
from models.net.checkpoint import load_checkpoint
from models.net.embedder import Embedder
from models.scoring.calibration import Calibration
from models.scoring.scorenorm import ScoreNorm, patient_key
from models.training.adapt import AdaptSettings, SiteData, adapt
from models.training.site import CalibrationRefusedError, fit_site_calibration, half_split

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.adaptation")

FARS = ("1e-2", "1e-3")
RESULT_VERSION = 1  # bump when a cached result's content changes


def site_samples(checkpoint: Path, data_root: Path) -> tuple[str, list[Sample]]:
    """The held-out site of a fold checkpoint and every image of its sets, patient ids keyed by the
    site (a patient in two sets of one hospital is one patient)."""
    training = load_checkpoint(checkpoint).get("training", {})
    held = list(training.get("split", {}).get("holdout_sets") or [])
    if not held:
        raise SystemExit(f"{checkpoint} is not a leave-one-site-out fold (no holdout_sets recorded)")
    site = held[0] if len(held) == 1 else _common_prefix(held)
    samples = []
    for name in held:
        for sample in read_manifest(data_root / name / "manifest.csv"):
            sample.patient_id = f"{site}:{sample.patient_id.split(':', 1)[1]}"
            samples.append(sample)
    return site, samples


def _common_prefix(names: Sequence[str]) -> str:
    """``nih-cxr14`` for ``nih-cxr14-64px`` and ``nih-cxr14-512px``: the site's name."""
    import os

    return os.path.commonprefix(list(names)).rstrip("-_") or "+".join(sorted(names))


def _subset(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """``fraction`` of the patients (all their images), chosen by a seeded shuffle of the ids."""
    if fraction >= 1:
        return list(samples)
    patients = sorted({s.patient_id for s in samples})
    order = np.random.default_rng(1000 + seed).permutation(len(patients))
    keep = {patients[i] for i in order[: max(1, round(len(patients) * fraction))]}
    return [s for s in samples if s.patient_id in keep]


def measure(
    vectors: np.ndarray, labels: Sequence[str], calibration: Calibration | None, bootstrap: int
) -> dict[str, Any]:
    """Figures on half B with the scores and thresholds a calibration implies (raw cosines and the
    network's own thresholds when ``calibration`` is a checkpoint's validation calibration)."""
    transform = None
    if calibration is not None and calibration.score_norm:
        norm = ScoreNorm.from_dict(calibration.score_norm)
        keys = [patient_key(p) for p in labels]

        def transform(scores: np.ndarray, pairs: np.ndarray) -> np.ndarray:
            return norm.normalise_within(vectors, keys, scores, pairs)

    result = evaluate_embeddings(vectors, list(labels), bootstrap=bootstrap, pair_transform=transform)
    out = {
        "auc": result["auc"],
        "precision_at_1": result["precision_at_1"],
        "ci": {k: result.get("ci", {}).get(k) for k in ("auc", "tar_at_far_1e-2", "tar_at_far_1e-3")},
    }
    genuine, impostor, gp, ip = pair_scores(vectors, list(labels), max_impostor_pairs=2_000_000)
    if transform is not None:
        genuine, impostor = transform(genuine, gp), transform(impostor, ip)
    for far in FARS:
        out[f"tar_at_far_{far}"] = result.get(f"tar_at_far_{far}")  # at B's own (oracle) threshold
        if calibration is not None and far in calibration.thresholds:
            threshold = calibration.thresholds[far]
            out[f"delivered_far_{far}"] = float(np.mean(impostor >= threshold))
            out[f"tar_at_promised_{far}"] = float(np.mean(genuine >= threshold))
    out["n_images"], out["n_patients"] = result["n_images"], result["n_patients"]
    return out


def run_halving(
    checkpoint: Path,
    samples: list[Sample],
    halving: int,
    fractions: Sequence[float],
    out_dir: Path,
    settings: AdaptSettings,
    bootstrap: int,
) -> dict[str, Any]:
    """Every row of one halving (cached row by row)."""
    cache = out_dir / f"halving-{halving}.json"
    rows: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    if rows.get("version") != RESULT_VERSION:
        rows = {"version": RESULT_VERSION}
    ids = [s.patient_id for s in samples]
    in_a = half_split(ids, seed=halving)
    half_a = [s for s, a in zip(samples, in_a, strict=True) if a]
    half_b = [s for s, a in zip(samples, in_a, strict=True) if not a]
    labels_b = [s.patient_id for s in half_b]
    base = Embedder.from_checkpoint(checkpoint)
    b_base = None

    def save() -> None:
        cache.write_text(json.dumps(rows, indent=2))

    if "base" not in rows or "calibrated" not in rows:
        b_base = embed_samples(base, half_b, progress=False)
        rows["base"] = measure(b_base, labels_b, base.calibration, bootstrap)
        a_base = embed_samples(base, half_a, progress=False)
        try:
            calibration = fit_site_calibration(
                a_base, [s.patient_id for s in half_a], fars=FARS, default_far=FARS[-1], bootstrap=0
            )
            rows["calibrated"] = measure(b_base, labels_b, calibration, bootstrap)
        except CalibrationRefusedError as exc:
            rows["calibrated"] = {"refused": str(exc)}
        rows["half_a"] = {"images": len(half_a), "patients": len(set(s.patient_id for s in half_a))}
        save()
    for fraction in fractions:
        key = f"adapted-{fraction:g}"
        if key in rows:
            continue
        part = _subset(half_a, fraction, halving)
        target = out_dir / f"adapted-h{halving}-f{fraction:g}.pt"
        record: dict[str, Any] = {
            "images": len(part),
            "patients": len({s.patient_id for s in part}),
        }
        try:
            result = adapt(
                SiteData(part, f"half A ({fraction:.0%})"),
                target,
                model=checkpoint,
                settings=settings,
                progress=False,
            )
        except ValueError as exc:  # refused: too few patients or pairs
            record["refused"] = str(exc)
            rows[key] = record
            save()
            continue
        record.update(
            adopted=result.written,
            steps=result.steps_run,
            minutes=result.minutes,
            held_back_before=result.before.get("auc"),
            held_back_after=result.after.get("auc"),
            delta_auc_ci=result.delta_auc_ci,
        )
        if result.written:
            adapted = Embedder.from_checkpoint(target)
            vectors = embed_samples(adapted, half_b, progress=False)
            record.update(measure(vectors, labels_b, adapted.calibration, bootstrap))
            target.unlink()
        rows[key] = record
        save()
    return rows


def summarise(site: str, halvings: list[dict[str, Any]], fractions: Sequence[float]) -> list[dict[str, Any]]:
    """Mean over halvings per row; an adaptation that declined counts as the calibrated row."""
    out = []
    names = ["base", "calibrated", *[f"adapted-{f:g}" for f in fractions]]
    for name in names:
        values: dict[str, list[float]] = {}
        adopted, sizes = 0, []
        for rows in halvings:
            row = rows.get(name, {})
            if name.startswith("adapted"):
                sizes.append(row.get("images", 0))
                if row.get("adopted"):
                    adopted += 1
                else:
                    row = rows.get("calibrated", {})
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.setdefault(key, []).append(float(value))
            for key, ci in (row.get("ci") or {}).items():
                if ci:
                    values.setdefault(f"{key}_lo", []).append(ci[0])
                    values.setdefault(f"{key}_hi", []).append(ci[1])
        summary = {"site": site, "row": name, "halvings": len(halvings)}
        summary.update({k: float(np.mean(v)) for k, v in values.items()})
        if name.startswith("adapted"):
            summary["adopted"] = adopted
            summary["site_images"] = float(np.mean(sizes)) if sizes else 0.0
        elif name == "calibrated":
            summary["site_images"] = float(np.mean([r.get("half_a", {}).get("images", 0) for r in halvings]))
        out.append(summary)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], key: str, ci: bool = False) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        text = f"{value:.3f}"
        if ci and f"{key}_lo" in row:
            text += f" [{row[f'{key}_lo']:.3f}, {row[f'{key}_hi']:.3f}]"
        return text

    lines = [
        "| unseen site | row | half-A images used | AUC [95% CI] | TAR@FAR1e-2 (promised thr.) "
        "| FAR delivered at 1e-2 | TAR@FAR1e-3 (promised thr.) | FAR delivered at 1e-3 | P@1 | adopted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        used = f"{row['site_images']:.0f}" if "site_images" in row else "-"
        adapted = row["row"].startswith("adapted")
        adopted = f"{row.get('adopted', 0)}/{row['halvings']}" if adapted else "-"
        cells = [
            row["site"],
            row["row"],
            used,
            cell(row, "auc", True),
            cell(row, "tar_at_promised_1e-2"),
            cell(row, "delivered_far_1e-2"),
            cell(row, "tar_at_promised_1e-3"),
            cell(row, "delivered_far_1e-3"),
            cell(row, "precision_at_1"),
            adopted,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--folds", nargs="+", type=Path, required=True, help="fold checkpoints (one per site)"
    )
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data", help="the sets' root"
    )
    parser.add_argument("--halvings", type=int, default=5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--minutes", type=float, default=30.0, help="adapt's budget per run (default 30)")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/adaptation"))
    parser.add_argument("--json", type=Path, help="write the summary rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("models.evaluation.metrics", "models.net.embedder", "models.training.adapt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.data.is_dir():
        log.warning("no data at %s: nothing to measure", args.data)
        return 0
    settings = AdaptSettings(minutes=args.minutes, bootstrap=args.bootstrap)
    summary, models = [], {}
    for checkpoint in args.folds:
        site, samples = site_samples(checkpoint, args.data)
        models[site] = load_checkpoint(checkpoint)["model_id"]
        fold_dir = args.out / site
        fold_dir.mkdir(parents=True, exist_ok=True)
        halvings = []
        for halving in range(args.halvings):
            log.info("%s: halving %d of %d", site, halving + 1, args.halvings)
            halvings.append(
                run_halving(checkpoint, samples, halving, args.fractions, fold_dir, settings, args.bootstrap)
            )
        summary += summarise(site, halvings, args.fractions)
    sys.stdout.write(
        f"# bench/adaptation.py, {dt.date.today().isoformat()}; fold models: {json.dumps(models)}\n"
    )
    sys.stdout.write(markdown(summary) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"models": models, "rows": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Leave-one-set-out: how a training recipe does at a site it never saw.

For each site of the recipe's ``data.manifests`` in turn (a set, or the sets ``data.sites`` names as
one hospital), train the recipe on the other sites (the held-out site is one ``data.holdout_sets``
override of the same config, never a copied config), then evaluate every image of the held-out
sets, as a new hospital would meet the model. Folds trained elsewhere (``scripts/train_gpu.py
--folds`` writes ``<recipe>/holdout-<site>/``) are evaluated with ``--no-train --out``. Prints:

1. the unseen-set table (per held-out set and the mean: AUC, EER, TAR@FAR1e-3, P@1 with patient
   bootstrap 95% intervals), the figures a recipe is chosen by;
2. thresholds at the unseen site: the FAR the model's own (validation) thresholds deliver there,
   and what site calibration delivers (calibrate on half of the site's patients, measure on the
   other half, both ways, several halvings), with and without AS-norm score normalisation;
3. the seen sets' test patients, for comparison only.

    python bench/generalisation.py                                  # configs/default.toml
    python bench/generalisation.py --config configs/recipes/baseline.toml --jobs 3 --threads 1
    python bench/generalisation.py --config configs/recipes/dg-augment.toml --json out.json
    python bench/generalisation.py --config configs/default.toml --set preprocess.size=160 --out runs/g160

Resumable: each fold trains in ``OUT/holdout-<set>/`` (``--out``, default
``runs/generalisation/<config name>``) through ``cxr-reid train --resume``; a finished fold is not
retrained and its evaluation is cached (``eval.json``), so rerunning the command after an
interruption, or with a new ``--minutes`` budget for folds the budget cut short, continues where it
stopped. ``--minutes`` is a hard stop per fold and per invocation; a fold it cut is marked in the
tables. Without the data (../shared/data) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.evaluation.benchkit import NO_DATA, json_safe, markdown_table, num, with_ci
from models.scoring.scorenorm import DEFAULT_TOP_K

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("generalisation")

EVAL_VERSION = 2  # bump when eval.json's content changes, so cached evaluations are redone
#: config keys that may differ between invocations without making a fold another recipe: how a run
#: is executed, and test-time augmentation (inference only: folds are evaluated with the recipe's)
RUN_ONLY_KEYS = (
    ("optim", "max_minutes"),
    ("optim", "threads"),
    ("output_dir",),
    ("name",),
    ("preprocess", "tta"),
)


# ---------------------------------------------------------------------------------------------- folds
def fold_overrides(held_out: str, fold_dir: Path, *, minutes: float, threads: int) -> list[str]:
    """The overrides that turn the recipe into its fold for ``held_out``."""
    return [
        f"data.holdout_sets={json.dumps([held_out])}",
        f"output_dir={json.dumps(str(fold_dir))}",
        f"name={json.dumps('holdout-' + held_out)}",
        f"optim.max_minutes={float(minutes)}",
        f"optim.threads={int(threads)}",
    ]


def _recipe_view(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the keys that only say how a run is executed."""
    out = json.loads(json.dumps(config_dict))
    for keys in RUN_ONLY_KEYS:
        target = out
        for key in keys[:-1]:
            target = target.get(key, {})
        target.pop(keys[-1], None)
    return out


def fold_state(fold_dir: Path, wanted: dict[str, Any]) -> str:
    """ "new", "resume" or "done" for a fold directory; raises if it holds another recipe's run."""
    from models.net.checkpoint import load_checkpoint
    from models.training.config import load_config

    saved = fold_dir / "config.toml"
    if not saved.is_file():
        return "new"
    if _recipe_view(load_config(saved).to_dict()) != _recipe_view(wanted):
        raise SystemExit(
            f"error: {fold_dir} holds a run of another recipe; pass another --out or delete the folder"
        )
    model = fold_dir / "model.pt"
    if model.is_file():
        summary = load_checkpoint(model).get("training", {})
        if summary.get("epochs_run", 0) >= summary.get("epochs_planned", math.inf):
            return "done"
    return "resume" if (fold_dir / "last.pt").is_file() else "new"


def train_folds(
    config_path: str,
    overrides: list[str],
    folds: dict[str, Path],
    *,
    minutes: float,
    jobs: int,
    threads: int = 0,
) -> None:
    """Train the unfinished folds, ``jobs`` at a time, each in its own ``cxr-reid train`` process
    with ``threads`` CPU threads (default: the cores shared out between the jobs)."""
    from models.training.config import load_config

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending: list[tuple[str, list[str]]] = []
    for held_out, fold_dir in folds.items():
        extra = fold_overrides(held_out, fold_dir, minutes=minutes, threads=threads)
        state = fold_state(fold_dir, load_config(config_path, [*overrides, *extra]).to_dict())
        if state == "done":
            log.info("fold %s: trained (%s)", held_out, fold_dir / "model.pt")
            continue
        command = [sys.executable, "-m", "app.cli", "train", "--config", config_path, "--no-progress"]
        for item in (*overrides, *extra):
            command += ["--set", item]
        if state == "resume":
            command.append("--resume")
        pending.append((held_out, command))

    running: list[tuple[str, subprocess.Popen, Any]] = []
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            held_out, command = pending.pop(0)
            folds[held_out].mkdir(parents=True, exist_ok=True)
            handle = (folds[held_out] / "train.log").open("a")
            log.info("fold %s: training (log %s)", held_out, folds[held_out] / "train.log")
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
            running.append((held_out, process, handle))
        time.sleep(2)
        for item in list(running):
            held_out, process, handle = item
            if process.poll() is None:
                continue
            handle.close()
            running.remove(item)
            if process.returncode != 0:
                failed.append(held_out)
                log.error("fold %s failed (exit %d): see %s", held_out, process.returncode, handle.name)
            else:
                log.info("fold %s: finished", held_out)
    if failed:
        raise SystemExit(f"error: training failed for fold(s) {', '.join(failed)}")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_fold(
    fold_dir: Path,
    manifests: Sequence[str],
    *,
    bootstrap: int,
    repeats: int,
    snorm_top_k: int,
    tta: int | None = None,
    partners: Sequence[Path] = (),
) -> dict[str, Any]:
    """Evaluate a fold's model on every set (cached in ``eval.json`` by model id and settings);
    ``tta`` sets the test-time augmentation (cached apart, ``eval-tta<k>.json``; None: the checkpoint's);
    ``partners``: fold folders of other recipes (same held-out set) whose embeddings are averaged
    with this one's, a small ensemble (cached apart, ``eval-ensemble-<ids>.json``)."""
    import dataclasses

    import numpy as np

    from models.data import read_manifest
    from models.evaluation.evaluate import embed_samples, select_split
    from models.evaluation.metrics import evaluate_embeddings
    from models.net.embedder import Embedder
    from models.training.site import split_half

    members = [Embedder.from_checkpoint(d / "model.pt") for d in (fold_dir, *partners)]
    if tta is not None:
        for member in members:
            member.preprocess_config = dataclasses.replace(member.preprocess_config, tta=tta)
    embedder = members[0]
    settings = {
        "version": EVAL_VERSION,
        "bootstrap": bootstrap,
        "repeats": repeats,
        "snorm_top_k": snorm_top_k,
        "tta": embedder.preprocess_config.tta,
    }
    if partners:
        settings["ensemble"] = [m.model_id for m in members[1:]]
    name = f"eval-tta{tta}" if tta else "eval"
    if partners:
        name += "-ensemble-" + "-".join(m.model_id.rsplit("-", 1)[-1][:6] for m in members[1:])
    cache = fold_dir / f"{name}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("model_id") == embedder.model_id and cached.get("settings") == settings:
            return cached
    training = embedder.training
    result: dict[str, Any] = {
        "model_id": embedder.model_id,
        "settings": settings,
        "held_out": training["split"]["holdout_sets"],
        "epochs_run": training.get("epochs_run"),
        "epochs_planned": training.get("epochs_planned"),
        "stopped_by_budget": bool(training.get("stopped_by_budget")),
        "train_minutes": training.get("train_minutes"),
        "sets": {},
    }
    for manifest in manifests:
        samples = read_manifest(manifest)
        chosen, description = select_split(samples, embedder, "auto")
        embeddings = sum(embed_samples(m, chosen, progress=False) for m in members)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        ids = [s.patient_id for s in chosen]
        labels = np.unique(ids, return_inverse=True)[1]
        threshold = embedder.calibration.threshold_for("1e-3")
        metrics = evaluate_embeddings(
            embeddings, labels, threshold=threshold, bootstrap=bootstrap, max_impostor_pairs=1_000_000
        )
        entry = {k: v for k, v in metrics.items() if k != "breakdown"}
        entry["split"] = description
        name = samples[0].dataset
        if name in result["held_out"]:
            entry["calibration"] = split_half(
                embeddings,
                ids,
                repeats=repeats,
                shipped=embedder.calibration,
                snorm_top_k=snorm_top_k or None,
            )
        result["sets"][name] = entry
    cache.write_text(json.dumps(json_safe(result), indent=2))
    return result


# ---------------------------------------------------------------------------------------------- tables
def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and finite else None


def _snorm_auc(entry: dict[str, Any]) -> float | None:
    """AUC after site calibration with AS-norm (split-half mean), where it was measured."""
    first = next(iter((entry.get("calibration") or {}).get("fars", {}).values()), {})
    return (first.get("auc_snorm") or {}).get("mean")


def _unseen(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(set, its figures, its fold) for every set a fold held out: a site of two sets gives two rows."""
    return [
        (name, r["sets"][name], r) for r in results.values() for name in r["held_out"] if name in r["sets"]
    ]


def unseen_table(results: dict[str, dict[str, Any]], children: Sequence[str] = ()) -> str:
    """One row per unseen set, the mean over all of them and, where some sets are of children, the
    mean over the adult ones (what an adult hospital should read)."""
    rows, columns = [], ("auc", "eer", "tar_at_far_1e-3", "precision_at_1")
    unseen = _unseen(results)
    for held_out, m, r in unseen:
        cut = " (cut by budget)" if r.get("stopped_by_budget") else ""
        rows.append(
            [
                held_out,
                f"`{r['model_id']}`, {r['epochs_run']}/{r['epochs_planned']} epochs{cut}",
                f"{m['n_images']:,} / {m['n_patients']:,} / {m['n_genuine_pairs']:,}",
                with_ci(m, "auc", 3),
                with_ci(m, "eer", 3),
                with_ci(m, "tar_at_far_1e-3", 3),
                with_ci(m, "precision_at_1", 3),
                num(_snorm_auc(m), 3),
            ]
        )
    groups = [("**mean**", unseen)]
    adults = [row for row in unseen if row[0] not in children]
    if children and adults and len(adults) < len(unseen):
        groups.append(("**mean, adult sets**", adults))
    for label, chosen in groups:
        means = [_mean([m.get(c) for _, m, _ in chosen]) for c in columns]
        snorm = _mean([_snorm_auc(m) for _, m, _ in chosen])
        rows.append([label, "", "", *[f"**{num(v, 3)}**" for v in (*means, snorm)]])
    header = (
        "held-out set (unseen)",
        "model",
        "images / patients / genuine pairs",
        "AUC [95% CI]",
        "EER",
        "TAR@FAR1e-3",
        "P@1",
        "AUC after site calibration (AS-norm, split-half)",
    )
    return markdown_table(header, rows)


def calibration_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for held_out, m, _ in _unseen(results):
        cal = m.get("calibration")
        if not cal:
            continue
        for far, c in cal["fars"].items():

            def cell(key: str, c: dict[str, Any] = c) -> str:
                v = c.get(key)
                return "-" if v is None else f"{v['mean']:.4f} [{v['min']:.4f}, {v['max']:.4f}]"

            def mean_of(key: str, c: dict[str, Any] = c) -> str:
                v = c.get(key)
                return "-" if v is None else f"{v['mean']:.3f}"

            rows.append(
                [
                    held_out,
                    far,
                    cell("shipped_far"),
                    mean_of("shipped_tar"),
                    cell("site_far"),
                    mean_of("site_tar"),
                    cell("snorm_far"),
                    mean_of("snorm_tar"),
                ]
            )
    header = (
        "unseen set",
        "promised FAR",
        "FAR delivered, model's own thresholds [min, max]",
        "TAR",
        "FAR delivered, site-calibrated [min, max]",
        "TAR",
        "FAR delivered, site-calibrated + AS-norm [min, max]",
        "TAR",
    )
    return markdown_table(header, rows)


def seen_table(results: dict[str, dict[str, Any]]) -> str:
    names = sorted({name for r in results.values() for name in r["sets"]})
    rows = []
    for held_out, r in results.items():
        row = [f"without {held_out}"]
        for name in names:
            row.append("(unseen)" if name in r["held_out"] else with_ci(r["sets"][name], "auc", 3))
        rows.append(row)
    return markdown_table(("model", *[f"{n} test patients: AUC" for n in names]), rows)


def report(results: dict[str, dict[str, Any]], title: str, children: Sequence[str] = ()) -> str:
    parts = [
        title,
        "Unseen sites (every image of a set the model never saw):",
        unseen_table(results, children),
    ]
    parts += [
        "Thresholds at the unseen site (split-half: calibrate on half of its patients, measure on the "
        "other half; mean [min, max] over halvings):",
        calibration_table(results),
    ]
    parts += ["Seen sets (held-out test patients of the sets each fold trained on):", seen_table(results)]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Leave-one-set-out generalisation of a training recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    parser.add_argument(
        "--config", default="configs/default.toml", help="the recipe (default: configs/default.toml)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="recipe override"
    )
    parser.add_argument("--out", help="fold directories (default: runs/generalisation/<config name>)")
    parser.add_argument(
        "--sets", nargs="*", help="hold out only these sites (default: every site of the recipe)"
    )
    parser.add_argument(
        "--minutes", type=float, default=0.0, help="hard stop per fold per invocation (0 = none)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="folds trained at once (threads split between them)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per fold (default: cores / jobs)")
    parser.add_argument("--bootstrap", type=int, default=200, help="patient bootstrap resamples for the CIs")
    parser.add_argument(
        "--repeats", type=int, default=5, help="random halvings for the split-half calibration"
    )
    parser.add_argument(
        "--snorm-top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"AS-norm: nearest cohort scores per side (default {DEFAULT_TOP_K}, as served; 0 = off)",
    )
    parser.add_argument(
        "--tta",
        type=int,
        help="evaluate with this many test-time views (default: the recipe's preprocess.tta)",
    )
    parser.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="DIR",
        help="average each fold's embeddings with the same fold of the recipe whose folds are in DIR",
    )
    parser.add_argument("--no-train", action="store_true", help="evaluate folds already trained; train none")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this markdown file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from models.data import dataset_name
    from models.training.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [m for m in config.data.manifests if not Path(m).is_file()]
    if missing:
        print(f"{', '.join(missing)} not found: {NO_DATA}")
        return 0
    if len(config.data.manifests) < 2:
        print("error: leave-one-set-out needs a recipe with at least two sets", file=sys.stderr)
        return 2
    sites = config.data.site_names([dataset_name(m) for m in config.data.manifests])
    held_out = args.sets or sites
    unknown = sorted(set(held_out) - set(sites))
    if unknown:
        print(f"error: --sets {unknown} are not sites of the recipe ({sites})", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO_ROOT / "runs" / "generalisation" / Path(args.config).stem
    folds = {name: out / f"holdout-{name}" for name in held_out}
    if not args.no_train:
        train_folds(
            str(Path(args.config).resolve()), args.set, folds, minutes=args.minutes, jobs=max(1, args.jobs)
        )
    results = {}
    for name, fold_dir in folds.items():
        if not (fold_dir / "model.pt").is_file():
            print(f"fold {name}: no model in {fold_dir} (train it first)", file=sys.stderr)
            continue
        log.info("fold %s: evaluating", name)
        results[name] = evaluate_fold(
            fold_dir,
            config.data.manifests,
            bootstrap=args.bootstrap,
            repeats=args.repeats,
            snorm_top_k=args.snorm_top_k,
            tta=config.preprocess.tta if args.tta is None else args.tta,
            partners=[Path(d) / fold_dir.name for d in args.ensemble],
        )
    if not results:
        return 1
    overrides = f" --set {' --set '.join(args.set)}" if args.set else ""
    overrides += f" --tta {args.tta}" if args.tta is not None else ""
    overrides += "".join(f" --ensemble {d}" for d in args.ensemble)
    title = (
        f"Leave-one-set-out of recipe `{args.config}`{overrides}; {args.bootstrap} bootstrap resamples, "
        f"{args.repeats} halvings; {dt.date.today().isoformat()}"
    )
    text = report(results, title, config.data.children)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        payload = {
            "config": args.config,
            "overrides": args.set,
            "date": dt.date.today().isoformat(),
            "folds": results,
        }
        Path(args.json).write_text(
            json.dumps(json_safe(payload), indent=2, allow_nan=False), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

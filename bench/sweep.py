"""A small training sweep: one base config, several named override sets, one table.

Each variant trains under the same wall-time budget, then is evaluated on the held-out test
patients of its own split (``cxr-reid evaluate --split auto``). The base is covid-collection's
CPU config, a few minutes per variant; on a GPU, pass a bigger base config and budget.

    OMP_NUM_THREADS=1 python bench/sweep.py --minutes 5 --only "arcface+supcon" "arcface only" \
        "supcon only" "arcface+supcon, 128 px"  # the sweep in MODEL_CARD.md
    python bench/sweep.py                       # every variant, 6 minutes each
    python bench/sweep.py --minutes 3 --only arcface+supcon cosface+supcon
    python bench/sweep.py --base configs/default.toml --minutes 30 --json sweep.json
    python bench/sweep.py --minutes 5 --only arcface+supcon --init-from runs/phantom-pretrain/model.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> overrides of the base config (section.key=TOML value)
VARIANTS: dict[str, list[str]] = {
    "arcface+supcon": [],
    "arcface only": ["loss.supcon_weight=0.0"],
    "supcon only": ["head.weight=0.0"],
    "cosface+supcon": ['head.name="cosface"'],
    "arcface+supcon, 128 px": ["preprocess.size=128"],
    "arcface+supcon, ir_se": ['backbone.variant="ir_se"'],
}


def run_variant(
    base: str, name: str, overrides: list[str], minutes: float, out_dir: Path, bootstrap: int
) -> dict:
    """Train one variant under the time budget and evaluate it on its test patients."""
    from models.evaluate import evaluate
    from models.train import load_config, train

    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    config = load_config(
        base,
        [
            *overrides,
            f'output_dir="{out_dir / slug}"',
            f"optim.max_minutes={minutes}",
            f'name="sweep-{slug}"',
        ],
    )
    checkpoint = train(config, progress=False)
    results = []
    for manifest in config.data.manifests:
        result = evaluate(manifest, model=checkpoint, split="auto", bootstrap=bootstrap, progress=False)
        results.append(result)
    history = [json.loads(x) for x in (out_dir / slug / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "name": name,
        "overrides": overrides,
        "epochs": len(history),
        "checkpoint": str(checkpoint),
        "results": results,
    }


def format_rows(rows: list[dict]) -> str:
    """A markdown table: one line per variant and evaluated set."""
    lines = [
        "| variant | epochs | set | test images | AUC [95% CI] | EER | TAR@FAR1e-2 | P@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["results"]:
            lo, hi = r.get("ci", {}).get("auc", [float("nan"), float("nan")])
            lines.append(
                f"| {row['name']} | {row['epochs']} | {r['dataset']} | {r['n_images']} | "
                f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}] | {r['eer']:.3f} | {r['tar_at_far_1e-2']:.3f} | "
                f"{r['precision_at_1']:.3f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=str(ROOT / "configs" / "covid-cpu.toml"), help="base config")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per variant")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sweep"), help="run directories")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--json", help="write all results here")
    parser.add_argument(
        "--init-from", help="start every variant from this checkpoint's backbone (pre-training)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.init_from and not Path(args.init_from).is_file():
        parser.error(f"--init-from {args.init_from}: no such checkpoint")
    from models.train import load_config

    missing = [m for m in load_config(args.base).data.manifests if not Path(m).is_file()]
    if missing:
        print(f"{', '.join(missing)} not found: nothing to measure; this sweep needs the real sets")
        return 0
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    if args.init_from:
        tag = Path(args.init_from).parent.name or Path(args.init_from).stem
        chosen = {f"{k}, init {tag}": [*v, f'optim.init_from="{args.init_from}"'] for k, v in chosen.items()}
    rows = []
    for name, overrides in chosen.items():
        print(f"training {name} ({args.minutes} min)...", flush=True)
        rows.append(run_variant(args.base, name, overrides, args.minutes, Path(args.out), args.bootstrap))
        print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-identification risk on the real sets: what ``cxr-reid risk`` reports for a release of half
of a set's patients when an attacker holds identified radiographs of the other half.

For each set (a folder under ``--data-dir`` with a ``manifest.csv``, or each ``--manifest``) the
images are split by patient, seeded:

- half of the patients with two or more images are *overlap* patients: their earlier images (by
  ``offset_days`` / ``follow_up`` where the manifest has them, else by path; at least one) go to the
  reference, the later ones to the release: the attacker holds an earlier radiograph of them;
- every other patient goes whole to the release (nobody can link them; a link is a wrong one) or
  whole to the reference (people the attacker holds who are not released), alternately.

The two manifests are written under ``--out`` (a temporary folder by default) and
``app.analysis.risk.run`` makes the report there; this prints one markdown table of linkability at each FAR
(exact 95% binomial intervals) and one of the defences at FAR 1e-3.

    python bench/risk.py [--data-dir ../shared/data] [--set nih-cxr14-64px ...] [--manifest CSV ...]
                         [--model CKPT] [--out DIR] [--defences all] [--seed 0]

Without the data (it is not part of the project) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import os
import random
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"  # "../shared/data" from the repo root


def _order_key(row: dict[str, str]) -> tuple[float, str]:
    for column in ("offset_days", "follow_up"):
        try:
            return float(row.get(column) or ""), row["path"]
        except ValueError:
            continue
    return 0.0, row["path"]


def split_release(manifest: Path, out: Path, *, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """Write ``release.csv`` and ``reference.csv`` under ``out`` (see the module docstring);
    returns them and the patient counts of each part."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_patient[row["patient_id"]].append(row)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    multi = [p for p in patients if len(by_patient[p]) >= 2]
    overlap = set(multi[: len(multi) // 2])
    release, reference = [], []
    counts = {"overlap": len(overlap), "release_only": 0, "reference_only": 0}
    alternate = 0
    for patient in patients:
        images = sorted(by_patient[patient], key=_order_key)
        if patient in overlap:
            cut = max(1, len(images) // 2)
            reference += images[:cut]
            release += images[cut:]
        elif alternate % 2 == 0:
            release += images
            counts["release_only"] += 1
            alternate += 1
        else:
            reference += images
            counts["reference_only"] += 1
            alternate += 1
    out.mkdir(parents=True, exist_ok=True)
    root = manifest.resolve().parent
    written = []
    for name, part in (("release.csv", release), ("reference.csv", reference)):
        target = out / name
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in part:
                writer.writerow({**row, "path": os.path.relpath(root / row["path"], out.resolve())})
        written.append(target)
    return written[0], written[1], counts


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(pair: Sequence[float | None]) -> str:
    lo, hi = pair
    return "" if lo is None else f" [{_pct(lo)}, {_pct(hi)}]"


def format_tables(results: list[dict[str, Any]]) -> str:
    """Two markdown tables: linkability per set and FAR, then each defence at the headline FAR."""
    if not results:
        return ""
    fars = list(results[0]["thresholds"])
    lines = [
        "| set | released images / patients | reference images / patients | overlap patients | "
        + " | ".join(f"linked at FAR {f} [95% CI]" for f in fars)
        + f" | wrong-link images at {fars[min(1, len(fars) - 1)]} |",
        "|---|---|---|---|" + "---|" * len(fars) + "---|",
    ]
    for r in results:
        measured = r["linkability"]["measured"]
        cells = [
            f"{measured[f]['linked']} of {measured[f]['patients']} ({_pct(measured[f]['share'])})"
            f"{_ci(measured[f]['share_ci'])}"
            for f in fars
        ]
        wrong = measured[fars[min(1, len(fars) - 1)]]["wrong_link_images"]
        lines.append(
            f"| {r['set']} | {r['release']['usable']} / {r['release']['patients']} | "
            f"{r['reference']['usable']} / {r['reference']['patients']} | {r['split']['overlap']} | "
            + " | ".join(cells)
            + f" | {wrong} |"
        )
    far = results[0]["headline_far"]
    lines += [
        "",
        f"| set | defence | PSNR dB | SSIM | linked at FAR {far} [95% CI] | wrong-link images |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for d in r["defences"]:
            m = d["measured"][far]
            psnr = "—" if d["psnr_db"] is None else f"{d['psnr_db']:.1f}"
            lines.append(
                f"| {r['set']} | {d['name']} | {psnr} | {d['ssim']:.3f} | "
                f"{m['linked']} of {m['patients']} ({_pct(m['share'])}){_ci(m['share_ci'])} | "
                f"{m['wrong_link_images']} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", help="folder of set folders (default: ../shared/data from the repo root)"
    )
    parser.add_argument("--set", action="append", help="only these set folders (repeatable)")
    parser.add_argument("--manifest", action="append", help="split and assess these manifests instead")
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--out", help="where the split manifests and reports go (default: a temp folder)")
    parser.add_argument("--far", default="1e-2,1e-3,1e-4")
    parser.add_argument("--defences", default="all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.manifest:
        manifests = [Path(m) for m in args.manifest]
        missing = [str(m) for m in manifests if not m.is_file()]
        if missing:
            print(f"error: manifest not found: {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
        shown = args.data_dir or "../shared/data"
        manifests = sorted(data_dir.glob("*/manifest.csv")) if data_dir.is_dir() else []
        if args.set:
            manifests = [m for m in manifests if m.parent.name in args.set]
        if not manifests:
            from models.evaluation.benchkit import NO_DATA

            print(f"no set with a manifest.csv under {shown}: {NO_DATA}")
            return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from app.analysis.risk import RiskError, RiskInputs, run  # torch: imported only when there is work
    from models.net.embedder import Embedder

    embedder = Embedder.from_checkpoint(args.model)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cxr-reid-risk-"))
    results = []
    for manifest in manifests:
        name = manifest.resolve().parent.name if manifest.name == "manifest.csv" else manifest.stem
        folder = out_root / name
        release, reference, counts = split_release(manifest, folder, seed=args.seed)
        print(f"{name}: {counts} -> {folder}", file=sys.stderr, flush=True)
        inputs = RiskInputs(
            release=str(release),
            reference=str(reference),
            out=str(folder / "report"),
            fars=args.far,
            defences=args.defences,
            batch_size=args.batch_size,
            progress=sys.stderr.isatty(),
        )
        try:
            report = run(inputs, embedder)
        except RiskError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        if not report["ground_truth"]:
            print(f"error: {name}: no patient ids on both sides", file=sys.stderr)
            return 2
        results.append({**report, "set": name, "split": counts})
    print(
        f"model {embedder.model_id}, {dt.date.today().isoformat()}, seed {args.seed}, exact 95% "
        f"intervals; reports under {out_root}\n"
    )
    print(format_tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

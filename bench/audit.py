"""Precision and recall of ``cxr-reid audit`` on real radiographs with planted errors.

For each set of ../shared/data: split its patients into train/test (80/20, seeded) when the manifest
has no split, audit the set as it is (its own findings are listed, not scored: nobody labelled
them), then plant errors in a copy of the manifest and audit again:

- leakage: an image of a patient put in the other split under a new id;
- mislabel: an image relabelled to another patient (who has images of their own), and two patients'
  ids merged into one;
- duplicate identity: a patient's images split between their id and a new one (same split);
- exact duplicate: a byte copy of an image, and a re-encoded copy (JPEG, quality 90, 90% size);
- outlier: an inverted copy of an image under its own id, and a truncated (unreadable) file.

Recall: planted errors found as a finding of their type. Precision: of the findings of a type
that touch a changed or added image, the share that are the planted error of that type; findings
touching none are the set's own and are reported beside. The audit runs at its default operating
point (the model's calibration at FAR 1e-3, or stricter for a large set: app.analysis.audit.operating_point).
``--screenshot`` keeps a PNG of one report as Chromium
draws it. Without the data it says so and exits 0.

    python bench/audit.py [--sets covid-collection nih-cxr14-64px] [--per-type 10] [--json out.json]
    python bench/audit.py --scale 100000     # time and memory of the findings step at 100k images
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from app.analysis.audit import FINDING_TYPES, run_audit
from app.analysis.audit_report import write_outputs
from models.evaluation.benchkit import NO_DATA
from models.net.embedder import Embedder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SETS = ("covid-collection", "kermany-paediatric", "nih-cxr14-64px")
log = logging.getLogger("bench.audit")


def read_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str((manifest.parent / row["path"]).resolve())
    return rows


def with_splits(rows: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    if all(row.get("split") for row in rows):
        return rows
    patients = sorted({row["patient_id"] for row in rows})
    test = set(np.random.default_rng(seed).permutation(patients)[: len(patients) // 5])
    return [dict(row, split="test" if row["patient_id"] in test else "train") for row in rows]


def plant(
    rows: list[dict[str, str]], folder: Path, per_type: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """A copy of ``rows`` with errors planted; returns (rows, truth). Each truth entry names the
    finding type expected, the row indices it involves and the ids."""
    rng = np.random.default_rng(seed)
    rows = [dict(row) for row in rows]
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_patient[row["patient_id"]].append(i)
    pool = [p for p in rng.permutation(sorted(by_patient)) if len(by_patient[p]) >= 2]
    big = [p for p in pool if len(by_patient[p]) >= 4]
    used: set[str] = set()

    def take(candidates: list[str], count: int) -> list[str]:
        out = [p for p in candidates if p not in used][:count]
        used.update(out)
        return out

    truth: list[dict[str, Any]] = []
    for n, p in enumerate(take(big, per_type)):  # duplicate identity: half the images under a new id
        moved = by_patient[p][: len(by_patient[p]) // 2]
        for i in moved:
            rows[i]["patient_id"] = f"alias-{n}"
        truth.append(
            {"type": "duplicate_identity", "rows": by_patient[p], "changed": moved, "ids": {p, f"alias-{n}"}}
        )
    for n, p in enumerate(take(pool, per_type)):  # leakage: one image into the other split, new id
        i = by_patient[p][0]
        other = "test" if rows[by_patient[p][1]]["split"] == "train" else "train"
        rows.append(dict(rows[i], patient_id=f"leak-{n}", split=other))
        truth.append(
            {
                "type": "leakage",
                "rows": [*by_patient[p], len(rows) - 1],
                "changed": [len(rows) - 1],
                "ids": {p, f"leak-{n}"},
                "also": {"exact_duplicate"},  # the same file under the new id is a copy too
            }
        )
    pairs = take(pool, 2 * per_type)
    for a, b in zip(pairs[0::2], pairs[1::2], strict=False):  # mislabel: one of a's images filed under b
        i = by_patient[a][0]
        rows[i]["patient_id"], rows[i]["split"] = b, rows[by_patient[b][0]]["split"]
        truth.append({"type": "mislabel", "rows": [i], "changed": [i], "ids": {b}})
    pairs = take(pool, 2 * per_type)
    for a, b in zip(pairs[0::2], pairs[1::2], strict=False):  # merge: a's id renamed to b's
        for i in by_patient[a]:
            rows[i]["patient_id"], rows[i]["split"] = b, rows[by_patient[b][0]]["split"]
        truth.append(
            {"type": "mislabel", "rows": by_patient[a] + by_patient[b], "changed": by_patient[a], "ids": {b}}
        )
    for n, p in enumerate(take(pool, per_type)):  # exact copies: bytes, then a re-encoding
        i = by_patient[p][0]
        target = folder / f"copy-{n}{Path(rows[i]['path']).suffix}"
        shutil.copy(rows[i]["path"], target)
        rows.append(dict(rows[i], path=str(target)))
        truth.append(
            {"type": "exact_duplicate", "rows": [i, len(rows) - 1], "changed": [len(rows) - 1], "ids": {p}}
        )
    for n, p in enumerate(take(pool, per_type)):
        i = by_patient[p][0]
        image = Image.open(rows[i]["path"]).convert("L")
        image = image.resize((max(16, int(image.width * 0.9)), max(16, int(image.height * 0.9))))
        target = folder / f"reencoded-{n}.jpeg"
        image.save(target, quality=90)
        rows.append(dict(rows[i], path=str(target)))
        truth.append(
            {"type": "exact_duplicate", "rows": [i, len(rows) - 1], "changed": [len(rows) - 1], "ids": {p}}
        )
    for n, p in enumerate(take(pool, per_type)):  # outliers: inverted copies and truncated files
        i = by_patient[p][0]
        target = folder / f"inverted-{n}.png"
        ImageOps.invert(Image.open(rows[i]["path"]).convert("L")).save(target)
        rows.append(dict(rows[i], path=str(target), patient_id=f"inverted-{n}"))
        truth.append(
            {"type": "outlier", "rows": [len(rows) - 1], "changed": [len(rows) - 1], "ids": {f"inverted-{n}"}}
        )
    for n, p in enumerate(take(pool, per_type)):
        i = by_patient[p][0]
        target = folder / f"broken-{n}.png"
        target.write_bytes(Path(rows[i]["path"]).read_bytes()[:200])
        rows.append(dict(rows[i], path=str(target), patient_id=f"broken-{n}"))
        truth.append(
            {"type": "outlier", "rows": [len(rows) - 1], "changed": [len(rows) - 1], "ids": {f"broken-{n}"}}
        )
    return rows, truth


def write_manifest(rows: list[dict[str, str]], path: Path) -> Path:
    fields = list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, path=os.path.relpath(row["path"], path.parent)))
    return path


def score(findings: list[Any], truth: list[dict[str, Any]], images: list[Any]) -> dict[str, Any]:
    """Recall and precision per type (see the module docstring)."""
    changed = {i for t in truth for i in t["changed"]}

    def matches(finding: Any, t: dict[str, Any]) -> bool:
        ids = {images[i].patient_id for i in finding.images}
        if finding.type == "mislabel":  # the planted row (or the merged id) is what it flags
            return bool(set(finding.flagged) & set(t["rows"])) and bool(ids & t["ids"])
        return bool(set(finding.images) & set(t["rows"])) and t["ids"] <= ids | {None}

    table = {}
    for kind in FINDING_TYPES:
        wanted = [t for t in truth if t["type"] == kind]
        allowed = [t for t in truth if t["type"] == kind or kind in t.get("also", ())]
        mine = [f for f in findings if f.type == kind]
        touching = [f for f in mine if changed & set(f.images)]
        found = sum(any(matches(f, t) for f in mine) for t in wanted)
        right = sum(any(matches(f, t) for t in allowed) for f in touching)
        table[kind] = {
            "planted": len(wanted),
            "found": found,
            "recall": found / len(wanted) if wanted else None,
            "findings_on_planted": len(touching),
            "precision": right / len(touching) if touching else None,
            "findings_elsewhere": len(mine) - len(touching),
        }
    return table


def fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.2f}"


def scale(images: int, dim: int, seed: int) -> None:
    """Time and peak memory of the findings step alone on ``images`` synthetic embeddings (patients
    of 1-4 images around a centre each, 512-d like the shipped model): the O(N^2) part of an audit."""
    import resource
    import time

    from app.analysis.audit import find_issues, operating_point
    from app.analysis.corpus import SIGNATURE_SIDE, CorpusImage, EmbeddedCorpus
    from models.scoring.calibration import Calibration

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, images)
    ids = np.repeat(np.arange(images), sizes)[:images]
    centres = rng.standard_normal((images, dim), dtype=np.float32)
    vectors = centres[ids] + 0.6 * rng.standard_normal((images, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    corpus = EmbeddedCorpus(
        [
            CorpusImage(
                Path(f"{i}.png"), f"{i}.png", f"p{pid}", "train" if pid % 5 else "test", key=f"s:p{pid}"
            )
            for i, pid in enumerate(ids)
        ],
        vectors,
        rng.integers(0, 256, (images, SIGNATURE_SIDE**2), dtype=np.uint8),
        [f"sha{i}" for i in range(images)],
        [f"px{i}" for i in range(images)],
        [None] * images,
        "synthetic",
    )
    # calibrated on the synthetic set's own scores, so its FARs hold there as a site calibration's do
    same = ids[:-1] == ids[1:]
    genuine = np.einsum("ij,ij->i", vectors[:-1][same], vectors[1:][same])
    a, b = rng.integers(0, images, (2, 200_000))
    impostor = np.einsum("ij,ij->i", vectors[a[ids[a] != ids[b]]], vectors[b[ids[a] != ids[b]]])
    calibration = Calibration.fit(genuine, impostor)
    threshold, far = operating_point(calibration, None, None, "1e-3", images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    findings, _ = find_issues(corpus, calibration, threshold)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"findings on {images:,} synthetic {dim}-d embeddings at FAR {far:g}: {seconds:.1f} s, "
        f"{len(findings)} findings, "
        f"peak RSS {peak / 1024:.0f} MB (embeddings {vectors.nbytes / 2**20:.0f} MB; "
        f"{(peak - before) / 1024:.0f} MB more during the step)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="folder of set folders (default: ../shared/data)")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--per-type", type=int, default=10, help="errors planted per kind (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale", type=int, metavar="N", help="instead: time the findings step on N synthetic embeddings"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "runs" / "bench-audit", help="reports, caches"
    )
    parser.add_argument(
        "--screenshot", action="store_true", help="keep OUT/<set>/planted/report.png (Chromium)"
    )
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.scale:
        scale(args.scale, 512, args.seed)
        return 0
    data_dir = args.data_dir or DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        print(f"no data at {args.data_dir or '../shared/data'}: {NO_DATA}")
        return 0
    embedder = Embedder.from_checkpoint(args.model, runtime="auto")
    results: dict[str, Any] = {"model_id": embedder.model_id, "date": dt.date.today().isoformat(), "sets": {}}
    for name in args.sets:
        manifest = data_dir / name / "manifest.csv"
        if not manifest.is_file():
            print(f"{name}: no manifest, skipped")
            continue
        rows = with_splits(read_rows(manifest), args.seed)
        out = args.out / name
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            folder = Path(tmp)
            as_is = run_audit(
                embedder, [write_manifest(rows, folder / "as-is.csv")], out / "as-is", progress=False
            )
            write_outputs(as_is, out / "as-is", embedder)
            planted_rows, truth = plant(rows, folder, args.per_type, args.seed)
            planted = run_audit(
                embedder,
                [write_manifest(planted_rows, folder / "planted.csv")],
                out / "planted",
                progress=False,
            )
            write_outputs(planted, out / "planted", embedder)
        table = score(planted.findings, truth, planted.corpus.images)
        results["sets"][name] = {"as_is": as_is.counts, "planted": table, "threshold": planted.threshold}
        if args.screenshot and shutil.which("chromium"):
            png = out / "planted" / "report.png"
            subprocess.run(
                ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                 "--window-size=1280,2400", (out / "planted" / "report.html").resolve().as_uri()],
                capture_output=True, timeout=180, check=False,
            )  # fmt: skip
        print(
            f"\n{name}: {len(rows)} images; threshold {planted.threshold:.4f} (FAR {planted.far:g}), "
            f"model {embedder.model_id}"
        )
        print(f"  the set as it is: {as_is.counts}")
        print(f"  {'type':20s} planted found recall  precision  (findings on planted / elsewhere)")
        for kind, row in table.items():
            print(
                f"  {kind:20s} {row['planted']:7d} {row['found']:5d} {fmt(row['recall'])}  "
                f"{fmt(row['precision'])}"
                f"      ({row['findings_on_planted']} / {row['findings_elsewhere']})"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pack the real sets small enough to carry to a GPU machine (its working tree is limited to 64 MiB).

Copies every ``<set>/manifest.csv`` under SOURCE to DEST with its images, shrinking any image whose
long side exceeds ``--max-side`` (PNG stays PNG, JPEG stays JPEG), and puts the one wheel the GPU
image lacks (pytorch-metric-learning, for the supervised-contrastive loss) into ``.whl/``. DEST and
``.whl/`` are git-ignored; name both in the device call's ``carry``.

    python scripts/pack_sets.py ../shared/data .data [--max-side 320]
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from PIL import Image

log = logging.getLogger("pack_sets")


def pack_set(source: Path, dest: Path, max_side: int) -> int:
    """Copy one set (manifest + images) into ``dest``; returns its size in bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "manifest.csv", dest / "manifest.csv")
    total = 0
    with (source / "manifest.csv").open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            src, out = source / row["path"], dest / row["path"]
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as image:
                if max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                    image.save(out, format=image.format or "PNG")
                else:
                    shutil.copy2(src, out)
            total += out.stat().st_size
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="folder of set folders, each with manifest.csv")
    parser.add_argument("dest", type=Path, help="output folder (git-ignored, e.g. .data)")
    parser.add_argument("--max-side", type=int, default=320, help="longest image side kept (default 320 px)")
    parser.add_argument(
        "--wheels", type=Path, default=Path(".whl"), help="where to put the wheel (default .whl)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = sorted(p.parent for p in args.source.glob("*/manifest.csv"))
    if not sets:
        log.error("no <set>/manifest.csv under %s", args.source)
        return 2
    for folder in sets:
        size = pack_set(folder, args.dest / folder.name, args.max_side)
        log.info("%s: %.1f MiB", folder.name, size / 2**20)
    spec = f"pytorch-metric-learning=={version('pytorch-metric-learning')}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(args.wheels), spec], check=True
    )
    log.info("wheel: %s in %s", spec, args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())

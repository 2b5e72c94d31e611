"""Pack the real sets small enough to carry to a GPU machine (its working tree is limited to 64 MiB).

Copies every ``<set>/manifest.csv`` under SOURCE to DEST with its images, shrinking any image whose
long side exceeds ``--max-side``; with ``--jpeg-quality Q`` every image is stored as an 8-bit grey
JPEG (the sets' content is grey; kermany's files are RGB) and the manifest's paths follow. It puts
the one wheel the GPU image lacks (pytorch-metric-learning, for the supervised-contrastive loss)
into ``.whl/``. DEST and ``.whl/`` are git-ignored; name them in the device call's ``carry``, one
set per call where all of them together would pass the limit (``--sets``).

    python scripts/pack_sets.py ../shared/data .data [--max-side 256] [--jpeg-quality 90] [--sets a b]
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path, PurePosixPath

from PIL import Image

log = logging.getLogger("pack_sets")


def pack_set(source: Path, dest: Path, max_side: int, jpeg_quality: int = 0) -> int:
    """Copy one set (manifest + images) into ``dest``; returns its size in bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    with (source / "manifest.csv").open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fieldnames = list(reader.fieldnames or [])
        rows = list(reader)
    total = 0
    for row in rows:
        src = source / row["path"]
        if jpeg_quality:
            row["path"] = str(PurePosixPath(row["path"]).with_suffix(".jpg"))
        out = dest / row["path"]
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            if jpeg_quality:
                grey = image.convert("L")
                grey.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                grey.save(out, format="JPEG", quality=jpeg_quality)
            elif max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                image.save(out, format=image.format or "PNG")
            else:
                shutil.copy2(src, out)
        total += out.stat().st_size
    with (dest / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="folder of set folders, each with manifest.csv")
    parser.add_argument("dest", type=Path, help="output folder (git-ignored, e.g. .data)")
    parser.add_argument("--max-side", type=int, default=320, help="longest image side kept (default 320 px)")
    parser.add_argument(
        "--jpeg-quality", type=int, default=0, help="store every image as grey JPEG of this quality (0: keep)"
    )
    parser.add_argument("--sets", nargs="+", help="only these sets (folder names; default all)")
    parser.add_argument(
        "--wheels", type=Path, default=Path(".whl"), help="where to put the wheel (default .whl)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = sorted(p.parent for p in args.source.glob("*/manifest.csv"))
    if args.sets:
        missing = sorted(set(args.sets) - {p.name for p in sets})
        if missing:
            log.error("no set %s under %s", ", ".join(missing), args.source)
            return 2
        sets = [p for p in sets if p.name in args.sets]
    if not sets:
        log.error("no <set>/manifest.csv under %s", args.source)
        return 2
    for folder in sets:
        size = pack_set(folder, args.dest / folder.name, args.max_side, args.jpeg_quality)
        log.info("%s: %.1f MiB", folder.name, size / 2**20)
    spec = f"pytorch-metric-learning=={version('pytorch-metric-learning')}"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(args.wheels), spec], check=True
    )
    log.info("wheel: %s in %s", spec, args.wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main())

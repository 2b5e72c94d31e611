"""Bulk enrolment throughput: ``cxr-reid enroll``'s path end to end, and what bounds it.

    python bench/enroll.py [--images 500] [--side 2000] [--format jpeg] [--device auto] [--json]

Issue 11, benchmark 6 (bulk embedding on a GPU when there is one). Writes ``--images`` distinct
radiographs of ``--side`` px (the example radiographs, upscaled, each with its own noise so every
file has its own sha256) into a temporary folder, then times, on ``--device``:

- ``decode_images_per_s``: reading, hashing, decoding and preparing alone, on the bulk jobs' worker
  threads (``app.service.enrollment.decode_workers``);
- ``embed_images_per_s``: the model alone on prepared batches of ``--batch-size``;
- ``enrol_images_per_s``: ``app.service.enrollment.bulk_enrol`` into a new gallery, everything included
  (SQLite rows and FAISS adds too).

The slowest of the first two is the bound the third approaches.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from app.service.enrollment import bulk_enrol, decode_workers, items_from_folder
from index import Gallery
from models.imaging.preprocess import decode_image, prepare
from models.net.embedder import Embedder

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.enroll")

EXAMPLES = REPO_ROOT / "examples" / "radiographs"


def write_images(folder: Path, count: int, side: int, fmt: str) -> int:
    """``count`` distinct radiographs in ``folder``; returns their total size in bytes."""
    bases = [
        np.asarray(Image.open(path).convert("L").resize((side, side), Image.Resampling.BILINEAR), np.float32)
        for path in sorted(EXAMPLES.glob("*.jpeg"))
    ]

    def one(i: int) -> int:
        rng = np.random.default_rng(i)
        pixels = np.clip(bases[i % len(bases)] + rng.normal(0, 4, (side, side)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=92)
        (folder / f"{i:06d}.{fmt}").write_bytes(buffer.getvalue())
        return buffer.tell()

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        return sum(pool.map(one, range(count)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--side", type=int, default=2000, help="pixels per side of each radiograph")
    parser.add_argument("--format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    embedder = Embedder.from_checkpoint(args.model, device=args.device, runtime="auto")
    config = embedder.preprocess_config
    with tempfile.TemporaryDirectory(prefix="cxr-reid-enroll-") as work:
        images = Path(work) / "images"
        images.mkdir()
        log.info("writing %d %s images of %d px ...", args.images, args.format, args.side)
        total_bytes = write_images(images, args.images, args.side, args.format)
        items = items_from_folder(images)

        def decode(path: Path) -> np.ndarray:
            return prepare(decode_image(path.read_bytes(), config=config), config)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
            prepared = np.stack(list(pool.map(decode, [item.path for item in items])))
        decode_s = time.perf_counter() - started

        embedder.embed_prepared(prepared[: args.batch_size])  # warm-up (cuDNN autotuning, allocator)
        started = time.perf_counter()
        for start in range(0, len(prepared), args.batch_size):
            embedder.embed_prepared(prepared[start : start + args.batch_size])
        embed_s = time.perf_counter() - started
        del prepared

        with Gallery(Path(work) / "gallery", dim=embedder.dim, model_id=embedder.model_id) as gallery:
            started = time.perf_counter()
            summary = bulk_enrol(embedder, gallery, items, batch_size=args.batch_size, progress=False)
            enrol_s = time.perf_counter() - started
    figures = {
        "model_id": embedder.model_id,
        "device": str(embedder.device),
        "runtime": embedder.runtime,
        "decode_workers": decode_workers(),
        "images": args.images,
        "side": args.side,
        "format": args.format,
        "mean_file_kb": total_bytes / args.images / 1024,
        "decode_images_per_s": args.images / decode_s,
        "embed_images_per_s": args.images / embed_s,
        "enrol_images_per_s": summary.enrolled / enrol_s,
        "enrolled": summary.enrolled,
        "failed": len(summary.failed),
    }
    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        for key, value in figures.items():
            log.info("%-22s %s", key, f"{value:.4g}" if isinstance(value, float) else value)
    return 0 if summary.enrolled == args.images else 1


if __name__ == "__main__":
    sys.exit(main())

"""Decoding at the resolution the model needs: its speed per format, and what it does to embeddings.

    python bench/decode.py [--model CKPT] [--data-dir ../shared/data] [--seconds 2] [--json]

Issue 11, benchmark 2. Two parts, both comparing ``decode_image(data)`` (full resolution) with
``decode_image(data, config=...)`` (what the service, enrolment and training do: JPEG 2000
resolution levels, JPEG DCT scaling, block means; see ``PreprocessConfig.reduction``):

- speed: decode + prepare per image, median of repeated runs, for one real chest CR (pydicom-data's
  RG1, 1955 x 1841, 15-bit) stored as uncompressed DICOM, JPEG 2000 lossless and lossy DICOM, 16-bit
  PNG and 8-bit JPEG, and the same radiograph upscaled to 2,800 px as 16-bit PNG and JPEG; beside it
  the model's own time per image at batch 32 (every test-time view), the goal of the issue;
- fidelity: on every set under ``--data-dir`` (all images), the lowest and median cosine between the
  embeddings of the two decodes, and verification AUC both ways. A decode path may be the default
  only if it keeps cosine >= 0.999 and moves AUC by less than 0.001.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.data import read_manifest
from models.evaluation.benchkit import embed_in_batches, median_ms
from models.evaluation.metrics import pair_scores, verification_metrics
from models.imaging.preprocess import PreprocessConfig, decode_image, prepare
from models.net.embedder import Embedder

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.decode")


def _pillow_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    """A grey radiograph as a 16-bit PNG or an 8-bit JPEG (quality 90), in memory."""
    scaled = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-6)
    if fmt == "png":
        image = Image.fromarray((scaled * 65535).astype(np.uint16))
    else:
        image = Image.fromarray((scaled * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if fmt == "png" else "JPEG", **({"quality": 90} if fmt == "jpeg" else {}))
    return buffer.getvalue()


def cases() -> list[tuple[str, bytes]]:
    """One real chest CR in each stored form; empty when pydicom-data is not installed."""
    try:
        from pydicom.data import get_testdata_file

        names = ("RG1_UNCR", "RG1_J2KR", "RG1_J2KI")
        files = {name: get_testdata_file(f"{name}.dcm", download=False) for name in names}
    except Exception as exc:  # noqa: BLE001 - pydicom-data missing: say so, measure nothing
        files = {"error": None}
        log.debug("pydicom-data: %s", exc)
    if not all(files.values()):
        log.warning("pydicom-data's RG1 files are not installed: no speed rows")
        return []
    out = [
        ("DICOM 1955x1841 uncompressed", Path(files["RG1_UNCR"]).read_bytes()),
        ("DICOM 1955x1841 JPEG 2000 lossless", Path(files["RG1_J2KR"]).read_bytes()),
        ("DICOM 1955x1841 JPEG 2000 lossy", Path(files["RG1_J2KI"]).read_bytes()),
    ]
    pixels = decode_image(out[0][1]).pixels
    big = np.asarray(Image.fromarray(pixels).resize((2630, 2800), Image.Resampling.BILINEAR))
    for label, image in (("1955x1841", pixels), ("2800x2630", big)):
        out.append((f"PNG {label} 16-bit", _pillow_bytes(image, "png")))
        out.append((f"JPEG {label} 8-bit", _pillow_bytes(image, "jpeg")))
    return out


def speed(embedder: Embedder, seconds: float, only: list[str] | None = None) -> dict[str, Any]:
    config = embedder.preprocess_config
    batch = np.random.default_rng(0).random((32, config.size, config.size), dtype=np.float32)
    model_ms = median_ms(lambda: embedder.embed_prepared(batch), seconds) / len(batch)
    rows = {}
    for label, data in cases():
        if only and not any(part in label for part in only):
            continue
        full = median_ms(lambda data=data: prepare(decode_image(data), config), seconds)
        needed = median_ms(lambda data=data: prepare(decode_image(data, config=config), config), seconds)
        vectors = embedder.embed_prepared(
            np.stack(
                [prepare(decode_image(data), config), prepare(decode_image(data, config=config), config)]
            )
        )
        rows[label] = {
            "full_ms": full,
            "needed_resolution_ms": needed,
            "speed_up": full / needed,
            "cosine_full_vs_needed": float(vectors[0] @ vectors[1]),
            "within_model_time": needed <= model_ms,
        }
    return {"model_ms_per_image_batch32": model_ms, "cases": rows}


def fidelity(embedder: Embedder, data_dir: Path) -> dict[str, Any]:
    """Cosine between full and needed-resolution embeddings, and AUC both ways, per real set."""
    config: PreprocessConfig = embedder.preprocess_config
    out = {}
    for manifest in sorted(data_dir.glob("*/manifest.csv")):
        samples = read_manifest(manifest)
        full, needed, reduced = [], [], 0
        for sample in samples:
            data = Path(sample.path).read_bytes()
            small = decode_image(data, config=config)
            reduced += small.original_shape is not None
            full.append(prepare(decode_image(data), config))
            needed.append(prepare(small, config))
        a, b = embed_in_batches(embedder, full), embed_in_batches(embedder, needed)
        labels = [s.patient_id for s in samples]
        aucs = [verification_metrics(*pair_scores(e, labels)[:2])["auc"] for e in (a, b)]
        cosines = (a * b).sum(axis=1)
        out[manifest.parent.name] = {
            "images": len(samples),
            "decoded_smaller": reduced,
            "min_cosine": float(cosines.min()),
            "median_cosine": float(np.median(cosines)),
            "auc_full": aucs[0],
            "auc_needed_resolution": aucs[1],
            "auc_change": aucs[1] - aucs[0],
        }
        log.info("%s: %s", manifest.parent.name, out[manifest.parent.name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--speed-only", action="store_true", help="skip the real-set fidelity part")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="speed rows whose label contains TEXT")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    embedder = Embedder.from_checkpoint(args.model, runtime="auto")  # the serving path
    figures: dict[str, Any] = {
        "model_id": embedder.model_id,
        "speed": speed(embedder, args.seconds, args.only),
    }
    if args.speed_only:
        pass
    elif args.data_dir.is_dir():
        figures["fidelity"] = fidelity(embedder, args.data_dir)
    else:
        log.warning("no data dir %s: fidelity on real sets skipped", args.data_dir)
    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        log.info("model: %.1f ms per image at batch 32", figures["speed"]["model_ms_per_image_batch32"])
        for label, row in figures["speed"]["cases"].items():
            log.info(
                "%-36s full %7.1f ms  needed resolution %6.1f ms  (%.1fx, cosine %.6f)",
                label,
                row["full_ms"],
                row["needed_resolution_ms"],
                row["speed_up"],
                row["cosine_full_vs_needed"],
            )
        for name, row in figures.get("fidelity", {}).items():
            log.info("%s: %s", name, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

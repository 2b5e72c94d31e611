"""Does the input quality gate let real radiographs through? Decode every image of some manifests
exactly as the service does (``app.service.decoding.decode_source``: decoder checks plus
``models.imaging.preprocess.check_usable``) and count what is refused, and why.

    python bench/quality_gate.py [MANIFEST ...] [--json OUT.json]

Without arguments it reads every ``manifest.csv`` under ``../shared/data`` (the project's sets).
Exit status 1 when any image is refused, so it can gate a change to the thresholds in
``models/imaging/quality.py`` (MIN_SIDE, MAX_ASPECT, MIN_GREY_LEVELS).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from app.service.decoding import decode_source
from app.service.errors import InvalidInputError
from models.data import read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.quality_gate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifests", nargs="*", type=Path, help="default: ../shared/data/*/manifest.csv")
    parser.add_argument("--json", type=Path, help="also write the counts and refusals here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifests = args.manifests or sorted((REPO_ROOT.parent / "shared" / "data").glob("*/manifest.csv"))
    if not manifests:
        parser.error("no manifests given and none found under ../shared/data")

    result: dict[str, dict] = {}
    for manifest in manifests:
        samples = read_manifest(manifest)
        refused: list[dict[str, str]] = []
        for sample in tqdm(samples, desc=manifest.parent.name, unit="img"):
            try:
                decode_source(sample.path, max_pixels=50_000_000, name=Path(sample.path).name)
            except InvalidInputError as exc:
                refused.append({"path": Path(sample.path).name, "reason": str(exc)})
        reasons = collections.Counter(item["reason"].split(": ", 1)[-1].split(" (")[0] for item in refused)
        result[manifest.parent.name] = {
            "images": len(samples),
            "refused": len(refused),
            "examples": refused[:5],
        }
        log.info(
            "%-24s %6d images, %d refused %s", manifest.parent.name, len(samples), len(refused), dict(reasons)
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(item["refused"] for item in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

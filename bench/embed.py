"""How close the model's forward pass runs to this machine's arithmetic limit.

    python bench/embed.py [--model CKPT] [--seconds 4] [--json]

Measures, in one run: images/s at batch 1 and 32 through ``Embedder.embed_prepared`` (every
test-time view included), the model's GFLOPs per image (``torch.utils.flop_counter``, conv and
linear, 2 FLOPs per multiply-accumulate, times the views), the fp32 matrix-multiply rate of this
machine (1024 x 1024 ``torch.mm``), and their ratio, ``efficiency``. Variants are measured beside
the default path and reported with their lowest cosine to the default embeddings; one becomes the
default only after it also keeps test AUC (issue 11), so none is switched on here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/embed.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.embedder import Embedder, embed_views  # noqa: E402

log = logging.getLogger("bench.embed")


def rate(run: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of ``run`` (one warm-up call, then repeated for about ``seconds``)."""
    run()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        run()
        calls += 1
    return items * calls / elapsed


def matmul_gflops(seconds: float) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return rate(lambda: torch.mm(a, b), 2 * 1024**3, seconds) / 1e9


def model_gflops_per_image(embedder: Embedder) -> float:
    size = embedder.preprocess_config.size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        embed_views(embedder.network, torch.zeros(1, 1, size, size), embedder.preprocess_config.tta)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    embedder = Embedder.from_checkpoint(args.model)
    size = embedder.preprocess_config.size
    batch = np.random.default_rng(0).random((32, size, size), dtype=np.float32)
    figures: dict[str, object] = {
        "model_id": embedder.model_id,
        "torch_threads": torch.get_num_threads(),
        "views_per_image": embedder.preprocess_config.tta + 1,
        "images_per_s_batch1": rate(lambda: embedder.embed_prepared(batch[:1]), 1, args.seconds),
        "images_per_s_batch32": rate(lambda: embedder.embed_prepared(batch), 32, args.seconds),
        "model_gflops_per_image": model_gflops_per_image(embedder),
        "matmul_gflops_per_s": matmul_gflops(args.seconds),
    }
    figures["achieved_gflops_per_s"] = figures["model_gflops_per_image"] * figures["images_per_s_batch32"]
    figures["efficiency"] = figures["achieved_gflops_per_s"] / figures["matmul_gflops_per_s"]

    reference = embedder.embed_prepared(batch)
    network = embedder.network
    network.to(memory_format=torch.channels_last)  # variant: NHWC activations
    try:
        channels_last = embedder.embed_prepared(batch)
        figures["variants"] = {
            "channels_last": {
                "images_per_s_batch32": rate(lambda: embedder.embed_prepared(batch), 32, args.seconds),
                "min_cosine_to_default": float((reference * channels_last).sum(axis=1).min()),
            }
        }
    finally:
        network.to(memory_format=torch.contiguous_format)

    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        for key, value in figures.items():
            log.info("%-24s %s", key, f"{value:.4g}" if isinstance(value, float) else value)
    return 0


if __name__ == "__main__":
    sys.exit(main())

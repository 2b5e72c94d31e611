"""How close the model's forward pass runs to this machine's arithmetic limit, and which runtime is fastest.

    python bench/embed.py [--model CKPT] [--seconds 4] [--variants ...] [--auc] [--json]

Measures, in one run: images/s at batch 1 and 32 through ``Embedder.embed_prepared`` (every
test-time view included), the model's GFLOPs per image (``torch.utils.flop_counter``, conv and
linear, 2 FLOPs per multiply-accumulate, times the views), the fp32 matrix-multiply rate of this
machine (1024 x 1024 ``torch.mm``), and their ratio, ``efficiency``.

Then each runtime variant of the same network, in the same embedding path: NCHW (the default is
channels_last), ``torch.compile`` (inductor), oneDNN fusion (``torch.jit`` trace, freeze and
``optimize_for_inference``: conv + batch norm + activation folded), ONNX Runtime (CPU provider)
and dynamic int8 (``quantize_dynamic`` on the linear layers).
Each gets images/s at batch 1 and 32 (the median of rounds timed in turns with the default, as
this machine's speed drifts), its speed-up and its lowest cosine to the default embeddings over
the example radiographs and random inputs. With ``--auc`` the variants that keep cosine >= 0.999
and beat the default are also scored on the real sets (the test patients of trained sets, every
image of unseen ones, like ``bench/accuracy.py``): the rule of issue 11 is that the fastest variant
that keeps cosine >= 0.999 and moves AUC by less than 0.001 becomes the service's default path
(``models/net/runtime.py`` says which it is and why).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.evaluation.benchkit import embed_in_batches, rate
from models.net.embedder import Embedder, embed_views
from models.net.runtime import OnnxRuntimeNetwork, onednn_network

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.embed")


def matmul_gflops(seconds: float) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return rate(lambda: torch.mm(a, b), 2 * 1024**3, seconds) / 1e9


def model_gflops_per_image(embedder: Embedder) -> float:
    size = embedder.preprocess_config.size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        embed_views(embedder.network, torch.zeros(1, 1, size, size), embedder.preprocess_config.tta)
    return counter.get_total_flops() / 1e9


def _nchw(network: torch.nn.Module, size: int) -> torch.nn.Module:
    return copy.deepcopy(network).to(memory_format=torch.contiguous_format)


def _compiled(network: torch.nn.Module, size: int) -> torch.nn.Module:
    return torch.compile(copy.deepcopy(network))


def _int8_dynamic(network: torch.nn.Module, size: int) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(network), {torch.nn.Linear}, dtype=torch.qint8)


#: Each builds a stand-in for the network from it and the model's input side.
VARIANTS: dict[str, Callable[[torch.nn.Module, int], torch.nn.Module]] = {
    "nchw": _nchw,
    "torch_compile": _compiled,
    "onednn_fusion": onednn_network,
    "onnxruntime": OnnxRuntimeNetwork,
    "int8_dynamic": _int8_dynamic,
}

EXAMPLES = REPO_ROOT / "examples" / "radiographs"


@contextmanager
def _swapped(embedder: Embedder, network: torch.nn.Module) -> Iterator[None]:
    original = embedder.forward_network
    embedder.forward_network = network
    try:
        yield
    finally:
        embedder.forward_network = original


def variants(
    embedder: Embedder, batch: np.ndarray, seconds: float, names: list[str], rounds: int = 3
) -> tuple[dict[str, dict[str, object]], dict[str, torch.nn.Module]]:
    """Speed and fidelity of each runtime variant in the embedding path the service uses.

    This sandbox's speed drifts by 20-30% over minutes, more than the variants differ, so the
    variants and the default are timed in turns: ``rounds`` rounds, each timing every one of them
    once; each gets the median of its rounds, and its speed-up is against the default's median."""
    check = np.concatenate([np.stack([embedder.prepare(p) for p in sorted(EXAMPLES.glob("*.jpeg"))]), batch])
    reference = embedder.embed_prepared(check)
    size = embedder.preprocess_config.size
    out: dict[str, dict[str, object]] = {}
    networks: dict[str, torch.nn.Module] = {"default": embedder.forward_network}
    for name in names:
        log.info("variant %s ...", name)
        started = time.perf_counter()
        try:
            network = VARIANTS[name](embedder.network, size)
            with _swapped(embedder, network):
                embeddings = embedder.embed_prepared(check)  # the first call also compiles
                embedder.embed_prepared(batch[:1])  # and compiles again for another batch size
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run here is a finding
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        networks[name] = network
        out[name] = {
            "min_cosine_to_default": float((reference * embeddings).sum(axis=1).min()),
            "build_s": time.perf_counter() - started,
        }
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in networks}
    for turn in range(rounds):
        log.info("timing round %d of %d ...", turn + 1, rounds)
        for name, network in networks.items():
            with _swapped(embedder, network):
                timings[name].append(
                    (
                        rate(lambda: embedder.embed_prepared(batch[:1]), 1, seconds / 2),
                        rate(lambda: embedder.embed_prepared(batch), len(batch), seconds),
                    )
                )
    median = {name: np.median(np.array(rows), axis=0) for name, rows in timings.items()}
    for name in networks:
        row = out.setdefault(name, {})
        row["images_per_s_batch1"], row["images_per_s_batch32"] = (float(x) for x in median[name])
        row["speed_up"] = float(median[name][1] / median["default"][1])
        row["speed_up_batch1"] = float(median[name][0] / median["default"][0])
    out["default"]["rounds"] = rounds
    return out, networks


def auc_guard(
    embedder: Embedder,
    results: dict[str, dict[str, object]],
    networks: dict[str, torch.nn.Module],
    data_dir: Path,
) -> dict[str, object]:
    """Verification AUC of the default path and of each variant that keeps cosine >= 0.999 and is
    faster, on every set under ``data_dir``; the change per set is what the 0.001 rule reads.
    ``networks`` are the variants ``variants`` built and timed (built once: compiling is slow)."""
    from models.data import read_manifest
    from models.evaluation.evaluate import select_split
    from models.evaluation.metrics import pair_scores, verification_metrics

    candidates = [
        name
        for name, row in results.items()
        if name != "default"
        and "error" not in row
        and row["min_cosine_to_default"] >= 0.999
        and row["speed_up"] > 1.0
    ]
    out: dict[str, object] = {"candidates": candidates, "sets": {}}
    for manifest in sorted(data_dir.glob("*/manifest.csv")):
        samples, _ = select_split(read_manifest(manifest), embedder, "auto")
        prepared = [embedder.prepare(s.path) for s in samples]
        labels = [s.patient_id for s in samples]

        def auc(prepared: list[np.ndarray] = prepared, labels: list[str] = labels) -> float:
            vectors = embed_in_batches(embedder, prepared)
            return float(verification_metrics(*pair_scores(vectors, labels)[:2])["auc"])

        row: dict[str, float] = {"images": len(samples), "default": auc()}
        for name in candidates:
            with _swapped(embedder, networks[name]):
                row[name] = auc()
            row[f"{name}_change"] = row[name] - row["default"]
        out["sets"][manifest.parent.name] = row
        log.info("%s: %s", manifest.parent.name, row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per measurement")
    parser.add_argument(
        "--variants", nargs="*", choices=sorted(VARIANTS), default=sorted(VARIANTS), help="runtimes to try"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, variants in turn")
    parser.add_argument("--auc", action="store_true", help="score the passing variants on the real sets")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    embedder = Embedder.from_checkpoint(args.model, runtime="torch")  # the baseline: PyTorch eager
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

    figures["variants"], networks = variants(embedder, batch, args.seconds, args.variants, args.rounds)
    if args.auc:
        figures["auc"] = auc_guard(embedder, figures["variants"], networks, args.data_dir)

    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        for key, value in figures.items():
            log.info(
                "%-24s %s",
                key,
                json.dumps(value)
                if isinstance(value, dict)
                else f"{value:.4g}"
                if isinstance(value, float)
                else value,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embedding and training throughput on a GPU, against the card's own measured arithmetic limit.

    python bench/gpu.py [--json] [--seconds 3] [--device auto] [--compile] [--quick]

Issue 11, benchmark 6. In one run it measures:

- the card's limit: a bf16 and an fp32 (TF32 off) matrix product, 8192 x 8192 x 8192;
- per recipe (the shipped checkpoint's own training config, and ``configs/gpu.toml``): embedding
  images/s at batch 256 in fp32 and in bf16 autocast, both channels_last, one view per image; the
  training step of ``models.training.train.training_step`` (two augmented views per image, margin + SupCon
  loss, AdamW) in the recipe's own precision, in view-images/s; the FLOPs of each
  (``torch.utils.flop_counter``: conv and matmul, 2 per multiply-accumulate, backward included for
  training) and the fraction of the bf16 limit they reach;
- the shipped model the way ``cxr-reid enroll --device auto`` runs it (``Embedder.embed_prepared``,
  fp32, its test-time views): images/s at batch 256, and the lowest cosine of its embeddings, and of a
  bf16 variant, to the CPU's, on the example radiographs and random inputs.

Timings synchronise the device after every call. Weights are random for the recipe rows (speed does
not depend on them) and the shipped ones for the Embedder row. ``--quick`` shrinks every size so the
script itself can be checked on a CPU in seconds; its figures then mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.losses import SupConLoss
from torch.utils.flop_counter import FlopCounterMode

from models.evaluation.benchkit import rate
from models.net.backbones import build_backbone
from models.net.embedder import Embedder, resolve_device
from models.net.heads import build_head
from models.training.config import TrainConfig, load_config
from models.training.train import IdentityModel, training_step

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.gpu")

EXAMPLES = REPO_ROOT / "examples" / "radiographs"
IDENTITIES = 5000  # classes of the margin head in the training rows: about the sets' train patients


def timed(run: Callable[[], object], items: int, seconds: float, device: torch.device) -> float:
    """Items/s of ``run``, the device synchronised after each call (kernels launch asynchronously)."""

    def call() -> None:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return rate(call, items, seconds)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return timed(lambda: torch.mm(a, b), 2 * n**3, seconds, device) / 1e12


def flops(run: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def recipe_figures(
    config: TrainConfig, device: torch.device, batch: int, seconds: float, bf16_limit: float, compile_: bool
) -> dict[str, Any]:
    """Embedding and training rates of one recipe's network, random weights."""
    size = config.preprocess.size
    network = build_backbone(config.backbone).to(device, memory_format=torch.channels_last).eval()
    inputs = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    out: dict[str, Any] = {"input_px": size, "backbone": config.backbone.to_dict()}

    def forward(bf16: bool, net: torch.nn.Module = network) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return net(inputs)

        return run

    forward_flops = flops(forward(False)) / batch
    out["forward_gflops_per_image"] = forward_flops / 1e9
    for name, bf16 in (("fp32", False), ("bf16", True)):
        images_s = timed(forward(bf16), batch, seconds, device)
        out[f"embed_images_per_s_{name}"] = images_s
        out[f"embed_efficiency_{name}"] = images_s * forward_flops / 1e12 / bf16_limit
    if compile_:
        try:
            compiled = torch.compile(network)
            images_s = timed(forward(True, compiled), batch, seconds, device)
            out["embed_images_per_s_bf16_compiled"] = images_s
            out["embed_efficiency_bf16_compiled"] = images_s * forward_flops / 1e12 / bf16_limit
        except Exception as exc:  # a compiler failure is a figure too, not the end of the run
            out["embed_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]

    # Training: the recipe's own step at its own batch size and precision (bf16 only on a GPU).
    network.train()
    head = build_head(
        config.head.name, config.backbone.embedding_dim, IDENTITIES, **config.head.build_kwargs()
    )
    model = IdentityModel(network, head).to(device)
    if config.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    supcon = SupConLoss(temperature=config.loss.supcon_temperature)
    generator = torch.Generator(device=device).manual_seed(0)
    patients = config.optim.patients_per_batch
    per_patient = config.optim.images_per_patient
    clean = torch.rand(patients * per_patient, 1, size, size, device=device)
    labels = torch.arange(patients, device=device).repeat_interleave(per_patient)
    use_amp = config.optim.amp and device.type == "cuda"

    def step() -> object:
        return training_step(model, optimizer, supcon, clean, labels, config, generator, use_amp=use_amp)

    views = 2 * len(clean)
    train_flops = flops(step) / views
    out["train_batch_views"] = views
    out["train_precision"] = "bf16 autocast" if use_amp else "fp32"
    out["train_gflops_per_view"] = train_flops / 1e9
    train_s = timed(step, views, seconds, device)
    out["train_views_per_s"] = train_s
    out["train_efficiency"] = train_s * train_flops / 1e12 / bf16_limit
    return out


def enroll_figures(embedder: Embedder, batch: int, seconds: float) -> dict[str, Any]:
    """The shipped model as bulk enrolment runs it on its device, and how far its embeddings move
    from the CPU's."""
    device = embedder.device
    reference = Embedder.from_checkpoint(embedder.source, device="cpu")
    size = embedder.preprocess_config.size
    examples = [embedder.prepare(path) for path in sorted(EXAMPLES.glob("*.jpeg"))]
    random = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
    check = np.concatenate([np.stack(examples), random[:32]]) if examples else random[:32]
    cpu = reference.embed_prepared(check)
    on_device = embedder.embed_prepared(check)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = embedder.embed_prepared(check)
    return {
        "model_id": embedder.model_id,
        "views_per_image": embedder.preprocess_config.tta + 1,
        "batch": batch,
        "images_per_s": timed(lambda: embedder.embed_prepared(random), batch, seconds, device),
        "checked_images": len(check),
        "min_cosine_to_cpu": float((cpu * on_device).sum(axis=1).min()),
        "min_cosine_to_cpu_bf16": float((cpu * bf16).sum(axis=1).min()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--config", action="append", type=Path, help="recipe(s) to measure (repeatable)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd bf16 embedding")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the card")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = resolve_device(args.device)
    batch, matmul_n = (8, 256) if args.quick else (256, 8192)
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "matmul_tflops_bf16": matmul_tflops(device, torch.bfloat16, matmul_n, args.seconds),
        "matmul_tflops_fp32": matmul_tflops(device, torch.float32, matmul_n, args.seconds),
    }
    embedder = Embedder.from_checkpoint(None, device=str(device))
    shipped = embedder.training.get("config")
    recipes = {"shipped": TrainConfig.from_dict(shipped)} if shipped else {}
    for path in args.config or [REPO_ROOT / "configs" / "gpu.toml"]:
        recipes[path.stem] = load_config(path)
    if args.quick:  # a CPU check of the code path: a few patients at a small size
        recipes = {
            name: replace(
                config,
                preprocess=replace(config.preprocess, size=64),
                optim=replace(config.optim, patients_per_batch=4),
            )
            for name, config in recipes.items()
        }
    figures["recipes"] = {}
    for name, config in recipes.items():
        log.info("recipe %s ...", name)
        figures["recipes"][name] = recipe_figures(
            config, device, batch, args.seconds, figures["matmul_tflops_bf16"], args.compile
        )
    log.info("enrol path ...")
    figures["enroll"] = enroll_figures(embedder, batch, args.seconds)

    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        for key, value in _flat(figures):
            log.info("%-44s %s", key, f"{value:.4g}" if isinstance(value, float) else value)
    return 0


def _flat(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict) and key != "backbone":
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""``cxr-reid train``: a config per experiment, CPU or CUDA, DDP through torchrun.

The objective combines a margin head (ArcFace by default) over patient classes with a
supervised-contrastive loss over two augmented views of every image in a P x K batch. The
contrastive term lets one-image patients count (their two views are positives), which matters on
small sets where most patients have a single image.

Layout of a run directory::

    config.toml      the resolved config (file + overrides)
    splits.csv       every image with its split (patient-disjoint)
    metrics.jsonl    one line per epoch
    last.pt          training state for --resume (weights, head, optimiser, epoch)
    model.pt         the best epoch as a cxr-reid checkpoint, calibrated on validation pairs
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss

from models.backbones import BackboneConfig, build_backbone
from models.calibration import Calibration
from models.checkpoint import load_checkpoint, save_checkpoint
from models.data import (
    AugmentConfig,
    PKSampler,
    Sample,
    assign_splits,
    augment,
    load_images,
    read_manifests,
    summarise,
    write_manifest,
)
from models.heads import build_head
from models.metrics import pair_scores, retrieval_metrics, verification_metrics
from models.preprocess import PreprocessConfig, to_tensor

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    manifests: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    holdout_sets: list[str] = field(default_factory=list)  # whole sets kept out of training (cross-site test)
    balance_sets: bool = False  # equal share of each set's patients per epoch (PKSampler groups)
    cache_dir: str = ".cache/cxr-reid"


@dataclass
class HeadConfig:
    name: str = "arcface"
    s: float = 30.0
    m1: float | None = None
    m2: float | None = None
    m3: float | None = None
    sub_centers: int = 1
    weight: float = 1.0  # weight of the margin loss in the objective


@dataclass
class LossConfig:
    supcon_weight: float = 1.0
    supcon_temperature: float = 0.1


@dataclass
class OptimConfig:
    epochs: int = 20
    patients_per_batch: int = 32
    images_per_patient: int = 2
    lr: float = 2e-3
    head_lr_scale: float = 10.0  # the head's class centres start random: let them move faster
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads; 0 = torch's default
    max_minutes: float = (
        0.0  # wall-time budget (0 = none): the LR schedule anneals within it, best epoch kept
    )
    eval_max_impostor_pairs: int = 200_000
    init_from: str = ""  # a checkpoint whose backbone weights start this run (e.g. phantom pre-training)


@dataclass
class TrainConfig:
    name: str = "cxr-reid"
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        sections = {
            "data": DataConfig,
            "head": HeadConfig,
            "loss": LossConfig,
            "optim": OptimConfig,
        }
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in sections:
                kwargs[key] = _build_section(sections[key], value, key)
            elif key == "backbone":
                kwargs[key] = BackboneConfig.from_dict(value)
            elif key == "preprocess":
                kwargs[key] = PreprocessConfig.from_dict(value)
            elif key == "augment":
                kwargs[key] = AugmentConfig.from_dict(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["backbone"] = self.backbone.to_dict()
        out["preprocess"] = self.preprocess.to_dict()
        return out


def _build_section(section: type, values: dict[str, Any], name: str) -> Any:
    allowed = {f.name for f in fields(section)}
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")
    return section(**values)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML experiment config and apply ``section.key=value`` overrides (TOML values)."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ValueError(f"override must look like section.key=value, got {override!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        target = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return TrainConfig.from_dict(values)


def _to_toml(values: dict[str, Any]) -> str:
    """A small TOML writer for the resolved config (flat sections of scalars and lists)."""

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return json.dumps(str(value))

    top = [f"{k} = {literal(v)}" for k, v in values.items() if not isinstance(v, dict)]
    blocks = []
    for key, section in values.items():
        if isinstance(section, dict):
            lines = [f"{k} = {literal(v)}" for k, v in section.items() if v is not None]
            blocks.append(f"[{key}]\n" + "\n".join(lines))
    return "\n".join(top) + "\n\n" + "\n\n".join(blocks) + "\n"


# --- the training loop ------------------------------------------------------------------------------


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_choice: str) -> tuple[DistributedContext, torch.device]:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        ctx = DistributedContext(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
        use_cuda = torch.cuda.is_available() and device_choice != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(ctx.local_rank)
            return ctx, torch.device("cuda", ctx.local_rank)
        return ctx, torch.device("cpu")
    if device_choice == "auto":
        device_choice = "cuda" if torch.cuda.is_available() else "cpu"
    return DistributedContext(), torch.device(device_choice)


class IdentityModel(torch.nn.Module):
    """Backbone + margin head, so DDP wraps one module."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.backbone(images)
        return embeddings, self.head(embeddings, labels)


def _lr_factor(step: int, total_steps: int, warmup_steps: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up then cosine decay to zero, by steps or by the time budget, whichever is further.

    With a time budget the schedule still anneals fully when the machine is slower than planned,
    instead of being cut off at a high learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_fraction)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def embed_images(
    backbone: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 128
) -> np.ndarray:
    """Embed prepared uint8 images (N, H, W) with a backbone in eval mode; unit vectors."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device).float() / 255
        out.append(F.normalize(backbone(to_tensor(batch)).float(), dim=1).cpu().numpy())
    backbone.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def validate(
    backbone: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    max_impostor_pairs: int,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Verification AUC and retrieval on held-out patients; returns metrics and pair scores."""
    embeddings = embed_images(backbone, images, device)
    genuine, impostor, *_ = pair_scores(embeddings, labels, max_impostor_pairs=max_impostor_pairs)
    metrics = verification_metrics(genuine, impostor)
    metrics.update(retrieval_metrics(embeddings, labels))
    return metrics, genuine, impostor


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train, validate every epoch, keep the best; returns the path of the final checkpoint."""
    ctx, device = _init_distributed(config.optim.device)
    if config.optim.threads:
        torch.set_num_threads(config.optim.threads)
    torch.manual_seed(config.optim.seed + ctx.rank)
    np.random.seed(config.optim.seed)
    out_dir = Path(config.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(_to_toml(config.to_dict()))

    samples = _load_samples(config)
    train_samples = [s for s in samples if s.split == "train"]
    val_samples = [s for s in samples if s.split == "val"]
    if ctx.is_main:
        write_manifest(samples, out_dir / "splits.csv")
        log.info("data: %s", json.dumps(summarise(samples)))
    if not train_samples or not val_samples:
        raise ValueError("the split left no training or no validation images: check data fractions")

    cache = config.data.cache_dir or None
    train_images = load_images(
        train_samples, config.preprocess, cache_dir=cache, progress=progress and ctx.is_main
    )
    val_images = load_images(
        val_samples, config.preprocess, cache_dir=cache, progress=progress and ctx.is_main
    )
    patient_index = {p: i for i, p in enumerate(sorted({s.patient_id for s in train_samples}))}
    train_labels = np.array([patient_index[s.patient_id] for s in train_samples])
    val_ids = {p: i for i, p in enumerate(sorted({s.patient_id for s in val_samples}))}
    val_labels = np.array([val_ids[s.patient_id] for s in val_samples])

    backbone = build_backbone(config.backbone)
    if config.optim.init_from and not (resume and (out_dir / "last.pt").is_file()):
        _init_backbone(backbone, config.optim.init_from, config.backbone)
    head_kwargs = {
        k: v for k, v in asdict(config.head).items() if k not in ("name", "weight") and v is not None
    }
    head = build_head(config.head.name, config.backbone.embedding_dim, len(patient_index), **head_kwargs)
    model = IdentityModel(backbone, head).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": config.optim.lr},
            {"params": model.head.parameters(), "lr": config.optim.lr * config.optim.head_lr_scale},
        ],
        weight_decay=config.optim.weight_decay,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    supcon = SupConLoss(temperature=config.loss.supcon_temperature)

    sampler = PKSampler(
        train_labels,
        config.optim.patients_per_batch,
        config.optim.images_per_patient,
        groups=[s.dataset for s in train_samples] if config.data.balance_sets else None,
        seed=config.optim.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    steps_per_epoch = max(1, len(sampler))
    total_steps = steps_per_epoch * config.optim.epochs
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)

    start_epoch, best_auc, best_state, history = 0, -1.0, None, []
    state_file = out_dir / "last.pt"
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_auc = state["epoch"] + 1, state["best_auc"]
        best_state = state["best_backbone"]
        history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
        log.info("resuming at epoch %d (best val AUC %.4f)", start_epoch, best_auc)
    elif ctx.is_main:
        (out_dir / "metrics.jsonl").write_text("")

    ddp_model: torch.nn.Module = model
    if ctx.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if device.type == "cuda" else None
        )
    use_amp = config.optim.amp and device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(config.optim.seed * 1000 + ctx.rank)
    started = time.monotonic()
    train_tensor = torch.from_numpy(train_images)

    from tqdm.auto import tqdm

    for epoch in range(start_epoch, config.optim.epochs):
        sampler.set_epoch(epoch)
        model.train()
        epoch_loss, seen, epoch_start = 0.0, 0, time.monotonic()
        bar = tqdm(
            sampler,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.optim.epochs}",
            disable=not (progress and ctx.is_main),
            leave=False,
        )
        for step_in_epoch, batch_indices in enumerate(bar):
            step = epoch * steps_per_epoch + step_in_epoch
            time_fraction = _time_fraction(config.optim.max_minutes, started, ctx)
            if time_fraction >= 1.0:
                break  # the schedule has annealed to zero: validate this epoch and stop
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * _lr_factor(step, total_steps, warmup_steps, time_fraction)
            index = torch.as_tensor(batch_indices)
            clean = train_tensor[index].to(device).float().div_(255).unsqueeze(1)
            views = torch.cat(
                [augment(clean, config.augment, generator), augment(clean, config.augment, generator)]
            )
            labels = torch.from_numpy(train_labels[batch_indices]).to(device).repeat(2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                embeddings, logits = ddp_model(to_tensor(views), labels)
            loss = config.head.weight * F.cross_entropy(logits.float(), labels)
            if config.loss.supcon_weight > 0:
                loss = loss + config.loss.supcon_weight * supcon(
                    F.normalize(embeddings.float(), dim=1), labels
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            epoch_loss += loss.item() * len(views)
            seen += len(views)
            rate = seen / max(1e-6, time.monotonic() - epoch_start)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
        bar.close()

        if ctx.is_main:
            metrics, _, _ = validate(
                model.backbone, val_images, val_labels, device, config.optim.eval_max_impostor_pairs
            )
            record = {
                "epoch": epoch + 1,
                "loss": epoch_loss / max(1, seen),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / max(1e-6, time.monotonic() - epoch_start),
                "elapsed_s": time.monotonic() - started,
                "val_auc": metrics["auc"],
                "val_eer": metrics["eer"],
                "val_precision_at_1": metrics["precision_at_1"],
            }
            history.append(record)
            with (out_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(
                "epoch %d: loss %.4f, val AUC %.4f, EER %.4f, P@1 %.4f",
                epoch + 1,
                record["loss"],
                metrics["auc"],
                metrics["eer"],
                metrics["precision_at_1"],
            )
            if metrics["auc"] > best_auc:
                best_auc = metrics["auc"]
                best_state = copy.deepcopy(model.backbone.state_dict())
            _save_training_state(state_file, model, optimizer, epoch, best_auc, best_state)
        if _out_of_time(config.optim.max_minutes, started, ctx, device):
            log.info("time budget of %.1f min reached after epoch %d", config.optim.max_minutes, epoch + 1)
            break

    final = out_dir / "model.pt"
    if ctx.is_main:
        assert best_state is not None
        model.backbone.load_state_dict(best_state)
        metrics, genuine, impostor = validate(
            model.backbone, val_images, val_labels, device, config.optim.eval_max_impostor_pairs
        )
        calibration = Calibration.fit(genuine, impostor)
        summary = summarise(samples)
        summary.update(
            {
                "split": {
                    "val_fraction": config.data.val_fraction,
                    "test_fraction": config.data.test_fraction,
                    "seed": config.data.split_seed,
                    "holdout_sets": config.data.holdout_sets,
                },
                "train_images": len(train_samples),
                "train_patients": len(patient_index),
                "val_images": len(val_samples),
                "val_patients": len(val_ids),
                "epochs_run": len(history),
                "config": config.to_dict(),
                "train_minutes": (time.monotonic() - started) / 60,
            }
        )
        model_id = save_checkpoint(
            final,
            name=config.name,
            backbone_config=config.backbone.to_dict(),
            preprocess_config=config.preprocess.to_dict(),
            state_dict=model.backbone.state_dict(),
            calibration=calibration.to_dict(),
            training_summary=summary,
            metrics={"val": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}},
        )
        log.info("saved %s as %s (best val AUC %.4f)", final, model_id, best_auc)
    if ctx.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _init_backbone(backbone: torch.nn.Module, path: str, expected: BackboneConfig) -> None:
    """Start from a pre-trained checkpoint's backbone; the margin head always starts fresh
    (its classes are this run's patients)."""
    payload = load_checkpoint(path)
    if payload["backbone"] != expected.to_dict():
        differing = sorted(k for k, v in expected.to_dict().items() if payload["backbone"].get(k) != v)
        raise ValueError(
            f"optim.init_from={path} has another architecture (differs in: {', '.join(differing)})"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    backbone.load_state_dict(state)
    log.info("backbone initialised from %s (%s)", path, payload["model_id"])


def _time_fraction(max_minutes: float, started: float, ctx: DistributedContext) -> float:
    """Share of the time budget spent; 0 without a budget, and under DDP (ranks' clocks differ,
    and their learning rates must not), where the budget only stops training between epochs."""
    if not max_minutes or ctx.world_size > 1:
        return 0.0
    return (time.monotonic() - started) / (max_minutes * 60)


def _out_of_time(max_minutes: float, started: float, ctx: DistributedContext, device: torch.device) -> bool:
    """Rank 0 decides and every rank follows, so no rank waits forever in an all-reduce."""
    stop = torch.tensor([bool(max_minutes) and time.monotonic() - started > max_minutes * 60], device=device)
    if ctx.world_size > 1:
        dist.broadcast(stop, src=0)
    return bool(stop.item())


def _load_samples(config: TrainConfig) -> list[Sample]:
    if not config.data.manifests:
        raise ValueError("no training data: set data.manifests in the config or pass --manifest")
    samples = read_manifests(config.data.manifests)
    held_out = [s for s in samples if s.dataset in config.data.holdout_sets]
    rest = [s for s in samples if s.dataset not in config.data.holdout_sets]
    assign_splits(
        rest,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
    )
    for sample in held_out:
        sample.split = "test"
    return rest + held_out


def _save_training_state(
    path: Path,
    model: IdentityModel,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    best_auc: float,
    best_state: dict | None,
) -> None:
    """Atomic write of everything --resume needs."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "best_auc": best_auc,
            "best_backbone": best_state,
        },
        tmp,
    )
    os.replace(tmp, path)

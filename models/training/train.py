"""``cxr-reid train``: a config per experiment, CPU or CUDA, DDP through torchrun.

Phases, each a function: :func:`setup` (data, model, optimiser, schedule, resume),
:func:`train_epoch`, :func:`validate_epoch` (metrics line, best weights, ``last.pt``) and
:func:`finalise` (calibrated checkpoint). The learning rate is a function of the step; a time
budget (``optim.max_minutes``) only stops a run early and the checkpoint records that it did.

The objective combines a margin head (ArcFace by default) over patient classes with a
supervised-contrastive loss over two augmented views of every image in a P x K batch. The
contrastive term lets one-image patients count (their two views are positives), which matters on
small sets where most patients have a single image.

Layout of a run directory::

    config.toml      the resolved config (base chain + file + overrides; models/training/config.py)
    splits.csv       every image with its split (patient-disjoint)
    metrics.jsonl    one line per epoch
    last.pt          training state for --resume (weights, head, optimiser, epoch)
    model.pt         the best epoch as a cxr-reid checkpoint, calibrated on validation pairs

Why one module of this size: the four phases share one run's state; each is a function.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss

from models.data import (
    PKSampler,
    Sample,
    assign_splits,
    augment,
    load_images,
    merge_duplicate_identities,
    read_manifests,
    summarise,
    write_manifest,
)
from models.evaluation.metrics import pair_scores, retrieval_metrics, verification_metrics
from models.imaging.preprocess import to_tensor
from models.net.backbones import BackboneConfig, build_backbone
from models.net.checkpoint import load_checkpoint, save_checkpoint
from models.net.embedder import embed_views
from models.net.heads import build_head
from models.net.runtime import bf16_autocast
from models.scoring.calibration import DEFAULT_FAR, FAR_KEYS, Calibration
from models.training.config import TrainConfig, load_config, to_toml

__all__ = ["TrainConfig", "load_config", "train"]

log = logging.getLogger(__name__)

#: What to do when a config's data is not there (a clean clone has none: the sets are not shipped).
GET_DATA = (
    "Build a manifest from a public set you downloaded, or from a folder of DICOM files, with "
    "`cxr-reid data SOURCE ROOT --out sets/NAME/manifest.csv` (SOURCE: chestxray14, chexpert, "
    "mimic-cxr-jpg, padchest or dicom; docs/train-your-own-data.md), then pass it: "
    "`cxr-reid train --config CONFIG --manifest sets/NAME/manifest.csv` (repeat --manifest for "
    "several sets; it replaces the config's data.manifests and keeps its other settings)"
)


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
        # The margin head stays in fp32 under bf16 autocast: its cosines near the margin need the
        # precision (bf16 has 8 bits of mantissa), and it is a small share of the step's work.
        with torch.autocast(images.device.type, enabled=False):
            logits = self.head(embeddings.float(), labels)
        return embeddings, logits


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``total_steps``: a function of the step only, so
    a run follows the same schedule on a fast and a slow machine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
@torch.no_grad()
def embed_images(
    backbone: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 128,
    views: int = 0,
) -> np.ndarray:
    """Embed prepared uint8 images (N, H, W) with a backbone in eval mode; unit vectors averaged
    over ``views`` test-time views besides the plain one (``preprocess.tta``)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.as_tensor(images[start : start + batch_size]).to(device).float() / 255
        out.append(embed_views(backbone, to_tensor(batch), views).cpu().numpy())
    backbone.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def validate(
    backbone: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    max_impostor_pairs: int,
    views: int = 0,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Verification AUC and retrieval on held-out patients; returns metrics and pair scores.
    Epochs are compared on the plain view; the final calibration passes the served ``views``."""
    embeddings = embed_images(backbone, images, device, views=views)
    genuine, impostor, *_ = pair_scores(embeddings, labels, max_impostor_pairs=max_impostor_pairs)
    metrics = verification_metrics(genuine, impostor)
    metrics.update(retrieval_metrics(embeddings, labels))
    return metrics, genuine, impostor


@dataclass
class TrainingData:
    """The split samples and their prepared pixels (uint8, decoded once)."""

    samples: list[Sample]
    train_samples: list[Sample]
    val_samples: list[Sample]
    train_images: np.ndarray
    val_images: np.ndarray
    train_labels: np.ndarray  # class index of each training image
    val_labels: np.ndarray
    num_classes: int
    merged_patients: dict[str, str] = field(default_factory=dict)  # label cleaning: old id -> merged id


@dataclass
class Run:
    """Everything one training run holds between its phases."""

    config: TrainConfig
    ctx: DistributedContext
    device: torch.device
    out_dir: Path
    data: TrainingData
    model: IdentityModel
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    supcon: SupConLoss
    sampler: PKSampler
    steps_per_epoch: int
    epochs: int  # planned; ``optim.fit_minutes`` may change it after the first epochs
    total_steps: int
    warmup_steps: int
    generator: torch.Generator
    train_tensor: torch.Tensor
    start_epoch: int = 0
    best_auc: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    earlier_s: float = 0.0  # training time of the sessions before a --resume
    stopped_by_budget: bool = False
    epoch_ends: list[float] = field(default_factory=list)  # monotonic time at the end of each epoch run

    @property
    def state_file(self) -> Path:
        return self.out_dir / "last.pt"

    def out_of_time(self) -> bool:
        budget = self.config.optim.max_minutes
        return bool(budget) and time.monotonic() - self.started > budget * 60


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train, validate every epoch, keep the best; returns the path of the final checkpoint."""
    run = setup(config, resume=resume, progress=progress)
    epoch = run.start_epoch
    while epoch < run.epochs:
        stats = train_epoch(run, epoch, progress=progress)
        if run.ctx.is_main:
            validate_epoch(run, epoch, stats)
        _fit_schedule(run, epoch)
        if _agree(run.stopped_by_budget or run.out_of_time(), run):
            run.stopped_by_budget = True
            log.warning(
                "time budget of %.1f min reached after epoch %d of %d: stopping early; the run is "
                "recorded as cut short (its schedule had not finished)",
                config.optim.max_minutes,
                epoch + 1,
                run.epochs,
            )
            break
        epoch += 1
    return finalise(run)


#: epochs timed before ``optim.fit_minutes`` stops re-sizing the schedule (the first one includes
#: warm-up costs such as cuDNN's algorithm search, so later ones set the pace)
FIT_EPOCHS = 3


def _fit_schedule(run: Run, epoch: int) -> None:
    """With ``optim.fit_minutes``, set the planned epochs to what fits the budget at the pace measured
    so far. Only in the first epochs, while the learning rate is still near its peak, so the cosine
    decay that follows is a whole one. Not on --resume (the saved plan stands), and in a single
    process only (DDP ranks would have to agree)."""
    run.epoch_ends.append(time.monotonic())
    budget = run.config.optim.fit_minutes * 60
    done = len(run.epoch_ends)
    if budget <= 0 or run.ctx.world_size > 1 or run.start_epoch > 0 or not 2 <= done <= FIT_EPOCHS:
        return
    now = run.epoch_ends[-1]
    pace = (now - run.epoch_ends[0]) / (done - 1)  # the first epoch's warm-up costs left out
    fitted = epoch + 1 + int(max(0.0, budget - (now - run.started)) / max(pace, 1e-6))
    if fitted != run.epochs:
        log.info(
            "schedule fitted to %.1f min at %.1f s per epoch: %d epochs (was %d)",
            run.config.optim.fit_minutes,
            pace,
            fitted,
            run.epochs,
        )
        run.epochs = fitted
        run.total_steps = run.steps_per_epoch * fitted


def setup(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> Run:
    """Seeds, data, model, optimiser, sampler and schedule; the state of ``last.pt`` when resuming."""
    ctx, device = _init_distributed(config.optim.device)
    if config.optim.threads:
        torch.set_num_threads(config.optim.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    torch.manual_seed(config.optim.seed + ctx.rank)
    np.random.seed(config.optim.seed)
    check_training_data(config)
    out_dir = Path(config.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(to_toml(config.to_dict()))

    data = load_training_data(config, progress=progress and ctx.is_main)
    if ctx.is_main:
        write_manifest(data.samples, out_dir / "splits.csv")
        log.info("data: %s", json.dumps(summarise(data.samples)))

    backbone = build_backbone(config.backbone)
    if config.optim.init_from and not (resume and (out_dir / "last.pt").is_file()):
        _init_backbone(backbone, config.optim.init_from, config.backbone)
    head = build_head(
        config.head.name, config.backbone.embedding_dim, data.num_classes, **config.head.build_kwargs()
    )
    model = IdentityModel(backbone, head).to(device)
    if config.optim.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": config.optim.lr},
            {"params": model.head.parameters(), "lr": config.optim.lr * config.optim.head_lr_scale},
        ],
        weight_decay=config.optim.weight_decay,
    )
    sampler = PKSampler(
        data.train_labels,
        config.optim.patients_per_batch,
        config.optim.images_per_patient,
        groups=[s.dataset for s in data.train_samples] if config.data.balance_sets else None,
        seed=config.optim.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        batches_per_epoch=config.optim.steps_per_epoch,
    )
    steps_per_epoch = max(1, len(sampler))
    ddp_model: torch.nn.Module = model
    if ctx.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if device.type == "cuda" else None
        )
    # On a GPU the whole uint8 training set lives in device memory: no per-step host copies.
    train_tensor = torch.from_numpy(data.train_images)
    if device.type == "cuda":
        train_tensor = train_tensor.to(device)
    run = Run(
        config=config,
        ctx=ctx,
        device=device,
        out_dir=out_dir,
        data=data,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        base_lrs=[group["lr"] for group in optimizer.param_groups],
        supcon=SupConLoss(temperature=config.loss.supcon_temperature),
        sampler=sampler,
        steps_per_epoch=steps_per_epoch,
        epochs=config.optim.epochs,
        total_steps=steps_per_epoch * config.optim.epochs,
        warmup_steps=int(config.optim.warmup_epochs * steps_per_epoch),
        generator=torch.Generator(device=device).manual_seed(config.optim.seed * 1000 + ctx.rank),
        train_tensor=train_tensor,
    )
    if resume and run.state_file.is_file():
        _restore(run)
    elif ctx.is_main:
        (out_dir / "metrics.jsonl").write_text("")
    log.info(
        "schedule: %d epochs x %d steps of %d patients x %d images (warm-up %d steps)",
        config.optim.epochs,
        steps_per_epoch,
        config.optim.patients_per_batch,
        config.optim.images_per_patient,
        run.warmup_steps,
    )
    return run


def load_training_data(config: TrainConfig, *, progress: bool = True) -> TrainingData:
    """Read, decode (once, cached), clean, split and label the training and validation images."""
    samples = _read_samples(config)
    cache = config.data.cache_dir or None
    images = load_images(samples, config.preprocess, cache_dir=cache, progress=progress)
    merged = merge_duplicate_identities(samples, images) if config.data.merge_duplicates else {}
    if merged:
        log.info("label cleaning: %d patient id(s) merged into another id with the same picture", len(merged))
        for sample in samples:
            sample.patient_id = merged.get(sample.patient_id, sample.patient_id)
    _assign_splits(samples, config)
    train_index = [i for i, s in enumerate(samples) if s.split == "train"]
    val_index = [i for i, s in enumerate(samples) if s.split == "val"]
    if not train_index or not val_index:
        raise ValueError("the split left no training or no validation images: check data fractions")
    train_samples = [samples[i] for i in train_index]
    val_samples = [samples[i] for i in val_index]
    train_ids = {p: i for i, p in enumerate(sorted({s.patient_id for s in train_samples}))}
    val_ids = {p: i for i, p in enumerate(sorted({s.patient_id for s in val_samples}))}
    return TrainingData(
        samples=samples,
        train_samples=train_samples,
        val_samples=val_samples,
        train_images=images[train_index],
        val_images=images[val_index],
        train_labels=np.array([train_ids[s.patient_id] for s in train_samples]),
        val_labels=np.array([val_ids[s.patient_id] for s in val_samples]),
        num_classes=len(train_ids),
        merged_patients=merged,
    )


def train_epoch(run: Run, epoch: int, *, progress: bool = True) -> dict[str, float]:
    """One pass of the sampler: margin + supervised-contrastive loss over two augmented views.

    A single process checks the time budget every step and stops mid-epoch when it is spent; under
    DDP the ranks' clocks differ, so the budget is checked between epochs only (see :func:`train`).
    """
    from tqdm.auto import tqdm

    config, device = run.config, run.device
    run.sampler.set_epoch(epoch)
    run.model.train()
    use_amp = bf16_autocast(device, "auto" if config.optim.amp else "off")
    epoch_loss, seen, epoch_start = 0.0, 0, time.monotonic()
    bar = tqdm(
        run.sampler,
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{run.epochs}",
        disable=not (progress and run.ctx.is_main),
        leave=False,
    )
    for step_in_epoch, batch_indices in enumerate(bar):
        if run.ctx.world_size == 1 and run.out_of_time():
            run.stopped_by_budget = True
            break
        step = epoch * run.steps_per_epoch + step_in_epoch
        factor = _lr_factor(step, run.total_steps, run.warmup_steps)
        for group, base in zip(run.optimizer.param_groups, run.base_lrs, strict=True):
            group["lr"] = base * factor
        index = torch.as_tensor(batch_indices, device=run.train_tensor.device)
        clean = run.train_tensor[index].to(device).float().div_(255).unsqueeze(1)
        labels = torch.from_numpy(run.data.train_labels[batch_indices]).to(device)
        loss = training_step(
            run.ddp_model, run.optimizer, run.supcon, clean, labels, config, run.generator, use_amp=use_amp
        )
        views, step_loss = 2 * len(batch_indices), loss.item()  # one device sync per step
        epoch_loss += step_loss * views
        seen += views
        rate = seen / max(1e-6, time.monotonic() - epoch_start)
        bar.set_postfix(loss=f"{step_loss:.3f}", img_s=f"{rate:.0f}")
    bar.close()
    return {
        "loss": epoch_loss / max(1, seen),
        "images_per_s": seen / max(1e-6, time.monotonic() - epoch_start),
        "steps": step_in_epoch + 1 if seen else 0,
    }


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    supcon: SupConLoss,
    clean: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    *,
    use_amp: bool,
) -> torch.Tensor:
    """One optimiser step on a batch of prepared images (N, 1, H, W) in [0, 1]: two augmented views
    of each, margin loss plus supervised-contrastive loss, clipped gradients. Returns the loss (a
    tensor, so the caller chooses when to synchronise). ``bench/gpu.py`` times this same step."""
    views = torch.cat([augment(clean, config.augment, generator), augment(clean, config.augment, generator)])
    labels = labels.repeat(2)
    memory_format = torch.channels_last if config.optim.channels_last else torch.contiguous_format
    inputs = to_tensor(views).contiguous(memory_format=memory_format)
    with torch.autocast(clean.device.type, dtype=torch.bfloat16, enabled=use_amp):
        embeddings, logits = model(inputs, labels)
    loss = config.head.weight * F.cross_entropy(logits.float(), labels)
    if config.loss.supcon_weight > 0:
        unit = F.normalize(embeddings.float(), dim=1)
        loss = loss + config.loss.supcon_weight * supcon(unit, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 5.0)
    optimizer.step()
    return loss.detach()


def validate_epoch(run: Run, epoch: int, stats: dict[str, float]) -> None:
    """Validation AUC of the epoch, its line in metrics.jsonl, the best weights so far, ``last.pt``."""
    config = run.config
    metrics, _, _ = validate(
        run.model.backbone,
        run.data.val_images,
        run.data.val_labels,
        run.device,
        config.optim.eval_max_impostor_pairs,
    )
    record = {
        "epoch": epoch + 1,
        "steps": stats["steps"],
        "loss": stats["loss"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": stats["images_per_s"],
        "elapsed_s": run.earlier_s + time.monotonic() - run.started,
        "val_auc": metrics["auc"],
        "val_eer": metrics["eer"],
        "val_precision_at_1": metrics["precision_at_1"],
    }
    if run.stopped_by_budget:
        record["stopped_by_budget"] = True
    run.history.append(record)
    with (run.out_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    log.info(
        "epoch %d: loss %.4f, val AUC %.4f, EER %.4f, P@1 %.4f",
        epoch + 1,
        record["loss"],
        metrics["auc"],
        metrics["eer"],
        metrics["precision_at_1"],
    )
    if metrics["auc"] > run.best_auc:
        run.best_auc = metrics["auc"]
        run.best_state = copy.deepcopy(run.model.backbone.state_dict())
    _save_training_state(run, epoch)


def calibrate_on_validation(
    genuine: np.ndarray, impostor: np.ndarray, labels: np.ndarray, final: Path
) -> Calibration:
    """The checkpoint's calibration, by the rule ``cxr-reid calibrate`` refuses by
    (:func:`models.training.site.calibration_problems`): every FAR the validation pairs resolve, and
    no threshold for one they do not (a request at it is refused, as at a site calibration). When
    they resolve none, a checkpoint still needs thresholds to load: they are fitted as before but
    marked ``provisional`` in the calibration with the reason, and a warning names the command that
    calibrates the model on enough labelled images."""
    from models.training.site import MIN_FALSE_ACCEPTS, calibration_problems, pair_counts, resolvable_fars

    counts = pair_counts(labels)
    problems = calibration_problems(counts, FAR_KEYS)
    if not problems:
        return Calibration.fit(genuine, impostor)
    fars = resolvable_fars(counts, FAR_KEYS)
    reason = (
        f"the validation split ({counts.images} images of {counts.patients} patients, "
        f"{counts.impostor:,} different-patient pairs) cannot calibrate "
        f"{', '.join(f for f in FAR_KEYS if f not in fars)}: " + "; ".join(problems)
    )
    fix = (
        f"calibrate it on labelled images: `cxr-reid calibrate --model {final} --manifest SITE.csv "
        "--out SITE.pt`, or train with more validation patients (data.val_fraction)"
    )
    if not fars:
        log.warning("%s; the thresholds in %s are provisional: %s", reason, final.name, fix)
        return Calibration.fit(genuine, impostor, provenance={"provisional": reason})
    log.warning("%s; calibrated %s only: %s", reason, ", ".join(fars), fix)
    return Calibration.fit(
        genuine,
        impostor,
        fars=tuple(fars),
        default_far=DEFAULT_FAR if DEFAULT_FAR in fars else fars[-1],
        min_far=MIN_FALSE_ACCEPTS / impostor.size,
        provenance={"uncalibrated_fars": [f for f in FAR_KEYS if f not in fars], "reason": reason},
    )


def finalise(run: Run) -> Path:
    """Best epoch's weights, calibrated on the validation pairs, saved as a cxr-reid checkpoint."""
    config, ctx = run.config, run.ctx
    final = run.out_dir / "model.pt"
    if ctx.is_main:
        if run.best_state is None:
            raise RuntimeError("no epoch was validated: nothing to save (is the time budget too small?)")
        run.model.backbone.load_state_dict(run.best_state)
        metrics, genuine, impostor = validate(
            run.model.backbone,
            run.data.val_images,
            run.data.val_labels,
            run.device,
            config.optim.eval_max_impostor_pairs,
            views=config.preprocess.tta,  # calibrate the embeddings the checkpoint will serve
        )
        calibration = calibrate_on_validation(genuine, impostor, run.data.val_labels, final)
        summary = summarise(run.data.samples)
        summary.update(
            {
                "split": {
                    "val_fraction": config.data.val_fraction,
                    "test_fraction": config.data.test_fraction,
                    "seed": config.data.split_seed,
                    "holdout_sets": config.data.held_out(),
                },
                "merged_patients": run.data.merged_patients,
                "train_images": len(run.data.train_samples),
                "train_patients": run.data.num_classes,
                "val_images": len(run.data.val_samples),
                "val_patients": int(len(np.unique(run.data.val_labels))),
                "epochs_run": len(run.history),
                "epochs_planned": run.epochs,
                "fitted_to_minutes": config.optim.fit_minutes or None,
                "steps_per_epoch": run.steps_per_epoch,
                "stopped_by_budget": run.stopped_by_budget,
                "config": config.portable_dict(),
                "train_minutes": (run.earlier_s + time.monotonic() - run.started) / 60,
                "bf16": bf16_autocast(run.device, "auto" if config.optim.amp else "off"),
            }
        )
        model_id = save_checkpoint(
            final,
            name=config.name,
            backbone_config=config.backbone.to_dict(),
            preprocess_config=config.preprocess.to_dict(),
            state_dict=run.model.backbone.state_dict(),
            calibration=calibration.to_dict(),
            training_summary=summary,
            metrics={"val": {k: v for k, v in metrics.items() if isinstance(v, int | float)}},
        )
        log.info("saved %s as %s (best val AUC %.4f)", final, model_id, run.best_auc)
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


def _agree(flag: bool, run: Run) -> bool:
    """Rank 0 decides and every rank follows, so no rank waits forever in an all-reduce."""
    if run.ctx.world_size == 1:
        return flag
    decision = torch.tensor([flag], device=run.device)
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def check_training_data(config: TrainConfig) -> None:
    """Fail before anything is written when the config names no data or data that is not here,
    saying how to get some (a clean clone has none)."""
    if not config.data.manifests:
        raise ValueError(f"no training data: set data.manifests in the config or pass --manifest. {GET_DATA}")
    missing = [m for m in config.data.manifests if not os.path.exists(m)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"training data not found: {missing[0]}{more}. {GET_DATA}")


def _read_samples(config: TrainConfig) -> list[Sample]:
    check_training_data(config)
    samples = read_manifests(config.data.manifests)
    known = {s.dataset for s in samples}
    unknown = sorted(set(config.data.holdout_sets) - known - set(config.data.sites))
    if unknown:
        raise ValueError(f"data.holdout_sets names {unknown}, which are not among the training sets")
    if not known - set(config.data.held_out()):
        raise ValueError(f"data.holdout_sets {config.data.holdout_sets} leaves no set to train on")
    return samples


def _assign_splits(samples: list[Sample], config: TrainConfig) -> None:
    """Patient-disjoint hash split of the trained sets; every image of a held-out set is "test"."""
    held_out = set(config.data.held_out())
    assign_splits(
        [s for s in samples if s.dataset not in held_out],
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.data.split_seed,
    )
    for sample in samples:
        if sample.dataset in held_out:
            sample.split = "test"


def _save_training_state(run: Run, epoch: int) -> None:
    """Atomic write of everything --resume needs."""
    tmp = run.state_file.with_suffix(".tmp")
    torch.save(
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "epoch": epoch,
            "best_auc": run.best_auc,
            "best_backbone": run.best_state,
            "epochs": run.epochs,
        },
        tmp,
    )
    os.replace(tmp, run.state_file)


def _restore(run: Run) -> None:
    """Continue from ``last.pt``: weights, optimiser, best epoch so far and the metrics history."""
    state = torch.load(run.state_file, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.start_epoch, run.best_auc = state["epoch"] + 1, state["best_auc"]
    run.best_state = state["best_backbone"]
    if run.config.optim.fit_minutes:  # a fitted plan stands; otherwise the config's epochs (may be raised)
        run.epochs = int(state.get("epochs", run.epochs))
        run.total_steps = run.steps_per_epoch * run.epochs
    lines = (run.out_dir / "metrics.jsonl").read_text().splitlines()
    run.history = [json.loads(line) for line in lines if line]
    if run.history:  # elapsed_s and train_minutes count earlier sessions; max_minutes only this one
        run.earlier_s = run.history[-1].get("elapsed_s", 0.0)
    log.info("resuming at epoch %d (best val AUC %.4f)", run.start_epoch + 1, run.best_auc)

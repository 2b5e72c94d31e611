"""``cxr-reid adapt``: the network learns a hospital from the hospital's own labelled images.

Every image in a PACS carries a PatientID, so a site has what training needs. Calibration moves
thresholds; adaptation moves the embedding itself (MODEL_CARD.md: fine-tuning on 122 images of an
unseen adult hospital raised AUC on its other patients from 0.85 to 0.92).

How it works, and why:

- **Proof.** The site's patients are split by a hash of their ids: about ``holdout_fraction`` of
  them (of the patients with several images and of those with one, alike) are held back and never
  trained on. They are looked at once, at the end: the base and the adapted network are measured on
  them, with patient-bootstrap intervals, and a paired bootstrap of the AUC difference decides. No
  epoch is chosen on them, so the figures after adaptation are not flattered by the choice.
- **Forgetting.** The sets the base was trained on are not at the site, so the adapted network must
  not drift far from the base: a low learning rate, a short cosine schedule, and a decoupled pull of
  every weight towards its starting value (L2-SP, Li et al. 2018, in AdamW's decoupled form: after
  each step ``w -= lr * pull * (w - w0)``). The margin head starts from the base's own embedding
  of each patient (the normalised mean of the patient's images), so the first steps refine the
  embedding instead of chasing random class centres.
- **Calibration.** The adapted network's thresholds, probability map and AS-norm cohort are fitted
  on the held-back patients only: on the training patients the adapted network separates pairs
  better than it will on new patients, and thresholds fitted there would promise a FAR they do not
  deliver. AS-norm is kept where it raises the held-back AUC.
- **Bounded and resumable.** The schedule scales with the data (:func:`default_steps`); a time
  budget is a hard stop, and where the pace measured in the first steps shows the schedule will not
  fit, the schedule is shortened so its cosine still ends. State is saved atomically to a work
  folder every few steps; the same command continues after an interruption (kill -9 included).
  Refused or unsuccessful runs write nothing and leave no work folder.

The checkpoint written carries the adapted weights, the site calibration, and provenance: the
base model, the site data (a hash of its listing, images, patients), the split, the steps and the
held-back figures before and after with their intervals.

Why one module of this size: it is one procedure; each step above is a function, kept together so
that the proof is read beside the training it guards.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.data import PKSampler, Sample, load_images
from models.evaluation.metrics import evaluate_embeddings, pair_scores
from models.net.checkpoint import load_checkpoint, save_checkpoint
from models.net.runtime import bf16_autocast
from models.scoring.calibration import DEFAULT_FAR, FAR_KEYS
from models.training.site import (
    MIN_FALSE_ACCEPTS,
    MIN_GENUINE_PAIRS,
    MIN_PATIENTS,
    fit_site_calibration,
    pair_counts,
)

log = logging.getLogger(__name__)

#: patients with several images the training part needs: fewer give too few genuine pairs to learn from
MIN_TRAIN_PATIENTS = 10
STATE_FILE = "state.pt"
#: settings that say how a run is executed, not what it learns: a resumed run may change them
RUN_ONLY_SETTINGS = ("minutes", "save_every_s", "device")


class AdaptRefusedError(ValueError):
    """The site's data cannot support an adaptation (too few patients or pairs); says what is missing."""


@dataclass
class AdaptSettings:
    """How an adaptation runs. The defaults suit a 2-core CPU and 500 to 50,000 site images."""

    steps: int = 0  # 0: scale with the data (default_steps)
    minutes: float = 60.0  # hard stop; the schedule is shortened to fit it when the pace says so
    lr: float = 3e-4  # backbone; the head moves head_lr_scale times faster
    head_lr_scale: float = 10.0
    pull: float = 2.0  # L2-SP strength: each step moves weights lr * pull of the way back to the base
    patients_per_batch: int = 16
    images_per_patient: int = 2
    holdout_fraction: float = 0.3
    warmup_fraction: float = 0.05
    fars: tuple[str, ...] = FAR_KEYS
    default_far: str = DEFAULT_FAR
    bootstrap: int = 200
    seed: int = 0
    save_every_s: float = 30.0  # state written at most this often (and at the end)
    device: str = "cpu"
    amp: str = "auto"  # bf16 autocast: auto (where the processor has it), on, off


@dataclass
class SiteData:
    """The site's labelled images and how to name them in the provenance."""

    samples: list[Sample]
    description: str  # e.g. "manifest site.csv", "DICOM folder /pacs/export", "gallery ./cxr-reid-data"

    def listing_sha256(self) -> str:
        """A hash of what the data is (patient id, file name, size per image), not where it lies."""
        digest = hashlib.sha256()
        for sample in sorted(self.samples, key=lambda s: (s.patient_id, s.path)):
            path = Path(sample.path)
            size = path.stat().st_size if path.is_file() else -1
            digest.update(f"{sample.patient_id}\t{path.name}\t{size}\n".encode())
        return digest.hexdigest()


@dataclass
class AdaptResult:
    """What an adaptation found; ``written`` is False when it did not help (nothing was written)."""

    improved: bool
    written: bool
    out: str | None
    model_id: str | None
    base_model_id: str
    before: dict[str, Any]
    after: dict[str, Any]
    delta_auc: float
    delta_auc_ci: list[float]
    resolvable_fars: list[str]
    steps_run: int
    steps_planned: int
    stopped_by_budget: bool
    minutes: float
    split: dict[str, int]
    calibration: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the split and the rules of refusal ---------------------------------------------------------


def _rank(patient: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def split_patients(samples: Sequence[Sample], fraction: float, seed: int) -> np.ndarray:
    """True for the images of held-back patients: ``fraction`` of the patients with several images
    and of those with one, chosen by a hash of the id (stable when images are added)."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.patient_id] = counts.get(sample.patient_id, 0) + 1
    held: set[str] = set()
    for several in (True, False):
        group = sorted((p for p, c in counts.items() if (c >= 2) == several), key=lambda p: _rank(p, seed))
        held.update(group[: round(len(group) * fraction)])
    return np.array([s.patient_id in held for s in samples])


def check_site(samples: Sequence[Sample], held: np.ndarray, fraction: float) -> None:
    """Raise :class:`AdaptRefusedError` when the held-back part cannot prove a change at FAR 1e-2 or
    the training part has too few patients to learn from; say how many more images would do."""
    ids = [s.patient_id for s in samples]
    proof = pair_counts([p for p, h in zip(ids, held, strict=True) if h])
    train_ids = [p for p, h in zip(ids, held, strict=True) if not h]
    train_multi = sum(1 for c in np.unique(train_ids, return_counts=True)[1] if c >= 2) if train_ids else 0
    total = pair_counts(ids)
    problems = []
    share = f"the {fraction:.0%} of patients held back to prove the change"
    if proof.patients < MIN_PATIENTS:
        more = math.ceil((MIN_PATIENTS - proof.patients) / fraction)
        problems.append(
            f"{share} are {proof.patients}, at least {MIN_PATIENTS} are needed (about {more} more patients)"
        )
    if proof.genuine < MIN_GENUINE_PAIRS:
        more = math.ceil((MIN_GENUINE_PAIRS - proof.genuine) / fraction)
        problems.append(
            f"{share} have {proof.genuine} same-patient pairs, at least {MIN_GENUINE_PAIRS} are "
            f"needed (about {more} more images of patients with several images)"
        )
    needed_impostors = math.ceil(MIN_FALSE_ACCEPTS / 1e-2)
    if proof.impostor < needed_impostors:
        problems.append(
            f"{share} give {proof.impostor:,} different-patient pairs, at least {needed_impostors:,} "
            "are needed to measure FAR 1e-2 (more patients)"
        )
    if train_multi < MIN_TRAIN_PATIENTS:
        problems.append(
            f"the training part has {train_multi} patients with several images, at least "
            f"{MIN_TRAIN_PATIENTS} are needed"
        )
    if problems:
        raise AdaptRefusedError(
            f"cannot adapt on {total.images} images of {total.patients} patients "
            f"({total.genuine} same-patient pairs): " + "; ".join(problems)
        )


def default_steps(train_images: int, batch_images: int) -> int:
    """About 12 passes over the site's training images, at least 150 steps and at most 4,000 (on a
    2-core CPU with bf16, about 0.8 s a step at 224 px: 2 minutes at the least, under an hour at most)."""
    return int(min(4000, max(150, math.ceil(12 * train_images / batch_images))))


def resolvable_fars(impostor_pairs: int, fars: Sequence[str]) -> list[str]:
    """The FARs whose threshold rests on at least MIN_FALSE_ACCEPTS false accepts with this many pairs."""
    return [f for f in fars if impostor_pairs >= math.ceil(MIN_FALSE_ACCEPTS / float(f))]


# --- the paired decision --------------------------------------------------------------------------


def _weighted_auc(genuine: np.ndarray, wg: np.ndarray, impostor: np.ndarray, wi: np.ndarray) -> float:
    order = np.argsort(impostor, kind="stable")
    imp, w = impostor[order], wi[order]
    cum = np.concatenate([[0.0], np.cumsum(w)])
    below = cum[np.searchsorted(imp, genuine, side="left")]
    ties = cum[np.searchsorted(imp, genuine, side="right")] - below
    total = float(wg.sum()) * float(w.sum())
    return float(np.sum(wg * (below + 0.5 * ties)) / total) if total > 0 else float("nan")


def paired_auc_delta(
    before: np.ndarray,
    after: np.ndarray,
    labels: Sequence[str],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    max_impostor_pairs: int = 300_000,
) -> tuple[float, list[float]]:
    """AUC(after) - AUC(before) on the same pairs, and its 95% patient-bootstrap interval (the same
    resampled patients for both networks, so what they share cancels out)."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    g0, i0, gp, ip = pair_scores(before, codes, max_impostor_pairs=max_impostor_pairs, rng_seed=seed)
    g1 = np.sum(after[gp[:, 0]] * after[gp[:, 1]], axis=1)
    i1 = np.sum(after[ip[:, 0]] * after[ip[:, 1]], axis=1)
    ones_g, ones_i = np.ones(g0.size), np.ones(i0.size)
    delta = _weighted_auc(g1, ones_g, i1, ones_i) - _weighted_auc(g0, ones_g, i0, ones_i)
    rng = np.random.default_rng(seed)
    n_patients = int(codes.max()) + 1
    draws = []
    for _ in range(bootstrap):
        c = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients).astype(float)
        wg = c[codes[gp[:, 0]]]
        wi = c[codes[ip[:, 0]]] * c[codes[ip[:, 1]]]
        if wg.sum() == 0 or wi.sum() == 0:
            continue
        draws.append(_weighted_auc(g1, wg, i1, wi) - _weighted_auc(g0, wg, i0, wi))
    ci = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))] if draws else [delta, delta]
    return float(delta), ci


def _figures(
    embeddings: np.ndarray, labels: Sequence[str], fars: Sequence[str], bootstrap: int
) -> dict[str, Any]:
    """The held-back figures a site reads: AUC, EER, TAR at the resolvable FARs, P@1, with CIs."""
    result = evaluate_embeddings(embeddings, list(labels), bootstrap=bootstrap)
    keys = ["auc", "eer", "precision_at_1", *[f"tar_at_far_{f}" for f in fars]]
    return {
        **{k: result.get(k) for k in keys},
        "ci": {k: result.get("ci", {}).get(k) for k in keys if k in result.get("ci", {})},
        "n_images": result.get("n_images"),
        "n_patients": result.get("n_patients"),
        "n_genuine_pairs": result.get("n_genuine_pairs"),
        "n_impostor_pairs": result.get("n_impostor_pairs"),
    }


# --- the run --------------------------------------------------------------------------------------


def adapt(
    site: SiteData,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    settings: AdaptSettings | None = None,
    work_dir: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = True,
) -> AdaptResult:
    """Fine-tune ``model`` (default: the shipped one) on ``site``, prove it on held-back patients,
    calibrate, and write the adapted checkpoint to ``out`` when it beats the base.

    Raises :class:`AdaptRefusedError` before any work when the data cannot support it. The work
    folder (default ``<out>.adapt``) holds the resumable state; it is removed when the run ends.
    """
    from models.net.embedder import DEFAULT_CHECKPOINT
    from models.training.train import IdentityModel, _lr_factor, embed_images, training_step

    settings = settings or AdaptSettings()
    out_path = Path(out)
    work = Path(work_dir) if work_dir is not None else out_path.with_name(out_path.name + ".adapt")
    samples = list(site.samples)
    held = split_patients(samples, settings.holdout_fraction, settings.seed)
    check_site(samples, held, settings.holdout_fraction)
    fars = tuple(dict.fromkeys(str(f) for f in settings.fars))

    base_path = Path(model) if model is not None else DEFAULT_CHECKPOINT
    base = load_checkpoint(base_path)
    config = _base_train_config(base)
    device = torch.device(settings.device)
    use_amp = bf16_autocast(device, settings.amp)

    listing = site.listing_sha256()
    recipe = {k: v for k, v in asdict(settings).items() if k not in RUN_ONLY_SETTINGS}
    key = hashlib.sha256(
        json.dumps([base["model_id"], listing, recipe], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    state = _read_state(work, key)
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(
        json.dumps({"key": key, "base": base["model_id"], "site": site.description})
    )

    images = load_images(samples, config.preprocess, cache_dir=work / "cache", progress=progress)
    train_idx, proof_idx = np.flatnonzero(~held), np.flatnonzero(held)
    proof_labels = [samples[i].patient_id for i in proof_idx]
    train_patients = sorted({samples[i].patient_id for i in train_idx})
    class_of = {p: i for i, p in enumerate(train_patients)}
    train_labels = np.array([class_of[samples[i].patient_id] for i in train_idx])

    backbone = _backbone_from(base)
    start = copy.deepcopy(backbone.state_dict())
    views = config.preprocess.tta
    before_vectors = embed_images(backbone, images[proof_idx], device, views=views)
    head = _head_from_means(config, backbone, images[train_idx], train_labels, len(train_patients), device)
    net = IdentityModel(backbone, head).to(device)
    if config.optim.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [
            {"params": net.backbone.parameters(), "lr": settings.lr},
            {"params": net.head.parameters(), "lr": settings.lr * settings.head_lr_scale},
        ],
        weight_decay=0.0,  # the pull towards the base replaces decay towards zero
    )
    base_lrs = [settings.lr, settings.lr * settings.head_lr_scale]
    batch_images = settings.patients_per_batch * settings.images_per_patient
    planned = settings.steps or default_steps(len(train_idx), batch_images)
    step, spent_s = 0, 0.0
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, planned, spent_s = int(state["step"]), int(state["planned"]), float(state["spent_s"])
        log.info("resuming the adaptation at step %d of %d (%s)", step, planned, work)
    start_params = {n: start[n].to(device) for n, _ in net.backbone.named_parameters()}

    from pytorch_metric_learning.losses import SupConLoss
    from tqdm.auto import tqdm

    supcon = SupConLoss(temperature=config.loss.supcon_temperature)
    sampler = PKSampler(
        train_labels,
        settings.patients_per_batch,
        settings.images_per_patient,
        seed=settings.seed,
        batches_per_epoch=max(1, planned),
    )
    generator = torch.Generator(device=device).manual_seed(settings.seed * 7919 + step)
    train_tensor = torch.from_numpy(images[train_idx])
    warmup = max(1, int(settings.warmup_fraction * planned))
    began = time.monotonic()
    budget_s = settings.minutes * 60 if settings.minutes > 0 else math.inf
    stopped_by_budget = False
    last_save = time.monotonic()
    net.train()
    bar = tqdm(total=planned, initial=step, desc="adapt", unit="step", disable=not progress)
    batches = _batches(sampler, step)
    fitted = state is not None
    while step < planned:
        elapsed = spent_s + time.monotonic() - began
        if elapsed >= budget_s:
            stopped_by_budget = True
            log.warning(
                "time budget of %.1f min reached at step %d of %d: stopping", settings.minutes, step, planned
            )
            break
        if not fitted and step >= 10:  # the pace is known: shorten the schedule if it cannot end in time
            fitted = True
            pace = elapsed / step
            fits = int((budget_s - elapsed) / pace * 0.95) + step
            if fits < planned:
                log.info(
                    "schedule shortened to %d steps to end within %.1f min (%.2f s a step)",
                    fits,
                    settings.minutes,
                    pace,
                )
                planned = max(step + 1, fits)
                bar.total = planned
        factor = _lr_factor(step, planned, warmup)
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * factor
        indices = next(batches)
        clean = train_tensor[torch.as_tensor(indices)].to(device).float().div_(255).unsqueeze(1)
        labels = torch.from_numpy(train_labels[indices]).to(device)
        loss = training_step(net, optimizer, supcon, clean, labels, config, generator, use_amp=use_amp)
        with torch.no_grad():  # L2-SP, decoupled: a step of lr * pull back towards the base
            for param_name, param in net.backbone.named_parameters():
                param.add_(
                    start_params[param_name] - param, alpha=min(1.0, settings.lr * factor * settings.pull)
                )
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.monotonic() - last_save >= settings.save_every_s:
            _save_state(work, key, net, optimizer, step, planned, spent_s + time.monotonic() - began)
            last_save = time.monotonic()
    bar.close()
    minutes = (spent_s + time.monotonic() - began) / 60
    _save_state(work, key, net, optimizer, step, planned, minutes * 60)

    after_vectors = embed_images(net.backbone, images[proof_idx], device, views=views)
    proof_counts = pair_counts(proof_labels)
    fars_ok = resolvable_fars(proof_counts.impostor, fars)
    before = _figures(before_vectors, proof_labels, fars_ok, settings.bootstrap)
    after = _figures(after_vectors, proof_labels, fars_ok, settings.bootstrap)
    delta, delta_ci = paired_auc_delta(
        before_vectors, after_vectors, proof_labels, bootstrap=settings.bootstrap, seed=settings.seed
    )
    tar_key = f"tar_at_far_{fars_ok[0]}" if fars_ok else None
    tar_ok = tar_key is None or (after.get(tar_key) or 0.0) >= (before.get(tar_key) or 0.0)
    # Better than the base, and better than chance: a site whose labels carry no identity can move a
    # chance-level AUC "significantly" from 0.47 to 0.50, which is no adaptation.
    above_chance = ((after.get("ci") or {}).get("auc") or [after["auc"]])[0] > 0.5
    improved = delta_ci[0] > 0 and tar_ok and above_chance
    split = {
        "train_images": int(train_idx.size),
        "train_patients": len(train_patients),
        "proof_images": int(proof_idx.size),
        "proof_patients": proof_counts.patients,
        "proof_genuine_pairs": proof_counts.genuine,
        "proof_impostor_pairs": proof_counts.impostor,
    }
    result = AdaptResult(
        improved=improved,
        written=False,
        out=None,
        model_id=None,
        base_model_id=base["model_id"],
        before=before,
        after=after,
        delta_auc=delta,
        delta_auc_ci=delta_ci,
        resolvable_fars=fars_ok,
        steps_run=step,
        steps_planned=planned,
        stopped_by_budget=stopped_by_budget,
        minutes=minutes,
        split=split,
    )
    if not improved:
        result.reason = (
            f"the adapted network does not beat the base on the {proof_counts.patients} held-back patients "
            f"(AUC {before['auc']:.4f} -> {after['auc']:.4f}, difference {delta:+.4f} "
            f"[95% CI {delta_ci[0]:+.4f}, {delta_ci[1]:+.4f}]"
            + (f"; {tar_key} {before.get(tar_key)} -> {after.get(tar_key)}" if tar_key else "")
            + ("" if above_chance else "; the adapted AUC is not above chance: do the labels name patients?")
            + ")"
        )
        shutil.rmtree(work, ignore_errors=True)
        return result

    calibration = _calibrate(after_vectors, proof_labels, fars_ok, settings, base, site, listing)
    result.calibration = {
        "thresholds": calibration.thresholds,
        "default_far": calibration.default_far,
        "score_norm": calibration.provenance.get("score_norm"),
        "threshold_ci": calibration.provenance.get("threshold_ci", {}),
        "catch_rate": calibration.provenance.get("catch_rate", {}),
    }
    provenance = {
        "base_model_id": base["model_id"],
        "base_name": base["name"],
        "site": {
            "data": site.description,
            "listing_sha256": listing,
            "images": len(samples),
            "patients": len({s.patient_id for s in samples}),
        },
        "split": {**split, "holdout_fraction": settings.holdout_fraction, "seed": settings.seed},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("device", "save_every_s")},
        "bf16": use_amp,
        "steps_run": step,
        "steps_planned": planned,
        "stopped_by_budget": stopped_by_budget,
        "minutes": minutes,
        "held_back": {"before": before, "after": after, "delta_auc": delta, "delta_auc_ci": delta_ci},
        "adapted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    training = {**base.get("training", {}), "adaptation": provenance}
    model_id = save_checkpoint(
        out_path,
        name=name or f"{base['name']}-site",
        backbone_config=base["backbone"],
        preprocess_config=base["preprocess"],
        state_dict=net.backbone.state_dict(),
        calibration=calibration.to_dict(),
        training_summary=training,
        metrics={**base.get("metrics", {}), "site_held_back": after},
    )
    shutil.rmtree(work, ignore_errors=True)
    result.written, result.out, result.model_id = True, str(out_path), model_id
    return result


def _base_train_config(base: dict[str, Any]) -> Any:
    """The base's own training recipe (augmentation, loss, head), so the site is learnt the same way."""
    from models.training.config import TrainConfig

    recorded = dict(base.get("training", {}).get("config") or {})
    recorded.pop("data", None)  # the base's data is not here; only how it learnt matters
    try:
        config = TrainConfig.from_dict(recorded)
    except ValueError:
        config = TrainConfig()
    config.backbone = type(config.backbone).from_dict(base["backbone"])
    config.preprocess = type(config.preprocess).from_dict(base["preprocess"])
    return config


def _backbone_from(base: dict[str, Any]) -> torch.nn.Module:
    from models.net.backbones import BackboneConfig, build_backbone

    backbone = build_backbone(BackboneConfig.from_dict(base["backbone"]))
    backbone.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in base["state_dict"].items()}
    )
    return backbone


def _head_from_means(
    config: Any,
    backbone: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    classes: int,
    device: torch.device,
) -> torch.nn.Module:
    """The margin head with each patient's centre at the base's normalised mean embedding of them."""
    from models.net.heads import build_head
    from models.training.train import embed_images

    head = build_head(config.head.name, config.backbone.embedding_dim, classes, **config.head.build_kwargs())
    vectors = torch.from_numpy(embed_images(backbone, images, device))
    centres = torch.zeros(classes, vectors.shape[1])
    centres.index_add_(0, torch.from_numpy(labels).long(), vectors)
    centres = F.normalize(centres, dim=1)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.nn.Parameter) and weight.shape == centres.shape:
        with torch.no_grad():
            weight.copy_(centres)
    elif isinstance(weight, torch.nn.Parameter) and weight.ndim == 2 and weight.shape[0] % classes == 0:
        with torch.no_grad():  # sub-centres: every sub-centre of a class starts at its mean
            weight.copy_(centres.repeat_interleave(weight.shape[0] // classes, dim=0))
    return head


def _batches(sampler: PKSampler, skip: int):
    """Endless P x K batches; the first ``skip`` are drawn and dropped so a resumed run continues the
    same sequence."""
    epoch, drawn = 0, 0
    while True:
        sampler.set_epoch(epoch)
        for batch in sampler:
            if drawn >= skip:
                yield batch
            drawn += 1
        epoch += 1


def _calibrate(
    vectors: np.ndarray,
    labels: Sequence[str],
    fars: Sequence[str],
    settings: AdaptSettings,
    base: dict[str, Any],
    site: SiteData,
    listing: str,
) -> Any:
    """Site calibration of the adapted network on the held-back patients; AS-norm where it raises
    their AUC (measured leave-pair-out, as the calibration applies it)."""
    default = settings.default_far if settings.default_far in fars else fars[-1]
    if default != settings.default_far:
        log.warning(
            "the held-back patients resolve FAR down to %s only: the adapted model's default FAR is %s",
            fars[-1],
            default,
        )
    common = {
        "fars": fars,
        "default_far": default,
        "bootstrap": settings.bootstrap,
        "provenance": {
            "data": site.description,
            "listing_sha256": listing,
            "fitted_on": "held-back patients of the adaptation",
            "base_model_id": base["model_id"],
        },
        "seed": settings.seed,
    }
    use_norm = _as_norm_helps(vectors, labels, settings.seed)
    log.info("site calibration on the held-back patients: %s", "AS-norm" if use_norm else "raw cosines")
    return fit_site_calibration(vectors, labels, score_norm=use_norm, **common)


def _as_norm_helps(vectors: np.ndarray, labels: Sequence[str], seed: int) -> bool:
    """Whether AS-norm, with a cohort of these images and leave-pair-out as the calibration applies
    it, ranks these pairs at least as well as raw cosines."""
    from models.scoring.scorenorm import ScoreNorm, choose_cohort, patient_key
    from models.training.site import _auc

    genuine, impostor, gp, ip = pair_scores(vectors, list(labels), max_impostor_pairs=300_000, rng_seed=seed)
    keys = [patient_key(p) for p in labels]
    cohort = choose_cohort(keys, seed=seed)
    norm = ScoreNorm(np.asarray(vectors)[cohort], [keys[i] for i in cohort])
    normed = _auc(
        norm.normalise_within(vectors, keys, genuine, gp), norm.normalise_within(vectors, keys, impostor, ip)
    )
    return normed >= _auc(genuine, impostor)


def _save_state(
    work: Path,
    key: str,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    planned: int,
    spent_s: float,
) -> None:
    """Atomic: a reader (the next run after kill -9) sees the old state or the new one."""
    tmp = work / f".{STATE_FILE}.tmp"
    torch.save(
        {
            "key": key,
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "planned": planned,
            "spent_s": spent_s,
        },
        tmp,
    )
    os.replace(tmp, work / STATE_FILE)


def _read_state(work: Path, key: str) -> dict[str, Any] | None:
    """The saved state of this same adaptation, None for a fresh start; a folder holding another
    adaptation's state is refused rather than overwritten."""
    path = work / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        raise AdaptRefusedError(
            f"{work} holds the state of another adaptation (other data, model or settings): delete it or "
            "pass another --work folder"
        )
    return state

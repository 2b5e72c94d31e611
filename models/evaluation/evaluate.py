"""``cxr-reid evaluate``: verification and retrieval figures of a checkpoint on a manifest.

Which images count: ``--split auto`` (the default) evaluates only the held-out test patients of a
set the checkpoint was trained on (recomputing its patient-disjoint split from the seed and
fractions stored in the checkpoint), and every image of a set it never saw. Evaluating on
training patients would flatter the model, so it is never the default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.data import Sample, check_files_exist, dataset_name, read_manifest, split_of
from models.evaluation.metrics import HEADLINE_METRICS, evaluate_embeddings, pair_scores, save_plots
from models.net.embedder import Embedder
from models.scoring.scorenorm import ScoreNorm, patient_key

log = logging.getLogger(__name__)


def select_split(samples: Sequence[Sample], embedder: Embedder, split: str) -> tuple[list[Sample], str]:
    """Pick the images to evaluate; returns them and a description of the choice."""
    if split == "all":
        return list(samples), "all images"
    training = embedder.training
    split_config = training.get("split") or {}
    trained_sets = set((training.get("sets") or {}).keys()) - set(split_config.get("holdout_sets") or [])
    if split == "auto":
        unseen = [s for s in samples if s.dataset not in trained_sets]
        if len(unseen) == len(samples):
            return list(samples), "all images (set not used in training)"
        split = "test"
    if not split_config:
        raise ValueError("this checkpoint records no split; use --split all")
    merged = training.get("merged_patients") or {}  # label cleaning at training time moved these ids
    chosen = []
    for sample in samples:
        if sample.dataset not in trained_sets:
            which = "test"
        elif sample.split:
            which = sample.split
        else:
            which = split_of(
                merged.get(sample.patient_id, sample.patient_id),
                val_fraction=split_config["val_fraction"],
                test_fraction=split_config["test_fraction"],
                seed=split_config["seed"],
            )
        if which == split:
            chosen.append(sample)
    return chosen, f"{split} patients of the checkpoint's split"


def embed_samples(
    embedder: Embedder, samples: Sequence[Sample], *, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Embed manifest images with a progress bar."""
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(samples), desc="embed", disable=not progress, leave=False) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            chunks.append(embedder.embed([s.path for s in batch], batch_size=batch_size))
            bar.update(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)


def evaluate(
    manifest: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    split: str = "auto",
    bootstrap: int = 200,
    plots_dir: str | os.PathLike | None = None,
    max_impostor_pairs: int = 1_000_000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint (default: the shipped one) on a manifest; returns one flat dict."""
    samples = read_manifest(manifest)  # before the model: a typo fails at once, not after loading it
    check_files_exist(samples, manifest)
    embedder = Embedder.from_checkpoint(model)
    chosen, description = select_split(samples, embedder, split)
    if len(chosen) < 2:
        raise ValueError(f"{manifest}: only {len(chosen)} image(s) in the chosen split ({description})")
    embeddings = embed_samples(embedder, chosen, progress=progress)
    ids = {p: i for i, p in enumerate(sorted({s.patient_id for s in chosen}))}
    labels = np.array([ids[s.patient_id] for s in chosen])
    threshold = embedder.calibration.threshold_for(None)
    transform = None
    if embedder.calibration.score_norm is not None:  # a site calibration decides on AS-norm scores
        norm = ScoreNorm.from_dict(embedder.calibration.score_norm)
        keys = [patient_key(s.patient_id) for s in chosen]

        def transform(scores: np.ndarray, pairs: np.ndarray) -> np.ndarray:
            return norm.normalise_within(embeddings, keys, scores, pairs)

    result = evaluate_embeddings(
        embeddings,
        labels,
        threshold=threshold,
        bootstrap=bootstrap,
        seed=seed,
        max_impostor_pairs=max_impostor_pairs,
        views=[s.view for s in chosen],
        offsets=[s.offset_days for s in chosen],
        follow_ups=[s.follow_up for s in chosen],
        pair_transform=transform,
    )
    result.update(
        {
            "model_id": embedder.model_id,
            "manifest": str(manifest),
            "dataset": dataset_name(manifest),
            "split": description,
            "threshold": threshold,
            "threshold_far": embedder.calibration.default_far,
            "calibration": embedder.calibration.summary(),
        }
    )
    if plots_dir is not None:
        genuine, impostor, genuine_pairs, impostor_pairs = pair_scores(
            embeddings, labels, max_impostor_pairs=max_impostor_pairs
        )
        if transform is not None:
            genuine, impostor = transform(genuine, genuine_pairs), transform(impostor, impostor_pairs)
        paths = save_plots(
            genuine,
            impostor,
            Path(plots_dir),
            threshold=threshold,
            title=f"{embedder.model_id}\n{dataset_name(manifest)}: {description}",
        )
        result["plots"] = [str(p) for p in paths]
    return result


def format_report(result: dict[str, Any]) -> str:
    """A human-readable table of the headline figures with their intervals."""
    ci = result.get("ci", {})
    lines = [
        f"model {result['model_id']} on {result['dataset']} ({result['split']})",
        f"{result['n_images']} images, {result['n_patients']} patients, "
        f"{result['n_genuine_pairs']} genuine / {result['n_impostor_pairs']} impostor pairs",
    ]
    for key in HEADLINE_METRICS:
        if key in result and result[key] is not None:
            lines.append(f"  {key:<18} {result[key]:.4f}{_interval(ci.get(key))}")
    if result.get("threshold") is not None and "balanced_accuracy" in result:
        lines.append(
            f"at the default threshold {result['threshold']:.4f} (FAR {result.get('threshold_far')} on the "
            f"calibration in force), on these pairs:"
        )
        lines.append(
            f"  {'tar_at_threshold':<18} {result['tar_at_threshold']:.4f}  same-patient pairs accepted"
        )
        lines.append(
            f"  {'far_at_threshold':<18} {result['far_at_threshold']:.4f}  different-patient pairs accepted"
        )
        lines.append(
            f"  {'balanced_accuracy':<18} {result['balanced_accuracy']:.4f}"
            f"{_interval(ci.get('balanced_accuracy'))}  (TAR + 1 - FAR) / 2, whatever the mix of pairs"
        )
    return "\n".join(lines)


def _interval(interval: list[float] | None) -> str:
    return f"  [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""

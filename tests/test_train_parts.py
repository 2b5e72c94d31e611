"""The pieces of training that decide reproducibility and generalisation: a step-based schedule,
the time budget as a recorded hard stop, fixed-length epochs, label cleaning, domain augmentation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import (
    AugmentConfig,
    PKSampler,
    Sample,
    augment,
    equalize_batch,
    merge_duplicate_identities,
    near_duplicate_pairs,
)
from models.imaging.preprocess import PreprocessConfig, equalize_histogram, prepare
from models.training.train import _lr_factor, load_config, train


def test_learning_rate_is_a_function_of_the_step_only() -> None:
    total, warmup = 100, 10
    factors = [_lr_factor(step, total, warmup) for step in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))  # cosine decay
    assert _lr_factor(total, total, warmup) == pytest.approx(0.0)
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_fixed_length_epochs_and_balanced_sets() -> None:
    labels = np.repeat(np.arange(50), 2)  # 50 patients
    groups = ["big"] * 90 + ["small"] * 10  # 45 patients vs 5
    sampler = PKSampler(labels, 4, 2, groups=groups, seed=0, batches_per_epoch=25)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 25  # longer than one pass over 50 patients
    small = {int(label) for label in labels[90:]}
    drawn = [int(labels[i]) for batch in batches for i in batch[::2]]
    share = sum(label in small for label in drawn) / len(drawn)
    assert 0.4 < share < 0.6  # each set half of the draws, whatever its size
    sharded = PKSampler(labels, 4, 2, seed=0, rank=1, world_size=2, batches_per_epoch=25)
    assert len(sharded) == 12


def test_near_duplicates_merge_identities_within_a_set() -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((6, 64, 64)) * 255).astype(np.uint8)
    images[3] = np.clip(images[0].astype(int) + 3, 0, 255)  # the same picture, re-encoded brighter
    images[5] = images[4]
    samples = [
        Sample(path=f"{i}.png", patient_id=pid, dataset=ds)
        for i, (pid, ds) in enumerate(
            [("a:p1", "a"), ("a:p2", "a"), ("a:p3", "a"), ("a:p9", "a"), ("a:p4", "a"), ("b:p4", "b")]
        )
    ]
    pairs = {tuple(p) for p in near_duplicate_pairs(images)}
    assert pairs == {(0, 3), (4, 5)}
    assert merge_duplicate_identities(samples, images) == {"a:p9": "a:p1"}  # sets never merge


def test_domain_augmentations_keep_shape_and_range() -> None:
    torch.manual_seed(0)
    batch = torch.rand(6, 1, 64, 64) * 0.8 + 0.1
    generator = torch.Generator().manual_seed(0)
    plain = AugmentConfig(
        erase_prob=0,
        noise_std=0,
        blur_prob=0,
        rotation_deg=0,
        shift=0,
        scale=(1, 1),
        crop_scale=(1, 1),
        brightness=0,
        contrast=0,
        gamma=(1, 1),
    )
    for change in ({"lowres_prob": 1.0, "lowres_min": 16}, {"equalize_prob": 1.0}, {"overlay_prob": 1.0}):
        config = AugmentConfig(**{**plain.__dict__, **change})
        out = augment(batch, config, generator)
        assert out.shape == batch.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert not torch.allclose(out, augment(batch, plain, generator), atol=1e-3), change
    # a down-sampled image loses fine detail
    detail = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    low = augment(batch, AugmentConfig(**{**plain.__dict__, "lowres_prob": 1.0, "lowres_min": 8}), generator)
    assert detail(low) < detail(batch)


def test_equalisation_matches_between_training_and_serving() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((64, 64), np.float32)
    image[8:56, 8:56] = rng.random((48, 48)) ** 3  # a dark, skewed histogram inside black padding
    served = equalize_histogram(image)
    trained = equalize_batch(torch.from_numpy(image)[None, None])[0, 0].numpy()
    assert served[0, 0] == 0 and trained[0, 0] == 0  # padding stays black
    inside = served[8:56, 8:56]
    assert abs(float(inside.mean()) - 0.5) < 0.05  # flat histogram
    assert np.abs(served - trained).max() < 1e-4
    radiograph = rng.random((100, 80)).astype(np.float32) ** 4
    assert (
        prepare(radiograph, PreprocessConfig(size=32, equalize=True)).mean()
        > prepare(radiograph, PreprocessConfig(size=32)).mean()
    )


def test_time_budget_is_a_recorded_hard_stop(tmp_path: Path) -> None:
    from models.imaging.phantom import write_phantom_set
    from models.net.checkpoint import load_checkpoint

    manifest = write_phantom_set(tmp_path / "ph", 20, 2, size=48, seed=2)
    config = load_config(
        None,
        [
            f'data.manifests=["{manifest}"]',
            f'output_dir="{tmp_path / "run"}"',
            f'data.cache_dir="{tmp_path / "cache"}"',
            "data.val_fraction=0.3",
            "data.test_fraction=0.0",
            "backbone.width=8",
            "backbone.embedding_dim=32",
            "preprocess.size=48",
            "optim.patients_per_batch=4",
            "optim.epochs=50",
            "optim.steps_per_epoch=1000",
            "optim.max_minutes=0.002",
            'optim.device="cpu"',
        ],
    )
    checkpoint = train(config, progress=False)
    summary = load_checkpoint(checkpoint)["training"]
    assert summary["stopped_by_budget"] is True
    assert summary["epochs_run"] == 1 and summary["epochs_planned"] == 50
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["stopped_by_budget"] is True and record["steps"] < 1000
    assert not os.path.isabs(summary["config"]["data"]["manifests"][0])  # no machine paths in a model


def test_training_views_match_the_embedder(tiny_checkpoint: Path) -> None:
    from models.net.embedder import Embedder
    from models.training.train import embed_images

    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    size = embedder.preprocess_config.size
    images = np.random.default_rng(0).integers(0, 256, (6, size, size), dtype=np.uint8)
    for views in (0, 2):
        embedder.preprocess_config = PreprocessConfig(size=size, tta=views)
        served = embedder.embed_prepared(images.astype(np.float32) / 255)
        trained = embed_images(embedder.network, images, torch.device("cpu"), views=views)
        np.testing.assert_allclose(trained, served, atol=1e-5)


def test_shipped_thresholds_are_fitted_on_the_embeddings_served(tmp_path: Path) -> None:
    """A run with test-time views calibrates on view-averaged embeddings: same seed and weights,
    other thresholds than the single-view run."""
    from models.imaging.phantom import write_phantom_set
    from models.net.checkpoint import load_checkpoint

    manifest = write_phantom_set(tmp_path / "ph", 16, 3, size=48, seed=3)
    thresholds = {}
    for views in (0, 2):
        config = load_config(
            None,
            [
                f'data.manifests=["{manifest}"]',
                f'output_dir="{tmp_path / f"run{views}"}"',
                f'data.cache_dir="{tmp_path / "cache"}"',
                "data.val_fraction=0.4",
                "data.test_fraction=0.0",
                "backbone.width=8",
                "backbone.embedding_dim=32",
                "preprocess.size=48",
                f"preprocess.tta={views}",
                "optim.patients_per_batch=4",
                "optim.epochs=1",
                "optim.steps_per_epoch=2",
                "optim.threads=1",
                'optim.device="cpu"',
            ],
        )
        payload = load_checkpoint(train(config, progress=False))
        thresholds[views] = (payload["state_dict"], payload["calibration"]["thresholds"])
    (weights0, cal0), (weights2, cal2) = thresholds[0], thresholds[2]
    assert all(torch.equal(weights0[k], weights2[k]) for k in weights0)  # same training
    assert cal0 != cal2  # calibrated on what each checkpoint serves

    # Resuming a finished run only re-finalises it: same weights, and its clock keeps the first session.
    elapsed = json.loads((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    again = load_checkpoint(train(config, resume=True, progress=False))
    assert all(torch.equal(weights2[k], again["state_dict"][k]) for k in weights2)
    assert again["calibration"]["thresholds"] == cal2
    assert again["training"]["train_minutes"] * 60 >= elapsed

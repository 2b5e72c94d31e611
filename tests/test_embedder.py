"""The checkpoint format and the embedder: round trip, model id, unit vectors, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.net.backbones import GridAvgPool2d
from models.net.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.net.embedder import Embedder, resolve_device
from models.net.runtime import inference_network


def test_checkpoint_round_trip_and_content_id(tiny_checkpoint: Path, tmp_path: Path) -> None:
    payload = load_checkpoint(tiny_checkpoint)
    assert payload["model_id"].startswith("tiny-test-") and len(payload["model_id"]) == len("tiny-test-") + 12
    assert payload["preprocess"]["size"] == 64 and payload["backbone"]["embedding_dim"] == 128
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    again = save_checkpoint(
        tmp_path / "copy.pt",
        name="tiny-test",
        backbone_config=payload["backbone"],
        preprocess_config=payload["preprocess"],
        state_dict=payload["state_dict"],
        calibration=payload["calibration"],
    )
    assert again == payload["model_id"]  # same content, same id
    changed = dict(payload["state_dict"])
    key = next(k for k, v in changed.items() if v.is_floating_point() and v.numel() > 1)
    changed[key] = changed[key] + 1
    other = save_checkpoint(
        tmp_path / "other.pt",
        name="tiny-test",
        backbone_config=payload["backbone"],
        preprocess_config=payload["preprocess"],
        state_dict=changed,
        calibration=payload["calibration"],
    )
    assert other != payload["model_id"]


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a cxr-reid checkpoint") as caught:
        load_checkpoint(bad)
    assert "cxr-reid train" in str(caught.value)  # says what to pass instead
    readme = Path(__file__).resolve().parents[1] / "README.md"  # a text file: torch's unpickling error
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(readme)
    assert "weights_only" not in str(caught.value)  # torch's unsafe advice is not passed on
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        Embedder.from_checkpoint(tmp_path / "absent.pt")


def test_embed_gives_unit_vectors_deterministically(
    tiny_checkpoint: Path, phantom_images: list[Path]
) -> None:
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    assert embedder.dim == 128 and embedder.model_id.startswith("tiny-test-")
    vectors = embedder.embed(phantom_images[:5], batch_size=2)
    assert vectors.shape == (5, 128) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    from_bytes = embedder.embed([phantom_images[0].read_bytes()])
    assert np.allclose(from_bytes[0], vectors[0], atol=1e-5)
    assert embedder.embed([]).shape == (0, 128)
    described = embedder.describe()
    assert described["model_id"] == embedder.model_id and "calibration" in described


def test_test_time_augmentation_averages_views(tiny_checkpoint: Path) -> None:
    import dataclasses

    from models.imaging.preprocess import TTA_VIEWS, PreprocessConfig

    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    from models.imaging.phantom import make_patient, render_study

    images = np.stack([render_study(make_patient(p), 0, size=64) for p in range(3)]).astype(np.float32)
    plain = embedder.embed_prepared(images)
    embedder.preprocess_config = dataclasses.replace(embedder.preprocess_config, tta=len(TTA_VIEWS))
    averaged = embedder.embed_prepared(images)
    assert np.allclose(np.linalg.norm(averaged, axis=1), 1.0, atol=1e-5)
    cosines = (plain * averaged).sum(1)
    assert np.all(cosines < 0.99999) and np.all(cosines > 0.5)  # other views, same image
    assert np.allclose(embedder.embed_prepared(images), averaged, atol=1e-6)  # deterministic
    with pytest.raises(ValueError, match="tta"):
        PreprocessConfig(tta=len(TTA_VIEWS) + 1)


def test_device_choice() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("runtime", ["onednn", "onnxruntime"])
def test_cpu_runtimes_give_the_embeddings_of_pytorch(runtime: str) -> None:
    """The shipped network exported to ONNX Runtime (the CPU default) or fused for oneDNN embeds the
    example radiographs as PyTorch eager does."""
    examples = sorted((Path(__file__).resolve().parents[1] / "examples" / "radiographs").glob("*.jpeg"))
    eager = Embedder.from_checkpoint(None, runtime="torch")
    other = Embedder.from_checkpoint(None, runtime=runtime)
    assert (eager.runtime, other.runtime) == ("torch", runtime)
    assert Embedder.from_checkpoint(None, runtime="auto").runtime == "onnxruntime"
    a, b = eager.embed(examples), other.embed(examples)
    assert (a * b).sum(axis=1).min() > 0.99999


def test_a_network_the_runtime_cannot_run_falls_back_or_says_so(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's own adaptive pooling on a map the grid does not divide (a 7x7 map into 4x4, as at
    224 px) is something neither the ONNX exporter nor the fused form can express: auto runs such a
    network in PyTorch (with a warning per runtime tried), an explicit onednn is an error that says
    why."""
    uneven = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=4, padding=1), torch.nn.AdaptiveAvgPool2d(4))
    cpu = torch.device("cpu")
    assert inference_network(uneven, 28, cpu, "auto") == (uneven, "torch")
    assert "runtime onnxruntime unavailable" in caplog.text and "runtime onednn unavailable" in caplog.text
    with pytest.raises(ValueError, match="cannot run in runtime 'onednn'"):
        inference_network(uneven, 28, cpu, "onednn")
    with pytest.raises(ValueError, match="unknown runtime"):
        Embedder.from_checkpoint(tiny_checkpoint, runtime="tensorrt")


@pytest.mark.parametrize("side", [1, 3, 4, 5, 7, 8, 9, 16])
def test_grid_pooling_is_torch_adaptive_pooling(side: int) -> None:
    """The exportable pooling of the output layer averages exactly PyTorch's adaptive bins, whether
    the map divides into the grid, does not (7 -> 4 at 224 px), or is smaller than it."""
    x = torch.randn(2, 3, side, side + 2)
    assert torch.allclose(GridAvgPool2d(4)(x), torch.nn.functional.adaptive_avg_pool2d(x, 4), atol=1e-6)

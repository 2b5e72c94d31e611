"""Checkpoint -> identity embeddings: the one path the service, evaluation and the CLI share."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.imaging.preprocess import (
    TTA_VIEWS,
    PreprocessConfig,
    Radiograph,
    load_for_model,
    prepare,
    to_tensor,
)
from models.net.backbones import BackboneConfig, build_backbone
from models.net.checkpoint import load_checkpoint
from models.net.runtime import inference_network
from models.scoring.calibration import Calibration

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "default.pt"

ImageSource = Radiograph | bytes | str | os.PathLike | np.ndarray

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str) -> torch.device:
    """``auto`` is the GPU when torch sees one, else the CPU; asking for ``cuda`` without one is an
    error that says so, not a silent fall-back to a 50x slower bulk run."""
    if choice not in DEVICES:
        raise ValueError(f"unknown device {choice!r}: choose one of {', '.join(DEVICES)}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no GPU (a CPU build, or no driver)")
    return torch.device(choice)


class Embedder:
    """A loaded model that turns radiographs into float32 unit-norm vectors."""

    def __init__(
        self,
        checkpoint: dict[str, Any],
        device: str = "cpu",
        source: Path | None = None,
        runtime: str = "torch",
    ) -> None:
        self.source = source
        self.model_id: str = checkpoint["model_id"]
        self.name: str = checkpoint["name"]
        self.backbone_config = BackboneConfig.from_dict(checkpoint["backbone"])
        self.preprocess_config = PreprocessConfig.from_dict(checkpoint["preprocess"])
        self.calibration = Calibration.from_dict(checkpoint["calibration"])
        self.training: dict[str, Any] = checkpoint.get("training", {})
        self.metrics: dict[str, Any] = checkpoint.get("metrics", {})
        self.dim = self.backbone_config.embedding_dim
        self.device = resolve_device(device)
        network = build_backbone(self.backbone_config)
        # fp16 weights on disk; compute in fp32 (on a GPU too: bench/gpu.py measures bf16 beside it).
        state = {
            key: value.float() if value.is_floating_point() else value
            for key, value in checkpoint["state_dict"].items()
        }
        network.load_state_dict(state)
        # NHWC: measured 1.14x the images/s of NCHW for the default net on a 2-core CPU (bench/speed.py).
        self.network = network.to(self.device, memory_format=torch.channels_last).eval()
        # What embed_prepared calls: the network itself or a fused / exported form of it
        # (models/net/runtime.py).
        self.forward_network, self.runtime = inference_network(
            self.network, self.preprocess_config.size, self.device, runtime
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike | None = None, device: str = "cpu", runtime: str = "torch"
    ) -> Embedder:
        """Load a checkpoint file; ``None`` means the default model shipped in the package.
        ``device`` is cpu, cuda or auto (see :func:`resolve_device`); ``runtime`` is torch, onednn,
        onnxruntime or auto (see :func:`models.net.runtime.inference_network`)."""
        checkpoint_path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        if not checkpoint_path.is_file():
            hint = (
                "the shipped default model is missing from this install (models/weights/default.pt)"
                if path is None
                else "check the path"
            )
            raise FileNotFoundError(f"checkpoint not found: {checkpoint_path} ({hint})")
        embedder = cls(
            load_checkpoint(checkpoint_path), device=device, source=checkpoint_path, runtime=runtime
        )
        log.info(
            "loaded model %s from %s on %s (%s)",
            embedder.model_id,
            checkpoint_path,
            embedder.device,
            embedder.runtime,
        )
        return embedder

    def prepare(self, image: ImageSource, **decode_kwargs: Any) -> np.ndarray:
        """Decode (if needed) and normalise one image the way this checkpoint was trained."""
        if isinstance(image, Radiograph):
            return prepare(image, self.preprocess_config)
        if isinstance(image, np.ndarray):
            return prepare(image, self.preprocess_config)
        return load_for_model(image, self.preprocess_config, **decode_kwargs)

    @torch.inference_mode()
    def embed_prepared(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a stack of prepared images (N, size, size) in [0, 1]; returns (N, dim) unit vectors.

        With test-time augmentation (``preprocess.tta = k``) the unit embeddings of the plain view and
        of the first k of :data:`~models.imaging.preprocess.TTA_VIEWS` are averaged, then normalised again.
        """
        inputs = to_tensor(batch).to(self.device)
        vectors = embed_views(self.forward_network, inputs, self.preprocess_config.tta)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence[ImageSource], batch_size: int = 32, **decode_kwargs: Any) -> np.ndarray:
        """Embed images (files, bytes, decoded radiographs or raw arrays) in batches."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [self.prepare(image, **decode_kwargs) for image in images[start : start + batch_size]]
            out.append(self.embed_prepared(np.stack(chunk)))
        return np.concatenate(out)

    def describe(self) -> dict[str, Any]:
        """What a client or model card needs to know about the loaded model."""
        return {
            "model_id": self.model_id,
            "name": self.name,
            "embedding_dim": self.dim,
            "backbone": self.backbone_config.to_dict(),
            "preprocess": self.preprocess_config.to_dict(),
            "calibration": self.calibration.to_dict(),
            "metrics": self.metrics,
        }


def embed_views(network: torch.nn.Module, inputs: torch.Tensor, views: int = 0) -> torch.Tensor:
    """Unit embeddings of a prepared batch (N, 1, H, W): the plain view averaged with the first
    ``views`` of :data:`~models.imaging.preprocess.TTA_VIEWS`, normalised again. The one definition that
    serving and training's final calibration share, so thresholds are fitted on the embeddings
    the checkpoint serves."""
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    total = torch.nn.functional.normalize(network(inputs).float(), dim=1)
    if not views:
        return total
    for zoom, dx, dy in TTA_VIEWS[:views]:
        view = _affine_view(inputs, zoom, dx, dy)
        total += torch.nn.functional.normalize(network(view).float(), dim=1)
    return torch.nn.functional.normalize(total, dim=1)


def _affine_view(inputs: torch.Tensor, zoom: float, dx: float, dy: float) -> torch.Tensor:
    """The batch zoomed in by ``zoom`` about the centre and shifted by (dx, dy) of the side; the
    border that comes into view is the padding value (-1: black after ``to_tensor``)."""
    n = inputs.shape[0]
    theta = inputs.new_tensor([[1 / zoom, 0.0, 2 * dx], [0.0, 1 / zoom, 2 * dy]]).expand(n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(inputs.shape), align_corners=False)
    return torch.nn.functional.grid_sample(inputs + 1, grid, align_corners=False) - 1

"""The one-file checkpoint: everything needed to embed, score and explain a model.

A checkpoint holds the architecture config, the preprocessing config (so a checkpoint always
preprocesses the way it was trained), the weights, the calibration, a training-data summary,
metrics, and a model id ``<name>-<sha256[:12]>`` of its content. Gallery vectors are tagged with
that id, so a gallery never mixes vectors of two models.

It is a plain ``torch.save`` dict of tensors and JSON-able values, loaded with
``weights_only=True`` (no pickled code runs when a user opens a checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_id", "name", "backbone", "preprocess", "state_dict", "calibration")


class CheckpointError(ValueError):
    """A file is not a readable cxr-reid checkpoint."""


def content_hash(state_dict: dict[str, torch.Tensor], configs: dict[str, Any]) -> str:
    """Hash weights and configs so that the same model always gets the same id."""
    digest = hashlib.sha256()
    digest.update(json.dumps(configs, sort_keys=True).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    *,
    name: str,
    backbone_config: dict[str, Any],
    preprocess_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    calibration: dict[str, Any],
    training_summary: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    half: bool = True,
) -> str:
    """Write a checkpoint atomically and return its model id.

    ``half`` stores floating-point weights as fp16 (halves the file; embeddings change by ~1e-3).
    """
    weights = {
        key: (value.detach().cpu().half() if half and value.is_floating_point() else value.detach().cpu())
        for key, value in state_dict.items()
    }
    configs = {"backbone": backbone_config, "preprocess": preprocess_config}
    model_id = f"{name}-{content_hash(weights, configs)[:12]}"
    payload = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "name": name,
        "backbone": backbone_config,
        "preprocess": preprocess_config,
        "state_dict": weights,
        "calibration": calibration,
        "training": training_summary or {},
        "metrics": metrics or {},
    }
    write_checkpoint(path, payload)
    return model_id


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically: a reader sees the old file or the new one, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_calibration(
    source: str | os.PathLike, target: str | os.PathLike, calibration: dict[str, Any]
) -> str:
    """Copy a checkpoint with another calibration (e.g. a site's); returns the model id.

    The id hashes weights and configs only, so it does not change: the embeddings are the same and a
    gallery built with the source checkpoint stays valid for the copy.
    """
    payload = load_checkpoint(source)
    payload["calibration"] = calibration
    write_checkpoint(target, payload)
    return str(payload["model_id"])


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError with the reason when it is not one."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        # torch's own message advises weights_only=False: unsafe for a file of unknown origin and never
        # what a cxr-reid user should do, so it is not passed on.
        text = str(exc).strip()
        # One line: the error's kind and the first sentence of its text (torch's zip reader adds a
        # paragraph of advice; a bare "101" from the unpickler says nothing without its kind).
        first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
        kind = type(exc).__name__
        reason = kind if not first or "weights_only" in text else f"{kind}: {first}"
        raise CheckpointError(
            f"{source} is not a cxr-reid checkpoint (torch.load: {reason}); pass a .pt file written by "
            "`cxr-reid train` or `cxr-reid calibrate`, or leave --model out for the shipped model"
        ) from exc
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(f"{source} is not a cxr-reid checkpoint (missing keys)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format {payload['format_version']}; this cxr-reid reads up to "
            f"{FORMAT_VERSION}: upgrade cxr-reid"
        )
    return payload


# --- parts: a checkpoint carried in pieces of bounded size (a GPU machine returns files <= 16 MiB) ---

PARTS_SUFFIX = ".parts.json"


def split_file(path: str | os.PathLike, out_dir: str | os.PathLike, part_bytes: int = 15 * 2**20) -> Path:
    """Cut a file into ``<name>.part000 ...`` of at most ``part_bytes`` each, plus ``<name>.parts.json``
    (size, sha256 and part names) that :func:`join_parts` checks; returns the JSON's path."""
    if part_bytes < 1:
        raise ValueError("part size must be positive")
    source = Path(path)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    digest, names = hashlib.sha256(), []
    with source.open("rb") as handle:
        while chunk := handle.read(part_bytes):
            digest.update(chunk)
            name = f"{source.name}.part{len(names):03d}"
            (target / name).write_bytes(chunk)
            names.append(name)
    index = target / f"{source.name}{PARTS_SUFFIX}"
    index.write_text(
        json.dumps(
            {"name": source.name, "size": source.stat().st_size, "sha256": digest.hexdigest(), "parts": names}
        )
    )
    return index


def join_parts(index: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rejoin the parts an index from :func:`split_file` names (beside it), checking size and sha256;
    the output appears only when it matches."""
    index_path = Path(index)
    spec = json.loads(index_path.read_text())
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for name in spec["parts"]:
                part = index_path.parent / name
                if not part.is_file():
                    raise CheckpointError(f"part {name} is missing beside {index_path}")
                data = part.read_bytes()
                digest.update(data)
                size += len(data)
                handle.write(data)
        if size != spec["size"] or digest.hexdigest() != spec["sha256"]:
            raise CheckpointError(
                f"the parts of {spec['name']} do not add up to the original (size or sha256)"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

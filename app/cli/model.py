"""Model jobs, no gallery involved: ``models`` (the backbone variants), ``train``, ``evaluate``,
``checkpoint`` (split a checkpoint into bounded parts, or join them) and ``phantoms`` (a synthetic
identity-labelled set to try the rest on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.cli.common import Subparsers


def shipped_shape() -> dict[str, int | str]:
    """Input size, embedding size, width and stem of the shipped model, read from its checkpoint: the
    defaults of ``cxr-reid models``, so its table starts from the network MODEL_CARD.md describes."""
    from models.net.checkpoint import load_checkpoint
    from models.net.embedder import DEFAULT_CHECKPOINT

    payload = load_checkpoint(DEFAULT_CHECKPOINT)
    backbone = payload["backbone"]
    return {
        "input_size": int(payload["preprocess"]["size"]),
        "embedding_dim": int(backbone["embedding_dim"]),
        "width": int(backbone["width"]),
        "stem": str(backbone["stem"]),
    }


def _cmd_models(args: argparse.Namespace) -> int:
    from models.net.backbones import describe_variants, format_variants_table

    shape = shipped_shape()
    rows = describe_variants(
        input_size=args.input_size or int(shape["input_size"]),
        embedding_dim=args.embedding_dim or int(shape["embedding_dim"]),
        width=args.width or int(shape["width"]),
        stem=str(shape["stem"]),
    )
    sys.stdout.write((json.dumps(rows, indent=2) if args.json else format_variants_table(rows)) + "\n")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from models.training.train import load_config, train

    overrides = list(args.set or [])
    if args.manifest:
        overrides.append("data.manifests=" + json.dumps(args.manifest))
    for flag, key in (
        ("output", "output_dir"),
        ("epochs", "optim.epochs"),
        ("device", "optim.device"),
        ("max_minutes", "optim.max_minutes"),
        ("name", "name"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    config = load_config(args.config, overrides)
    checkpoint = train(config, resume=args.resume, progress=not args.no_progress)
    sys.stdout.write(f"{checkpoint}\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from models.evaluation.evaluate import evaluate, format_report

    result = evaluate(
        args.manifest,
        model=args.model,
        split=args.split,
        bootstrap=args.bootstrap,
        plots_dir=args.plots,
        max_impostor_pairs=args.max_impostor_pairs,
        progress=not args.json,
    )
    sys.stdout.write((json.dumps(result) if args.json else format_report(result)) + "\n")
    return 0


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from models.imaging.phantom import write_phantom_set

    manifest = write_phantom_set(
        args.output, args.patients, args.studies, size=args.size, fmt=args.format, seed=args.seed
    )
    sys.stdout.write(f"{manifest}\n")
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from models.net.checkpoint import join_parts, split_file

    if args.action == "split":
        index = split_file(args.path, args.out or Path(args.path).parent, int(args.part_mib * 2**20))
        sys.stdout.write(f"{index}\n")
    else:
        if not args.out:
            raise ValueError("join needs --out FILE: where to write the rejoined checkpoint")
        sys.stdout.write(f"{join_parts(args.path, args.out)}\n")
    return 0


def register(subparsers: Subparsers) -> None:
    """Add models, train, evaluate, checkpoint and phantoms to ``cxr-reid``."""
    from models.data import SPLIT_CHOICES

    p = subparsers.add_parser(
        "models",
        help="list backbone variants with parameters and GFLOPs",
        description="Every backbone variant and depth at one input size, embedding size and width; the "
        "defaults are the shipped model's (MODEL_CARD.md), so its row is the network served.",
    )
    p.add_argument("--input-size", type=int, help="input side in pixels (default: the shipped model's)")
    p.add_argument("--embedding-dim", type=int, help="embedding dimensions (default: the shipped model's)")
    p.add_argument(
        "--width",
        type=int,
        help="channels of the first stage; stages are width x 1, 2, 4, 8 (default: the shipped model's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=_cmd_models)

    p = subparsers.add_parser("train", help="train an identity model from a config (torchrun for DDP)")
    p.add_argument("--config", help="experiment config (TOML), e.g. configs/default.toml")
    p.add_argument(
        "--manifest",
        action="append",
        help="a training manifest, e.g. from `cxr-reid data`; repeat for several sets. Replaces the config's "
        "data.manifests and keeps its other settings",
    )
    p.add_argument("--output", help="run directory (default from the config)")
    p.add_argument("--epochs", type=int, help="passes over the training set (default from the config)")
    p.add_argument("--max-minutes", type=float, help="stop after this wall time, keeping the best epoch")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--name", help="model name (the model id is name + content hash)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("evaluate", help="verification and retrieval metrics on a manifest")
    p.add_argument("--model", help="checkpoint (default: the shipped model)")
    p.add_argument("--manifest", required=True, help="manifest CSV (path,patient_id[,view,...])")
    p.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="auto",
        help="auto: held-out patients of sets seen in training, all images of unseen sets",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="patient-level bootstrap resamples (0 = none)")
    p.add_argument(
        "--max-impostor-pairs",
        type=int,
        default=1_000_000,
        help="different-patient pairs scored at most (a uniform sample beyond; default %(default)s)",
    )
    p.add_argument("--plots", help="write ROC and score-histogram PNGs here")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser(
        "checkpoint",
        help="split a checkpoint into parts of bounded size, or join them back (checked by sha256)",
    )
    p.add_argument("action", choices=("split", "join"), help="split a checkpoint, or join its parts")
    p.add_argument("path", help="split: the checkpoint; join: its <name>.parts.json")
    p.add_argument("--out", help="split: folder for the parts (default: beside it); join: the file to write")
    p.add_argument("--part-mib", type=float, default=15.0, help="largest part, MiB (default 15)")
    p.set_defaults(func=_cmd_checkpoint)

    p = subparsers.add_parser(
        "phantoms", help="write a synthetic identity-labelled phantom set (not radiographs)"
    )
    p.add_argument("output", help="output folder")
    p.add_argument("--patients", type=int, default=20, help="phantom patients (default %(default)s)")
    p.add_argument("--studies", type=int, default=3, help="studies per phantom patient (default %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default %(default)s)")
    p.add_argument(
        "--format", choices=("png", "dicom"), default="png", help="file format (default %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: the same seed writes the same set (default %(default)s)",
    )
    p.set_defaults(func=_cmd_phantoms)

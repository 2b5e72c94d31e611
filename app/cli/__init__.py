"""The ``cxr-reid`` command line: one entry point, a subcommand per job.

Each command group lives in its own module and adds its subcommands with ``register(subparsers)``:

- ``app.cli.data``: data (a manifest from a public set or a DICOM folder)
- ``app.cli.model``: models, train, evaluate, checkpoint, phantoms
- ``app.cli.service``: serve, keys, check, healthcheck
- ``app.cli.gallery``: enroll, sync, reindex, migrate
- ``app.cli.site``: calibrate, adapt
- ``app.cli.analysis``: audit, risk

``app.cli.common`` holds what they share (logging, settings from the flags, the model and the gallery).
Heavy imports happen inside each command so that ``cxr-reid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from app.cli import analysis, data, gallery, model, service, site
from app.cli.common import configure_logging, log

#: The groups in the order their subcommands are listed by ``cxr-reid --help``.
GROUPS = (data, model, service, gallery, site, analysis)


def version_text() -> str:
    """``cxr-reid <version>, shipped model <model id>``: what a bug report needs to name the build.

    The model id is read from the shipped checkpoint itself (torch is imported only here), so it is
    the model this install would serve; a missing or unreadable checkpoint is said, not raised."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("cxr-reid")
    except PackageNotFoundError:  # run from a source tree that was never installed
        package = "unknown (not installed)"
    from models.net.checkpoint import load_checkpoint
    from models.net.embedder import DEFAULT_CHECKPOINT

    try:
        model_id = str(load_checkpoint(DEFAULT_CHECKPOINT)["model_id"])
    except (OSError, ValueError) as exc:
        model_id = f"unavailable ({exc})"
    return f"cxr-reid {package}, shipped model {model_id}"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit 0 (computed only when asked for)."""

    def __init__(
        self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-reid", description="Chest X-ray patient re-identification")
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the package version and the shipped model id, and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["cxr-reid", *argv])  # what a command tells the user to run again
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130

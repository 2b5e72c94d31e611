"""The ``cxr-reid`` command line: one entry point, a subcommand per job.

Each command group lives in its own module and adds its subcommands with ``register(subparsers)``:

- ``app.cli.model``: models, train, evaluate, checkpoint, phantoms
- ``app.cli.service``: serve, keys, check, healthcheck
- ``app.cli.gallery``: enroll, sync, reindex
- ``app.cli.site``: calibrate, adapt
- ``app.cli.analysis``: audit, risk

``app.cli.common`` holds what they share (logging, settings from the flags, the model and the gallery).
Heavy imports happen inside each command so that ``cxr-reid --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from app.cli import analysis, gallery, model, service, site
from app.cli.common import configure_logging, log

#: The groups in the order their subcommands are listed by ``cxr-reid --help``.
GROUPS = (model, service, gallery, site, analysis)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-reid", description="Chest X-ray patient re-identification")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130

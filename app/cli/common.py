"""What every ``cxr-reid`` command group shares: the logger, logging set-up, settings from the
environment overridden by the flags, the model and the gallery those settings name, and the flags
that set them (``--model``, ``--data-dir``, ``--device``).

Nothing heavy is imported here at module level: torch, faiss and the settings load inside the
helpers, so ``cxr-reid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.settings import Settings
    from index import Gallery
    from models.net.embedder import Embedder

#: The subparsers action of the ``cxr-reid`` parser that each group's ``register`` adds to.
Subparsers = argparse._SubParsersAction

log = logging.getLogger("cxr_reid")


def configure_logging(verbose: bool) -> None:
    """Log to stderr, debug with ``-v``; quiet faiss's loader, which reads like a failure."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # faiss's loader logs each instruction-set build it tries and fails to find (a ModuleNotFoundError
    # that reads like a failure); the service says once which build it runs instead (index.faiss_build).
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # httpx logs every request at INFO: a line per file for `enroll --to`; -v shows them
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by the flags the user gave."""
    from app.settings import Settings

    given = {
        "model_path": getattr(args, "model", None),
        "data_dir": getattr(args, "data_dir", None),
        "init": True if getattr(args, "init", False) else None,
        "insecure": True if getattr(args, "insecure", False) else None,
        "device": getattr(args, "device", None),
        **extra,
    }
    return Settings(**{key: value for key, value in given.items() if value is not None})


def load_embedder(settings: Settings) -> Embedder:
    """The model of the settings (path, device, runtime), with torch's thread count applied."""
    from app.service.wiring import configure_torch_threads
    from models.net.embedder import Embedder

    configure_torch_threads(settings.torch_threads)
    return Embedder.from_checkpoint(settings.model_path, device=settings.device, runtime=settings.runtime)


def open_model_and_gallery(
    settings: Settings, *, allow_model_mismatch: bool = False, create: bool = True
) -> tuple[Embedder, Gallery]:
    """The model, then the gallery of ``settings.data_dir`` opened for it (``wiring.open_gallery``).

    ``create=False`` (every job but serve, enroll and sync, which exist to fill a gallery): a data
    dir without a gallery is ``GalleryNotFoundError`` before the model loads, and nothing is made."""
    from app.service.wiring import open_gallery

    if not create:
        require_gallery(settings)
    embedder = load_embedder(settings)
    return embedder, open_gallery(
        embedder, settings, allow_model_mismatch=allow_model_mismatch, create=create
    )


def require_gallery(settings: Settings) -> None:
    """``GalleryNotFoundError``, saying which commands make one, when the data dir holds no gallery."""
    from index import GalleryNotFoundError, holds_gallery

    if settings.database_url is not None:  # the gallery is the database's; the data dir is local
        from index.pg_store import holds_gallery as database_holds_gallery
        from index.pg_store import redacted

        url = settings.database_url.get_secret_value()
        if not database_holds_gallery(url):
            raise GalleryNotFoundError(
                f"no gallery in the database {redacted(url)} (CXR_REID_DATABASE_URL); nothing was "
                "created. Give the database of an existing gallery; `cxr-reid serve`, `enroll` and `sync` "
                "start a new one"
            )
        return
    if not holds_gallery(settings.data_dir):
        raise GalleryNotFoundError(
            f"no gallery in {settings.data_dir} (--data-dir, CXR_REID_DATA_DIR); nothing was created. Give "
            "the folder of an existing gallery; `cxr-reid serve`, `enroll` and `sync` start a new one"
        )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device for the bulk jobs (the values of models.net.embedder.DEVICES; torch is not imported here)."""
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: CXR_REID_DEVICE, else auto: the GPU when there is one)",
    )


#: Images per forward pass of the bulk jobs (enroll, reindex, audit, risk).
DEFAULT_BATCH_SIZE = 32


def add_batch_size_arg(parser: argparse.ArgumentParser) -> None:
    """--batch-size for the bulk jobs: larger is faster on a GPU, smaller needs less memory."""
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images embedded per forward pass (default %(default)s; lower it if memory runs short)",
    )


def add_settings_args(parser: argparse.ArgumentParser, *, data_dir: bool = True, model: bool = True) -> None:
    """--model and --data-dir, which override CXR_REID_MODEL_PATH and CXR_REID_DATA_DIR."""
    if model:
        parser.add_argument(
            "--model", help="checkpoint (default: CXR_REID_MODEL_PATH, else the shipped model)"
        )
    if data_dir:
        parser.add_argument(
            "--data-dir", help="gallery folder (default: CXR_REID_DATA_DIR, else ./cxr-reid-data)"
        )

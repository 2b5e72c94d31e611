"""One place that builds the service from settings, for the API, the CLI and PACS sync alike: the
process set-up (threads, allocator), the gallery with its index options, the alert webhook and
``ReidService`` with its limits. Each caller adds only its own hooks (the API its metrics)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from app.service.decoding import DecodeBudget
from app.service.reid import ReidService
from app.service.webhook import AlertWebhook
from app.settings import MIB, Settings
from index import (
    AlertRecord,
    Gallery,
    GalleryError,
    GalleryIntegrityError,
    GalleryLockedError,
    GalleryModelMismatchError,
    faiss_build,
)
from models.net.embedder import Embedder

log = logging.getLogger(__name__)

#: errno values that mean the data dir cannot be written (a read-only volume, the wrong owner).
UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

#: glibc mallopt parameters: large blocks straight from (and back to) the OS, and few arenas.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def configure_torch_threads(threads: int | None) -> None:
    """One forward pass at a time may use every core; more threads than cores only thrash."""
    import torch

    torch.set_num_threads(threads or max(1, min(8, os.cpu_count() or 1)))


def configure_allocator() -> None:
    """Give decoded images' memory back to the OS when a request ends.

    glibc keeps memory a thread freed in that thread's arena, and raises its mmap threshold as large
    blocks are freed: six threadpool threads decoding one 7000 x 7000 image each in turn left the
    process 1.4 GB larger, not the ~0.4 GB one decode needs, which defeats the decode budget. A fixed
    1 MiB mmap threshold and two arenas keep the peak at one decode's worth. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    mallopt(_M_ARENA_MAX, 2)


def open_gallery(
    embedder: Embedder, settings: Any, *, allow_model_mismatch: bool = False, create: bool = True
) -> Gallery:
    """Open the gallery in ``settings.data_dir`` for this model (one place for the index options);
    ``create=False`` for a job that must find one there (``GalleryNotFoundError``, nothing made)."""
    return Gallery(
        settings.data_dir,
        dim=embedder.dim,
        model_id=embedder.model_id,
        index_factory=settings.index_factory,
        nprobe=settings.nprobe,
        ef_search=settings.ef_search,
        allow_model_mismatch=allow_model_mismatch,
        init=settings.init,
        create=create,
        database_url=settings.database_url.get_secret_value() if settings.database_url else None,
        blob_dir=settings.blob_dir,
        follow_poll_seconds=settings.follow_poll_seconds,
        vector_url=settings.vector_url.get_secret_value() if settings.vector_url else None,
    )


def build_webhook(settings: Settings, on_outcome: Callable[[str], None] | None = None) -> AlertWebhook | None:
    """The alert webhook the settings name, or None; the server and ``cxr-reid sync`` send alike."""
    if settings.alert_webhook is None:
        return None
    webhook = AlertWebhook(
        settings.alert_webhook,
        attempts=settings.alert_webhook_attempts,
        backoff_seconds=settings.alert_webhook_backoff_seconds,
        secret=(settings.alert_webhook_secret.get_secret_value() if settings.alert_webhook_secret else None),
        on_outcome=on_outcome,
    )
    log.info("wrong-patient alerts are sent to the webhook at %s", webhook.host)
    return webhook


def service_for(
    settings: Settings,
    embedder: Embedder,
    gallery: Gallery | None,
    *,
    gallery_problem: str | None = None,
    gallery_locked: bool = False,
    on_embedded: Callable[[int], None] | None = None,
    on_alert: Callable[[str], None] | None = None,
    on_alert_event: Callable[[str, AlertRecord], None] | None = None,
    next_embedder: Embedder | None = None,
) -> ReidService:
    """``ReidService`` with the operating point and the limits the settings give (one place)."""
    return ReidService(
        embedder,
        gallery,
        default_far=settings.far_for(embedder.calibration),
        default_threshold=settings.threshold,
        max_pixels=settings.max_pixels,
        decode_budget=DecodeBudget(settings.max_decode_mb * MIB, settings.decode_wait_seconds),
        gallery_problem=gallery_problem,
        gallery_locked=gallery_locked,
        on_embedded=on_embedded,
        on_alert=on_alert,
        on_alert_event=on_alert_event,
        next_embedder=next_embedder,
    )


def build_service(settings: Settings, embedder: Embedder | None = None, **hooks: Any) -> ReidService:
    """Load the model and open the gallery; a gallery of another model leaves the service unready.
    ``hooks`` are :func:`service_for`'s ``on_*`` callbacks."""
    configure_torch_threads(settings.torch_threads)
    configure_allocator()
    if embedder is None:
        embedder = Embedder.from_checkpoint(
            settings.model_path, device=settings.device, runtime=settings.runtime
        )
    next_embedder = None
    if settings.next_model_path is not None:
        next_embedder = Embedder.from_checkpoint(
            settings.next_model_path, device=settings.device, runtime=settings.runtime
        )
        log.info("next model %s loaded: a reindex to it switches this service over", next_embedder.model_id)
    embedder, next_embedder, (gallery, problem, locked) = _open_current(embedder, next_embedder, settings)
    if locked:
        log.error("gallery in %s cannot be opened yet: %s", settings.data_dir, problem)
    service = service_for(
        settings,
        embedder,
        gallery,
        gallery_problem=problem,
        gallery_locked=locked,
        next_embedder=next_embedder,
        **hooks,
    )
    log.info(
        "serving model %s (dim %d) with %d gallery image(s) from %s; %s",
        embedder.model_id,
        embedder.dim,
        service.gallery_size(),
        settings.data_dir,
        faiss_build(),
    )
    return service


def _open_current(
    embedder: Embedder, next_embedder: Embedder | None, settings: Settings
) -> tuple[Embedder, Embedder | None, tuple[Gallery | None, str | None, bool]]:
    """``open_or_explain`` with the model the gallery holds: the next model's when the switch to it
    was made while this process was down (then it is simply the model)."""
    try:
        return embedder, next_embedder, (open_gallery(embedder, settings), None, False)
    except GalleryModelMismatchError as exc:
        if next_embedder is not None:
            try:
                gallery = open_gallery(next_embedder, settings)
            except GalleryError:
                pass  # it holds neither model: explained for this one, below
            else:
                log.info("the gallery holds model %s's vectors already: serving it", next_embedder.model_id)
                return next_embedder, None, (gallery, None, False)
        return embedder, next_embedder, (None, *_explain(exc, embedder, settings))
    except GalleryError as exc:
        return embedder, next_embedder, (None, *_explain(exc, embedder, settings))


def open_or_explain(embedder: Embedder, settings: Settings) -> tuple[Gallery | None, str | None, bool]:
    """The gallery; or None, why it cannot be served (logged, except while another process holds
    it) and whether that is the lock, which is worth waiting out."""
    try:
        return open_gallery(embedder, settings), None, False
    except GalleryError as exc:
        return (None, *_explain(exc, embedder, settings))


def _explain(exc: GalleryError, embedder: Embedder, settings: Settings) -> tuple[str, bool]:
    """Why the gallery cannot be served (logged, unless it is the lock) and whether it is the lock."""
    if isinstance(exc, GalleryLockedError):
        return f"{exc}; this server opens it as soon as the other process lets go", True
    if isinstance(exc, GalleryModelMismatchError):
        problem = f"{exc} (run `cxr-reid reindex` to re-embed the gallery with model {embedder.model_id})"
    elif isinstance(exc, GalleryIntegrityError):
        problem = str(exc)
    else:  # anything else that keeps it closed, e.g. a read-only volume
        problem = str(exc)
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno in UNWRITABLE:
            problem += (
                f": the service writes its data dir (the gallery, its lock and index); mount "
                f"{settings.data_dir} read-write and give the service user its ownership"
            )
    log.error("gallery in %s will not be served: %s", settings.data_dir, problem)
    return problem, False


def open_when_unlocked(service: ReidService, settings: Settings, stop: threading.Event) -> None:
    """A second server on a locked data dir keeps trying, and becomes ready when the lock frees."""
    while not stop.wait(settings.lock_retry_seconds):
        try:
            gallery, problem, locked = open_or_explain(service.embedder, settings)
        except GalleryError as exc:  # any other reason it cannot be opened: say so, stop retrying
            gallery, problem, locked = None, str(exc), False
            log.error("gallery in %s cannot be served: %s", settings.data_dir, exc)
        if locked:
            continue
        if gallery is None:
            service.gallery_problem = problem
            return
        service.attach_gallery(gallery)
        log.info(
            "gallery in %s was released by the other process; serving %d image(s)",
            settings.data_dir,
            len(gallery),
        )
        return

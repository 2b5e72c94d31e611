"""Filling a gallery and keeping it current: ``enroll`` (a manifest or a folder), ``sync`` (from a PACS,
over DICOMweb or Orthanc's change feed), ``reindex`` (re-embed every image with the current model) and
``migrate`` (move a SQLite gallery into PostgreSQL, ``index.migrate_sqlite``; no model is loaded).

Each job opens the gallery itself, so the data dir must not be open in a running server; with
``--to URL`` ``enroll`` and ``sync`` send to that running server instead (``app.pacs.push``: POST
/images, STOW-RS) and open no gallery. ``sync`` builds its service and alert webhook through
``app.service.wiring``, as the server does.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from app.cli.common import (
    Subparsers,
    add_batch_size_arg,
    add_device_arg,
    add_settings_args,
    log,
    open_model_and_gallery,
    settings_from,
)

if TYPE_CHECKING:
    from app.pacs.push import ServiceClient
    from app.service.enrollment import BulkEnrolSummary, EnrolItem
    from app.service.reid import ReidService


#: Said after the lock error of enroll and sync: the way to feed a running server without stopping it.
USE_TO = (
    "; or leave it running and send to it: add --to URL (the server's address, e.g. "
    "http://127.0.0.1:8000) and, with API keys, a write key in CXR_REID_API_KEY"
)


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else CXR_REID_API_KEY (which stays out of the process list)."""
    import os

    return args.api_key or os.environ.get("CXR_REID_API_KEY") or None


def _enroll_summary(args: argparse.Namespace, summary: BulkEnrolSummary) -> int:
    """The one summary line of both paths, and their exit code: 1 when a file failed."""
    log.info(
        "enrolled %d, skipped %d already in collection '%s', failed %d (of %d files)",
        summary.enrolled,
        summary.skipped,
        args.collection,
        len(summary.failed),
        summary.total,
    )
    return 1 if summary.failed else 0


def _interrupted(args: argparse.Namespace, enrolled: int, skipped: int, extra: str = "") -> int:
    log.warning(
        "interrupted: %d image(s) enrolled and kept in collection '%s' (%d already there)%s; the rest "
        "were not: run the same command again to resume: %s",
        enrolled,
        args.collection,
        skipped,
        extra,
        getattr(args, "command_line", "cxr-reid enroll ..."),
    )
    return 130


def _enroll_to(args: argparse.Namespace, items: list[EnrolItem]) -> int:
    """``enroll --to URL``: each file to the running service's POST /images, ``--concurrency`` at a time.

    The service keeps what it answered for; a file it already holds under the same patient comes back
    ``already_enrolled`` (skipped), so a rerun after Ctrl-C or a failure resumes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    from app.pacs.push import ServiceClient, ServiceUnreachableError
    from app.service.enrollment import BulkEnrolSummary

    stop = threading.Event()
    target = ServiceClient(args.to, _api_key(args), concurrency=args.concurrency, stop=stop)
    summary = BulkEnrolSummary(total=len(items))
    try:
        target.check()
    except ServiceUnreachableError as exc:
        log.error("%s; nothing was sent", exc)
        target.close()
        return 2
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        with tqdm(total=len(items), desc="enrol", unit="img", disable=args.no_progress) as bar:
            futures = {
                pool.submit(
                    target.enrol_file,
                    item.path,
                    collection=args.collection,
                    patient_id=item.patient_id,
                    view=item.view,
                    split=item.split,
                    tags=item.tags,
                ): item
                for item in items
            }
            for future in as_completed(futures):
                pushed = future.result()
                bar.update(1)
                if pushed.status == "enrolled":
                    summary.enrolled += 1
                elif pushed.status == "already":
                    summary.skipped += 1
                else:
                    summary.failed.append((str(futures[future].path), pushed.reason))
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        return _interrupted(
            args,
            summary.enrolled,
            summary.skipped,
            f" (up to {args.concurrency} more in flight may be in too: a rerun skips them)",
        )
    except ServiceUnreachableError as exc:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        log.error(
            "%s; %d image(s) enrolled before it stopped are kept: run the same command again to resume",
            exc,
            summary.enrolled,
        )
        return 2
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        target.close()
    for path, reason in summary.failed:
        log.warning("not enrolled: %s (%s)", path, reason)
    return _enroll_summary(args, summary)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from app.service.enrollment import EnrolmentInterrupted, bulk_enrol, items_from_source
    from index import GalleryError, GalleryLockedError

    settings = settings_from(args)
    items = items_from_source(args.source)
    if not items:
        log.error("no images found in %s", args.source)
        return 1
    if args.to:
        if args.concurrency < 1:
            log.error("--concurrency %d: give at least 1", args.concurrency)
            return 2
        return _enroll_to(args, items)
    try:
        embedder, gallery = open_model_and_gallery(settings)
    except GalleryLockedError as exc:
        log.error("%s%s", exc, USE_TO)
        return 2
    except (GalleryError, ValueError) as exc:  # ValueError: no such device
        log.error("%s", exc)
        return 2
    try:
        summary = bulk_enrol(
            embedder,
            gallery,
            items,
            collection=args.collection,
            copy=args.copy,
            batch_size=args.batch_size,
            max_pixels=settings.max_pixels,
            progress=not args.no_progress,
        )
    except EnrolmentInterrupted as stopped:
        return _interrupted(args, stopped.summary.enrolled, stopped.summary.skipped)
    finally:
        gallery.close()
    return _enroll_summary(args, summary)


def _pacs_headers(args: argparse.Namespace) -> dict[str, str]:
    """--header 'Name: value' (repeatable), and CXR_REID_PACS_AUTHORIZATION for an Authorization
    header that stays out of the process list."""
    import os

    headers = {}
    for given in args.header or []:
        name, sep, value = given.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {given!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    if os.environ.get("CXR_REID_PACS_AUTHORIZATION"):
        headers.setdefault("Authorization", os.environ["CXR_REID_PACS_AUTHORIZATION"])
    return headers


def _sync_options(args: argparse.Namespace) -> dict[str, Any]:
    """What both sync paths read from the flags (ValueError, SyncUnavailableError when they cannot run)."""
    from app.pacs.bounded import MIB, SyncLimits
    from app.pacs.sync import check_pacs, parse_modalities, parse_since

    modalities = parse_modalities(args.modality)
    since = "last" if args.since == "last" else parse_since(args.since)
    headers = _pacs_headers(args)
    if args.orthanc_changes and args.since:
        raise ValueError("--since applies to --dicomweb; the change feed resumes from its cursor")
    settings = settings_from(args)
    limits = SyncLimits(
        request_seconds=args.request_timeout,
        max_query_bytes=int(args.max_query_mb * MIB),
        max_instance_bytes=settings.max_upload_bytes,
        max_pages=args.max_pages,
        max_studies=args.max_studies,
    )
    check_pacs(dicomweb=args.dicomweb, orthanc=args.orthanc_changes, headers=headers, limits=limits)
    return {
        "modalities": modalities,
        "since": since,
        "headers": headers,
        "settings": settings,
        "limits": limits,
    }


def _run_sync(args: argparse.Namespace, target: ReidService | ServiceClient, options: dict[str, Any]) -> int:
    """One sync run into ``target`` (this process's service, or a ServiceClient), signals handled; the
    summary line and the exit code of both paths."""
    import threading

    from app.pacs.bounded import stop_on_signals
    from app.pacs.push import ServiceClient
    from app.pacs.sync import SyncState, SyncUnavailableError, follow_orthanc_changes, sync_dicomweb

    stop = target.stop if isinstance(target, ServiceClient) else threading.Event()
    common = {
        "collection": args.collection,
        "modalities": options["modalities"],
        "headers": options["headers"],
        "stop": stop,
        "progress": not args.no_progress,
    }
    caught: list[int] = []
    try:
        state = SyncState(options["settings"].data_dir)
        with stop_on_signals(stop) as caught:
            if args.dicomweb:
                summary = sync_dicomweb(
                    target,
                    args.dicomweb,
                    state=state,
                    since=options["since"],
                    limits=options["limits"],
                    **common,
                )
            else:
                summary = follow_orthanc_changes(
                    target,
                    args.orthanc_changes,
                    state=state,
                    once=args.once,
                    poll_seconds=args.poll,
                    limits=options["limits"],
                    **common,
                )
    except SyncUnavailableError as exc:
        log.error("sync could not run: %s", exc)
        return 2
    log.info("sync %s: %s", args.dicomweb or args.orthanc_changes, summary.line())
    if caught and summary.interrupted and (args.dicomweb or args.once):
        log.warning("sync stopped by signal %d; the cursor is saved in %s", caught[0], state.path)
        return 128 + caught[0]
    return 1 if summary.failed else 0


def _sync_to(args: argparse.Namespace) -> int:
    """``sync --to URL``: fetch from the PACS as the local path does, store each instance in the running
    service by STOW-RS; the cursor stays in the data dir's sync-state.json, and no gallery is opened."""
    import threading

    from app.pacs.push import ServiceClient, ServiceUnreachableError
    from app.pacs.sync import SyncUnavailableError

    try:
        options = _sync_options(args)
    except SyncUnavailableError as exc:
        log.error("sync could not run: %s; nothing was sent", exc)
        return 2
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    target = ServiceClient(args.to, _api_key(args), concurrency=1, stop=threading.Event())
    try:
        target.check()
        return _run_sync(args, target, options)
    except ServiceUnreachableError as exc:
        log.error("sync stopped: %s; the cursor keeps what was done, run it again to resume", exc)
        return 2
    finally:
        target.close()


def _cmd_sync(args: argparse.Namespace) -> int:
    """Pull radiographs from a PACS (DICOMweb, or Orthanc's change feed); exit 0 done, 1 some
    instances failed, 2 could not run, 128 + the signal's number when SIGINT / SIGTERM stopped a
    --dicomweb or --once run (the cursor saved)."""
    from app.pacs.sync import SyncUnavailableError
    from app.service.wiring import build_webhook, service_for
    from index import GalleryError, GalleryLockedError

    if args.to:
        return _sync_to(args)
    try:
        options = _sync_options(args)  # the PACS first: a sync that cannot run starts no gallery
        settings = options["settings"]
        embedder, gallery = open_model_and_gallery(settings)
    except SyncUnavailableError as exc:
        log.error("sync could not run: %s; nothing was created", exc)
        return 2
    except GalleryLockedError as exc:
        log.error("%s%s", exc, USE_TO)
        return 2
    except (GalleryError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    webhook = build_webhook(settings)  # the alerts a sync raises reach the service's webhook too
    service = service_for(settings, embedder, gallery, on_alert_event=webhook.send if webhook else None)
    try:
        return _run_sync(args, service, options)
    finally:
        service.close()
        if webhook is not None:
            webhook.close()


def _cmd_reindex(args: argparse.Namespace) -> int:
    from app.service.enrollment import reindex_gallery
    from app.service.errors import InvalidInputError
    from index import GalleryError

    settings = settings_from(args)
    try:  # re-embeds a gallery that exists; a data dir without one fails, and nothing is made
        embedder, gallery = open_model_and_gallery(settings, allow_model_mismatch=True, create=False)
    except (GalleryError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    try:
        count = reindex_gallery(
            embedder,
            gallery,
            batch_size=args.batch_size,
            max_pixels=settings.max_pixels,
            progress=not args.no_progress,
            switch=not args.stage_only,
        )
    except InvalidInputError as exc:
        log.error(
            "reindex stopped: %s. Restore the file or delete the image (DELETE /images/{id}), then run "
            "`cxr-reid reindex` again: it resumes where it stopped",
            exc,
        )
        return 1
    finally:
        gallery.close()
    if args.stage_only:
        log.info(
            "staged %d image(s) with model %s; the gallery still serves the old model. Run "
            "`cxr-reid reindex` without --stage-only to switch (it embeds only what came since)",
            count,
            embedder.model_id,
        )
    else:
        log.info("re-embedded %d image(s) with model %s", count, embedder.model_id)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Copy a SQLite gallery into PostgreSQL; exit 0 verified, 1 differences found, 2 could not run
    (the target refused: nothing written), 130 interrupted (a rerun resumes)."""
    import os

    from index.migrate_sqlite import migrate_sqlite
    from index.records import GalleryError

    url = args.target or os.environ.get("CXR_REID_DATABASE_URL")
    if not url:
        log.error(
            "give the target database: --to postgresql://... or CXR_REID_DATABASE_URL; nothing was written"
        )
        return 2
    try:
        summary = migrate_sqlite(
            args.source,
            url,
            blob_dir=args.blob_dir,
            batch_size=args.batch_rows,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        log.warning(
            "interrupted: the batches committed so far are kept; run the same command again to resume: %s",
            getattr(args, "command_line", "cxr-reid migrate ..."),
        )
        return 130
    except GalleryError as exc:
        log.error("%s", exc)
        return 2
    if not summary.verified:
        log.error("migrate: %s; differs: %s", summary.line(), "; ".join(summary.differences))
        return 1
    log.info("migrated %s", summary.line())
    return 0


def _add_to_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--to and --api-key: feed a running server instead of opening its gallery (locked while it runs)."""
    parser.add_argument(
        "--to",
        metavar="URL",
        help=f"send to the running cxr-reid service at URL ({what}) instead of opening the gallery, so "
        "the server keeps running; no model is loaded here",
    )
    parser.add_argument(
        "--api-key",
        help="--to: a key with the write scope (default: CXR_REID_API_KEY, which stays out of the "
        "process list)",
    )


def register(subparsers: Subparsers) -> None:
    """Add enroll, sync, reindex and migrate to ``cxr-reid``."""
    p = subparsers.add_parser(
        "enroll",
        help="bulk-enrol a manifest or a folder of images into a gallery (resumable)",
        description="Manifest: CSV path,patient_id[,view,split,offset_days,...], paths relative to the CSV. "
        "Folder: every DICOM/PNG/JPEG/TIFF under it, patient id from the DICOM PatientID or unknown. "
        "Files already in the collection (same sha256) are skipped, so a rerun resumes.",
    )
    p.add_argument("source", metavar="MANIFEST_OR_FOLDER", help="a manifest CSV or a folder of images")
    p.add_argument("--collection", default="default", help="gallery collection (default: default)")
    p.add_argument("--copy", action="store_true", help="store copies of the originals instead of their paths")
    p.add_argument(
        "--init", action="store_true", help="allow a new gallery where stored data but no database is"
    )
    add_batch_size_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_to_args(p, "each file to its POST /images")
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="--to: files sent at once (default: %(default)s)",
    )
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_enroll)

    p = subparsers.add_parser(
        "sync",
        help="pull radiographs from a PACS: DICOMweb (QIDO-RS + WADO-RS) or Orthanc's change feed",
        description="--dicomweb URL: one pass over the PACS's studies (oldest first), resumable: the "
        "studies fully done are kept in DATA_DIR/sync-state.json and not fetched again."
        " --orthanc-changes URL: follow "
        "Orthanc's /changes feed (its REST root), resuming from the stored sequence number, until stopped"
        " (SIGINT/SIGTERM) or, with --once, until caught up. SIGINT/SIGTERM stop a run within a second, the "
        "cursor saved (exit 128 + the signal's number, but 0 for a follower without --once). The --since "
        "last cursor never passes a study that failed: it is retried by the next run. Each instance is"
        " enrolled under its DICOM PatientID / StudyInstanceUID / SOPInstanceUID / ViewPosition with the "
        "wrong-patient check; instances already in the collection are skipped, non-radiographs refused. "
        "The gallery must not be open in a running server, except with --to URL: then each instance goes "
        "to that server by STOW-RS. Exit 0 done, 1 some instances failed, 2 could "
        "not run.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicomweb", metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    source.add_argument("--orthanc-changes", metavar="URL", help="Orthanc's REST root, e.g. http://pacs:8042")
    p.add_argument(
        "--since",
        help="--dicomweb: studies from this StudyDate on (YYYY-MM-DD), or 'last': from the newest "
        "StudyDate an earlier run saw",
    )
    p.add_argument("--modality", help="comma-separated radiograph modalities to enrol (default: CR,DR,DX,RG)")
    p.add_argument("--collection", default="default", help="gallery collection (default: default)")
    p.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="HTTP header for the PACS (repeatable); CXR_REID_PACS_AUTHORIZATION sets Authorization",
    )
    p.add_argument("--once", action="store_true", help="--orthanc-changes: stop when caught up")
    p.add_argument(
        "--poll", type=float, default=5.0, help="--orthanc-changes: seconds between polls when caught up"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="the most one PACS request may take, its whole answer included, however "
        "slowly it comes (default: 300; a study whose request runs out fails and is retried next run)",
    )
    p.add_argument(
        "--max-pages",
        type=int,
        default=500,
        help="--dicomweb: QIDO-RS pages of 100 studies asked for per run (default: 500)",
    )
    p.add_argument(
        "--max-studies",
        type=int,
        default=10_000,
        help="--dicomweb: studies looked at per run; the rest are left for the next (default: 10000)",
    )
    p.add_argument(
        "--max-query-mb",
        type=float,
        default=4.0,
        metavar="MB",
        help="largest QIDO-RS (or Orthanc JSON) answer, refused past it (default: 4); one retrieved instance "
        "may be as large as the service's upload limit (CXR_REID_MAX_UPLOAD_BYTES)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_to_args(p, "each instance by STOW-RS; the cursor stays in DATA_DIR")
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_sync)

    p = subparsers.add_parser(
        "reindex",
        help="re-embed every gallery image with the current model (resumable)",
        description="Needed after changing the model: a gallery refuses to serve vectors of another model. "
        "The new vectors are staged beside the old ones while the gallery serves on, then one transaction "
        "switches every vector and the gallery's model. With PostgreSQL, replicas started with "
        "CXR_REID_NEXT_MODEL_PATH set to this model switch over at that moment without a restart "
        "(docs/scale-out.md).",
    )
    p.add_argument(
        "--stage-only",
        action="store_true",
        help="embed and stage the new vectors, do not switch (the gallery keeps serving the old model)",
    )
    add_batch_size_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_reindex)

    p = subparsers.add_parser(
        "migrate",
        help="move a SQLite gallery and its stored originals into PostgreSQL (resumable, verified)",
        description="Copies every row of the gallery in --from (ids kept) into the PostgreSQL database "
        "--to, created there if new, and each stored original into --blob-dir; then compares both sides "
        "(row counts, a digest of every row, the originals' sha256). The source is only read: a server "
        "may keep running on it, but what it adds after the start is copied by the next run only. Run "
        "again after an interruption: it resumes. A database holding another gallery is refused. Start "
        "the replicas once it says verified. Exit 0 verified, 1 differences found, 2 could not run.",
    )
    p.add_argument(
        "--from", dest="source", metavar="DATA_DIR", required=True, help="the SQLite gallery's folder"
    )
    p.add_argument(
        "--to",
        dest="target",
        metavar="URL",
        help="the PostgreSQL database, postgresql://user@host/db: empty, or this gallery's earlier "
        "migration (default: CXR_REID_DATABASE_URL, which keeps a password out of the process list)",
    )
    p.add_argument(
        "--blob-dir",
        metavar="DIR",
        help="where the replicas' stored originals go (CXR_REID_BLOB_DIR of the replicas; default: "
        "DATA_DIR/images itself, then only checked)",
    )
    p.add_argument(
        "--batch-rows",
        type=int,
        default=1000,
        metavar="N",
        help="rows per database transaction (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_migrate)

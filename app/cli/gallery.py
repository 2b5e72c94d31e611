"""Filling a gallery and keeping it current: ``enroll`` (a manifest or a folder), ``sync`` (from a PACS,
over DICOMweb or Orthanc's change feed) and ``reindex`` (re-embed every image with the current model).

Each job opens the gallery itself, so the data dir must not be open in a running server. ``sync``
builds its service and alert webhook through ``app.service.wiring``, as the server does.
"""

from __future__ import annotations

import argparse

from app.cli.common import (
    Subparsers,
    add_batch_size_arg,
    add_device_arg,
    add_settings_args,
    log,
    open_model_and_gallery,
    settings_from,
)


def _cmd_enroll(args: argparse.Namespace) -> int:
    from app.service.enrollment import EnrolmentInterrupted, bulk_enrol, items_from_source
    from index import GalleryError

    settings = settings_from(args)
    items = items_from_source(args.source)
    if not items:
        log.error("no images found in %s", args.source)
        return 1
    try:
        embedder, gallery = open_model_and_gallery(settings)
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
        done = stopped.summary
        log.warning(
            "interrupted: %d image(s) enrolled and kept in collection '%s' (%d already there); the rest "
            "were not: run the same command again to resume: %s",
            done.enrolled,
            args.collection,
            done.skipped,
            getattr(args, "command_line", "cxr-reid enroll ..."),
        )
        return 130
    finally:
        gallery.close()
    log.info(
        "enrolled %d, skipped %d already in collection '%s', failed %d (of %d files)",
        summary.enrolled,
        summary.skipped,
        args.collection,
        len(summary.failed),
        summary.total,
    )
    return 1 if summary.failed else 0


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


def _cmd_sync(args: argparse.Namespace) -> int:
    """Pull radiographs from a PACS (DICOMweb, or Orthanc's change feed); exit 0 done, 1 some
    instances failed, 2 could not run, 128 + the signal's number when SIGINT / SIGTERM stopped a
    --dicomweb or --once run (the cursor saved)."""
    import threading

    from app.pacs.sync import (
        MIB,
        SyncLimits,
        SyncState,
        SyncUnavailableError,
        check_pacs,
        follow_orthanc_changes,
        parse_modalities,
        parse_since,
        stop_on_signals,
        sync_dicomweb,
    )
    from app.service.wiring import build_webhook, service_for
    from index import GalleryError

    try:
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
        # the PACS first: a sync that cannot run starts no gallery
        check_pacs(dicomweb=args.dicomweb, orthanc=args.orthanc_changes, headers=headers, limits=limits)
        embedder, gallery = open_model_and_gallery(settings)
    except SyncUnavailableError as exc:
        log.error("sync could not run: %s; nothing was created", exc)
        return 2
    except (GalleryError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    webhook = build_webhook(settings)  # the alerts a sync raises reach the service's webhook too
    service = service_for(settings, embedder, gallery, on_alert_event=webhook.send if webhook else None)
    stop = threading.Event()
    common = {
        "collection": args.collection,
        "modalities": modalities,
        "headers": headers,
        "stop": stop,
        "progress": not args.no_progress,
    }
    caught: list[int] = []
    try:
        state = SyncState(settings.data_dir)
        with stop_on_signals(stop) as caught:
            if args.dicomweb:
                summary = sync_dicomweb(
                    service, args.dicomweb, state=state, since=since, limits=limits, **common
                )
            else:
                summary = follow_orthanc_changes(
                    service,
                    args.orthanc_changes,
                    state=state,
                    once=args.once,
                    poll_seconds=args.poll,
                    limits=limits,
                    **common,
                )
    except SyncUnavailableError as exc:
        log.error("sync could not run: %s", exc)
        return 2
    finally:
        service.close()
        if webhook is not None:
            webhook.close()
    log.info("sync %s: %s", args.dicomweb or args.orthanc_changes, summary.line())
    if caught and summary.interrupted and (args.dicomweb or args.once):
        log.warning("sync stopped by signal %d; the cursor is saved in %s", caught[0], state.path)
        return 128 + caught[0]
    return 1 if summary.failed else 0


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
    log.info("re-embedded %d image(s) with model %s", count, embedder.model_id)
    return 0


def register(subparsers: Subparsers) -> None:
    """Add enroll, sync and reindex to ``cxr-reid``."""
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
        "The gallery must not be open in a running server. Exit 0 done, 1 some instances failed, 2 could "
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
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_sync)

    p = subparsers.add_parser(
        "reindex",
        help="re-embed every gallery image with the current model (resumable)",
        description="Needed after changing the model: a gallery refuses to serve vectors of another model.",
    )
    add_batch_size_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    add_settings_args(p)
    p.set_defaults(func=_cmd_reindex)

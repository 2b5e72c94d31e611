"""Gallery and service subcommands of ``cxr-reid``: serve, healthcheck, check, enroll, sync, reindex,
calibrate, adapt, audit, risk.

``register(subparsers)`` adds them to the CLI in ``app/cli.py``. Every command reads the same
``CXR_REID_*`` settings as the service; its flags override them. Heavy imports happen inside the
commands so ``cxr-reid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

log = logging.getLogger("cxr_reid")


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
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


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args, host=args.host, port=args.port, workers=args.workers)
    if settings.workers > 1:
        log.error(
            "--workers %d: a gallery data dir can be open in one process only (the gallery holds a file "
            "lock and an in-memory index); run one worker, which serves requests from a thread pool",
            settings.workers,
        )
        return 2
    if not _keys_configured(settings):
        if settings.host not in LOOPBACK_HOSTS and not settings.insecure:
            log.error(
                "no API key is configured, so the API would be open to anyone who can reach %s: add "
                "one (`cxr-reid keys add --scope admin`, or CXR_REID_API_KEYS) or pass --insecure "
                "(CXR_REID_INSECURE=1) to serve it open anyway",
                settings.host,
            )
            return 2
        log.warning(
            "no API key is configured: the API is open to every client that can reach %s:%d "
            "(`cxr-reid keys add` to require keys)",
            settings.host,
            settings.port,
        )
    import uvicorn  # only now: a refused start says so without loading torch first

    from app.main import create_app
    from models.net.embedder import DEFAULT_CHECKPOINT

    checkpoint = settings.model_path or DEFAULT_CHECKPOINT
    if not checkpoint.is_file():  # fail here, with a plain message, not in uvicorn's start-up traceback
        what = "checkpoint" if settings.model_path else "the shipped default model (pass --model)"
        raise FileNotFoundError(f"{what} not found: {checkpoint}")
    log.info("serving on http://%s:%d (data dir %s)", settings.host, settings.port, settings.data_dir)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        reload=False,
        access_log=False,  # it logs raw paths and query strings (patient ids); app.access logs templates
    )
    return 0


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _keys_configured(settings: Any) -> bool:
    from app.service.keys import KeyStore

    return bool(settings.api_key_list) or bool(KeyStore(settings.keys_path).keys())


def _cmd_keys(args: argparse.Namespace) -> int:
    """Manage the scoped API keys of a data dir; the running service sees changes at once."""
    from app.service.keys import KeyStore

    settings = _settings(args)
    store = KeyStore(settings.keys_path)
    if args.action == "add":
        key, token = store.add(args.scope, note=args.note or "", collections=args.collection)
        sys.stderr.write(
            f"added key {key.key_id} (scope {key.scope}) to {store.path}; give the client this key, "
            "it is not shown again:\n"
        )
        sys.stdout.write(token + "\n")
    elif args.action == "list":
        sys.stdout.write(json.dumps([k.public() for k in store.keys().values()], indent=2) + "\n")
    elif not store.revoke(args.key_id):
        sys.stderr.write(f"no key {args.key_id!r} in {store.path}\n")
        return 1
    else:
        sys.stderr.write(f"revoked key {args.key_id}\n")
    return 0


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 only when the local service answers /readyz with 200 (the container HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    port = args.port or _settings(args).port
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        sys.stderr.write(f"not ready: {url} answered {exc.code}: {detail}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"not ready: {url} did not answer ({exc})\n")
        return 1
    sys.stdout.write(f"ready: {url} answered {status}\n")
    return 0 if status == 200 else 1


def _embedder(settings: Any) -> Any:
    """The model of the settings (path, device, runtime), with torch's thread count applied."""
    from app.service.wiring import configure_torch_threads
    from models.net.embedder import Embedder

    configure_torch_threads(settings.torch_threads)
    return Embedder.from_checkpoint(settings.model_path, device=settings.device, runtime=settings.runtime)


def _open(settings: Any, *, allow_model_mismatch: bool = False) -> tuple[Any, Any]:
    from app.service.wiring import open_gallery

    embedder = _embedder(settings)
    return embedder, open_gallery(embedder, settings, allow_model_mismatch=allow_model_mismatch)


def _cmd_check(args: argparse.Namespace) -> int:
    """Open the gallery offline the way the service does (integrity checks, orphan clean-up, FAISS
    rebuilt if stale) and report; exit 1 with the reason when it cannot be served."""
    from index import GalleryError

    settings = _settings(args)
    try:
        _, gallery = _open(settings, allow_model_mismatch=True)
    except GalleryError as exc:
        sys.stderr.write(f"check failed: {exc}\n")
        return 1
    with gallery:
        report = {
            "data_dir": str(gallery.data_dir),
            "images": len(gallery),
            "collections": gallery.collections(),
            "gallery_model_id": gallery.stored_model_id,
            "orphaned_originals_removed": gallery.remove_orphan_blobs(),
            "index_matches_database": gallery.is_consistent(),
            "index": gallery.effective_index_factory,
            "index_rebuilding": gallery.index_rebuilding,
        }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if report["index_matches_database"] else 1


def _cmd_enroll(args: argparse.Namespace) -> int:
    from app.service.enrollment import bulk_enrol, items_from_source
    from index import GalleryError

    settings = _settings(args)
    items = items_from_source(args.source)
    if not items:
        log.error("no images found in %s", args.source)
        return 1
    try:
        embedder, gallery = _open(settings)
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
    instances failed, 2 could not run."""
    import threading

    from app.pacs.sync import (
        SyncState,
        SyncUnavailableError,
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
        settings = _settings(args)
        embedder, gallery = _open(settings)
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
    try:
        state = SyncState(settings.data_dir)
        with stop_on_signals(stop):
            if args.dicomweb:
                summary = sync_dicomweb(service, args.dicomweb, state=state, since=since, **common)
            else:
                summary = follow_orthanc_changes(
                    service,
                    args.orthanc_changes,
                    state=state,
                    once=args.once,
                    poll_seconds=args.poll,
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
    return 1 if summary.failed else 0


def _cmd_reindex(args: argparse.Namespace) -> int:
    from app.service.enrollment import reindex_gallery
    from app.service.errors import InvalidInputError
    from index import GalleryError

    settings = _settings(args)
    try:
        embedder, gallery = _open(settings, allow_model_mismatch=True)
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


def _cmd_audit(args: argparse.Namespace) -> int:
    from app.analysis.audit import run_audit
    from app.analysis.audit_report import format_summary, write_outputs
    from app.analysis.corpus import CorpusError
    from app.reports import prepare_out_dir

    settings = _settings(args)
    try:
        out_dir = prepare_out_dir(args.out)
        embedder = _embedder(settings)
        result = run_audit(
            embedder,
            args.sources,
            out_dir,
            far=args.far,
            threshold=args.threshold,
            default_far=settings.far,
            split_level=args.split_level,
            batch_size=args.batch_size,
            max_pixels=settings.max_pixels,
            progress=not (args.no_progress or args.json),
        )
        report = write_outputs(result, out_dir, embedder)
    except (CorpusError, OSError) as exc:
        log.error("audit could not run: %s", exc)
        return 2
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_summary(report, out_dir)) + "\n")
    return 0 if report["clean"] else 1


def _cmd_risk(args: argparse.Namespace) -> int:
    """Re-identification risk of a release against identified reference images (app/risk.py)."""
    from app.analysis.risk import RiskError, RiskInputs, run, summary_of

    settings = _settings(args)
    embedder = _embedder(settings)
    inputs = RiskInputs(
        release=args.release,
        reference=args.reference,
        out=args.out,
        fars=args.far,
        defences=args.defences,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        max_pixels=settings.max_pixels,
        progress=not (args.no_progress or args.json),
    )
    try:
        report = run(inputs, embedder)
    except RiskError as exc:
        log.error("%s", exc)
        return 2
    log.info("%s; report: %s/report.html", report["headline"], args.out)
    if args.json:
        sys.stdout.write(json.dumps(summary_of(report), indent=2) + "\n")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from app.service.errors import ServiceError
    from models.scoring.calibration import Calibration
    from models.scoring.decide import parse_fars

    try:
        fars = parse_fars(args.far)
    except ValueError as exc:
        log.error("--far: %s", exc)
        return 2
    settings = _settings(args)
    if args.manifest:
        from models.scoring.site import CalibrationRefusedError, calibrate_checkpoint

        if args.data_dir:
            log.error("give --manifest (a site's labelled images) or --data-dir (a gallery), not both")
            return 2
        if not args.out:
            log.error("--manifest needs --out SITE.pt: the calibrated copy of the checkpoint to write")
            return 2
        try:
            calibration: Calibration = calibrate_checkpoint(
                args.manifest,
                args.out,
                model=settings.model_path,
                fars=fars,
                default_far=settings.far,
                bootstrap=args.bootstrap,
                score_norm=args.score_norm == "as-norm",
                progress=not (args.no_progress or args.json),
            )
        except CalibrationRefusedError as exc:
            log.error("%s; nothing written", exc)
            return 1
        where = f"wrote {args.out}: serve it with `cxr-reid serve --model {args.out}`"
    else:
        from app.service.clientargs import collection_arg
        from app.service.wiring import service_for
        from index import GalleryError

        if args.out:
            log.error("--out is for --manifest; the gallery form keeps the calibration in the gallery")
            return 2
        try:
            embedder, gallery = _open(settings)
        except GalleryError as exc:
            log.error("%s", exc)
            return 2
        try:
            service = service_for(settings, embedder, gallery)
            calibration = service.calibrate(
                fars=fars,
                collection=collection_arg(args.collection),
                bootstrap=args.bootstrap,
                score_norm=args.score_norm == "as-norm",
            )
        except ServiceError as exc:
            log.error("%s", exc.detail)
            return 1
        finally:
            gallery.close()
        where = f"kept in the gallery {settings.data_dir}; `cxr-reid serve` uses it from its next start"
    report = {**calibration.summary(), "thresholds": calibration.thresholds, **calibration.provenance}
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        lines = [
            f"site calibration ({report['score_norm'] or 'raw cosines'}) on {report['images']} images of "
            f"{report['patients']} patients "
            f"({report['genuine_pairs']:,} same-patient / {report['impostor_pairs']:,} "
            "different-patient pairs)"
        ]
        for far, threshold in calibration.thresholds.items():
            low, high = report["threshold_ci"].get(far, (float("nan"), float("nan")))
            lines.append(f"  FAR {far}: threshold {threshold:.4f}  [95% CI {low:.4f}, {high:.4f}]")
        lines.append(where)
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _site_data(args: argparse.Namespace, settings: Any) -> Any:
    """The site's labelled images for ``adapt``: a manifest CSV, a DICOM folder, or a gallery."""
    from pathlib import Path

    from models.training.adapt import SiteData
    from models.training.data import check_files_exist, read_dicom_folder, read_manifest

    if args.manifest:
        source = Path(args.manifest)
        if source.is_dir():
            samples, skipped = read_dicom_folder(source)
            if skipped:
                log.warning(
                    "%d file(s) under %s are not DICOM or carry no PatientID: left out", skipped, source
                )
            return SiteData(samples, f"DICOM folder {source.name}")
        samples = read_manifest(source)
        check_files_exist(samples, source)
        return SiteData(samples, f"manifest {source.name}")
    from index import GalleryError
    from models.training.data import Sample

    data_dir = Path(settings.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no gallery at {data_dir} (--data-dir); nothing was created")
    try:
        _, gallery = _open(settings, allow_model_mismatch=True)
    except GalleryError as exc:
        raise ValueError(str(exc)) from None
    samples, unlabelled, offset = [], 0, 0
    try:
        while True:
            records, total = gallery.list_images(collection=None, offset=offset, limit=1000)
            for record in records:
                path = record.stored_path or record.source_path
                if record.patient_id is None or path is None:
                    unlabelled += 1
                    continue
                key = f"{record.collection}:{record.patient_id}"
                samples.append(Sample(path=path, patient_id=key, dataset=record.collection))
            offset += len(records)
            if not records or offset >= total:
                break
    finally:
        gallery.close()
    if unlabelled:
        log.info("%d gallery image(s) without a patient id or an original: left out", unlabelled)
    return SiteData(samples, f"gallery {data_dir.name}")


def _cmd_adapt(args: argparse.Namespace) -> int:
    from models.scoring.decide import parse_fars
    from models.training.adapt import AdaptRefusedError, AdaptSettings, adapt
    from models.training.data import ManifestError

    if bool(args.manifest) == bool(args.data_dir):
        log.error("give --manifest (a CSV or a DICOM folder) or --data-dir (a gallery, server stopped)")
        return 2
    try:
        fars = parse_fars(args.far)
    except ValueError as exc:
        log.error("--far: %s", exc)
        return 2
    settings = _settings(args)
    try:
        site = _site_data(args, settings)
        result = adapt(
            site,
            args.out,
            model=settings.model_path,
            settings=AdaptSettings(
                steps=args.steps,
                minutes=args.minutes,
                lr=args.lr if args.lr is not None else AdaptSettings.lr,
                fars=tuple(fars),
                default_far=settings.far,
                holdout_fraction=args.holdout,
                seed=args.seed,
                save_every_s=args.save_every,
                device=_embedder_device(settings),
            ),
            work_dir=args.work,
            name=args.name,
            progress=not (args.no_progress or args.json),
        )
    except (AdaptRefusedError, ManifestError) as exc:
        log.error("%s; nothing written", exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(_format_adaptation(result) + "\n")
    if not result.written:
        log.error("%s; nothing written", result.reason)
        return 1
    return 0


def _embedder_device(settings: Any) -> str:
    from models.net.embedder import resolve_device

    return str(resolve_device(settings.device))


def _format_adaptation(result: Any) -> str:
    """The held-back figures before and after, as a site would read them."""
    split = result.split
    lines = [
        f"held back to prove the change: {split['proof_images']} images of {split['proof_patients']} "
        f"patients ({split['proof_genuine_pairs']:,} same-patient / {split['proof_impostor_pairs']:,} "
        f"different-patient pairs); trained on {split['train_images']} images of "
        f"{split['train_patients']} patients, "
        f"{result.steps_run} steps in {result.minutes:.1f} min"
        + (" (stopped by --minutes)" if result.stopped_by_budget else ""),
        f"{'':24}{'base':>24}{'adapted':>24}",
    ]
    keys = ["auc", *[f"tar_at_far_{f}" for f in result.resolvable_fars], "precision_at_1"]
    for key in keys:
        cells = []
        for figures in (result.before, result.after):
            value, ci = figures.get(key), figures.get("ci", {}).get(key)
            cell = "-" if value is None else f"{value:.3f}"
            if ci:
                cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(cell)
        lines.append(f"  {key:<22}{cells[0]:>24}{cells[1]:>24}")
    low, high = result.delta_auc_ci
    lines.append(
        f"AUC difference {result.delta_auc:+.4f} [95% CI {low:+.4f}, {high:+.4f}] (paired patient bootstrap)"
    )
    if result.written:
        lines.append(
            f"wrote {result.out} ({result.model_id}), calibrated on the held-back patients "
            f"({'AS-norm' if result.calibration.get('score_norm') else 'raw cosines'}). A gallery holds the "
            f"base network's vectors: `cxr-reid reindex --model {result.out}` before "
            f"`cxr-reid serve --model {result.out}`"
        )
    return "\n".join(lines)


def _device_arg(parser: argparse.ArgumentParser) -> None:
    """--device for the bulk jobs (the values of models.net.embedder.DEVICES; torch is not imported here)."""
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default: CXR_REID_DEVICE, else auto: the GPU when there is one)",
    )


def _common(parser: argparse.ArgumentParser, *, data_dir: bool = True, model: bool = True) -> None:
    if model:
        parser.add_argument(
            "--model", help="checkpoint (default: CXR_REID_MODEL_PATH, else the shipped model)"
        )
    if data_dir:
        parser.add_argument(
            "--data-dir", help="gallery folder (default: CXR_REID_DATA_DIR, else ./cxr-reid-data)"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the gallery and service subcommands (see the module docstring) to ``cxr-reid``."""
    p = subparsers.add_parser("serve", help="run the HTTP service (uvicorn)")
    p.add_argument("--host", help="bind address (default: CXR_REID_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: CXR_REID_PORT, else 8000)")
    p.add_argument("--workers", type=int, help="worker processes; the gallery allows only 1")
    _common(p)
    p.add_argument(
        "--init",
        action="store_true",
        help="allow a new, empty gallery in a data dir that holds stored data but no database",
    )
    p.add_argument(
        "--insecure", action="store_true", help="serve beyond loopback even with no API key configured"
    )
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser(
        "keys",
        help="scoped API keys (read < write < admin), stored hashed in the data dir's keys.json",
        description="add prints the new key once (stdout); list shows ids, scopes and notes; revoke "
        "removes one. A running service picks the change up at its next request.",
    )
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="revoke: the key id (from list)")
    p.add_argument("--scope", choices=["read", "write", "admin"], default="read", help="add: default read")
    p.add_argument("--note", help="add: who or what the key is for")
    p.add_argument(
        "--collection",
        action="append",
        help="add: limit the key to this collection (repeat for several; default: every collection)",
    )
    _common(p, model=False)
    p.set_defaults(func=_cmd_keys)

    p = subparsers.add_parser(
        "check",
        help="integrity check of a gallery data dir, offline: database, stored originals, FAISS index",
        description="Runs SQLite's quick_check, refuses a data dir whose database is missing next to "
        "stored data, removes stored originals no row references and rebuilds a stale FAISS index, as "
        "the service does at start. Exit 0 when the gallery can be served, 1 with the reason if not.",
    )
    _common(p)
    p.set_defaults(func=_cmd_check)

    p = subparsers.add_parser(
        "healthcheck",
        help="exit 0 if the local service is ready (GET /readyz is 200), else 1: the container health check",
    )
    p.add_argument("--port", type=int, help="port (default: CXR_REID_PORT, else 8000)")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    p.set_defaults(func=_cmd_healthcheck)

    p = subparsers.add_parser(
        "enroll",
        help="bulk-enrol a manifest or a folder of images into a gallery (resumable)",
        description="Manifest: CSV path,patient_id[,view,split,offset_days,...], paths relative to the CSV. "
        "Folder: every DICOM/PNG/JPEG/TIFF under it, patient id from the DICOM PatientID or unknown. "
        "Files already in the collection (same sha256) are skipped, so a rerun resumes.",
    )
    p.add_argument("source", metavar="MANIFEST_OR_FOLDER")
    p.add_argument("--collection", default="default", help="gallery collection (default: default)")
    p.add_argument("--copy", action="store_true", help="store copies of the originals instead of their paths")
    p.add_argument(
        "--init", action="store_true", help="allow a new gallery where stored data but no database is"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(p)
    _common(p)
    p.set_defaults(func=_cmd_enroll)

    p = subparsers.add_parser(
        "sync",
        help="pull radiographs from a PACS: DICOMweb (QIDO-RS + WADO-RS) or Orthanc's change feed",
        description="--dicomweb URL: one pass over the PACS's studies (oldest first), resumable: the "
        "studies fully done are kept in DATA_DIR/sync-state.json and not fetched again."
        " --orthanc-changes URL: follow "
        "Orthanc's /changes feed (its REST root), resuming from the stored sequence number, until stopped"
        " (SIGINT/SIGTERM: after the current instance) or, with --once, until caught up. Each instance is"
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(p)
    _common(p)
    p.set_defaults(func=_cmd_sync)

    p = subparsers.add_parser(
        "reindex",
        help="re-embed every gallery image with the current model (resumable)",
        description="Needed after changing the model: a gallery refuses to serve vectors of another model.",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(p)
    _common(p)
    p.set_defaults(func=_cmd_reindex)

    p = subparsers.add_parser(
        "calibrate",
        help="fit thresholds on a site's own labelled images (the FAR promised is the FAR delivered)",
        description="A model's thresholds come from its validation patients and do not hold at a site unlike "
        "them. --manifest: embed the site's labelled images (CSV path,patient_id) and write a copy of the "
        "checkpoint carrying the site calibration to --out, for `evaluate`/`serve --model`. --data-dir (the "
        "server stopped; POST /calibration while it runs): fit on the gallery's labelled images and keep the "
        "calibration in the gallery. Refused, changing nothing, when the images cannot resolve a FAR asked "
        "for; the message says how many more are needed. Exit 0 done, 1 refused, 2 could not run.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", help="a site's labelled images: CSV path,patient_id (paths relative to it)"
    )
    p.add_argument("--out", help="with --manifest: the calibrated checkpoint to write")
    p.add_argument(
        "--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs to calibrate (default 1e-2,1e-3,1e-4)"
    )
    p.add_argument(
        "--collection", default="*", help='gallery form: collection to use ("*" = all, the default)'
    )
    p.add_argument("--bootstrap", type=int, default=200, help="patient bootstrap resamples for threshold CIs")
    p.add_argument(
        "--score-norm",
        choices=("as-norm", "none"),
        default="as-norm",
        help="normalise scores against a cohort of the site's images (AS-norm, the default: higher TAR at "
        "unseen sites, MODEL_CARD.md) or decide on raw cosines",
    )
    p.add_argument("--json", action="store_true", help="print the calibration summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_cmd_calibrate)

    p = subparsers.add_parser(
        "adapt",
        help="fine-tune the network on a site's own labelled images, prove it on held-back patients, "
        "calibrate",
        description="Learns the site: fine-tunes the model (default: the shipped one) on the site's "
        "labelled images, holding back about 30%% of its patients (by a hash of the id) that it never trains "
        "on; the base and the adapted network are measured on them, and the adapted checkpoint, calibrated "
        "on them, is written to --out only when it beats the base (AUC difference above 0 by a paired "
        "patient bootstrap, TAR at the largest FAR they resolve not lower). Guards against forgetting the "
        "training sets: a low learning rate, a short schedule and a pull of every weight towards the base. "
        "Budget: about 12 passes over the site's training images, 150 to 4,000 steps (on a 2-core CPU with "
        "bf16 about 0.8 s a step at 224 px: 500 site images take a few minutes, 50,000 under an hour), cut "
        "to fit --minutes. Resumable: run the same command again after an interruption. Then `cxr-reid "
        "reindex --model OUT` (a gallery holds the base network's vectors) and `cxr-reid serve --model OUT`. "
        "Exit 0 written, 1 no better than the base (nothing written), 2 could not run (too few patients or "
        "pairs: says how many more).",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", help="the site's labelled images: a CSV path,patient_id or a DICOM folder"
    )
    p.add_argument("--out", required=True, help="the adapted checkpoint to write")
    p.add_argument("--minutes", type=float, default=60.0, help="hard stop on the training (default 60)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: scaled with the data)")
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate (default: AdaptSettings.lr, low to keep what the base knows)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="share of patients held back to prove the change (default 0.3)",
    )
    p.add_argument(
        "--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs to calibrate (default 1e-2,1e-3,1e-4)"
    )
    p.add_argument("--work", help="folder of the resumable state (default OUT.adapt; removed at the end)")
    p.add_argument("--name", help="model name of the adapted checkpoint (default: the base's name + -site)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and the sampling")
    p.add_argument(
        "--save-every",
        type=float,
        default=30.0,
        help="seconds between saves of the resumable state (default 30)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(p)
    _common(p)
    p.set_defaults(func=_cmd_adapt)

    p = subparsers.add_parser(
        "audit",
        help="audit a labelled data set: leakage across splits, mislabels, duplicate identities, "
        "duplicate files, outliers (HTML report; exit 1 on findings)",
        description="Embeds every image (cached in OUT/cache by file content and model id, so a re-run is "
        "cheap) and reports, as clusters: the same patient in several splits (by id, and by image under "
        "other ids), images that look like another person than their patient id says, different ids that "
        "look like one person, exact and near-exact duplicate files, and images that do not belong (broken, "
        "blank, inverted, laterals or other body parts, far outliers). Writes OUT/report.html, "
        "OUT/findings.csv and OUT/findings.json. Sources: manifests (CSV path,patient_id[,split]; several "
        "manifests without a split column: each file name is its split) or folders of images (patient id "
        "from DICOM PatientID). Exit 0 clean, 1 findings, 2 could not run.",
    )
    p.add_argument("sources", metavar="MANIFEST_OR_FOLDER", nargs="+")
    p.add_argument("--out", default="cxr-reid-audit", help="report folder (default ./cxr-reid-audit)")
    p.add_argument(
        "--far", help="false-accept rate of the same-patient decision (default: CXR_REID_FAR, 1e-3)"
    )
    p.add_argument("--threshold", type=float, help="explicit decision threshold instead of --far")
    p.add_argument(
        "--split-level",
        type=int,
        help="folders: the split is the name of the folder this many levels below the one given "
        "(0: its subfolders, e.g. data/train/..., data/test/...)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print findings.json to stdout instead of the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_arg(p)
    _common(p, data_dir=False)
    p.set_defaults(func=_cmd_audit)

    p = subparsers.add_parser(
        "risk",
        help="re-identification risk of an image release: how many images link back to identified ones",
        description="RELEASE and --reference are manifests (CSV path,patient_id, paths relative to it) or "
        "folders of images; the reference may also be a gallery's data dir (read only). Each released "
        "image's best reference match is a link when it reaches the model's threshold at a FAR; with "
        "patient ids on both sides the report measures the share of patients linked (patient bootstrap "
        "95%% CIs) and the wrong links, without them it estimates the expected true links. Candidate "
        "defences (blur, noise, lower resolution, lung-field crop) are measured on the same images with "
        "their fidelity cost. Writes OUT/report.html and OUT/risk.json. Exit 0 done, 2 could not run.",
    )
    p.add_argument("release", metavar="RELEASE", help="the images to be released: manifest CSV or folder")
    p.add_argument(
        "--reference",
        required=True,
        help="identified images an attacker may hold: manifest CSV, folder, or a gallery data dir",
    )
    p.add_argument("--out", required=True, help="folder for report.html, risk.json and the embedding cache")
    p.add_argument("--far", default="1e-2,1e-3,1e-4", help="comma-separated FARs (default 1e-2,1e-3,1e-4)")
    p.add_argument(
        "--defences",
        default="all",
        help="all (default), none, or comma-separated families (blur, noise, lowres, crop) or names "
        "(blur-1, noise-15, lowres-half, crop-75, ...)",
    )
    p.add_argument("--bootstrap", type=int, default=500, help="patient bootstrap resamples (default 500)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the summary of risk.json (no per-image rows)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _device_arg(p)
    _common(p, data_dir=False)
    p.set_defaults(func=_cmd_risk)

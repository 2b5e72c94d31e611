"""Running the HTTP service: ``serve`` starts it, ``keys`` manages its scoped API keys, ``check``
opens its gallery offline the way it would at start, ``healthcheck`` asks a running one if it is ready.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from app.cli.common import Subparsers, add_settings_args, log, open_model_and_gallery, settings_from

if TYPE_CHECKING:
    from app.settings import Settings

#: Hosts that only this machine can reach: serving there without an API key is allowed (with a warning).
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _cmd_serve(args: argparse.Namespace) -> int:
    proxies = ",".join(args.trusted_proxy) if args.trusted_proxy else None
    settings = settings_from(
        args,
        host=args.host,
        port=args.port,
        workers=args.workers,
        trusted_proxies=proxies,
        dicom_port=args.dicom_port,
        dicom_host=args.dicom_host,
        ae_title=args.ae_title,
        allowed_aes=",".join(args.allowed_ae) if args.allowed_ae else None,
        dicom_collection=args.dicom_collection,
    )
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
    if settings.dicom_port is not None:
        from app.pacs.dimse import listen_problem

        if (problem := listen_problem(settings)) is not None:
            log.error("%s", problem)
            return 2
    import uvicorn  # only now: a refused start says so without loading torch first

    from app.main import create_app
    from models.net.checkpoint import load_checkpoint
    from models.net.embedder import DEFAULT_CHECKPOINT

    checkpoint = settings.model_path or DEFAULT_CHECKPOINT
    if not checkpoint.is_file():  # fail here, with a plain message, not in uvicorn's start-up traceback
        what = "checkpoint" if settings.model_path else "the shipped default model (pass --model)"
        raise FileNotFoundError(f"{what} not found: {checkpoint}")
    load_checkpoint(checkpoint)  # a damaged file: one line and exit 2 (CheckpointError), as a missing one
    log.info("serving on http://%s:%d (data dir %s)", settings.host, settings.port, settings.data_dir)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        reload=False,
        access_log=False,  # it logs raw paths and query strings (patient ids); app.access logs templates
        **forwarded_headers(settings),
    )
    return 0


def forwarded_headers(settings: Settings) -> dict[str, object]:
    """uvicorn's proxy options from ``CXR_REID_TRUSTED_PROXIES`` (``--trusted-proxy``): X-Forwarded-For
    is believed from those peers only. uvicorn's own default believes it from 127.0.0.1, so any local
    client (or a proxy on the same host) could name itself anyone and slip past the failed-key limit;
    with no proxy configured the headers are ignored and the peer address is the client."""
    proxies = settings.trusted_proxy_list
    if not proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": ",".join(proxies)}


def _keys_configured(settings: Settings) -> bool:
    from app.service.keys import KeyStore

    return bool(settings.api_key_list) or bool(KeyStore(settings.keys_path).keys())


def _cmd_keys(args: argparse.Namespace) -> int:
    """Manage the scoped API keys of a data dir; the running service sees changes at once."""
    from app.service.keys import KeyStore

    settings = settings_from(args)
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


def _cmd_check(args: argparse.Namespace) -> int:
    """Open the gallery offline the way the service does (integrity checks, orphan clean-up, FAISS
    rebuilt if stale) and report; exit 1 with the reason when it cannot be served."""
    from index import GalleryError

    settings = settings_from(args)
    try:  # a check never starts a gallery: a data dir without one fails, and nothing is made
        _, gallery = open_model_and_gallery(settings, allow_model_mismatch=True, create=False)
    except GalleryError as exc:
        sys.stderr.write(f"check failed: {exc}\n")
        return 1
    with gallery:
        originals = gallery.check_originals(deep=args.deep)
        report = {
            "data_dir": str(gallery.data_dir),
            "images": len(gallery),
            "collections": gallery.collections(),
            "gallery_model_id": gallery.stored_model_id,
            "orphaned_originals_removed": gallery.remove_orphan_blobs(),
            "index_matches_database": gallery.is_consistent(),
            "index": gallery.effective_index_factory,
            "index_rebuilding": gallery.index_rebuilding,
            "originals": originals.as_dict(),
        }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    if not report["index_matches_database"]:
        sys.stderr.write("check failed: the FAISS index does not match the database\n")
    if not originals.ok:
        sys.stderr.write(f"check failed: {originals.summary()}\n")
    return 0 if report["index_matches_database"] and originals.ok else 1


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 only when the local service answers /readyz with 200 (the container HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    port = args.port or settings_from(args).port
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


def register(subparsers: Subparsers) -> None:
    """Add serve, keys, check and healthcheck to ``cxr-reid``."""
    p = subparsers.add_parser("serve", help="run the HTTP service (uvicorn)")
    p.add_argument("--host", help="bind address (default: CXR_REID_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: CXR_REID_PORT, else 8000)")
    p.add_argument("--workers", type=int, help="worker processes; the gallery allows only 1")
    add_settings_args(p)
    p.add_argument(
        "--init",
        action="store_true",
        help="allow a new, empty gallery in a data dir that holds stored data but no database",
    )
    p.add_argument(
        "--insecure", action="store_true", help="serve beyond loopback even with no API key configured"
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="a reverse proxy (IP address or network, e.g. 10.0.0.5 or 10.0.0.0/8; repeat for several) "
        "whose X-Forwarded-For header names the client: the failed-API-key limit then counts by the "
        "real client, not the proxy (default: CXR_REID_TRUSTED_PROXIES, else none: forwarded headers "
        "are ignored, even from 127.0.0.1)",
    )
    dicom = p.add_argument_group(
        "DICOM receiver",
        "C-STORE and C-ECHO beside the HTTP service, for modalities and PACS that speak DIMSE only; each "
        "instance is enrolled as over STOW-RS (same refusals, same wrong-patient alerts)",
    )
    dicom.add_argument(
        "--dicom-port",
        type=int,
        metavar="PORT",
        help="listen for DICOM associations on this port, e.g. 11112 (default: CXR_REID_DICOM_PORT, "
        "else none)",
    )
    dicom.add_argument(
        "--dicom-host",
        metavar="ADDRESS",
        help="address the receiver binds (default: CXR_REID_DICOM_HOST, else --host)",
    )
    dicom.add_argument(
        "--ae-title",
        help="the receiver's AE title, which senders must call (default: CXR_REID_AE_TITLE, else CXRREID)",
    )
    dicom.add_argument(
        "--allowed-ae",
        action="append",
        metavar="AE_TITLE",
        help="accept associations from this calling AE title only (repeat for several; default: "
        "CXR_REID_ALLOWED_AES, else any)",
    )
    dicom.add_argument(
        "--dicom-collection",
        metavar="NAME",
        help="collection received instances are enrolled into (default: CXR_REID_DICOM_COLLECTION, "
        "else default)",
    )
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser(
        "keys",
        help="scoped API keys (read < write < admin), stored hashed in the data dir's keys.json",
        description="add prints the new key once (stdout); list shows ids, scopes and notes; revoke "
        "removes one. A running service picks the change up at its next request.",
    )
    p.add_argument("action", choices=["add", "list", "revoke"], help="add a key, list them, or revoke one")
    p.add_argument("key_id", nargs="?", help="revoke: the key id (from list)")
    p.add_argument("--scope", choices=["read", "write", "admin"], default="read", help="add: default read")
    p.add_argument("--note", help="add: who or what the key is for")
    p.add_argument(
        "--collection",
        action="append",
        help="add: limit the key to this collection (repeat for several; default: every collection)",
    )
    add_settings_args(p, model=False)
    p.set_defaults(func=_cmd_keys)

    p = subparsers.add_parser(
        "check",
        help="integrity check of a gallery data dir, offline: database, stored originals, FAISS index",
        description="Runs SQLite's quick_check, refuses a data dir whose database is missing next to "
        "stored data, removes stored originals no row references and rebuilds a stale FAISS index, as "
        "the service does at start; then checks that every image's original (stored under images/, or "
        "referenced by path after `enroll` without --copy) is there and not empty, which `reindex` "
        "needs. Exit 0 when the gallery can be served and re-embedded, 1 with the reason if not (a data dir "
        "without a gallery included: check creates nothing).",
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="also read every original and check its sha256 (slow: reads the whole gallery)",
    )
    add_settings_args(p)
    p.set_defaults(func=_cmd_check)

    p = subparsers.add_parser(
        "healthcheck",
        help="exit 0 if the local service is ready (GET /readyz is 200), else 1: the container health check",
    )
    p.add_argument("--port", type=int, help="port (default: CXR_REID_PORT, else 8000)")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer (default 4)")
    p.set_defaults(func=_cmd_healthcheck)

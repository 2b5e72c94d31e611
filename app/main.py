"""The FastAPI application factory.

``create_app(settings)`` wires routers, middleware and error handlers; the model and the gallery
are loaded once, in the lifespan, and reached by routes through ``app.state.service``.
``create_app_from_env`` is the zero-argument factory uvicorn imports (``--factory``), so every
worker process reads the same ``CXR_REID_*`` environment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app.api.dependencies import require_scope
from app.api.middleware import BodyLimitMiddleware, MetricsMiddleware, ServiceMetrics, route_template
from app.api.routers import (
    alerts,
    calibration,
    dicomweb,
    duplicates,
    embed,
    health,
    home,
    images,
    review,
    search,
    verify,
)
from app.api.schemas import ErrorResponse, FieldError, error_responses
from app.api.status import status_of
from app.pacs.dimse import DicomReceiver
from app.service.alerts import ALERT_ACTIONS
from app.service.errors import (
    BusyError,
    ServiceError,
)
from app.service.keys import FailedAuthLimiter, KeyStore
from app.service.webhook import AlertWebhook
from app.service.wiring import build_service, build_webhook, open_when_unlocked
from app.settings import Settings
from index import (
    GalleryDuplicateError,
    GalleryError,
    GalleryFullError,
    GalleryModelMismatchError,
    GalleryUnavailableError,
    GalleryValidationError,
)
from models.net.embedder import Embedder

log = logging.getLogger(__name__)

DESCRIPTION = """
Chest X-ray patient re-identification: identity embeddings of radiographs, verification
("same patient?"), search in a gallery of enrolled images, wrong-patient alerts at enrolment, and
duplicate / conflicting-label discovery.

* Images: DICOM (CR/DX), PNG, JPEG or TIFF, as multipart uploads.
* `score` is the cosine similarity of unit-norm embeddings, or, under a site calibration that
  normalises scores (AS-norm), how far that cosine stands above each image's nearest other patients
  at the site; `cosine` is always the raw similarity. `same_patient` is `score >= threshold`, the
  same rule on every route. The default threshold is the calibrated threshold at a
  false-accept rate of `CXR_REID_FAR` (1e-3); requests may pass `far` or `threshold`. Responses
  say which calibration is in force: the model's own (`shipped`, fitted on its validation patients,
  which may not hold at your site) or this site's (`POST /calibration` fits it on the gallery's
  labelled images).
* Every error is JSON `{"detail": ...}` (`ErrorResponse`; a 422 from request checks also lists
  `errors`, one per rejected field): 401 missing/invalid API key, 404 unknown id, 413 upload over the
  size limit, 422 unusable image or missing/contradictory fields, 503 not ready (e.g. the gallery holds
  vectors of another model: run `cxr-reid reindex`).
* With API keys configured (`cxr-reid keys add`, or `CXR_REID_API_KEYS`), every route but /healthz
  and the status of /readyz needs `X-API-Key`, of scope `read` (embed, verify, search, list,
  duplicates, alerts, metrics), `write` (enrol, resolve alerts, delete) or `admin` (site
  calibration). Too many rejected
  keys from one address get 429 for a minute. Without keys the service binds loopback only.
"""

TAGS = [
    {"name": "embed", "description": "Images to identity embeddings."},
    {"name": "verify", "description": "Is it the same patient? Image vs image, or image vs a patient."},
    {"name": "images", "description": "The gallery: enrol, list, read and delete images and patients."},
    {"name": "alerts", "description": "Wrong-patient alerts raised at enrolment: review and resolve them."},
    {"name": "search", "description": "Nearest gallery images of a query image."},
    {"name": "duplicates", "description": "Pairs and clusters of near-identical identities in the gallery."},
    {"name": "calibration", "description": "The thresholds in force; fitting them on this site's images."},
    {"name": "dicomweb", "description": "DICOMweb STOW-RS: a modality or PACS stores radiographs here."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


def alert_hook(metrics: ServiceMetrics, webhook: AlertWebhook | None) -> Callable[[str, Any], None]:
    """What happens to each stored alert event: counted, and sent to the webhook when there is one."""
    action_of = {state: action for action, state in ALERT_ACTIONS.items()}

    def hook(event: str, alert: Any) -> None:
        if event in action_of:
            metrics.alerts_resolved.labels(action_of[event]).inc()
        if webhook is not None:
            webhook.send(event, alert)

    return hook


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """Build the app; ``embedder`` may be passed in to share an already loaded model (tests, CLI)."""
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        webhook = build_webhook(
            settings, on_outcome=lambda outcome: metrics.alert_webhook.labels(outcome).inc()
        )
        try:
            service = await run_in_threadpool(
                partial(
                    build_service,
                    settings,
                    embedder,
                    on_embedded=metrics.embeddings.inc,
                    on_alert=lambda kind: metrics.alerts.labels(kind).inc(),
                    on_alert_event=alert_hook(metrics, webhook),
                )
            )
        except BaseException:
            if webhook is not None:
                webhook.close(timeout=0)
            raise
        app.state.service = service
        stop = threading.Event()
        retry = None
        if service.gallery_locked:
            retry = threading.Thread(
                target=open_when_unlocked,
                args=(service, settings, stop),
                name="gallery-lock-retry",
                daemon=True,
            )
            retry.start()
        receiver = None
        try:
            if settings.dicom_port is not None:  # C-STORE / C-ECHO beside HTTP, on the same service
                receiver = DicomReceiver(
                    service,
                    settings,
                    on_answered=lambda status: metrics.dicom_stores.labels(f"0x{status:04X}").inc(),
                )
                await run_in_threadpool(receiver.start)
                app.state.dicom_receiver = receiver
            yield
        finally:
            stop.set()
            if receiver is not None:
                await run_in_threadpool(receiver.stop)  # before the service it stores through closes
            if retry is not None:
                retry.join()
            app.state.service = None
            await run_in_threadpool(service.close)
            if webhook is not None:
                await run_in_threadpool(webhook.close)

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from files the package ships, not a CDN
    app = FastAPIOffline(
        title="cxr-reid",
        summary="Chest X-ray patient re-identification",
        description=DESCRIPTION,
        version="0.1.0",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.metrics = metrics
    metrics.track_gallery(lambda: app.state.service.gallery_size() if app.state.service is not None else 0)
    metrics.track_open_alerts(lambda: app.state.service.open_alerts() if app.state.service is not None else 0)

    app.state.key_store = KeyStore(settings.keys_path)
    app.state.auth_limiter = FailedAuthLimiter(settings.auth_failures_per_minute, window=60.0)
    secured = [Depends(require_scope("read"))]  # write and admin routes ask for more themselves
    app.include_router(health.router, responses=error_responses(500))
    for module in (embed, verify, images, alerts, search, duplicates, calibration, dicomweb):
        app.include_router(
            module.router, dependencies=secured, responses=error_responses(400, 401, 403, 422, 429, 500, 503)
        )
    app.include_router(review.router)  # HTML for people; it checks the key (header or cookie) itself
    app.include_router(home.router)  # GET /: links to /docs and /review, for people and scripts
    app.openapi = _openapi_with_form_descriptions(app)

    _add_error_handlers(app)
    # outermost last: metrics see every response, including the body limit's 413
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.request_body_limit, upload_limit=settings.max_upload_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """Zero-argument factory for ``uvicorn --factory app.main:create_app_from_env``."""
    return create_app(Settings())


def _openapi_with_form_descriptions(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI names each multipart form ``Body_<operation>`` without a description; give it one."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        schemas = spec.get("components", {}).get("schemas", {})
        for operations in spec["paths"].values():
            for operation in operations.values():
                for media in operation.get("requestBody", {}).get("content", {}).values():
                    name = media.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
                    if name in schemas and not schemas[name].get("description"):
                        schemas[name]["description"] = f"Form fields of: {operation['summary']}"
        return spec

    return openapi


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    """Pydantic's errors as `where: what`, without the rejected values (they may hold patient ids)."""
    return [
        FieldError(field=".".join(str(part) for part in error["loc"]), message=error["msg"])
        for error in exc.errors()
    ]


def _add_error_handlers(app: FastAPI) -> None:
    """Map service and gallery errors to JSON 4xx/503; anything else is a bug (500, logged).

    Every body is an ``ErrorResponse``, request validation errors included.
    """

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        detail = "invalid request: " + "; ".join(f"{error.field}: {error.message}" for error in errors)
        body = ErrorResponse(detail=detail, errors=errors)
        return JSONResponse(body.model_dump(), status_code=422)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, BusyError) else None
        return JSONResponse({"detail": exc.detail}, status_code=status, headers=headers)

    @app.exception_handler(GalleryValidationError)
    async def _gallery_validation(request: Request, exc: GalleryValidationError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(GalleryModelMismatchError)
    async def _gallery_mismatch(request: Request, exc: GalleryModelMismatchError) -> JSONResponse:
        return JSONResponse({"detail": f"{exc} (run `cxr-reid reindex`)"}, status_code=503)

    @app.exception_handler(GalleryFullError)
    async def _gallery_full(request: Request, exc: GalleryFullError) -> JSONResponse:
        log.error("gallery write refused on %s %s: %s", request.method, route_template(request.scope), exc)
        return JSONResponse({"detail": str(exc)}, status_code=507)

    @app.exception_handler(GalleryUnavailableError)
    async def _gallery_unavailable(request: Request, exc: GalleryUnavailableError) -> JSONResponse:
        log.warning(
            "gallery database unavailable on %s %s: %s", request.method, route_template(request.scope), exc
        )
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(GalleryDuplicateError)
    async def _gallery_duplicate(request: Request, exc: GalleryDuplicateError) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; send it again to get the stored image"}, status_code=409)

    @app.exception_handler(GalleryError)
    async def _gallery_error(request: Request, exc: GalleryError) -> JSONResponse:
        log.error("gallery error on %s %s: %s", request.method, route_template(request.scope), exc)
        body = ErrorResponse(
            detail="the gallery could not complete the request; the error is in the server log"
        )
        return JSONResponse(body.model_dump(exclude_none=True), status_code=500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, route_template(request.scope))
        return JSONResponse({"detail": "internal server error"}, status_code=500)

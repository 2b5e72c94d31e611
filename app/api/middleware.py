"""ASGI middleware: request-body size limit (enforced while the body streams in) and Prometheus metrics.

Both are plain ASGI callables rather than ``BaseHTTPMiddleware`` so they add no task switching to
every request and see the raw ``receive`` stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("app.access")


def _too_large_detail(limit: int) -> str:
    return (
        f"request body is larger than the upload limit of {limit:,} bytes "
        "(CXR_REID_MAX_UPLOAD_BYTES; it covers all files of one request together)"
    )


def route_template(scope: Scope) -> str:
    """The matched route's template (`/patients/{patient_id}`), never the raw path: paths hold
    patient ids, which must not reach logs or metrics."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, without buffering more than the limit.

    A declared Content-Length over the limit is refused before any byte is read. Otherwise the bytes
    are counted as they arrive; the first chunk past the limit raises an HTTPException inside the
    form parser, which FastAPI re-raises unchanged and its handler turns into a JSON 413.
    """

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.detail = _too_large_detail(upload_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await self._refuse(send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(status_code=413, detail=self.detail)
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ServiceMetrics:
    """The service's Prometheus series, in a registry of its own (one per app, so tests can make many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cxr_reid_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_reid_request_duration_seconds",
            "HTTP request latency by route and method",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.embeddings = Counter(
            "cxr_reid_embeddings", "images embedded by the model", registry=self.registry
        )
        self.alerts = Counter(
            "cxr_reid_alerts",
            "wrong-patient alerts raised at enrolment (POST /images, STOW-RS, C-STORE), by kind",
            ["kind"],
            registry=self.registry,
        )
        self.dicom_stores = Counter(
            "cxr_reid_dicom_stores",
            "DICOM C-STORE requests the receiver answered (app/pacs/dimse.py), by status: 0x0000 stored "
            "or already there, else the failure code (0xA700, 0xC000, 0x0122, 0x0111, 0x0110)",
            ["status"],
            registry=self.registry,
        )
        self.alerts_resolved = Counter(
            "cxr_reid_alerts_resolved",
            "wrong-patient alerts resolved (POST /alerts/{alert_id}), by action: confirm, dismiss, relabel",
            ["action"],
            registry=self.registry,
        )
        self.alerts_open = Gauge(
            "cxr_reid_alerts_open", "wrong-patient alerts open in the gallery", registry=self.registry
        )
        self.alert_webhook = Counter(
            "cxr_reid_alert_webhook",
            "alert webhook events by outcome: delivered, retried (one failed attempt), failed (gave "
            "up), dropped (queue full)",
            ["outcome"],
            registry=self.registry,
        )
        self.gallery_images = Gauge(
            "cxr_reid_gallery_images", "images in the gallery", registry=self.registry
        )

    def track_gallery(self, size: Callable[[], int]) -> None:
        """Read the gallery size at scrape time rather than keeping a second count."""
        self.gallery_images.set_function(lambda: float(size()))

    def track_open_alerts(self, count: Callable[[], int]) -> None:
        self.alerts_open.set_function(lambda: float(count()))


class MetricsMiddleware:
    """Count, time and log every HTTP request by its route template.

    The template (``/patients/{patient_id}``), never the raw path or query string, so patient ids
    stay out of metrics and logs; ``cxr-reid serve`` turns uvicorn's own access log (raw paths) off.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            method = scope.get("method", "")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(elapsed)
            access_log.info('"%s %s" %d %.1fms', method, template, status, elapsed * 1000)

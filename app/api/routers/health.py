"""Liveness, readiness and Prometheus metrics.

/healthz and the status of /readyz answer everyone (orchestrators and the container health check
hold no key); with API keys configured, what /readyz says beyond ready / not ready, and /metrics,
need a key with the read scope. A key limited to collections sees its own collections' image count
on /readyz and no /metrics (they count every collection).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.dependencies import get_access, has_scope, require_scope
from app.api.schemas import (
    AdaptationOut,
    Health,
    OperatingPointOut,
    Readiness,
    ReplicationOut,
    error_responses,
)

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness: the process is up",
    description="Always 200 while the process serves HTTP; says nothing about the model or gallery.",
)
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    summary="Readiness: model loaded and gallery consistent",
    description=(
        "200 when the model is loaded and the gallery is open, holds vectors of this model, its "
        "FAISS index matches the database and no stored original is missing (counted at start, kept "
        "current by the service's own writes, and a random sample of 8 originals looked at on each "
        "call). 503 with the reason in `detail` otherwise (for example a gallery embedded with "
        "another model: run `cxr-reid reindex`; lost originals: restore the data dir's images/ "
        "folder, `cxr-reid check` lists the images)."
    ),
    responses=error_responses(503, e503="not ready; `detail` says why and what to do"),
)
def readyz(request: Request) -> Readiness | JSONResponse:
    service = request.app.state.service
    problem = "the model is not loaded yet" if service is None else service.readiness_problem()
    details = has_scope(request, "read")
    if problem is not None:
        if not details:
            problem = "not ready (the reason is in the server log, and shown here with an API key)"
        return JSONResponse({"detail": problem}, status_code=503)
    if not details:
        return Readiness()
    key = get_access(request).key
    gallery = service.gallery_status(key.collections if key is not None else None)
    return Readiness(
        model_id=service.model_id,
        embedding_dim=service.embedder.dim,
        gallery_images=gallery.images,
        index=gallery.index,
        index_rebuilding=gallery.index_rebuilding,
        replication=ReplicationOut(**gallery.replication) if gallery.replication else None,
        operating_point=OperatingPointOut.of(service.operating_point()),
        adaptation=AdaptationOut.of(service.embedder.training),
    )


@router.get(
    "/metrics",
    dependencies=[Depends(require_scope("read"))],
    summary="Prometheus metrics",
    description=(
        "Prometheus text format: `cxr_reid_requests_total` and `cxr_reid_request_duration_seconds` by "
        "route template, `cxr_reid_embeddings_total`, `cxr_reid_gallery_images`. Per process: with "
        "several workers each reports its own counts. They count every collection, so a key limited "
        "to collections gets 403."
    ),
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "metrics in text format"},
        **error_responses(401, 403, 429),
    },
)
def metrics(request: Request) -> Response:
    key = get_access(request).key
    if key is not None and key.collections is not None:
        raise HTTPException(
            status_code=403,
            detail="/metrics counts every collection: it needs a key not limited to collections",
        )
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""GET /duplicates: every gallery pair above the threshold, clustered, with label conflicts marked."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.dependencies import AccessDep, Label, PageLimit, PageOffset, ServiceDep
from app.api.schemas import (
    ClusterOut,
    DuplicatePairOut,
    DuplicatesResponse,
    OperatingPointOut,
    PairImage,
    error_responses,
)
from app.service.clientargs import collection_arg

router = APIRouter(tags=["duplicates"])


@router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    summary="Find pairs of gallery images that look like the same patient",
    description=(
        "Every pair of gallery images whose score reaches the threshold (default operating point, or "
        "`far` / `threshold`), best first, paginated with `offset` / `limit` over the pairs. A pair is "
        "a `conflict` when both patient ids are known and differ: one label is probably wrong, or one "
        "patient has two ids. `conflicts_only=true` keeps only those. `clusters` are the connected "
        "components of all (filtered) pairs, largest first; each pair names its cluster. "
        '`collection`: default "default", "*" = across every collection.\n\n'
        "Bounded: a threshold below the calibration's FAR 1e-1 point is refused (422), as is a scan "
        "that finds more than 200,000 candidate pairs; one scan runs at a time, and its report is "
        "kept until the gallery changes, so pages and `conflicts_only` reuse it."
    ),
    responses=error_responses(
        422, e422="a threshold below the FAR 1e-1 point, too many pairs, or a bad field"
    ),
)
def find_duplicates(
    service: ServiceDep,
    access: AccessDep,
    collection: Annotated[str | None, Query(description='"*" = every collection'), Label] = "default",
    far: Annotated[str | None, Query(description="false-accept rate of the operating point")] = None,
    threshold: Annotated[float | None, Query(description="explicit threshold on `score`")] = None,
    conflicts_only: Annotated[bool, Query(description="only pairs whose patient ids disagree")] = False,
    offset: PageOffset = 0,
    limit: PageLimit = 100,
) -> DuplicatesResponse:
    point = service.operating_point(far=far or None, threshold=threshold)
    where = access.collection(collection_arg(collection))
    report = service.duplicates(point=point, collection=where, conflicts_only=conflicts_only)
    cluster_of = {image_id: n for n, cluster in enumerate(report.clusters) for image_id in cluster.image_ids}
    page = report.pairs[offset : offset + limit]
    return DuplicatesResponse(
        model_id=service.model_id,
        collection=where,
        operating_point=OperatingPointOut.of(point),
        total_pairs=len(report.pairs),
        total_conflicts=report.total_conflicts,
        offset=offset,
        limit=limit,
        pairs=[
            DuplicatePairOut(
                a=PairImage(image_id=p.a.image_id, patient_id=p.a.patient_id, collection=p.a.collection),
                b=PairImage(image_id=p.b.image_id, patient_id=p.b.patient_id, collection=p.b.collection),
                score=p.score,
                conflict=p.conflict,
                cluster=cluster_of[p.a.image_id],
            )
            for p in page
        ],
        clusters=[ClusterOut(**asdict(cluster)) for cluster in report.clusters],
    )

"""POST /search: the nearest gallery images of a query image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.api.dependencies import MAX_IMAGE_ID, AccessDep, Label, ServiceDep, SettingsDep, upload_or_id
from app.api.schemas import ImageRef, MatchOut, OperatingPointOut, SearchResponse, error_responses
from app.service.clientargs import collection_arg

router = APIRouter(tags=["search"])


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Find the gallery images most like a query image",
    description=(
        "Query by `file` (an upload) or `image_id` (a gallery image, itself excluded from the results). "
        "Returns up to `k` matches best first, each with its `score` (the cosine, or its AS-norm when a "
        "site calibration normalises scores), its `cosine` and `same_patient` (score >= "
        'threshold: the rule /verify uses). `collection`: default "default" for an upload and the '
        'query image\'s own collection for an `image_id`; "*" searches every collection. Optional '
        "filters: `patient_id`, `split`; `only_matches=true` keeps only matches at or above the "
        "threshold. `far` or `threshold` pick the operating point."
    ),
    responses=error_responses(404, 413, e404="unknown query image id"),
)
def search(
    service: ServiceDep,
    settings: SettingsDep,
    access: AccessDep,
    file: Annotated[UploadFile | None, File(description="query image")] = None,
    image_id: Annotated[
        int | None, Form(ge=1, le=MAX_IMAGE_ID, description="query by a gallery image")
    ] = None,
    k: Annotated[int, Form(ge=1, le=1000, description="number of matches")] = 10,
    collection: Annotated[str | None, Form(description='collection to search, "*" = all'), Label] = None,
    patient_id: Annotated[str | None, Form(description="only images of this patient"), Label] = None,
    split: Annotated[str | None, Form(description="only images of this split"), Label] = None,
    only_matches: Annotated[bool, Form(description="only matches at or above the threshold")] = False,
    far: Annotated[str | None, Form(description="false-accept rate of the operating point")] = None,
    threshold: Annotated[float | None, Form(description="explicit threshold on `score`")] = None,
) -> SearchResponse:
    point = service.operating_point(far=far or None, threshold=threshold)
    (query_image,) = service.query_images([upload_or_id(file, image_id, settings, "file", "image_id")])
    query, record = ImageRef.of(query_image), query_image.record
    if record is not None:  # its own collection by default, and never itself
        access.record(record)
        where, exclude = collection_arg(collection, record.collection), (record.image_id,)
    else:
        where, exclude = collection_arg(collection), ()
    access.collection(where)
    matches = service.search(
        query_image.vector,
        k=k,
        collection=where,
        point=point,
        exclude_ids=exclude,
        patient_id=patient_id or None,
        split=split or None,
        only_matches=only_matches,
        query_key=query_image.key,
    )
    return SearchResponse(
        model_id=service.model_id,
        query=query,
        collection=where,
        k=k,
        operating_point=OperatingPointOut.of(point),
        matches=[MatchOut.of(m) for m in matches],
    )

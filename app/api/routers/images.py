"""The gallery over HTTP: enrol images (with wrong-patient alerts), list, read, delete."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile

from app.api.dependencies import (
    AccessDep,
    ImageIdPath,
    Label,
    PageLimit,
    PageOffset,
    ServiceDep,
    SettingsDep,
    collect_files,
    read_uploads,
    require_scope,
)
from app.api.schemas import (
    AlertOut,
    DeleteResponse,
    EnrolledImage,
    EnrolResponse,
    ImageOut,
    ImagePage,
    MatchOut,
    OperatingPointOut,
    error_responses,
)
from app.service.clientargs import ALL_COLLECTIONS, collection_arg
from app.service.errors import InvalidInputError
from index import ImageMetadata

router = APIRouter(tags=["images"])

NOT_FOUND = error_responses(404)


def parse_tags(raw: str | None) -> dict[str, str]:
    """`tags` form field: a JSON object of scalar values, stored as strings."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"tags must be a JSON object: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InvalidInputError('tags must be a JSON object, e.g. {"site": "A"}')
    tags = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)) or item is None:
            raise InvalidInputError(f"tag '{key}' must be a string, number or boolean")
        tags[str(key)] = json.dumps(item) if isinstance(item, bool) else str(item)
    return tags


def _clean(value: str | None) -> str | None:
    """Empty form fields mean 'not given'."""
    if value is None:
        return None
    value = value.strip()
    return value or None


@router.post(
    "/images",
    dependencies=[Depends(require_scope("write"))],
    status_code=201,
    response_model=EnrolResponse,
    summary="Enrol radiographs in the gallery, with a wrong-patient check",
    description=(
        "Upload `file` (or several as `files`) with an optional `patient_id` (default: the DICOM "
        "PatientID; may stay unknown, null, so the image can still be searched), `collection` (default "
        '"default"), `study_instance_uid`, `view`, `study_date`, `split` and `tags` (a JSON object '
        "string); DICOM headers fill the gaps. The metadata applies to every file of the request.\n\n"
        "All or nothing: every file is decoded and embedded before one gallery write; one unusable "
        "file fails the request and enrols nothing. The original bytes are stored so `cxr-reid "
        "reindex` can re-embed them.\n\n"
        "Per image: `image_id`, the best `matches` (top 5 in the same collection) and an `alert` when "
        "the image is filed under patient X but matches another patient above the threshold "
        "(`matches_other_patient`), or matches none of X's earlier images (`no_match_with_own_images`). "
        "Matches and alerts are computed against the gallery as it stood before this request.\n\n"
        "Identical bytes already in the collection are still enrolled as a new image, and "
        "`duplicate_of` names the earlier one (it then also shows as a score-1.0 pair in /duplicates)."
    ),
    responses=error_responses(413, 507),
)
def enrol_images(
    service: ServiceDep,
    settings: SettingsDep,
    access: AccessDep,
    file: Annotated[UploadFile | None, File(description="one image")] = None,
    files: Annotated[list[UploadFile] | None, File(description="several images (all or nothing)")] = None,
    patient_id: Annotated[
        str | None, Form(description="patient label; default: DICOM PatientID"), Label
    ] = None,
    collection: Annotated[str | None, Form(description="gallery collection"), Label] = "default",
    study_instance_uid: Annotated[str | None, Form(description="default: the DICOM header"), Label] = None,
    view: Annotated[str | None, Form(description="e.g. PA, AP, LL"), Label] = None,
    study_date: Annotated[str | None, Form(description="e.g. 2024-05-01 or 20240501"), Label] = None,
    split: Annotated[str | None, Form(description="data-set split, e.g. train / val / test"), Label] = None,
    tags: Annotated[str | None, Form(description="JSON object of free metadata")] = None,
    far: Annotated[str | None, Form(description="FAR of the alert threshold")] = None,
    threshold: Annotated[float | None, Form(description="explicit alert threshold")] = None,
) -> EnrolResponse:
    if collection is None or collection == ALL_COLLECTIONS:
        raise InvalidInputError("collection must be a non-empty name other than '*'")
    access.collection(collection)
    meta = ImageMetadata(
        patient_id=patient_id,
        collection=collection,
        study_instance_uid=study_instance_uid,
        view=view,
        study_date=study_date,
        split=split,
        tags=parse_tags(tags),
    )
    point = service.operating_point(far=_clean(far), threshold=threshold)
    uploads = read_uploads(collect_files(file, files), settings)
    if not uploads:
        raise InvalidInputError("send an image as the multipart field 'file' (or several as 'files')")
    decoded, vectors = service.embed_uploads(uploads)
    results = service.enrol(decoded, vectors, meta, point=point)
    return EnrolResponse(
        model_id=service.model_id,
        operating_point=OperatingPointOut.of(point),
        images=[
            EnrolledImage(
                image_id=result.record.image_id,
                filename=image.filename,
                image=ImageOut.of(result.record),
                duplicate_of=result.duplicate_of,
                already_enrolled=result.already_enrolled,
                matches=[MatchOut.of(m) for m in result.matches],
                alert=AlertOut.of(result.alert),
            )
            for image, result in zip(decoded, results, strict=True)
        ],
    )


@router.get(
    "/images",
    response_model=ImagePage,
    summary="List gallery images",
    description=(
        "Paginated (`offset`, `limit`), optionally filtered by `patient_id` and `collection` (omitted or "
        '"*" = every collection); `total` counts every image matching the filters.'
    ),
)
def list_images(
    service: ServiceDep,
    access: AccessDep,
    patient_id: Annotated[str | None, Query(description="only this patient's images"), Label] = None,
    collection: Annotated[str | None, Query(description='"*" or omitted = every collection'), Label] = None,
    offset: PageOffset = 0,
    limit: PageLimit = 100,
) -> ImagePage:
    records, total = service.list_images(
        patient_id=patient_id,
        collection=access.collection(collection_arg(collection, None)),
        offset=offset,
        limit=limit,
    )
    return ImagePage(total=total, offset=offset, limit=limit, items=[ImageOut.of(r) for r in records])


@router.get(
    "/images/{image_id}",
    response_model=ImageOut,
    summary="One gallery image's metadata",
    description="Labels, DICOM identifiers, metadata, the model that embedded it and when it was enrolled.",
    responses=NOT_FOUND,
)
def get_image(service: ServiceDep, access: AccessDep, image_id: ImageIdPath) -> ImageOut:
    return ImageOut.of(access.record(service.record(image_id)))


@router.delete(
    "/images/{image_id}",
    dependencies=[Depends(require_scope("write"))],
    response_model=DeleteResponse,
    summary="Delete a gallery image",
    description="Removes the image, its vector and (when no other image shares it) its stored original.",
    responses=NOT_FOUND,
)
def delete_image(service: ServiceDep, access: AccessDep, image_id: ImageIdPath) -> DeleteResponse:
    access.record(service.record(image_id))
    service.delete_image(image_id)
    return DeleteResponse(deleted=1)


@router.delete(
    "/patients/{patient_id}",
    dependencies=[Depends(require_scope("write"))],
    response_model=DeleteResponse,
    summary="Delete every image of a patient",
    description='In one `collection`, or in every collection when it is omitted or "*". 404 when none.',
    responses=NOT_FOUND,
)
def delete_patient(
    service: ServiceDep,
    access: AccessDep,
    patient_id: Annotated[str, Path(description="the patient whose images to delete"), Label],
    collection: Annotated[str | None, Query(description='"*" or omitted = every collection'), Label] = None,
) -> DeleteResponse:
    where = access.collection(collection_arg(collection, None))
    return DeleteResponse(deleted=service.delete_patient(patient_id, where))

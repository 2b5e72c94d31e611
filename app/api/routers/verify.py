"""POST /verify: same patient? An image against an image, or an image against a patient's gallery."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.api.dependencies import MAX_IMAGE_ID, Access, AccessDep, Label, ServiceDep, SettingsDep, upload_or_id
from app.api.schemas import (
    PRIOR_FIELD_DESCRIPTION,
    CalibrationOut,
    ImageRef,
    PairVerification,
    PatientVerification,
    error_responses,
)
from app.service.clientargs import collection_arg
from app.service.decoding import QueryImage
from app.service.errors import InvalidInputError

router = APIRouter(tags=["verify"])


def _checked(access: Access, images: list[QueryImage]) -> list[QueryImage]:
    """Gallery images the request's key may not see are not found."""
    for image in images:
        if image.record is not None:
            access.record(image.record)
    return images


@router.post(
    "/verify",
    response_model=PairVerification | PatientVerification,
    summary="Are two radiographs of the same patient? Or: is this radiograph patient X?",
    description=(
        "**Pair mode**: side A is `file_a` (an upload) or `image_id_a` (a gallery image), side B is "
        "`file_b` or `image_id_b`, in any mix. Returns the `score` the decision uses (the cosine, or "
        "its AS-norm when a site calibration normalises scores), the `cosine`, `same_patient` (score >= "
        "threshold) and the `threshold` with the false-accept rate `far` it stands for, and the "
        "calibrated `probability` (P(same patient | score)) with the `prior` it is at: by default the "
        "prior at which the threshold is the Bayes decision, so the probability is >= 0.5 exactly when "
        "`same_patient` is true; send `prior` (e.g. the site's misfile base rate) for the probability "
        "at yours.\n\n"
        "**Patient mode**: `file` (or `image_id`) plus `patient_id` [+ `collection`, default "
        '"default", "*" = all]: the image is scored against every gallery image of that patient '
        "(itself excluded); the decision uses the best score, and the mean and the number of images "
        "compared are returned too.\n\n"
        "Pass `far` (e.g. 1e-4) or `threshold` (on `score`) for another operating point. "
        "/search and /images decide with the same rule, so they never disagree on a pair."
    ),
    responses=error_responses(
        404,
        413,
        422,
        e404="unknown image id, or a patient without images",
        e422="a bad field: `prior` not in (0, 1), say",
    ),
)
def verify(
    service: ServiceDep,
    settings: SettingsDep,
    access: AccessDep,
    file_a: Annotated[UploadFile | None, File(description="pair mode: first image")] = None,
    file_b: Annotated[UploadFile | None, File(description="pair mode: second image")] = None,
    image_id_a: Annotated[
        int | None, Form(ge=1, le=MAX_IMAGE_ID, description="pair mode: first image, from the gallery")
    ] = None,
    image_id_b: Annotated[
        int | None, Form(ge=1, le=MAX_IMAGE_ID, description="pair mode: second image, from the gallery")
    ] = None,
    file: Annotated[UploadFile | None, File(description="patient mode: the image to check")] = None,
    image_id: Annotated[
        int | None, Form(ge=1, le=MAX_IMAGE_ID, description="patient mode: a gallery image to check")
    ] = None,
    patient_id: Annotated[
        str | None, Form(description="patient mode: the patient to check against"), Label
    ] = None,
    collection: Annotated[str | None, Form(description='patient mode: collection, "*" = all'), Label] = None,
    far: Annotated[
        str | None, Form(description="false-accept rate of the operating point, e.g. 1e-4")
    ] = None,
    threshold: Annotated[float | None, Form(description="explicit threshold on `score`")] = None,
    prior: Annotated[float | None, Form(gt=0.0, lt=1.0, description=PRIOR_FIELD_DESCRIPTION)] = None,
) -> PairVerification | PatientVerification:
    point = service.operating_point(far=far or None, threshold=threshold)
    pair_fields = [
        n
        for n, v in (
            ("file_a", file_a),
            ("file_b", file_b),
            ("image_id_a", image_id_a),
            ("image_id_b", image_id_b),
        )
        if v is not None
    ]
    if patient_id:
        if pair_fields:
            raise InvalidInputError(
                f"patient mode ('patient_id') takes 'file' or 'image_id'; remove {', '.join(pair_fields)}"
            )
        (query,) = _checked(
            access, service.query_images([upload_or_id(file, image_id, settings, "file", "image_id")])
        )
        where = access.collection(collection_arg(collection))
        verdict = service.verify_patient(
            query.vector, patient_id, collection=where, point=point, exclude_image_id=image_id, prior=prior
        )
        return PatientVerification(
            model_id=service.model_id,
            query=ImageRef.of(query),
            patient_id=patient_id,
            collection=where,
            score=verdict.best_score,
            cosine=verdict.best_cosine,
            best_score=verdict.best_score,
            mean_score=verdict.mean_score,
            best_image_id=verdict.best_image_id,
            compared_with=verdict.compared_with,
            probability=verdict.probability,
            prior=verdict.prior,
            prior_source=verdict.prior_source,
            same_patient=verdict.same_patient,
            threshold=point.threshold,
            far=point.far,
            calibration=CalibrationOut(**point.calibration),
        )
    if file is not None or image_id is not None or collection:
        raise InvalidInputError(
            "'file', 'image_id' and 'collection' need a 'patient_id' (patient mode); to compare two "
            "images send 'file_a' or 'image_id_a' and 'file_b' or 'image_id_b'"
        )
    a, b = _checked(
        access,
        service.query_images(
            [
                upload_or_id(file_a, image_id_a, settings, "file_a", "image_id_a"),
                upload_or_id(file_b, image_id_b, settings, "file_b", "image_id_b"),
            ]
        ),
    )
    verdict = service.verify_pair(a.vector, a.key, b.vector, b.key, point=point, prior=prior)
    return PairVerification(
        model_id=service.model_id,
        a=ImageRef.of(a),
        b=ImageRef.of(b),
        score=verdict.score,
        cosine=verdict.cosine,
        probability=verdict.probability,
        prior=verdict.prior,
        prior_source=verdict.prior_source,
        same_patient=verdict.same_patient,
        threshold=point.threshold,
        far=point.far,
        calibration=CalibrationOut(**point.calibration),
    )

"""GET/POST/DELETE /calibration: the thresholds in force, and fitting them on this site's images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException

from app.api.dependencies import Access, AccessDep, ServiceDep, require_scope
from app.api.schemas import CalibrationDetail, CalibrationOut, error_responses
from app.service.clientargs import collection_arg
from app.service.errors import InvalidInputError
from app.service.reid import ReidService
from models.scoring.decide import parse_fars

router = APIRouter(tags=["calibration"])

DEFAULT_FARS = "1e-2,1e-3,1e-4"


def _detail(service: ReidService) -> CalibrationDetail:
    calibration = service.calibration
    return CalibrationDetail(
        calibration=CalibrationOut(**calibration.summary()),
        default_far=service.default_far,
        thresholds=calibration.thresholds,
        default_prior=calibration.bayes_prior(service.operating_point().threshold),
        threshold_ci=calibration.provenance.get("threshold_ci") or {},
        provenance=calibration.provenance,
    )


LIMITED_KEY = (
    "the key's scope is below admin, or the key is limited to some collections (the calibration in "
    "force decides for all of them)"
)


def _service_wide(access: Access) -> None:
    """One calibration decides for every collection, so only a key that may touch every collection
    may change it: a key limited to some must not move what the others see."""
    if access.key is not None and access.key.collections is not None:
        raise HTTPException(
            status_code=403,
            detail="the calibration in force decides for every collection: changing it needs an admin "
            "key not limited to collections",
        )


def _fars(text: str) -> list[str]:
    try:
        return parse_fars(text)
    except ValueError as exc:
        raise InvalidInputError(f"far: {exc}") from None


@router.get(
    "/calibration",
    response_model=CalibrationDetail,
    summary="The calibration in force",
    description=(
        "The thresholds every decision uses and where they come from: `shipped` (fitted in training on "
        "the model's own validation patients) or `site` (fitted on this gallery's labelled images)."
    ),
)
def get_calibration(service: ServiceDep) -> CalibrationDetail:
    return _detail(service)


@router.post(
    "/calibration",
    dependencies=[Depends(require_scope("admin"))],
    response_model=CalibrationDetail,
    summary="Fit the thresholds on this site's labelled gallery images (admin)",
    description=(
        "A model's own thresholds promise a false-accept rate measured on its validation patients; at a "
        "hospital unlike them the FAR delivered can be many times higher. This fits thresholds at the "
        "FARs in `far` and the score -> probability map on every pair of gallery images filed under a "
        "patient id (`collection`: default every collection), keeps the calibration in the gallery "
        "with its provenance and uses it from then on, across restarts.\n\n"
        "Refused with 409, keeping the calibration in force, when the labelled images cannot resolve "
        "a FAR asked for (each FAR f needs 10/f different-patient pairs) or hold too few same-patient "
        "pairs; the message says how many more labelled images are needed."
    ),
    responses=error_responses(
        403,
        409,
        422,
        e403=LIMITED_KEY,
        e422="malformed `far`, or the default FAR left out, or a bad field",
    ),
)
def fit_calibration(
    service: ServiceDep,
    access: AccessDep,
    far: Annotated[
        str, Form(description="comma-separated false-accept rates to calibrate (must include the default)")
    ] = DEFAULT_FARS,
    collection: Annotated[str, Form(description='collection whose labelled images to use; "*" = all')] = "*",
    bootstrap: Annotated[
        int, Form(ge=0, le=2000, description="patient bootstrap resamples for the threshold intervals")
    ] = 200,
    score_norm: Annotated[
        bool,
        Form(
            description="normalise scores against a cohort of these images (AS-norm; higher TAR at a site "
            "the model never saw, see MODEL_CARD.md); false = decide on raw cosines"
        ),
    ] = True,
) -> CalibrationDetail:
    _service_wide(access)
    service.calibrate(
        fars=_fars(far),
        collection=access.collection(collection_arg(collection)),
        bootstrap=bootstrap,
        score_norm=score_norm,
    )
    return _detail(service)


@router.delete(
    "/calibration",
    dependencies=[Depends(require_scope("admin"))],
    response_model=CalibrationDetail,
    summary="Stop using the site calibration (admin)",
    description="Back to the model's own thresholds; the site calibration stays in the gallery's history.",
    responses=error_responses(403, e403=LIMITED_KEY),
)
def clear_calibration(service: ServiceDep, access: AccessDep) -> CalibrationDetail:
    _service_wide(access)
    service.clear_calibration()
    return _detail(service)

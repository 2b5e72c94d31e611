"""Wrong-patient alerts kept in the gallery: list them, read one, resolve one (confirm, dismiss, relabel)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from app.api.dependencies import (
    AccessDep,
    AlertIdPath,
    Label,
    PageLimit,
    PageOffset,
    ServiceDep,
    require_scope,
    resolve_as,
    visible_alert,
)
from app.api.schemas import AlertItem, AlertPage, AlertResolution, AlertState, error_responses
from app.service.clientargs import collection_arg

router = APIRouter(tags=["alerts"])

NOT_FOUND = error_responses(404, e404="unknown alert id")


@router.get(
    "/alerts",
    response_model=AlertPage,
    summary="List wrong-patient alerts",
    description=(
        "The alerts enrolments raised (`POST /images`, DICOMweb STOW-RS), newest first, each with its "
        "image and the image it matched as they are now (null once deleted), the operating point it "
        "was decided at, and how it was resolved. Filter by `state` (e.g. `open`: the review queue) and "
        '`collection` (omitted or "*" = every collection); page with `offset` and `limit`.'
    ),
)
def list_alerts(
    service: ServiceDep,
    access: AccessDep,
    state: Annotated[
        AlertState | None, Query(description="only alerts in this state; omitted = every state")
    ] = None,
    collection: Annotated[str | None, Query(description='"*" or omitted = every collection'), Label] = None,
    offset: PageOffset = 0,
    limit: PageLimit = 100,
) -> AlertPage:
    views, total = service.list_alerts(
        state=state,
        collection=access.collection(collection_arg(collection, None)),
        offset=offset,
        limit=limit,
    )
    return AlertPage(total=total, offset=offset, limit=limit, items=[AlertItem.of_view(v) for v in views])


@router.get(
    "/alerts/{alert_id}",
    response_model=AlertItem,
    summary="One wrong-patient alert",
    description="The alert, its image and the image it matched (as they are now), and its resolution.",
    responses=NOT_FOUND,
)
def get_alert(service: ServiceDep, access: AccessDep, alert_id: AlertIdPath) -> AlertItem:
    return AlertItem.of_view(service.alert_view(visible_alert(access, service.alert(alert_id))))


@router.post(
    "/alerts/{alert_id}",
    dependencies=[Depends(require_scope("write"))],
    response_model=AlertItem,
    summary="Resolve a wrong-patient alert",
    description=(
        "`confirm`: the image is misfiled (the gallery is not changed: delete or relabel it); "
        "`dismiss`: a false alarm; `relabel`: file the image under `patient_id` (default: the patient "
        "it matched), in the same transaction. Recorded with the API key id (`resolved_by`, "
        '"anonymous" without keys), the time and the `note`. Only an open alert can be resolved: '
        "409 when it was resolved before or its image deleted (nothing changes)."
    ),
    responses={
        **NOT_FOUND,
        **error_responses(409, e409="the alert is no longer open (resolved, or its image deleted)"),
    },
)
def resolve_alert(
    service: ServiceDep, access: AccessDep, alert_id: AlertIdPath, body: AlertResolution
) -> AlertItem:
    return AlertItem.of_view(service.alert_view(resolve_as(service, access, alert_id, body)))

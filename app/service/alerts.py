"""Alert review: read, list, count and resolve (confirm, dismiss, relabel) the wrong-patient alerts
enrolments stored, and tell the hook (webhook, counters) of each event.

Raising an alert is part of an enrolment (:meth:`app.service.reid.ReidService.enrol`), or of a
reviewer acting on a duplicate conflict (:meth:`AlertReview.alert_for_conflict`); reviewing one is a
job of its own, kept here so ``reid`` holds the model-facing work. :class:`AlertReview` is
mixed into ``ReidService`` (the API and the review pages see one service object); it uses the
service's gallery, its enrolment lock (a relabel changes the labels an enrolment's check reads) and
its ``on_alert_event`` hook.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.service.errors import ConflictError, InvalidInputError, NotFoundError
from app.service.results import AlertView
from app.service.scoring import record_key
from index import AlertNotOpenError, AlertRecord, Gallery, NewAlert

log = logging.getLogger(__name__)

#: How a reviewer resolves an alert, and the state each action leaves it in.
ALERT_ACTIONS = {"confirm": "confirmed", "dismiss": "dismissed", "relabel": "relabelled"}


class AlertReview:
    """The alert-review part of ``ReidService`` (see the module docstring)."""

    # provided by ReidService
    gallery: Gallery  # the open gallery; UnavailableError when none can serve
    _gallery: Gallery | None
    _enrol_lock: threading.Lock
    _on_alert_event: Callable[[str, AlertRecord], None] | None

    def _alert_event(self, event: str, alert: AlertRecord) -> None:
        """Tell the hook (webhook, counters); its failure never fails the request that caused it."""
        if self._on_alert_event is None:
            return
        try:
            self._on_alert_event(event, alert)
        except Exception:
            log.exception("alert %d: the %s hook failed", alert.alert_id, event)

    def alert(self, alert_id: int) -> AlertRecord:
        found = self.gallery.get_alert(alert_id)
        if found is None:
            raise NotFoundError(f"alert {alert_id} not found")
        return found

    def alert_view(self, alert: AlertRecord) -> AlertView:
        gallery = self.gallery
        other = gallery.get(alert.other_image_id) if alert.other_image_id is not None else None
        return AlertView(alert, gallery.get(alert.image_id), other)

    def list_alerts(
        self, *, state: str | None, collection: str | None, offset: int, limit: int
    ) -> tuple[list[AlertView], int]:
        """A page of stored alerts, newest first, each with its images as they are now."""
        alerts, total = self.gallery.list_alerts(
            state=state, collection=collection, offset=offset, limit=limit
        )
        return [self.alert_view(a) for a in alerts], total

    def open_alerts(self) -> int:
        """Open alerts in the gallery (0 while none is open): the Prometheus gauge."""
        if self._gallery is None:
            return 0
        try:
            return self._gallery.count_alerts("open")
        except Exception:  # a closing gallery: the scrape goes on
            return 0

    def alert_for_conflict(self, image_id: int, other_image_id: int) -> AlertRecord:
        """The alert a reviewer resolves for a duplicate conflict: ``image_id`` matches the patient of
        ``other_image_id`` though filed under another. Raised now, scored at the operating point in
        force, so a conflict is confirmed, dismissed or relabelled as an enrolment's alert is (and
        its resolution kept with who and when); an open one for the same pair is reused."""
        gallery = self.gallery
        image, other = gallery.get(int(image_id)), gallery.get(int(other_image_id))
        for wanted, record in ((image_id, image), (other_image_id, other)):
            if record is None:
                raise NotFoundError(f"image {wanted} not found")
        assert image is not None and other is not None
        if image.collection != other.collection:
            raise InvalidInputError(
                f"images {image_id} and {other_image_id} are in different collections ({image.collection}, "
                f"{other.collection}): patient ids of two collections are not compared"
            )
        if image.patient_id is not None and image.patient_id == other.patient_id:
            raise ConflictError(
                f"images {image_id} and {other_image_id} are both filed under {image.patient_id} now; "
                "nothing to resolve"
            )
        offset = 0
        while True:  # an open alert about this pair already (a second click, a second reviewer)
            alerts, total = gallery.list_alerts(
                state="open", collection=image.collection, offset=offset, limit=500
            )
            for alert in alerts:
                if alert.image_id == image.image_id and alert.other_image_id == other.image_id:
                    return alert
            offset += len(alerts)
            if not alerts or offset >= total:
                break
        point = self.operating_point()  # type: ignore[attr-defined]
        _, a = self.stored_vector(image.image_id)  # type: ignore[attr-defined]
        _, b = self.stored_vector(other.image_id)  # type: ignore[attr-defined]
        _, score = self.scorer.pair(a, record_key(image), b, record_key(other))  # type: ignore[attr-defined]
        alert = NewAlert(
            kind="matches_other_patient",
            message=(
                f"duplicate conflict: filed under patient '{image.patient_id}' but matches image "
                f"{other.image_id} of patient '{other.patient_id}' (score {score:.3f}, threshold "
                f"{point.threshold:.3f})"
            ),
            score=float(score),
            other_patient_id=other.patient_id,
            other_image_id=other.image_id,
            operating_point={
                "threshold": point.threshold,
                "far": point.far,
                "source": point.source,
                "calibration": dict(point.calibration),
            },
        )
        with self._enrol_lock:
            raised = gallery.raise_alert(image.image_id, alert)
        if raised is None:
            raise NotFoundError(f"image {image_id} not found")
        log.info(
            "alert %d raised from a duplicate conflict (images %d, %d)",
            raised.alert_id,
            image_id,
            other_image_id,
        )
        self._alert_event("raised", raised)
        return raised

    def resolve_alert(
        self,
        alert_id: int,
        *,
        action: str,
        resolved_by: str,
        patient_id: str | None = None,
        note: str | None = None,
    ) -> AlertRecord:
        """Confirm (the image is misfiled), dismiss (a false alarm) or relabel (file the image under
        ``patient_id``, by default the patient it matched) an open alert; recorded with who and when.
        Under the enrolment lock: a relabel changes the labels an enrolment's check reads."""
        state = ALERT_ACTIONS.get(action)
        if state is None:
            raise InvalidInputError(f"action must be one of {', '.join(ALERT_ACTIONS)}")
        alert = self.alert(alert_id)
        if action != "relabel" and patient_id is not None:
            raise InvalidInputError("patient_id is only for the action 'relabel'")
        new_patient = None
        if action == "relabel":
            new_patient = patient_id or alert.other_patient_id
            if new_patient is None:
                raise InvalidInputError(
                    "relabel: give the patient_id to file the image under (this alert names no other patient)"
                )
        with self._enrol_lock:
            try:
                resolved = self.gallery.resolve_alert(
                    alert_id, state=state, resolved_by=resolved_by, note=note, new_patient_id=new_patient
                )
            except AlertNotOpenError as exc:
                raise ConflictError(
                    f"alert {alert_id} is already {exc.alert.state}"
                    + (f" (since {exc.alert.resolved_at})" if exc.alert.resolved_at else "")
                    + "; nothing changed"
                ) from None
        if resolved is None:
            raise NotFoundError(f"alert {alert_id} not found")
        # ids only: the note and the patients stay out of the log
        log.info("alert %d %s by %s (image %d)", alert_id, state, resolved_by, resolved.image_id)
        self._alert_event(state, resolved)
        return resolved

"""What the service can refuse, in domain terms. The HTTP edge (``app.api.status``) maps each kind
to a status code; nothing in ``app.service`` knows HTTP."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service cannot serve, in domain terms (``detail`` says what and why)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInputError(ServiceError):
    """The client sent something unusable (bad image, contradictory fields)."""


class NotFoundError(ServiceError):
    """No such image, or no images of such a patient."""


class PayloadTooLargeError(ServiceError):
    """An upload, or the decoding it needs, is over a configured limit."""


class ConflictError(ServiceError):
    """The request is valid but the service's data cannot satisfy it yet (e.g. too few labelled
    images to calibrate); nothing changed."""


class UnavailableError(ServiceError):
    """The service is up but cannot answer this yet (gallery locked, damaged or of another model)."""


class BusyError(UnavailableError):
    """Too much decoding in flight to take this request now; worth retrying after ``retry_after``
    seconds."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

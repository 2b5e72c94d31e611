"""The HTTP status of each kind of service error: the one place where domain errors meet status
codes (the app's error handler and the review pages read it)."""

from __future__ import annotations

from app.service.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceError,
    UnavailableError,
)

#: The HTTP status of each kind of service error (the first that matches; one place for the mapping).
STATUS_OF_SERVICE_ERROR: tuple[tuple[type[ServiceError], int], ...] = (
    (InvalidInputError, 422),
    (NotFoundError, 404),
    (PayloadTooLargeError, 413),
    (ConflictError, 409),
    (UnavailableError, 503),
    (ServiceError, 400),
)


def status_of(exc: ServiceError) -> int:
    """The status code of ``exc``: its kind's, the first that matches."""
    return next(code for kind, code in STATUS_OF_SERVICE_ERROR if isinstance(exc, kind))

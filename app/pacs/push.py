"""Feeding a running cxr-reid service over HTTP: ``cxr-reid enroll --to URL`` and ``sync --to URL``.

A served gallery is held by its server (one process opens a data dir), so the bulk jobs send to the
server instead of opening the gallery: ``enroll`` posts each file to ``POST /images`` (one file per
request, with the manifest's labels; a file already filed under the same patient comes back
``already_enrolled``, so a rerun resumes), ``sync`` stores each instance it fetched with STOW-RS
(``POST /dicomweb/studies``: a SOPInstanceUID already in the collection is not enrolled again).

Retries: a 503 (gallery busy or not open yet) or 429 waits for its ``Retry-After`` (else a growing
pause) and a connection error a growing pause, up to :data:`ATTEMPTS` tries; any other answer is
final. The API key goes in ``X-API-Key`` and never into a log line.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.service.ingest import ALREADY_STORED_TEXT

log = logging.getLogger(__name__)

#: Tries per request when the service answers 503 / 429 or cannot be reached.
ATTEMPTS = 6
#: The longest pause between two tries, whatever Retry-After asks (seconds).
MAX_PAUSE = 30.0
#: Requests in flight at once: enough to keep the server's micro-batcher fed, few enough not to
#: crowd out the requests it serves meanwhile.
DEFAULT_CONCURRENCY = 4

STOW_FAILURE_REASON = "00081197"
REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE = "00081199", "00081198"
REFERENCED_SOP_INSTANCE, TEXT_VALUE = "00081155", "0040A160"


class ServiceUnreachableError(RuntimeError):
    """The service cannot take anything (down, refused the key, not a cxr-reid service): the run stops."""


class _StoppedError(Exception):
    """The run's stop event was set while a request waited to be tried again."""


@dataclass
class Pushed:
    """What the service made of one file or instance: ``status`` is enrolled, already or failed."""

    status: str
    reason: str = ""
    sop_instance_uid: str | None = None
    alert: str | None = None
    failure: int | None = None  # STOW-RS: the FailureReason code of a refused instance


def _pause(response: httpx.Response | None, attempt: int) -> float:
    """Retry-After when the answer gives one in seconds, else 0.5 s doubling; at most MAX_PAUSE."""
    if response is not None:
        given = response.headers.get("Retry-After", "")
        if given.strip().isdigit():
            return min(MAX_PAUSE, float(given))
    return min(MAX_PAUSE, 0.5 * 2**attempt)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail) if detail else f"HTTP {response.status_code}"


class ServiceClient:
    """HTTP to one running service, with the retries above; thread-safe (httpx's pool)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        concurrency: int = DEFAULT_CONCURRENCY,
        stop: threading.Event | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        self.stop = stop or threading.Event()

    def close(self) -> None:
        self._client.close()

    def check(self) -> None:
        """Fail early, before any work, when the service is not there or refuses the key for writing."""
        try:
            ready = self._client.get("/readyz")
        except httpx.HTTPError as exc:
            raise ServiceUnreachableError(f"no cxr-reid service answers at {self.url}: {exc}") from None
        if ready.status_code not in (200, 503) or "application/json" not in ready.headers.get(
            "content-type", ""
        ):
            raise ServiceUnreachableError(
                f"{self.url}/readyz answered HTTP {ready.status_code}: not cxr-reid"
            )
        # an empty STOW body is refused after the key check: 401/403 say the key will not do
        probe = self._client.post("/dicomweb/studies", content=b"", headers={"Content-Type": "text/plain"})
        if probe.status_code in (401, 403):
            raise ServiceUnreachableError(
                f"{self.url} refused the API key for writing (HTTP {probe.status_code}): give a key with "
                "the write scope in --api-key or CXR_REID_API_KEY"
            )

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(ATTEMPTS):
            response: httpx.Response | None = None
            try:
                response = self._client.post(path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS - 1:
                    raise ServiceUnreachableError(f"{self.url}{path}: {exc}") from None
                log.warning("%s%s: %s; trying again", self.url, path, exc)
            else:
                if response.status_code not in (429, 503) or attempt == ATTEMPTS - 1:
                    return response
                log.info("%s%s: HTTP %d, trying again", self.url, path, response.status_code)
            if self.stop.wait(_pause(response, attempt)):
                raise _StoppedError
        raise AssertionError("unreachable")  # pragma: no cover

    def _final(self, response: httpx.Response) -> None:
        """The answers that mean no file of the run will go in: stop the run rather than fail each."""
        if response.status_code in (401, 403, 404, 405, 503):
            raise ServiceUnreachableError(
                f"{self.url} answered HTTP {response.status_code}: {_detail(response)}"
            )

    def enrol_file(
        self,
        path: Path,
        *,
        collection: str,
        patient_id: str | None = None,
        view: str | None = None,
        split: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Pushed:
        """``POST /images`` with one file and its labels; a refusal (4xx) is this file's failure."""
        import json

        try:
            data = path.read_bytes()
        except OSError as exc:
            return Pushed("failed", f"cannot read: {exc.strerror or exc}")
        form = {"collection": collection}
        for name, value in (("patient_id", patient_id), ("view", view), ("split", split)):
            if value is not None:
                form[name] = value
        if tags:
            form["tags"] = json.dumps(tags)
        try:
            response = self._post("/images", data=form, files={"file": (path.name, data)})
        except _StoppedError:
            return Pushed("failed", "stopped before the service took it")
        if response.status_code == 201:
            [image] = response.json()["images"]
            alert = image.get("alert")
            return Pushed(
                "already" if image.get("already_enrolled") else "enrolled",
                alert=alert.get("kind") if isinstance(alert, dict) else None,
            )
        self._final(response)
        return Pushed("failed", f"HTTP {response.status_code}: {_detail(response)}")

    def stow(self, data: bytes, *, collection: str) -> Pushed:
        """One DICOM instance by STOW-RS; the answer's ReferencedSOPSequence (stored, or already there)
        or FailedSOPSequence item (its reason) says what became of it."""
        boundary = uuid.uuid4().hex
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            response = self._post(
                "/dicomweb/studies",
                params={"collection": collection},
                content=body,
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            )
        except _StoppedError:
            return Pushed("failed", "stopped before the service took it")
        if response.status_code not in (200, 202, 409):
            self._final(response)
            return Pushed("failed", f"HTTP {response.status_code}: {_detail(response)}")
        answer = response.json()
        for sequence, status in ((REFERENCED_SOP_SEQUENCE, "enrolled"), (FAILED_SOP_SEQUENCE, "failed")):
            for item in answer.get(sequence, {}).get("Value", []):
                sop = (item.get(REFERENCED_SOP_INSTANCE, {}).get("Value") or [None])[0]
                text = (item.get(TEXT_VALUE, {}).get("Value") or [""])[0]
                if status == "enrolled":
                    if text == ALREADY_STORED_TEXT:
                        return Pushed("already", sop_instance_uid=sop)
                    alert = text if text.startswith("wrong-patient alert") else None
                    return Pushed("enrolled", sop_instance_uid=sop, alert=alert)
                code = (item.get(STOW_FAILURE_REASON, {}).get("Value") or [0])[0]
                return Pushed(
                    "failed", text or f"FailureReason {code:#06x}", sop_instance_uid=sop, failure=code
                )
        return Pushed("failed", "the STOW-RS answer names no instance")

"""Bounded requests to a PACS that may be slow, broken or hostile (``cxr-reid sync``).

Every PACS request goes through here: a whole-answer deadline however slowly the bytes come, answers
refused past their caps while they stream (QIDO answers, retrieved instances, multipart parts), at most
so many pages per query and studies per run (:class:`SyncLimits`), and a stop event (SIGINT / SIGTERM,
:func:`stop_on_signals`) seen within :data:`POLL` seconds. :mod:`app.pacs.sync` decides what to fetch
and what to do with it; this module only makes sure no answer can cost unbounded time or memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Bounded PACS requests: a whole-answer deadline, size caps, and a stop that is seen within 0.1 s

MIB = 1024 * 1024
#: Pauses between retries while a PACS cannot be reached: doubled from the first up to the last.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
#: bytes per read of an answer, and the most chunks waiting between the reading thread and the run
CHUNK, QUEUED_CHUNKS = 64 * 1024, 4
#: how often a run waiting on the PACS looks at its stop event and its deadline
POLL = 0.1


@dataclass(frozen=True)
class SyncLimits:
    """What one run may spend on a PACS: each request within ``request_seconds`` all told (headers and
    the whole body, however slowly it drips; ``read_seconds`` bounds one read, ``connect_seconds`` the
    connection), each QIDO answer within ``max_query_bytes``, each retrieved instance within
    ``max_instance_bytes`` (the service's upload limit), at most ``max_pages`` QIDO pages per study
    query and ``max_studies`` studies looked at per run."""

    request_seconds: float = 300.0
    connect_seconds: float = 10.0
    read_seconds: float = 20.0
    max_query_bytes: int = 8 * MIB
    max_instance_bytes: int = 50 * MIB
    max_pages: int = 500
    max_studies: int = 10_000
    #: runs in a row a study may fail before it stops holding the ``--since last`` cursor back
    max_study_attempts: int = 5

    def __post_init__(self) -> None:
        for name in ("request_seconds", "connect_seconds", "read_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0")
        for name in (
            "max_query_bytes",
            "max_instance_bytes",
            "max_pages",
            "max_studies",
            "max_study_attempts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class SyncStoppedError(Exception):
    """The run's stop event was set (SIGINT / SIGTERM) while it waited on the PACS."""


class PacsAnswerError(Exception):
    """A PACS answer that was refused: an HTTP error status, past its deadline, over its size cap,
    cut short or malformed. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AnswerTooLargeError(PacsAnswerError):
    """A PACS answer (or one part of it) over its size cap."""


class _Answer:
    """One GET whose answer is read by a daemon thread and handed over in chunks, so that the run
    waits at most :data:`POLL` seconds at a time: it sees its stop event, and the deadline of the
    whole answer, however the PACS drips its bytes. An abandoned answer's thread ends at its next
    read (its socket is shut down) or at the read timeout."""

    def __init__(
        self,
        session: Any,
        url: str,
        *,
        params: Any,
        headers: dict[str, str],
        limits: SyncLimits,
        stop: threading.Event,
    ) -> None:
        self.url, self.limits, self.stop = url, limits, stop
        self.deadline = time.monotonic() + limits.request_seconds
        self.chunks: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.cancelled = threading.Event()
        self.response: Any = None
        args = (session, url, params, headers)
        self.thread = threading.Thread(target=self._read, args=args, name="pacs-answer", daemon=True)
        self.thread.start()
        kind, value = self._next()
        if kind == "error":
            self.close()
            raise PacsAnswerError(f"{url}: {value}") from value
        self.response = value
        self.status: int = value.status_code
        self.headers = value.headers

    def _read(self, session: Any, url: str, params: Any, headers: dict[str, str]) -> None:
        response = None
        try:
            response = session.get(
                url,
                params=params,
                headers=headers,
                stream=True,
                timeout=(self.limits.connect_seconds, self.limits.read_seconds),
            )
            self.response = response
            if not self._put(("head", response)):
                return
            for chunk in response.iter_content(CHUNK):
                if not self._put(("data", chunk)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 (handed to the run, which raises it)
            self._put(("error", exc))
        finally:
            if response is not None:
                response.close()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.cancelled.is_set():
            try:
                self.chunks.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def _next(self) -> tuple[str, Any]:
        while True:
            if self.stop.is_set():
                self.close()
                raise SyncStoppedError(f"stopped while waiting on {self.url}")
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise PacsAnswerError(
                    f"{self.url}: no whole answer within {self.limits.request_seconds:g} s "
                    "(--request-timeout)"
                )
            try:
                return self.chunks.get(timeout=min(POLL, left))
            except queue.Empty:
                continue

    def iter_bytes(self) -> Iterator[bytes]:
        """The body, chunk by chunk, under the deadline; raises PacsAnswerError past it."""
        try:
            while True:
                kind, value = self._next()
                if kind == "data":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise PacsAnswerError(f"{self.url}: the answer broke off: {value}") from value
        finally:
            self.close()

    def read(self, cap: int, what: str) -> bytes:
        """The whole body, refused (PacsAnswerError) as soon as it passes ``cap`` bytes."""
        declared = self.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            self.close()
            raise AnswerTooLargeError(
                f"{self.url}: {what} of {int(declared):,} bytes is over the cap of {cap:,}; refused"
            )
        body = bytearray()
        for chunk in self.iter_bytes():
            body += chunk
            if len(body) > cap:
                raise AnswerTooLargeError(f"{self.url}: {what} over the cap of {cap:,} bytes; refused")
        return bytes(body)

    def close(self) -> None:
        """Stop reading: the thread lets go at its next chunk, and a blocked read is woken by shutting
        its socket down (best effort: while the headers are still coming the socket is not reachable,
        and the read timeout ends the thread)."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        sock = _socket_of(self.response)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _socket_of(response: Any) -> Any:
    raw = getattr(response, "raw", None)
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:  # urllib3 hands the connection back to the pool once the body is read
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def _boundary(content_type: str) -> bytes | None:
    from email.message import Message

    message = Message()
    message["Content-Type"] = content_type
    value = message.get_param("boundary")
    return str(value).encode() if isinstance(value, str) and value else None


def multipart_parts(chunks: Iterable[bytes], boundary: bytes, cap: int) -> Iterator[bytes]:
    """The bodies of a ``multipart/related`` stream one at a time, each refused (PacsAnswerError) as soon
    as it passes ``cap`` bytes: memory holds one part. A stream cut short raises PacsAnswerError."""
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    source = iter(chunks)
    buffer = bytearray()

    def more(what: str) -> None:
        chunk = next(source, None)
        if chunk is None:
            raise PacsAnswerError(f"the multipart answer ended inside {what}")
        buffer.extend(chunk)

    head_cap = 64 * 1024
    while (start := buffer.find(delimiter)) < 0:
        if len(buffer) > head_cap:
            raise PacsAnswerError("no multipart boundary in the first 64 KiB of the answer")
        more("its preamble")
    del buffer[: start + len(delimiter)]
    while True:
        while len(buffer) < 2:
            more("a boundary")
        if buffer[:2] == b"--":
            return
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > head_cap:
                raise PacsAnswerError("multipart part headers over 64 KiB")
            more("part headers")
        del buffer[: end + 4]
        searched = 0
        while (end := buffer.find(separator, searched)) < 0:
            if len(buffer) > cap + len(separator):
                raise AnswerTooLargeError(f"an instance over the cap of {cap:,} bytes; refused")
            searched = max(0, len(buffer) - len(separator) + 1)
            more("an instance")
        if end > cap:
            raise AnswerTooLargeError(f"an instance of {end:,} bytes is over the cap of {cap:,}; refused")
        part = bytes(buffer[:end])
        del buffer[: end + len(separator)]
        yield part


class DicomwebReader:
    """QIDO-RS and WADO-RS over ``requests``, every answer streamed under :class:`SyncLimits` and the
    run's stop event (no retries: a study that fails is tried again by the next run)."""

    QIDO_ACCEPT = "application/dicom+json"
    WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        limits: SyncLimits | None = None,
        stop: threading.Event | None = None,
        session: Any = None,
    ) -> None:
        import requests

        self.base = url.rstrip("/")
        self.limits = limits or SyncLimits()
        self.stop = stop or threading.Event()
        self.session = session or requests.Session()
        self.session.headers.update(headers or {})

    def close(self) -> None:
        self.session.close()

    def _get(self, path: str, params: Any, accept: str) -> _Answer:
        answer = _Answer(
            self.session,
            self.base + path,
            params=params,
            headers={"Accept": accept},
            limits=self.limits,
            stop=self.stop,
        )
        if answer.status >= 400:
            answer.close()
            raise PacsAnswerError(f"{answer.url} answered {answer.status}", status=answer.status)
        return answer

    def _search(self, path: str, fields: Iterable[str], filters: dict[str, Any]) -> list[dict[str, Any]]:
        params = [*((k, str(v)) for k, v in filters.items()), *(("includefield", f) for f in fields)]
        answer = self._get(path, params, self.QIDO_ACCEPT)
        if answer.status == 204:
            answer.close()
            return []
        body = answer.read(self.limits.max_query_bytes, "QIDO-RS answer")
        if not body.strip():
            return []
        try:
            items = json.loads(body)
        except ValueError as exc:
            raise PacsAnswerError(f"{answer.url}: not a DICOM JSON answer ({exc})") from exc
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PacsAnswerError(f"{answer.url}: not a list of DICOM JSON objects")
        return items

    def search_for_studies(
        self,
        *,
        offset: int | None = None,
        limit: int | None = None,
        fields: Iterable[str] = (),
        search_filters: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        filters = dict(search_filters or {})
        if offset is not None:
            filters["offset"] = offset
        if limit is not None:
            filters["limit"] = limit
        return self._search("/studies", fields, filters)

    def search_for_series(self, study: str, fields: Iterable[str] = ()) -> list[dict[str, Any]]:
        return self._search(f"/studies/{study}/series", fields, {})

    def search_for_instances(
        self, study: str, series: str, fields: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        return self._search(f"/studies/{study}/series/{series}/instances", fields, {})

    def _instances(self, path: str, most: int) -> Iterator[bytes]:
        answer = self._get(path, None, self.WADO_ACCEPT)
        content_type = answer.headers.get("Content-Type", "")
        cap = self.limits.max_instance_bytes
        if content_type.split(";")[0].strip().lower() == "application/dicom":
            yield answer.read(cap, "an instance")
            return
        boundary = _boundary(content_type)
        if boundary is None:
            answer.close()
            raise PacsAnswerError(
                f"{answer.url}: not a multipart answer ({content_type or 'no Content-Type'})"
            )
        count = 0
        chunks = answer.iter_bytes()
        try:
            for part in multipart_parts(chunks, boundary, cap):
                count += 1
                if count > most:
                    raise PacsAnswerError(f"{answer.url}: more instances than the {most} listed; refused")
                yield part
        finally:
            answer.close()

    def iter_series(self, study: str, series: str, most: int) -> Iterator[bytes]:
        """The series' instances as DICOM files, one at a time (at most ``most`` of them)."""
        return self._instances(f"/studies/{study}/series/{series}", most)

    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes:
        parts = list(self._instances(f"/studies/{study}/series/{series}/instances/{sop}", 1))
        if not parts:
            raise PacsAnswerError(f"instance {sop}: an empty answer")
        return parts[0]


class Backoff:
    """Pauses between retries while a PACS cannot be reached: doubled from the first up to the last."""

    def __init__(self) -> None:
        self.pause = BACKOFF_FIRST
        self.failures = 0

    def failed(self) -> float:
        pause, self.pause = self.pause, min(self.pause * 2, BACKOFF_MAX)
        self.failures += 1
        return pause

    def reset(self) -> None:
        self.pause, self.failures = BACKOFF_FIRST, 0


class TransientPacsError(Exception):
    """The PACS (Orthanc) could not be reached, or answered 5xx: try the same change again later."""


@dataclass
class Fetched:
    """A whole (capped) answer of Orthanc's REST API."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def bounded_get(
    session: Any, url: str, *, limits: SyncLimits, stop: threading.Event, cap: int, what: str
) -> Fetched:
    """GET under ``limits`` (the whole-answer deadline; the body refused past ``cap`` bytes: raises
    AnswerTooLargeError). Raises TransientPacsError when Orthanc cannot be reached, answers 5xx or too
    slowly, SyncStoppedError when the run is stopped; a 4xx answer comes back without its body."""
    try:
        answer = _Answer(session, url, params=None, headers={}, limits=limits, stop=stop)
    except PacsAnswerError as exc:
        raise TransientPacsError(str(exc)) from exc
    if answer.status >= 400:
        answer.close()
        if answer.status >= 500:
            raise TransientPacsError(f"{url} answered {answer.status}")
        return Fetched(answer.status, b"")
    try:
        return Fetched(answer.status, answer.read(cap, what))
    except AnswerTooLargeError:
        raise
    except PacsAnswerError as exc:
        raise TransientPacsError(str(exc)) from exc


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT / SIGTERM set ``stop`` while in the block: a run waiting on the PACS stops within a
    fraction of a second, one enrolling an instance after it. The block gets the list of the signals
    caught; the handlers before it are put back after. Only in the main thread, where Python allows it."""
    import signal

    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping (the cursor is saved)", signum)
        caught.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

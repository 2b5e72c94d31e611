"""Wrong-patient alerts out of the service: the webhook sender (``CXR_REID_ALERT_WEBHOOK``).

Every alert an enrolment stores, and every resolution of one, is POSTed as JSON (``payload``: the
event and the alert as ``GET /alerts`` lists it) to the configured URL by one background thread.
Enrolment never waits on it: events go into a bounded queue, and when the queue is full (the
receiver has been down for long) the event is dropped with a logged warning and counted. A delivery
that fails (connection error, timeout, a 408 / 429 / 5xx answer) is retried with exponential back-off,
``attempts`` times in all; other 4xx answers are not retried. Logs name the alert id and the
receiver's host only, never patient ids or the URL's path and query (which may hold a token). The
gallery's alert table stays the record: ``GET /alerts?state=open`` shows what a dropped or failed
delivery missed.

Bodies carry patient ids, so a receiver must be able to tell them from forgeries and a network must
not read them. With a shared secret (``CXR_REID_ALERT_WEBHOOK_SECRET``) every POST is signed:
``X-CXR-Reid-Timestamp`` (Unix seconds) and ``X-CXR-Reid-Signature: sha256=<hex>``, the HMAC-SHA256
of ``"<timestamp>.<body>"`` under the secret (:func:`signature`); the receiver recomputes it over the
raw body and refuses stale timestamps (replays). Without a secret, or over plain http to another
host, the sender warns at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from index import AlertRecord

log = logging.getLogger(__name__)

#: Answers worth sending again; any other non-2xx status is the receiver refusing this payload.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def payload(event: str, alert: AlertRecord) -> dict[str, Any]:
    """What the webhook receives: ``event`` ("raised", or the state a resolution left: "confirmed",
    "dismissed", "relabelled") and the stored alert, field for field (the API's ``StoredAlertOut``
    documents the same fields; tests/test_alerts.py holds the two together)."""
    return {"event": event, "alert": dataclasses.asdict(alert)}


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret`` (what a receiver checks)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class AlertWebhook:
    """POST alert events to ``url`` from a background thread (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        timeout_seconds: float = 10.0,
        queue_size: int = 1000,
        secret: str | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.host = urlsplit(url).netloc.rsplit("@", 1)[-1] or "?"  # never a user:password part
        self._secret = secret or None
        if urlsplit(url).scheme.lower() == "http" and not _is_loopback(self.host):
            log.warning("alert webhook: %s is plain http: alerts carry patient ids; use https", self.host)
        if self._secret is None:
            log.warning(
                "alert webhook: no CXR_REID_ALERT_WEBHOOK_SECRET: bodies go unsigned, so %s cannot tell "
                "them from forgeries",
                self.host,
            )
        self.attempts = max(1, int(attempts))
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._on_outcome = on_outcome  # "delivered" | "retried" | "failed" | "dropped" (counter)
        self._queue: queue.Queue[tuple[str, AlertRecord] | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        self._worker = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._worker.start()

    def send(self, event: str, alert: AlertRecord) -> bool:
        """Queue an event without waiting; False (logged, counted) when the queue is full or closed."""
        if self._stop.is_set():
            self._outcome("dropped")
            log.warning("alert webhook: closed; alert %d (%s) not sent", alert.alert_id, event)
            return False
        try:
            self._queue.put_nowait((event, alert))
        except queue.Full:
            self._outcome("dropped")
            log.warning(
                "alert webhook: queue full (%d events waiting for %s); alert %d (%s) dropped",
                self._queue.maxsize,
                self.host,
                alert.alert_id,
                event,
            )
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop (the rest is dropped)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._worker.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()  # cuts a back-off wait short
        self._worker.join(1.0)
        left = self._queue.qsize()
        if left:
            log.warning("alert webhook: %d event(s) not sent before shutdown", left)
        self._client.close()

    # ---------------------------------------------------------------- the worker
    def _outcome(self, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._stop.is_set():
                return
            event, alert = item
            try:
                self._deliver(event, alert)
            except Exception:  # a bug must not end the thread: the next events still go out
                log.exception("alert webhook: alert %d (%s) failed unexpectedly", alert.alert_id, event)
                self._outcome("failed")

    def _headers(self, event: str, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-CXR-Reid-Event": event}
        if self._secret is not None:  # signed per attempt: a retry carries a fresh timestamp
            timestamp = str(int(time.time()))
            headers["X-CXR-Reid-Timestamp"] = timestamp
            headers["X-CXR-Reid-Signature"] = signature(self._secret, timestamp, body)
        return headers

    def _deliver(self, event: str, alert: AlertRecord) -> None:
        body = json.dumps(payload(event, alert)).encode("utf-8")
        for attempt in range(1, self.attempts + 1):
            retry, problem = False, ""
            try:
                response = self._client.post(self.url, content=body, headers=self._headers(event, body))
            except httpx.HTTPError as exc:  # connection refused, timeout, protocol error
                retry, problem = True, type(exc).__name__
            else:
                if response.is_success:
                    self._outcome("delivered")
                    log.info("alert webhook: alert %d (%s) delivered to %s", alert.alert_id, event, self.host)
                    return
                retry, problem = response.status_code in RETRY_STATUSES, f"HTTP {response.status_code}"
            if not retry or attempt == self.attempts:
                self._outcome("failed")
                log.warning(
                    "alert webhook: alert %d (%s) not delivered to %s after %d attempt(s): %s",
                    alert.alert_id,
                    event,
                    self.host,
                    attempt,
                    problem,
                )
                return
            wait = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1))
            self._outcome("retried")
            log.info(
                "alert webhook: alert %d (%s) to %s failed (%s), attempt %d of %d; retrying in %.1f s",
                alert.alert_id,
                event,
                self.host,
                problem,
                attempt,
                self.attempts,
                wait,
            )
            if self._stop.wait(wait):
                self._outcome("failed")
                return

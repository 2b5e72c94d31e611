"""GET /review: the wrong-patient alerts and /duplicates conflicts as one HTML page for a person.

Plain server-rendered HTML (the report kit's Jinja2 templates, autoescaped), no script needed: each
open alert shows its two radiographs side by side (PNG thumbnails drawn here from the stored
originals, inline as data URIs: each decoded once, inside the service's decode budget like any
upload, concurrent first loads of one original waiting for the one decode, and kept small in
:data:`THUMBNAILS`), the decision and the FAR it was taken at first, the score and the calibrated
probability with the prior it is at beside them (``?prior=`` for the site's own; by default the
prior at which the threshold is the Bayes decision, so the two never contradict each other),
patient ids, study dates and views, and one form whose buttons confirm, dismiss or relabel it through the same
``ReidService.resolve_alert`` as ``POST /alerts/{id}`` (then 303 back to the page).

Auth: the API key in ``X-API-Key`` as for the API, or, for a browser, a session: the login form
(``POST /review/login``) checks the key and sets an HttpOnly, SameSite=Strict cookie holding a random
session id, never the key; the key stays in this process (:class:`ReviewSessions`) and is checked
again on every request, so a revoked key ends its sessions, and signing out ends the session on the
server, not only in the browser. Every form carries an anti-CSRF token, an HMAC of the credential
under a secret drawn when the app starts. Without keys configured the page is as open as the rest
of the API.

Pages carry a Content-Security-Policy (nothing loads from elsewhere, only the page's own script runs,
by a per-response nonce; no framing) and the headers that go with it (:data:`PAGE_HEADERS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from PIL import Image
from pydantic import ValidationError

from app.api.dependencies import AlertIdPath, ServiceDep, authorise, get_access, resolve_as
from app.api.schemas import PRIOR_FIELD_DESCRIPTION, AlertResolution
from app.api.status import status_of
from app.reports import package_version, png_data_uri, render
from app.service.clientargs import collection_arg
from app.service.decoding import DecodeBudget, decode_source
from app.service.errors import BusyError, InvalidInputError, ServiceError
from app.service.reid import ReidService
from index import AlertRecord, ImageRecord
from models.imaging.preprocess import DECODE_BYTES_PER_PIXEL, PreprocessConfig, header_pixels
from models.scoring.calibration import check_prior
from models.scoring.decide import OperatingPoint

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

COOKIE = "cxr_reid_review"
#: How long a review session lasts without signing in again, and how many the process keeps.
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
#: Sent with every review page (the policy itself, with its nonce, is made per response).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: Open alerts per page, and conflicting /duplicates pairs shown (best first).
PAGE_SIZE = 20
MAX_CONFLICTS = 50
THUMB_SIDE = 192


def _secret(request: Request) -> bytes:
    state = request.app.state
    if getattr(state, "review_secret", None) is None:
        state.review_secret = secrets.token_bytes(32)
    return state.review_secret


class ReviewSessions:
    """Session id -> API key, in this process only: the browser holds an id that means nothing
    elsewhere, sessions end after :data:`SESSION_SECONDS` or at sign-out, and at most
    :data:`MAX_SESSIONS` are kept (the oldest ended first). A restart signs everyone out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, api_key: str) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = (api_key, self._clock() + SESSION_SECONDS)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def key_of(self, session: str | None) -> str | None:
        """The API key of a live session, else None (unknown, ended or expired)."""
        if not session:
            return None
        with self._lock:
            found = self._sessions.get(session)
            if found is None:
                return None
            if found[1] <= self._clock():
                del self._sessions[session]
                return None
            return found[0]

    def close(self, session: str | None) -> None:
        with self._lock:
            self._sessions.pop(session or "", None)


def _sessions(request: Request) -> ReviewSessions:
    state = request.app.state
    if getattr(state, "review_sessions", None) is None:
        state.review_sessions = ReviewSessions()
    return state.review_sessions


def _credential(request: Request) -> str | None:
    return request.headers.get("X-API-Key") or _sessions(request).key_of(request.cookies.get(COOKIE))


def _html(html_of: Callable[[str], str], status: int) -> HTMLResponse:
    """A review page with its headers; ``html_of(nonce)`` renders it with the nonce its script needs."""
    nonce = secrets.token_urlsafe(16)
    policy = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers = {**PAGE_HEADERS, "Content-Security-Policy": policy}
    return HTMLResponse(html_of(nonce), status_code=status, headers=headers)


def csrf_token(request: Request, credential: str | None) -> str:
    """The anti-CSRF token of a session: an HMAC of its credential (none: the open API)."""
    return hmac.new(_secret(request), (credential or "").encode(), hashlib.sha256).hexdigest()


class _Making:
    """One thumbnail being drawn: the lock its other callers wait on, and the error it ended in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.error: BaseException | None = None


class ThumbnailCache:
    """Drawn thumbnails (PNG data URIs, tens of kB each), at most ``size`` of them, least recently used
    out first. Each is made once: a caller asking for one being made waits for it instead of decoding
    the same original again, and gets its error if it failed (a busy budget is not waited for again by
    each waiter in turn). A failed drawing ("" or an exception) is not kept, so a busy decode budget
    does not leave a blank image for good."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._done: OrderedDict[Hashable, str] = OrderedDict()
        self._making: dict[Hashable, _Making] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], str]) -> str:
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            making = self._making.get(key)
            mine = making is None
            if making is None:
                making = self._making[key] = _Making()
                making.lock.acquire()
        if not mine:
            with making.lock:  # until the one drawing it is done
                pass
            if making.error is not None:
                raise making.error
            with self._lock:
                return self._done.get(key, "")
        value = ""
        try:
            value = make()
        except BaseException as exc:
            making.error = exc
            raise
        finally:
            with self._lock:
                if value:
                    self._done[key] = value
                    while len(self._done) > self.size:
                        self._done.popitem(last=False)
                del self._making[key]
            making.lock.release()
        return value

    def clear(self) -> None:
        with self._lock:
            self._done.clear()


#: The thumbnails of this process (a stored original's path never changes content: blobs are
#: content-addressed).
THUMBNAILS = ThumbnailCache()


def _draw(
    path: str, max_pixels: int, config: PreprocessConfig, budget: DecodeBudget | None, side: int
) -> str:
    """A stored original as a windowed, aspect-kept PNG data URI ("" when it cannot be read). The
    decode and the drawing hold a reservation of the budget, as ``decode_uploads`` does: ``header_pixels
    x DECODE_BYTES_PER_PIXEL``; :class:`BusyError` when the budget had no room in time."""
    name = "the stored original"
    try:
        data = FilePath(path).read_bytes()
        need = (header_pixels(data) or 0) * DECODE_BYTES_PER_PIXEL
        with budget.reserve(need, name) if budget is not None else contextlib.nullcontext():
            radiograph = decode_source(data, max_pixels=max_pixels, name=name, config=config)
            del data
            pixels = np.asarray(radiograph.pixels, dtype=np.float32)
            del radiograph
            if not pixels.flags.writeable:  # windowed in place below
                pixels = pixels.copy()
            low, high = np.percentile(pixels, [config.low_percentile, config.high_percentile])
            pixels -= low
            pixels *= 1.0 / max(float(high - low), 1e-6)
            np.clip(pixels, 0.0, 1.0, out=pixels)
            pixels *= 255.0
            pixels += 0.5
            image = Image.fromarray(pixels.astype(np.uint8), mode="L")
            del pixels
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            return png_data_uri(np.asarray(image))
    except BusyError:
        raise
    except (OSError, ServiceError, ValueError) as exc:
        log.warning("review: a stored original could not be drawn (%s)", type(exc).__name__)
        return ""


def thumbnail(service: ReidService, record: ImageRecord | None, side: int = THUMB_SIDE) -> str:
    """The thumbnail of a record's stored original, drawn once within the decode budget ("" if none;
    :class:`BusyError` when the budget had no room in time)."""
    path = record and (record.stored_path or record.source_path)
    if not path:
        return ""
    config = service.embedder.preprocess_config
    key = (path, service.max_pixels, config, side)
    budget = service.decode_budget
    return THUMBNAILS.get(key, lambda: _draw(path, service.max_pixels, config, budget, side))


class _Sides:
    """The sides of one page: after the decode budget was busy once, the page's remaining thumbnails
    are left out (drawn on a later load) rather than each waiting for room in turn."""

    def __init__(self, service: ReidService) -> None:
        self.service = service
        self.busy = False

    def __call__(self, record: ImageRecord | None, role: str) -> dict:
        src = ""
        if not self.busy:
            try:
                src = thumbnail(self.service, record)
            except BusyError:
                self.busy = True
                log.warning("review: the decode budget is busy; thumbnails left out of this page")
        return {"role": role, "record": record, "src": src}


def share(x: float | None) -> str:
    """A probability or prior as a percentage that never rounds a doubt away: 99.98% stays 99.98%,
    not 100.0%; 0.012% stays 0.012%, not 0.0%."""
    if x is None:
        return "n/a"
    pct = 100.0 * x
    for digits in range(1, 5):
        text = f"{pct:.{digits}f}"
        if 0.0 < float(text) < 100.0 or pct in (0.0, 100.0):
            return f"{text}%"
    return "< 0.0001%" if pct < 50 else "> 99.9999%"


def _chance(
    service: ReidService, score: float, point: OperatingPoint, prior: float | None
) -> dict[str, str | None]:
    """Probability and prior of one score, as the page prints them."""
    found = service.posterior(score, point, prior)
    return {
        "probability": share(found.probability),
        "prior": share(found.prior),
        "prior_source": found.prior_source,
    }


def _alert_chance(service: ReidService, alert: AlertRecord, prior: float | None) -> dict[str, str | None]:
    """The probability of an alert's score at the operating point it was raised at; n/a when the
    calibration in force is not the one it was scored under (another scale: the number would lie)."""
    decided = alert.operating_point or {}
    if decided.get("calibration") != service.calibration.summary() or "threshold" not in decided:
        return {"probability": None, "prior": None, "prior_source": None}
    point = OperatingPoint(float(decided["threshold"]), float(decided.get("far") or 0.0), "alert")
    return _chance(service, alert.score, point, prior)


def _page(
    request: Request,
    service: ReidService,
    *,
    collection: str | None,
    offset: int,
    prior: float | None = None,
    notice: str = "",
    error: str = "",
    status: int = 200,
) -> HTMLResponse:
    access = get_access(request)
    key = access.key
    if collection is None and key is not None and key.collections:
        collection = key.collections[0]  # a limited key must name a collection: its first
    where = access.collection(collection_arg(collection, None))
    views, total = service.list_alerts(state="open", collection=where, offset=offset, limit=PAGE_SIZE)
    side = _Sides(service)
    alerts = [
        {
            "view": v,
            "sides": [side(v.image, "enrolled"), side(v.other_image, "matched")],
            **_alert_chance(service, v.alert, prior),
        }
        for v in views
    ]
    point = service.operating_point()
    report = service.duplicates(point=point, collection=where, conflicts_only=True)
    settled = _settled_pairs(service, where)
    pairs = [p for p in report.pairs if frozenset((p.a.image_id, p.b.image_id)) not in settled]
    groups: dict[str, list[dict]] = {}
    for p in pairs[:MAX_CONFLICTS]:
        same = p.a.collection == p.b.collection
        groups.setdefault(p.a.collection if same else "", []).append(
            {
                "pair": p,
                "sides": [side(p.a, "a"), side(p.b, "b")],
                "actionable": same,
                **_chance(service, p.score, point, prior),
            }
        )
    # one section per collection (patient ids are per collection), pairs across collections last
    conflict_groups = sorted(groups.items(), key=lambda item: (item[0] == "", item[0]))
    return _html(
        lambda nonce: render(
            "review.html.j2",
            nonce=nonce,
            version=package_version(),
            model_id=service.model_id,
            created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            alerts=alerts,
            total=total,
            offset=offset,
            page_size=PAGE_SIZE,
            collection=collection or "",
            conflict_groups=conflict_groups,
            shown_conflicts=min(len(pairs), MAX_CONFLICTS),
            total_conflicts=max(report.total_conflicts - (len(report.pairs) - len(pairs)), 0),
            settled_conflicts=len(report.pairs) - len(pairs),
            threshold=point.threshold,
            far=point.far,
            prior="" if prior is None else f"{prior:g}",
            csrf=csrf_token(request, _credential(request)),
            key_id=key.key_id if key is not None else None,
            notice=notice,
            error=error,
            base=request.url_for("review_page").path,
        ),
        status,
    )


def _settled_pairs(service: ReidService, collection: str | None) -> set[frozenset[int]]:
    """Image pairs a reviewer already judged different patients: a dismissed alert raised from a
    conflict (or an enrolment) about them. They stay out of the conflicts (a relabel needs no
    filter: the two images share a patient after it)."""
    settled: set[frozenset[int]] = set()
    offset = 0
    while True:
        views, total = service.list_alerts(state="dismissed", collection=collection, offset=offset, limit=500)
        settled.update(
            frozenset((v.alert.image_id, v.alert.other_image_id))
            for v in views
            if v.alert.other_image_id is not None
        )
        offset += len(views)
        if not views or offset >= total:
            return settled


def _login_page(request: Request, message: str = "", status: int = 401) -> HTMLResponse:
    response = _html(
        lambda nonce: render(
            "review_login.html.j2",
            nonce=nonce,
            version=package_version(),
            model_id="",
            created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            message=message,
            base=request.url_for("review_page").path,
        ),
        status,
    )
    if request.cookies.get(COOKIE):
        _sessions(request).close(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/")
    return response


def _signed_in(request: Request, scope: str) -> bool:
    """Authorise the header or cookie credential; False (no exception) when none or a bad one."""
    try:
        authorise(request, _credential(request), scope)
    except HTTPException as exc:
        if exc.status_code == 401:
            return False
        raise
    return True


@router.get("/review", response_class=HTMLResponse, name="review_page")
def review_page(
    request: Request,
    service: ServiceDep,
    collection: Annotated[str | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    resolved: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    state: Annotated[str | None, Query(max_length=20)] = None,
    prior: Annotated[str | None, Query(max_length=40, description=PRIOR_FIELD_DESCRIPTION)] = None,
) -> Response:
    if not _signed_in(request, "read"):
        return _login_page(request)
    notice = ""
    if resolved is not None and state in ("confirmed", "dismissed", "relabelled"):
        notice = f"alert {resolved} {state}"
    try:  # the page's own form sends "" for "no prior of mine"
        chosen = check_prior(prior) if prior and prior.strip() else None
    except ValueError as exc:
        return _page(request, service, collection=collection, offset=offset, error=str(exc), status=422)
    return _page(request, service, collection=collection, offset=offset, prior=chosen, notice=notice)


@router.post("/review/login", name="review_login")
def review_login(request: Request, api_key: Annotated[str, Form(max_length=512)] = "") -> Response:
    try:
        authorise(request, api_key.strip(), "read")
    except HTTPException as exc:
        if exc.status_code == 401:
            return _login_page(request, "That API key is not valid.")
        raise
    response = RedirectResponse(request.url_for("review_page").path, status_code=303)
    if api_key.strip():
        response.set_cookie(
            COOKIE,
            _sessions(request).open(api_key.strip()),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
    return response


@router.post("/review/logout", name="review_logout")
def review_logout(request: Request) -> Response:
    _sessions(request).close(request.cookies.get(COOKIE))
    response = RedirectResponse(request.url_for("review_page").path, status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.post("/review/alerts/{alert_id}", name="review_resolve")
def review_resolve(
    request: Request,
    service: ServiceDep,
    alert_id: AlertIdPath,
    action: Annotated[str, Form(max_length=20)] = "",
    patient_id: Annotated[str, Form(max_length=1024)] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    collection: Annotated[str, Form(max_length=300)] = "",
) -> Response:
    credential = _credential(request)
    authorise(request, credential, "write")
    if not hmac.compare_digest(csrf.encode(), csrf_token(request, credential).encode()):
        raise HTTPException(
            status_code=403, detail="missing or wrong anti-CSRF token: reload the review page"
        )
    access = get_access(request)
    try:
        body = AlertResolution(
            action=action,
            patient_id=(patient_id or None) if action == "relabel" else None,
            note=note.strip() or None,
        )
        resolved = resolve_as(service, access, alert_id, body)
    except ServiceError as exc:
        status = status_of(exc)
        return _page(
            request,
            service,
            collection=collection or None,
            offset=0,
            error=f"alert {alert_id}: {exc.detail}",
            status=status,
        )
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _page(
            request,
            service,
            collection=collection or None,
            offset=0,
            error=f"alert {alert_id}: {reasons}",
            status=422,
        )
    target = request.url_for("review_page").include_query_params(
        resolved=alert_id, state=resolved.state, **({"collection": collection} if collection else {})
    )
    return RedirectResponse(f"{target.path}?{target.query}", status_code=303)


#: The buttons of a duplicate conflict, and the alert action each becomes.
CONFLICT_ACTIONS = {"relabel_a": "relabel", "relabel_b": "relabel", "dismiss": "dismiss"}


@router.post("/review/conflicts", name="review_conflict")
def review_conflict(
    request: Request,
    service: ServiceDep,
    a: Annotated[int, Form(ge=1, le=2**62)],
    b: Annotated[int, Form(ge=1, le=2**62)],
    action: Annotated[str, Form(max_length=20)] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    collection: Annotated[str, Form(max_length=300)] = "",
) -> Response:
    """A conflict's buttons: file image a under b's patient (relabel_a) or b under a's (relabel_b),
    or dismiss the pair as two patients. Each raises the alert the pair deserves
    (``alert_for_conflict``) and resolves it through the path of the alert forms, so the decision is
    kept with who made it and when, and a dismissed pair is not shown again."""
    credential = _credential(request)
    authorise(request, credential, "write")
    if not hmac.compare_digest(csrf.encode(), csrf_token(request, credential).encode()):
        raise HTTPException(
            status_code=403, detail="missing or wrong anti-CSRF token: reload the review page"
        )
    access = get_access(request)
    chosen = CONFLICT_ACTIONS.get(action)
    try:
        if chosen is None:
            raise InvalidInputError(f"action must be one of {', '.join(CONFLICT_ACTIONS)}")
        moved, keep = (a, b) if action == "relabel_a" else (b, a)  # dismiss: about b, as relabel_b
        for image_id in (moved, keep):
            access.record(service.record(image_id))  # another collection's image is "not found"
        alert = service.alert_for_conflict(moved, keep)
        body = AlertResolution(
            action=chosen,
            patient_id=alert.other_patient_id if chosen == "relabel" else None,
            note=note.strip() or None,
        )
        resolved = resolve_as(service, access, alert.alert_id, body)
    except ServiceError as exc:
        return _page(
            request,
            service,
            collection=collection or None,
            offset=0,
            error=f"conflict of images {a} and {b}: {exc.detail}",
            status=status_of(exc),
        )
    target = request.url_for("review_page").include_query_params(
        resolved=resolved.alert_id, state=resolved.state, **({"collection": collection} if collection else {})
    )
    return RedirectResponse(f"{target.path}?{target.query}", status_code=303)

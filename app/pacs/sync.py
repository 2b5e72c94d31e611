"""Pull radiographs from a PACS into the gallery: ``cxr-reid sync`` (issue 13).

Two ways in, one enrolment path (:class:`Enroller`, through :func:`app.service.ingest.ingest_instance`,
the check-and-enrol path STOW-RS uses too, so each instance gets the wrong-patient check of
``POST /images`` against the gallery as it stands):

* :func:`sync_dicomweb`: QIDO-RS lists the studies (``ModalitiesInStudy`` and ``StudyDate`` filters,
  paged with limit/offset), oldest first; per study the series of the wanted modalities, per series the
  instances not yet in the collection (QIDO-RS instance level), retrieved with WADO-RS one series (or,
  when part of it is already there, one instance) at a time, streamed, so memory holds one instance.
  The cursor in ``<data dir>/sync-state.json`` lists the studies fully done (with their instance
  count): a rerun, or a run after an interruption, skips them without fetching anything, and looks
  again at a done study only when the PACS reports more instances in it.
* :func:`follow_orthanc_changes`: Orthanc's ``GET /changes?since=N&limit=M`` feed; each
  ``NewInstance`` is read (``/instances/{id}/tags?simplify`` first, the file only when it is wanted)
  and enrolled; the last sequence number is kept in the same state file after each change, so the
  follower resumes where it stopped. Connection errors and 5xx answers are logged and retried with a
  growing pause (Orthanc restarting); a change log that starts again below the stored number (a new
  Orthanc database) is followed from 0 (instances already in the gallery are skipped by
  SOPInstanceUID).

Every instance is filed under its DICOM PatientID, StudyInstanceUID, SOPInstanceUID and ViewPosition;
one already in the collection (same SOPInstanceUID) is not enrolled again; one whose Modality is not a
projection radiograph (or not among ``--modality``) is refused; one that cannot be fetched, decoded or
stored is counted as failed and the run goes on. Patients' ids and alert messages stay out of the log
(alert kinds and image ids only); :class:`SyncSummary` carries the alerts in full.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.service.errors import ServiceError
from app.service.ingest import IngestStatus, InstanceRules, ingest_instance
from app.service.reid import ReidService
from index import AlertRecord, GalleryError
from index._fs import atomic_write_bytes
from models.imaging.preprocess import RADIOGRAPH_MODALITIES

log = logging.getLogger(__name__)

STATE_FILE = "sync-state.json"
#: QIDO-RS page size (studies per request).
PAGE_SIZE = 100
#: Orthanc /changes page size.
CHANGES_LIMIT = 100
#: Pauses between retries while Orthanc cannot be reached: doubled from the first up to the last.
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0

# DICOM JSON tags of QIDO-RS answers
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
STUDY_DATE, STUDY_TIME, MODALITY, MODALITIES_IN_STUDY = "00080020", "00080030", "00080060", "00080061"
STUDY_INSTANCES, SERIES_INSTANCES = "00201208", "00201209"


class SyncUnavailableError(RuntimeError):
    """The PACS cannot be reached or refuses the first request: nothing was done."""


@dataclass
class SyncAlert:
    """A wrong-patient alert raised by an instance's enrolment."""

    image_id: int
    sop_instance_uid: str
    alert: AlertRecord


@dataclass
class SyncSummary:
    studies: int = 0  # studies looked at this run (dicomweb)
    studies_done_before: int = 0  # skipped: done in an earlier run (the cursor)
    seen: int = 0  # instances met (refused by their series' modality included)
    enrolled: int = 0
    already: int = 0  # already in the collection (same SOPInstanceUID)
    refused: int = 0  # not a radiograph / not among --modality
    failed: list[tuple[str, str]] = field(default_factory=list)  # (instance, reason)
    alerts: list[SyncAlert] = field(default_factory=list)
    newest_study_date: str | None = None
    last_change: int | None = None  # orthanc-changes: the sequence number reached
    interrupted: bool = False

    def line(self) -> str:
        parts = []
        if self.last_change is None:
            parts.append(f"studies {self.studies} (+{self.studies_done_before} done before)")
        else:
            parts.append(f"changes up to {self.last_change}")
        parts.append(
            f"instances seen {self.seen}, enrolled {self.enrolled}, already there {self.already}, "
            f"refused {self.refused}, failed {len(self.failed)}"
        )
        alerts = ", ".join(
            f"image {a.image_id} {a.alert.kind}" + (f" alert {a.alert.alert_id}" if a.alert.alert_id else "")
            for a in self.alerts
        )
        parts.append(f"alerts {len(self.alerts)}" + (f" ({alerts})" if alerts else ""))
        if self.newest_study_date:
            parts.append(f"newest StudyDate {self.newest_study_date}")
        if self.interrupted:
            parts.append("interrupted")
        return "; ".join(parts)


class SyncState:
    """``<data dir>/sync-state.json``: one entry per (kind, PACS URL, collection), written atomically."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / STATE_FILE
        try:
            self.data = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.data = {}
        except (OSError, ValueError) as exc:
            raise SyncUnavailableError(f"cannot read the sync cursor {self.path}: {exc}") from exc
        self.data.setdefault("sources", {})

    def source(self, kind: str, url: str, collection: str) -> dict[str, Any]:
        return self.data["sources"].setdefault(f"{kind} {url.rstrip('/')} {collection}", {})

    def save(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())


def parse_modalities(text: str | None) -> frozenset[str]:
    """``--modality CR,DX``: radiograph modalities only (ValueError otherwise); None: all of them."""
    if not text:
        return RADIOGRAPH_MODALITIES
    wanted = frozenset(m.strip().upper() for m in text.split(",") if m.strip())
    others = wanted - RADIOGRAPH_MODALITIES
    if not wanted or others:
        raise ValueError(
            f"--modality {text!r}: only projection radiographs can be enrolled "
            f"({', '.join(sorted(RADIOGRAPH_MODALITIES))})"
        )
    return wanted


def parse_since(text: str | None) -> str | None:
    """``--since 2024-05-01`` or ``20240501`` -> ``20240501`` (ValueError otherwise)."""
    if not text:
        return None
    digits = text.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise ValueError(f"--since {text!r}: give a date as YYYY-MM-DD or YYYYMMDD (or 'last')")
    return digits


class Enroller:
    """Enrols instances one by one into a collection and counts what became of each."""

    def __init__(
        self, service: ReidService, summary: SyncSummary, *, collection: str, modalities: frozenset[str]
    ) -> None:
        self.service, self.summary = service, summary
        self.collection, self.modalities = collection, modalities
        self.rules = InstanceRules(modalities=modalities)
        self.point = service.operating_point()

    def wanted(self, sop: str | None, modality: str | None) -> bool:
        """Count an instance seen from its tags alone; True when it should be fetched and enrolled."""
        self.summary.seen += 1
        if modality is not None and modality.upper() not in self.modalities:
            self.summary.refused += 1
            log.info(
                "instance %s refused: Modality %s is not among %s", sop, modality, sorted(self.modalities)
            )
            return False
        if sop and self.service.find_by_sop_instance_uid(sop, collection=self.collection):
            self.summary.already += 1
            return False
        return True

    def fail(self, name: str, reason: str) -> None:
        log.error("instance %s failed: %s", name, reason)
        self.summary.failed.append((name, reason))

    def enrol(self, data: bytes, name: str) -> bool:
        """Check and enrol one DICOM file already counted by :meth:`wanted` (:func:`ingest_instance`);
        False when it failed (refused and already-there instances are not failures)."""
        summary = self.summary
        done = ingest_instance(
            self.service, data, collection=self.collection, point=self.point, rules=self.rules
        )
        sop, status, error = done.sop_instance_uid, done.status, done.error
        if status is IngestStatus.UNREADABLE:
            self.fail(name, f"not a readable DICOM file ({error})")
            return False
        if sop is None:  # IngestStatus.NO_SOP_UIDS
            self.fail(name, "no SOPInstanceUID")
            return False
        if status is IngestStatus.OTHER_MODALITY:
            summary.refused += 1
            shown = done.modality or "(missing)"
            log.info("instance %s refused: Modality %s is not among %s", sop, shown, sorted(self.modalities))
            return True
        if status is IngestStatus.ALREADY_STORED:
            summary.already += 1
            return True
        if isinstance(error, ServiceError):  # undecodable pixels, the quality gate, the decode budget
            self.fail(sop, error.detail)
            return False
        if isinstance(error, (GalleryError, ValueError)):
            self.fail(sop, f"could not be stored: {error}")
            return False
        if error is not None:  # anything else is still one instance's failure, not the run's
            log.error("instance %s: unexpected error", sop, exc_info=error)
            self.fail(sop, f"unexpected error: {error!r}")
            return False
        result = done.result
        summary.enrolled += 1
        if result is not None and result.alert is not None:
            image_id = result.record.image_id
            # the kind and ids only: the message names patients, which stay out of logs
            log.warning("wrong-patient alert %s on image %d (instance %s)", result.alert.kind, image_id, sop)
            summary.alerts.append(SyncAlert(image_id, sop, result.alert))
        return True


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _count(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _search_studies(client: Any, filters: dict[str, str]) -> list[dict[str, Any]]:
    """Every study the filters match, page by page (limit/offset)."""
    fields = ["StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]
    studies: list[dict[str, Any]] = []
    while True:
        page = client.search_for_studies(
            offset=len(studies), limit=PAGE_SIZE, fields=fields, search_filters=dict(filters)
        )
        studies += page
        if len(page) < PAGE_SIZE:
            return studies


def _list_studies(client: Any, modalities: frozenset[str], since: str | None) -> list[dict[str, Any]]:
    """The studies to look at, oldest first. The ModalitiesInStudy filter is asked for; a PACS that
    refuses it is asked without it (the series are filtered by their Modality in any case)."""
    import requests

    base = {"StudyDate": f"{since}-"} if since else {}
    try:
        studies = _search_studies(client, {**base, "ModalitiesInStudy": ",".join(sorted(modalities))})
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status not in (400, 501):
            raise
        log.info("the PACS refused the ModalitiesInStudy filter (%s); filtering series instead", status)
        studies = _search_studies(client, base)
    studies = [s for s in studies if _first(s, STUDY_UID)]
    return sorted(
        studies,
        key=lambda s: (_first(s, STUDY_DATE) or "", _first(s, STUDY_TIME) or "", _first(s, STUDY_UID)),
    )


def _sync_study(client: Any, enroller: Enroller, study: str, stop: threading.Event, bar: Any) -> bool:
    """Enrol one study's wanted instances; True when every instance was dealt with (none failed)."""
    ok = True
    for series in client.search_for_series(study, fields=["Modality", "NumberOfSeriesRelatedInstances"]):
        if stop.is_set():
            return False
        series_uid, modality = _first(series, SERIES_UID), _first(series, MODALITY)
        if not series_uid:
            continue
        if modality and str(modality).upper() not in enroller.modalities:
            count = _count(series, SERIES_INSTANCES) or 1
            enroller.summary.seen += count
            enroller.summary.refused += count
            bar.update(count)
            log.info("series %s (%d instance(s)) refused: Modality %s", series_uid, count, modality)
            continue
        instances = client.search_for_instances(study, series_uid, fields=["Modality"])
        missing = []
        for item in instances:
            sop = _first(item, SOP_UID)
            if enroller.wanted(sop, _first(item, MODALITY) or modality):
                missing.append(sop)
            else:
                bar.update(1)
        if not missing:
            continue
        if len(missing) == len(instances):  # none there yet: the series in one streamed request
            fetched: Iterable[Any] = client.iter_series(study, series_uid)
        else:
            fetched = (client.retrieve_instance(study, series_uid, sop) for sop in missing)
        done = set()
        try:
            for ds in fetched:
                done.add(str(ds.get("SOPInstanceUID", "")))
                ok = enroller.enrol(_dataset_bytes(ds), str(ds.get("SOPInstanceUID", "?"))) and ok
                bar.update(1)
                if stop.is_set():
                    return False
        except Exception as exc:  # a broken stream or an HTTP error: the rest of the series failed
            for sop in missing:
                if sop not in done:
                    enroller.fail(sop, f"could not be retrieved: {exc}")
                    bar.update(1)
            ok = False
    return ok


def _dataset_bytes(ds: Any) -> bytes:
    """A retrieved instance as a DICOM file again (dicomweb-client hands out parsed datasets)."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dicomweb_client(url: str, headers: dict[str, str] | None = None) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url.rstrip("/"), headers=headers or None)


def sync_dicomweb(
    service: ReidService,
    url: str,
    *,
    state: SyncState,
    collection: str = "default",
    modalities: frozenset[str] = RADIOGRAPH_MODALITIES,
    since: str | None = None,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
    client: Any = None,
) -> SyncSummary:
    """One pass over a DICOMweb PACS (QIDO-RS + WADO-RS); see the module docstring.

    ``since``: a StudyDate (YYYYMMDD) or ``"last"`` (the newest StudyDate a run has seen). Raises
    :class:`SyncUnavailableError` when the first query fails.
    """
    import requests
    from tqdm import tqdm

    stop = stop or threading.Event()
    client = client or dicomweb_client(url, headers)
    cursor = state.source("dicomweb", url, collection)
    done: dict[str, int | None] = cursor.setdefault("done_studies", {})
    summary = SyncSummary(newest_study_date=cursor.get("newest_study_date"))
    if since == "last":
        since = cursor.get("newest_study_date")
    # the first query is not retried (dicomweb-client's default: 5 tries, 30 s of back-off), so an
    # unreachable PACS is reported at once; later requests get the retries
    retries = hasattr(client, "set_http_retry_params")
    if retries:
        client.set_http_retry_params(retry=False)
    try:
        studies = _list_studies(client, modalities, since)
    except (requests.RequestException, ValueError) as exc:
        raise SyncUnavailableError(f"the PACS at {url} did not answer the study query: {exc}") from exc
    if retries:
        client.set_http_retry_params()
    pending = []
    for study in studies:
        uid, count = _first(study, STUDY_UID), _count(study, STUDY_INSTANCES)
        if uid in done and (count is None or done[uid] is None or count <= done[uid]):
            summary.studies_done_before += 1
        else:
            pending.append((uid, count, _first(study, STUDY_DATE)))
    log.info(
        "%d stud(ies) at %s, %d done in an earlier run, %d to look at",
        len(studies),
        url,
        summary.studies_done_before,
        len(pending),
    )
    enroller = Enroller(service, summary, collection=collection, modalities=modalities)
    total = sum(count or 0 for _, count, _ in pending) or None
    with tqdm(total=total, unit="instance", disable=not progress, desc="sync") as bar:
        for uid, count, date in pending:
            if stop.is_set():
                summary.interrupted = True
                break
            summary.studies += 1
            try:
                complete = _sync_study(client, enroller, uid, stop, bar)
            except Exception as exc:  # QIDO of this study failed: the next run tries it again
                enroller.fail(f"study {uid}", f"could not be listed: {exc}")
                complete = False
            if stop.is_set():
                summary.interrupted = True
            if complete:
                done[uid] = count
            if date and (summary.newest_study_date is None or date > summary.newest_study_date):
                summary.newest_study_date = cursor["newest_study_date"] = date
            state.save()
    state.save()
    return summary


# --------------------------------------------------------------------------------------------------
# Orthanc's /changes feed


class _Backoff:
    def __init__(self) -> None:
        self.pause = BACKOFF_FIRST
        self.failures = 0

    def failed(self) -> float:
        pause, self.pause = self.pause, min(self.pause * 2, BACKOFF_MAX)
        self.failures += 1
        return pause

    def reset(self) -> None:
        self.pause, self.failures = BACKOFF_FIRST, 0


class _TransientError(Exception):
    """Orthanc could not be reached, or answered 5xx: try the same change again later."""


def _get(session: Any, url: str, *, timeout: float) -> Any:
    import requests

    try:
        response = session.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise _TransientError(str(exc)) from exc
    if response.status_code >= 500:
        raise _TransientError(f"{url} answered {response.status_code}")
    return response


def follow_orthanc_changes(
    service: ReidService,
    url: str,
    *,
    state: SyncState,
    collection: str = "default",
    modalities: frozenset[str] = RADIOGRAPH_MODALITIES,
    headers: dict[str, str] | None = None,
    once: bool = False,
    poll_seconds: float = 5.0,
    max_retries_once: int = 5,
    stop: threading.Event | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    sleep: Callable[[threading.Event, float], None] | None = None,
    session: Any = None,
) -> SyncSummary:
    """Follow Orthanc's change log from the stored sequence number; see the module docstring.

    ``once``: stop when caught up (``Done``), or after ``max_retries_once`` failed tries in a row.
    Raises :class:`SyncUnavailableError` when Orthanc does not answer the first request.
    """
    import requests
    from tqdm import tqdm

    stop = stop or threading.Event()
    wait = sleep or (lambda event, seconds: event.wait(seconds))
    base = url.rstrip("/")
    cursor = state.source("orthanc-changes", base, collection)
    summary = SyncSummary(last_change=int(cursor.get("since", 0)))
    session = session or requests.Session()
    session.headers.update(headers or {})
    try:
        _get(session, f"{base}/changes?last", timeout=timeout).raise_for_status()
    except (_TransientError, requests.HTTPError) as exc:
        raise SyncUnavailableError(f"Orthanc at {base} did not answer GET /changes: {exc}") from exc
    enroller = Enroller(service, summary, collection=collection, modalities=modalities)
    backoff = _Backoff()
    with contextlib.closing(session), tqdm(unit="instance", disable=not progress, desc="changes") as bar:
        while not stop.is_set():
            since = summary.last_change or 0
            try:
                page = _get(session, f"{base}/changes?since={since}&limit={CHANGES_LIMIT}", timeout=timeout)
                page.raise_for_status()
                body = page.json()
                last = int(body["Last"])
                if last < since:
                    log.warning(
                        "Orthanc's change log ends at %d, before the stored %d (a new Orthanc database?): "
                        "following it from the start; instances already enrolled are skipped",
                        last,
                        since,
                    )
                    summary.last_change = cursor["since"] = 0
                    state.save()
                    continue
                for change in body.get("Changes", []):
                    if stop.is_set():
                        break
                    if change.get("ChangeType") == "NewInstance":
                        _enrol_orthanc_instance(session, base, change["ID"], enroller, timeout)
                        bar.update(1)
                    summary.last_change = cursor["since"] = int(change["Seq"])
                    state.save()
                else:
                    summary.last_change = cursor["since"] = max(last, since)
                    state.save()
            except (_TransientError, requests.HTTPError, ValueError, KeyError) as exc:
                pause = backoff.failed()
                if once and backoff.failures >= max_retries_once:
                    enroller.fail(
                        f"change {since}", f"Orthanc at {base}: {exc}; gave up after {backoff.failures} tries"
                    )
                    break
                log.warning("Orthanc at %s: %s; trying again in %.0f s", base, exc, pause)
                wait(stop, pause)
                continue
            backoff.reset()
            if body.get("Done") and not stop.is_set():
                if once:
                    break
                wait(stop, poll_seconds)
    summary.interrupted = stop.is_set()
    state.save()
    return summary


def _enrol_orthanc_instance(
    session: Any, base: str, orthanc_id: str, enroller: Enroller, timeout: float
) -> None:
    """One NewInstance: its tags first (a refused or already-enrolled instance is not downloaded),
    then its file. Raises _TransientError when Orthanc cannot be reached (the change is tried again)."""
    tags = _get(session, f"{base}/instances/{orthanc_id}/tags?simplify", timeout=timeout)
    if tags.status_code == 404:
        log.info("Orthanc instance %s was deleted before it could be read", orthanc_id)
        return
    if tags.status_code >= 400:
        enroller.summary.seen += 1
        enroller.fail(orthanc_id, f"GET /instances/{orthanc_id}/tags answered {tags.status_code}")
        return
    header = tags.json()
    sop = header.get("SOPInstanceUID")
    if not enroller.wanted(sop, header.get("Modality") or None):
        return
    data = _get(session, f"{base}/instances/{orthanc_id}/file", timeout=timeout)
    if data.status_code >= 400:
        enroller.fail(sop or orthanc_id, f"GET /instances/{orthanc_id}/file answered {data.status_code}")
        return
    enroller.enrol(data.content, sop or orthanc_id)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop`` (the run ends after the current instance) while in the block;
    the handlers before it are put back after. Only in the main thread, where Python allows it."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping after the current instance", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

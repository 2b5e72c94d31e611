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
  again at a done study only when the PACS reports more instances in it. It never passes a study
  that failed: such a study is kept in ``retry_studies`` (asked for by its UID next run when the
  query would not list it, given up after ``max_study_attempts`` runs) and ``--since last`` resumes
  at the oldest StudyDate not done (a listing cut short by ``max_pages`` moves it no further than the
  query's start).
* Every PACS request goes through :mod:`app.pacs.bounded` (:class:`DicomwebReader`, ``requests``,
  streamed): a whole-answer deadline, answers capped while they stream, bounded pages and studies per
  run (:class:`SyncLimits`); a run waiting on the PACS sees its stop event (SIGINT / SIGTERM,
  :func:`~app.pacs.bounded.stop_on_signals`) within a tenth of a second and ends with the cursor saved.
* :func:`follow_orthanc_changes`: Orthanc's ``GET /changes?since=N&limit=M`` feed; each
  ``NewInstance`` is read (``/instances/{id}/tags?simplify`` first, the file only when it is wanted)
  and enrolled; the last sequence number is kept in the same state file after each change, so the
  follower resumes where it stopped. Connection errors and 5xx answers are logged and retried with a
  growing pause (Orthanc restarting); a change log that starts again below the stored number (a new
  Orthanc database) is followed from 0 (instances already in the gallery are skipped by
  SOPInstanceUID).

With ``--to URL`` (:class:`StowEnroller`, :mod:`app.pacs.push`) each instance goes by STOW-RS to a
running service, which holds the gallery, instead; the PACS side and the cursor are the same, and a
service that cannot be reached stops the run (:class:`~app.pacs.push.ServiceUnreachableError`) with
the studies done so far saved.

Every instance is filed under its DICOM PatientID, StudyInstanceUID, SOPInstanceUID and ViewPosition;
one already in the collection (same SOPInstanceUID) is not enrolled again; one whose Modality is not a
projection radiograph (or not among ``--modality``) is refused; one that cannot be fetched, decoded or
stored is counted as failed and the run goes on. Patients' ids and alert messages stay out of the log
(alert kinds and image ids only); :class:`SyncSummary` carries the alerts in full.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.pacs.bounded import (
    AnswerTooLargeError,
    Backoff,
    DicomwebReader,
    PacsAnswerError,
    SyncLimits,
    SyncStoppedError,
    TransientPacsError,
    bounded_get,
)
from app.pacs.push import ServiceClient, ServiceUnreachableError
from app.service.errors import ServiceError
from app.service.ingest import Failure, IngestStatus, InstanceRules, ingest_instance
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
    conflicts: int = 0  # SOPInstanceUID already in the collection under another PatientID
    failed: list[tuple[str, str]] = field(default_factory=list)  # (instance, reason)
    alerts: list[SyncAlert] = field(default_factory=list)
    newest_study_date: str | None = None
    last_change: int | None = None  # orthanc-changes: the sequence number reached
    interrupted: bool = False  # stopped by SIGINT / SIGTERM (the cursor is saved)
    retried: int = 0  # dicomweb: studies looked at again because an earlier run failed them
    to_retry: int = 0  # dicomweb: studies that failed this run, tried again by the next
    given_up: int = 0  # dicomweb: studies that failed max_study_attempts runs in a row
    left: int = 0  # dicomweb: studies left for the next run by --max-studies
    held_back: bool = False  # dicomweb: the --since last cursor stays at a study not done
    remote_alerts: int = 0  # --to URL: wrong-patient alerts the service raised (stored there, for review)

    def line(self) -> str:
        parts = []
        if self.last_change is None:
            parts.append(f"studies {self.studies} (+{self.studies_done_before} done before)")
        else:
            parts.append(f"changes up to {self.last_change}")
        parts.append(
            f"instances seen {self.seen}, enrolled {self.enrolled}, already there {self.already}, "
            f"refused {self.refused}, conflicting {self.conflicts}, failed {len(self.failed)}"
        )
        alerts = ", ".join(
            f"image {a.image_id} {a.alert.kind}" + (f" alert {a.alert.alert_id}" if a.alert.alert_id else "")
            for a in self.alerts
        )
        parts.append(f"alerts {len(self.alerts) + self.remote_alerts}" + (f" ({alerts})" if alerts else ""))
        if self.retried:
            parts.append(f"retried {self.retried} stud(ies) that failed before")
        if self.to_retry:
            parts.append(f"{self.to_retry} failed stud(ies) to be retried next run")
        if self.given_up:
            parts.append(f"gave up on {self.given_up} stud(ies) failed run after run")
        if self.left:
            parts.append(f"{self.left} stud(ies) left for the next run (--max-studies)")
        if self.newest_study_date:
            if self.held_back:
                parts.append(f"--since last resumes at StudyDate {self.newest_study_date}")
            else:
                parts.append(f"newest StudyDate {self.newest_study_date}")
        if self.interrupted:
            parts.append("interrupted (cursor saved)")
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
        self.last_sop: str | None = None  # the SOPInstanceUID of the last file given to enrol

    def wanted(self, sop: str | None, modality: str | None) -> bool:
        """Count an instance seen from its tags alone; True when it should be fetched and enrolled."""
        self.summary.seen += 1
        if modality is not None and modality.upper() not in self.modalities:
            self.summary.refused += 1
            log.info(
                "instance %s refused: Modality %s is not among %s", sop, modality, sorted(self.modalities)
            )
            return False
        return not self._already_there(sop)

    def _already_there(self, sop: str | None) -> bool:
        """An instance the collection holds (by SOPInstanceUID) is counted and not fetched again."""
        if sop and self.service.find_by_sop_instance_uid(sop, collection=self.collection):
            self.summary.already += 1
            return True
        return False

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
        self.last_sop = sop
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
        if status is IngestStatus.OTHER_PATIENT:  # not enrolled again, not retried: a person decides
            summary.conflicts += 1
            log.warning("instance %s conflicts: %s", sop, error.detail if error is not None else "")
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


class StowEnroller(Enroller):
    """The same counting, each instance stored by STOW-RS in a running service (``sync --to URL``):
    the server holds the gallery, so nothing here opens it; the service's answer says whether the
    instance was stored, already there, or refused."""

    def __init__(
        self, target: ServiceClient, summary: SyncSummary, *, collection: str, modalities: frozenset[str]
    ) -> None:
        self.target, self.summary = target, summary
        self.collection, self.modalities = collection, modalities
        self.last_sop = None

    def _already_there(self, sop: str | None) -> bool:
        """Not asked here: the service's STOW-RS answer tells whether it is already there."""
        return False

    def enrol(self, data: bytes, name: str) -> bool:
        """Store one instance through the service; False when it failed there (refused and
        already-there instances are not failures, as on the local path)."""
        pushed = self.target.stow(data, collection=self.collection)
        self.last_sop = pushed.sop_instance_uid
        sop = pushed.sop_instance_uid or name
        if pushed.status == "already":
            self.summary.already += 1
            return True
        if pushed.failure == Failure.SOP_CLASS_NOT_SUPPORTED:  # not a radiograph
            self.summary.refused += 1
            log.info("instance %s refused: %s", sop, pushed.reason)
            return True
        if pushed.failure == Failure.DUPLICATE_SOP_INSTANCE:  # stored under another patient: a person decides
            self.summary.conflicts += 1
            log.warning("instance %s conflicts: %s", sop, pushed.reason)
            return True
        if pushed.status == "failed":
            self.fail(sop, pushed.reason)
            return False
        self.summary.enrolled += 1
        if pushed.alert is not None:  # the kind only: the message names patients
            log.warning("wrong-patient alert on instance %s (%s)", sop, pushed.alert.split(":")[0])
            self.summary.remote_alerts += 1
        return True


def make_enroller(
    service: ReidService | ServiceClient, summary: SyncSummary, *, collection: str, modalities: frozenset[str]
) -> Enroller:
    """An :class:`Enroller` into this process's gallery, or a :class:`StowEnroller` into a running service."""
    if isinstance(service, ServiceClient):
        return StowEnroller(service, summary, collection=collection, modalities=modalities)
    return Enroller(service, summary, collection=collection, modalities=modalities)


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _count(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class _Study:
    uid: str
    date: str | None
    time: str | None
    count: int | None  # NumberOfStudyRelatedInstances, when the PACS gives it


STUDY_FIELDS = ["StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"]


def _study(item: dict[str, Any]) -> _Study | None:
    uid = _first(item, STUDY_UID)
    if not uid:
        return None
    date, hour = _first(item, STUDY_DATE), _first(item, STUDY_TIME)
    return _Study(
        str(uid), str(date) if date else None, str(hour) if hour else None, _count(item, STUDY_INSTANCES)
    )


def _search_studies(client: Any, filters: dict[str, str], limits: SyncLimits) -> tuple[list[_Study], bool]:
    """The studies the filters match, page by page (limit/offset), at most ``limits.max_pages`` pages;
    True with them when the listing is whole. A failing first page raises; a later one ends the listing
    (not whole), as do a page that brings no study not seen before (a PACS that ignores the offset) and
    the page limit."""
    found: dict[str, _Study] = {}
    for number in range(limits.max_pages):
        try:
            page = client.search_for_studies(
                offset=number * PAGE_SIZE, limit=PAGE_SIZE, fields=STUDY_FIELDS, search_filters=dict(filters)
            )
        except PacsAnswerError as exc:
            if number == 0:
                raise
            log.warning(
                "the study query stopped at page %d: %s; going on with the %d listed",
                number + 1,
                exc,
                len(found),
            )
            return list(found.values()), False
        new = 0
        for item in page[:PAGE_SIZE]:  # a PACS that answers more than asked for gets no more room
            study = _study(item)
            if study is not None and study.uid not in found:
                found[study.uid] = study
                new += 1
        if len(page) < PAGE_SIZE:
            return list(found.values()), True
        if not new:
            log.warning(
                "page %d of the study query brought no new study (the PACS ignores the offset?): "
                "going on with the %d listed",
                number + 1,
                len(found),
            )
            return list(found.values()), False
    log.warning(
        "the study query stopped after %d pages (--max-pages): going on with the %d studies listed; the "
        "--since last cursor does not move past the query's start",
        limits.max_pages,
        len(found),
    )
    return list(found.values()), False


def _list_studies(
    client: Any, modalities: frozenset[str], since: str | None, limits: SyncLimits
) -> tuple[list[_Study], bool]:
    """The studies to look at (and whether the listing is whole). The ModalitiesInStudy filter is asked
    for; a PACS that refuses it is asked without it (the series are filtered by their Modality in any
    case)."""
    base = {"StudyDate": f"{since}-"} if since else {}
    try:
        return _search_studies(client, {**base, "ModalitiesInStudy": ",".join(sorted(modalities))}, limits)
    except PacsAnswerError as exc:
        if exc.status not in (400, 501):
            raise
        log.info("the PACS refused the ModalitiesInStudy filter (%s); filtering series instead", exc.status)
        return _search_studies(client, base, limits)


def _sync_study(client: Any, enroller: Enroller, study: str, stop: threading.Event, bar: Any) -> bool:
    """Enrol one study's wanted instances; True when every instance was dealt with (none failed).
    Raises SyncStoppedError when the run is stopped while waiting on the PACS, PacsAnswerError when a
    QIDO-RS answer of the study is refused."""
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
            fetched: Iterable[bytes] = client.iter_series(study, series_uid, len(missing))
        else:
            fetched = (client.retrieve_instance(study, series_uid, sop) for sop in missing)
        done: set[str | None] = set()
        try:
            for data in fetched:
                ok = enroller.enrol(data, f"part {len(done) + 1} of series {series_uid}") and ok
                done.add(enroller.last_sop)
                bar.update(1)
                if stop.is_set():
                    return False
        except SyncStoppedError:
            return False
        except ServiceUnreachableError:  # --to: the service is gone, not this series: the run stops
            raise
        except Exception as exc:  # a broken or refused answer: the rest of the series failed
            for sop in missing:
                if sop not in done:
                    enroller.fail(sop, f"could not be retrieved: {exc}")
                    bar.update(1)
            ok = False
    return ok


def sync_dicomweb(
    service: ReidService | ServiceClient,
    url: str,
    *,
    state: SyncState,
    collection: str = "default",
    modalities: frozenset[str] = RADIOGRAPH_MODALITIES,
    since: str | None = None,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    progress: bool = True,
    limits: SyncLimits | None = None,
    client: Any = None,
) -> SyncSummary:
    """One pass over a DICOMweb PACS (QIDO-RS + WADO-RS); see the module docstring.

    ``since``: a StudyDate (YYYYMMDD) or ``"last"`` (where the last run left the cursor). Raises
    :class:`SyncUnavailableError` when the first query fails. A run stopped (``stop``, set by SIGINT /
    SIGTERM) ends within a fraction of a second, even in the middle of an answer, with the cursor saved
    and ``summary.interrupted`` set.
    """
    from tqdm import tqdm

    stop = stop or threading.Event()
    limits = limits or SyncLimits()
    own = client is None
    client = client or DicomwebReader(url, headers=headers, limits=limits, stop=stop)
    try:
        return _sync_dicomweb(
            client, service, url, state, collection, modalities, since, stop, limits, progress, tqdm
        )
    finally:
        if own:
            client.close()


def _sync_dicomweb(
    client: Any,
    service: ReidService | ServiceClient,
    url: str,
    state: SyncState,
    collection: str,
    modalities: frozenset[str],
    since: str | None,
    stop: threading.Event,
    limits: SyncLimits,
    progress: bool,
    tqdm: Any,
) -> SyncSummary:
    cursor = state.source("dicomweb", url, collection)
    done: dict[str, int | None] = cursor.setdefault("done_studies", {})
    retry: dict[str, dict[str, Any]] = cursor.setdefault("retry_studies", {})
    summary = SyncSummary(newest_study_date=cursor.get("newest_study_date"))
    if since == "last":
        since = cursor.get("newest_study_date")
    try:
        studies, whole = _list_studies(client, modalities, since, limits)
    except SyncStoppedError:
        summary.interrupted = True
        log.warning("stopped while listing the studies; nothing done, the cursor is as it was")
        state.save()
        return summary
    except PacsAnswerError as exc:
        raise SyncUnavailableError(f"the PACS at {url} did not answer the study query: {exc}") from exc
    listed = {s.uid for s in studies}
    # studies that failed in an earlier run and are not listed (outside --since, or without StudyDate)
    for uid in [u for u in retry if u not in listed][: limits.max_studies]:
        try:
            found = client.search_for_studies(fields=STUDY_FIELDS, search_filters={"StudyInstanceUID": uid})
        except SyncStoppedError:
            break
        except PacsAnswerError as exc:
            log.warning("study %s, to be retried, could not be asked for: %s", uid, exc)
            continue
        again = [s for s in map(_study, found) if s is not None and s.uid == uid]
        if not again:
            log.info("study %s, to be retried, is no longer in the PACS", uid)
            del retry[uid]
            continue
        studies.append(again[0])
    studies.sort(key=lambda s: (s.date or "", s.time or "", s.uid))
    pending = []
    for study in studies:
        count = study.count
        if study.uid in done and (count is None or done[study.uid] is None or count <= done[study.uid]):
            summary.studies_done_before += 1
            retry.pop(study.uid, None)
        else:
            pending.append(study)
    summary.retried = sum(1 for s in pending if s.uid in retry)
    log.info(
        "%d stud(ies) at %s, %d done in an earlier run, %d to look at (%d that failed before)",
        len(studies),
        url,
        summary.studies_done_before,
        len(pending),
        summary.retried,
    )
    enroller = make_enroller(service, summary, collection=collection, modalities=modalities)
    held: list[str] = []  # StudyDates of the studies not done: the cursor stays at or before them
    total = sum(s.count or 0 for s in pending[: limits.max_studies]) or None
    with tqdm(total=total, unit="instance", disable=not progress, desc="sync") as bar:
        for index, study in enumerate(pending):
            if stop.is_set() or index >= limits.max_studies:
                if stop.is_set():
                    summary.interrupted = True
                else:
                    summary.left = len(pending) - index
                    log.warning(
                        "%d stud(ies) left for the next run (--max-studies %d)",
                        summary.left,
                        limits.max_studies,
                    )
                held += [s.date for s in pending[index:] if s.date]
                break
            summary.studies += 1
            try:
                complete = _sync_study(client, enroller, study.uid, stop, bar)
            except SyncStoppedError:
                complete = False
            except ServiceUnreachableError:  # --to: the studies done so far are saved; the run stops
                raise
            except Exception as exc:  # QIDO of this study failed: the next run tries it again
                enroller.fail(f"study {study.uid}", f"could not be listed: {exc}")
                complete = False
            if complete:
                done[study.uid] = study.count
                retry.pop(study.uid, None)
            elif stop.is_set():  # cut short, not failed: the next run goes on with it
                if study.date:
                    held.append(study.date)
            else:
                attempts = int(retry.get(study.uid, {}).get("attempts", 0)) + 1
                if attempts >= limits.max_study_attempts:
                    log.error(
                        "study %s failed in %d runs in a row: no longer retried, nor holding the cursor back "
                        "(sync it again with --since %s)",
                        study.uid,
                        attempts,
                        study.date or "an earlier date",
                    )
                    retry.pop(study.uid, None)
                    summary.given_up += 1
                else:
                    retry[study.uid] = {"date": study.date, "attempts": attempts}
                    summary.to_retry += 1
                    if study.date:
                        held.append(study.date)
            state.save()
    # --since last: from the oldest StudyDate not done, else the newest listed; after a listing cut
    # short no later than the query's start (the studies beyond it were never seen), and with no start
    # from no date at all
    dates = [s.date for s in studies if s.date]
    resume = min(held) if held else max(dates, default=None)
    if not whole:
        resume = min(resume or since, since) if since else None
        if resume is None:
            cursor.pop("newest_study_date", None)
    summary.newest_study_date = resume or cursor.get("newest_study_date")
    if resume is not None:
        cursor["newest_study_date"] = resume
    summary.held_back = bool(held)
    if stop.is_set():
        summary.interrupted = True
        log.warning(
            "stopped after %d of %d stud(ies) to look at; the cursor is saved in %s: the next run goes on "
            "from there%s",
            summary.studies,
            len(pending),
            state.path,
            f" (--since last: from StudyDate {resume})" if resume else "",
        )
    if summary.to_retry:
        log.warning(
            "%d failed stud(ies) to be retried next run%s",
            summary.to_retry,
            f"; --since last resumes at StudyDate {resume}" if resume else "",
        )
    state.save()
    return summary


# --------------------------------------------------------------------------------------------------
# Orthanc's /changes feed


def check_pacs(
    *,
    dicomweb: str | None = None,
    orthanc: str | None = None,
    headers: dict[str, str] | None = None,
    limits: SyncLimits | None = None,
) -> None:
    """Ask the PACS one small question (QIDO-RS for one study, or Orthanc's last change) before a run
    opens the gallery, so an unreachable or refusing PACS costs nothing: no gallery is started for a
    sync that cannot run. Raises :class:`SyncUnavailableError` with the reason."""
    import requests

    limits = limits or SyncLimits()
    stop = threading.Event()
    if dicomweb:
        reader = DicomwebReader(dicomweb, headers=headers, limits=limits, stop=stop)
        try:
            reader.search_for_studies(limit=1)
        except PacsAnswerError as exc:
            raise SyncUnavailableError(
                f"the PACS at {dicomweb} did not answer the study query: {exc}"
            ) from exc
        finally:
            reader.close()
        return
    base = (orthanc or "").rstrip("/")
    with requests.Session() as session:
        session.headers.update(headers or {})
        try:
            first = bounded_get(
                session,
                f"{base}/changes?last",
                limits=limits,
                stop=stop,
                cap=limits.max_query_bytes,
                what="an answer",
            )
            if first.status_code >= 400:
                raise TransientPacsError(f"answered {first.status_code}")
        except (TransientPacsError, PacsAnswerError) as exc:
            raise SyncUnavailableError(f"Orthanc at {base} did not answer GET /changes: {exc}") from exc


def follow_orthanc_changes(
    service: ReidService | ServiceClient,
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
    limits: SyncLimits | None = None,
) -> SyncSummary:
    """Follow Orthanc's change log from the stored sequence number; see the module docstring.

    ``once``: stop when caught up (``Done``), or after ``max_retries_once`` failed tries in a row.
    ``limits``: each request's whole-answer deadline and size caps (default: :class:`SyncLimits` with
    ``timeout`` as its read timeout). Raises :class:`SyncUnavailableError` when Orthanc does not answer
    the first request.
    """
    import requests
    from tqdm import tqdm

    stop = stop or threading.Event()
    limits = limits or SyncLimits(read_seconds=timeout)
    asks = {"limits": limits, "stop": stop, "cap": limits.max_query_bytes, "what": "an answer"}
    wait = sleep or (lambda event, seconds: event.wait(seconds))
    base = url.rstrip("/")
    cursor = state.source("orthanc-changes", base, collection)
    summary = SyncSummary(last_change=int(cursor.get("since", 0)))
    session = session or requests.Session()
    session.headers.update(headers or {})
    try:
        first = bounded_get(session, f"{base}/changes?last", **asks)
        if first.status_code >= 400:
            raise TransientPacsError(f"answered {first.status_code}")
    except (TransientPacsError, PacsAnswerError) as exc:
        raise SyncUnavailableError(f"Orthanc at {base} did not answer GET /changes: {exc}") from exc
    except SyncStoppedError:
        stop.set()
    enroller = make_enroller(service, summary, collection=collection, modalities=modalities)
    backoff = Backoff()
    with contextlib.closing(session), tqdm(unit="instance", disable=not progress, desc="changes") as bar:
        while not stop.is_set():
            since = summary.last_change or 0
            try:
                page = bounded_get(session, f"{base}/changes?since={since}&limit={CHANGES_LIMIT}", **asks)
                if page.status_code >= 400:
                    raise PacsAnswerError(f"GET /changes answered {page.status_code}", page.status_code)
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
                        _enrol_orthanc_instance(session, base, change["ID"], enroller, asks)
                        bar.update(1)
                    summary.last_change = cursor["since"] = int(change["Seq"])
                    state.save()
                else:
                    summary.last_change = cursor["since"] = max(last, since)
                    state.save()
            except SyncStoppedError:
                break
            except (TransientPacsError, PacsAnswerError, ValueError, KeyError, TypeError) as exc:
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
    session: Any, base: str, orthanc_id: str, enroller: Enroller, asks: dict[str, Any]
) -> None:
    """One NewInstance: its tags first (a refused or already-enrolled instance is not downloaded),
    then its file (one over the instance cap fails). Raises TransientPacsError when Orthanc cannot be
    reached (the change is tried again)."""
    tags = bounded_get(session, f"{base}/instances/{orthanc_id}/tags?simplify", **asks)
    if tags.status_code == 404:
        log.info("Orthanc instance %s was deleted before it could be read", orthanc_id)
        return
    if tags.status_code >= 400:
        enroller.summary.seen += 1
        enroller.fail(orthanc_id, f"GET /instances/{orthanc_id}/tags answered {tags.status_code}")
        return
    header = tags.json()
    if not isinstance(header, dict):
        raise ValueError(f"GET /instances/{orthanc_id}/tags: not a JSON object")
    sop = header.get("SOPInstanceUID")
    if not enroller.wanted(sop, header.get("Modality") or None):
        return
    cap = asks["limits"].max_instance_bytes
    try:
        data = bounded_get(
            session, f"{base}/instances/{orthanc_id}/file", **{**asks, "cap": cap, "what": "an instance"}
        )
    except AnswerTooLargeError as exc:
        enroller.fail(sop or orthanc_id, str(exc))
        return
    if data.status_code >= 400:
        enroller.fail(sop or orthanc_id, f"GET /instances/{orthanc_id}/file answered {data.status_code}")
        return
    enroller.enrol(data.content, sop or orthanc_id)

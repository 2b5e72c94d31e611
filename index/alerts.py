"""Wrong-patient alerts kept in the gallery: records and the SQL of the ``alerts`` table.

An alert is written in the transaction that enrols its image (``Gallery.add_with_alerts``), so it
exists only for an image that was enrolled. Its life:

* ``open``: raised at enrolment, waiting for a person;
* ``confirmed``: the image is misfiled (nothing in the gallery changes; delete or relabel it later);
* ``dismissed``: a false alarm;
* ``relabelled``: the image was filed under another patient (``new_patient_id``), in the same
  transaction that resolved the alert;
* ``deleted``: the image was deleted while the alert was open (closed in the delete's transaction;
  resolved alerts keep their state when their image goes, as history).

Who resolved it (an API key id) and when are kept with it; nothing is ever removed from the table.

Here: the records, the SQL of the ``alerts`` table (functions on a connection, the caller owns the
transaction) and ``AlertStore``, the reads and resolutions ``Gallery`` delegates to. Application
state, kept in the gallery's database only so that an alert commits with its image.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .records import GalleryError, GalleryValidationError, now_iso

if TYPE_CHECKING:  # store.py imports this module (close_for_deleted)
    from .store import Store

#: Every state an alert can be in; the first is the only one that can still be resolved.
ALERT_STATES = ("open", "confirmed", "dismissed", "relabelled", "deleted")
#: The states a person resolves an alert into.
RESOLVED_STATES = ("confirmed", "dismissed", "relabelled")


class AlertNotOpenError(GalleryError):
    """The alert was resolved (or its image deleted) before; nothing changed."""

    def __init__(self, alert: AlertRecord) -> None:
        super().__init__(f"alert {alert.alert_id} is already {alert.state}")
        self.alert = alert


@dataclass(kw_only=True)
class NewAlert:
    """What the wrong-patient check found for one image, and the operating point it decided at."""

    kind: str  # "matches_other_patient" | "no_match_with_own_images"
    message: str
    score: float
    other_patient_id: str | None = None
    other_image_id: int | None = None
    own_best_score: float | None = None
    own_images: int = 0
    operating_point: dict[str, Any] = field(default_factory=dict)  # threshold, far, calibration summary


@dataclass(kw_only=True)
class AlertRecord(NewAlert):
    """A stored alert: what was found, about which image as it was filed, and how it was resolved."""

    alert_id: int
    image_id: int
    collection: str
    patient_id: str | None  # the patient the image was filed under when the alert was raised
    state: str
    created_at: str  # ISO-8601 UTC
    resolved_at: str | None = None
    resolved_by: str | None = None  # API key id, or "anonymous" when the service has no keys
    note: str | None = None
    new_patient_id: str | None = None  # relabelled: the patient the image is filed under now


_COLUMNS = (
    "alert_id, image_id, collection, patient_id, kind, message, score, other_patient_id, other_image_id, "
    "own_best_score, own_images, operating_point, state, created_at, resolved_at, resolved_by, note, "
    "new_patient_id"
)


def _record(row: Sequence) -> AlertRecord:
    names = [c.strip() for c in _COLUMNS.split(",")]
    values = dict(zip(names, row, strict=True))
    values["operating_point"] = json.loads(values["operating_point"] or "{}")
    return AlertRecord(**values)


def insert(
    conn: sqlite3.Connection,
    alert: NewAlert,
    *,
    image_id: int,
    collection: str,
    patient_id: str | None,
    created_at: str,
) -> AlertRecord:
    cur = conn.execute(
        "INSERT INTO alerts (image_id, collection, patient_id, kind, message, score, other_patient_id,"
        " other_image_id, own_best_score, own_images, operating_point, state, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?) RETURNING alert_id",
        (
            int(image_id),
            collection,
            patient_id,
            alert.kind,
            alert.message,
            float(alert.score),
            alert.other_patient_id,
            alert.other_image_id,
            alert.own_best_score,
            int(alert.own_images),
            json.dumps(alert.operating_point, allow_nan=False, sort_keys=True),
            created_at,
        ),
    )
    return get(conn, int(cur.fetchone()[0]))  # type: ignore[return-value]


def get(conn: sqlite3.Connection, alert_id: int) -> AlertRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE alert_id = ?", (int(alert_id),)).fetchone()
    return None if row is None else _record(row)


def _where(state: str | None, collection: str | None) -> tuple[str, list]:
    clauses, args = [], []
    if state is not None:
        clauses.append("state = ?")
        args.append(state)
    if collection is not None:
        clauses.append("collection = ?")
        args.append(collection)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def page(
    conn: sqlite3.Connection, *, state: str | None, collection: str | None, offset: int, limit: int
) -> tuple[list[AlertRecord], int]:
    """Newest first, and the total matching (call inside a read transaction)."""
    where, args = _where(state, collection)
    total = int(conn.execute(f"SELECT COUNT(*) FROM alerts{where}", args).fetchone()[0])
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM alerts{where} ORDER BY alert_id DESC LIMIT ? OFFSET ?",
        [*args, int(limit), int(offset)],
    ).fetchall()
    return [_record(r) for r in rows], total


def count(conn: sqlite3.Connection, state: str | None = None) -> int:
    where, args = _where(state, None)
    return int(conn.execute(f"SELECT COUNT(*) FROM alerts{where}", args).fetchone()[0])


def resolve(
    conn: sqlite3.Connection,
    alert_id: int,
    *,
    state: str,
    resolved_by: str,
    resolved_at: str,
    note: str | None,
    new_patient_id: str | None,
) -> AlertRecord | None:
    """Resolve an open alert (write transaction held); None when there is no such alert."""
    current = get(conn, alert_id)
    if current is None:
        return None
    if current.state != "open":
        raise AlertNotOpenError(current)
    conn.execute(
        "UPDATE alerts SET state = ?, resolved_at = ?, resolved_by = ?, note = ?, new_patient_id = ?"
        " WHERE alert_id = ?",
        (state, resolved_at, resolved_by, note, new_patient_id, int(alert_id)),
    )
    return get(conn, alert_id)


def close_for_deleted(conn: sqlite3.Connection, image_ids: Sequence[int], closed_at: str) -> int:
    """Open alerts of deleted images become ``deleted`` (in the delete's transaction)."""
    closed = 0
    for s in range(0, len(image_ids), 500):
        part = [int(i) for i in image_ids[s : s + 500]]
        marks = ",".join("?" * len(part))
        cur = conn.execute(
            "UPDATE alerts SET state = 'deleted', resolved_at = ?"
            f" WHERE state = 'open' AND image_id IN ({marks})",
            [closed_at, *part],
        )
        closed += int(cur.rowcount)
    return closed


class AlertStore:
    """The alerts of one gallery: what ``Gallery.get_alert``, ``list_alerts``, ``count_alerts`` and
    ``resolve_alert`` delegate to. Raising an alert is part of an enrolment (``Gallery.add_with_alerts``
    calls ``insert`` in its transaction), so it is not here."""

    def __init__(self, store: Store, check_open: Callable[[], None]) -> None:
        self._store = store
        self._check_open = check_open  # the gallery's: raises once it is closed

    def get(self, alert_id: int) -> AlertRecord | None:
        return get(self._store.reader(), int(alert_id))

    def page(
        self, *, state: str | None, collection: str | None, offset: int, limit: int
    ) -> tuple[list[AlertRecord], int]:
        """A page of alerts, newest first, and the total matching (state / collection None: any)."""
        if int(offset) < 0 or int(limit) < 0:
            raise GalleryValidationError("offset and limit must be >= 0")
        if state is not None and state not in ALERT_STATES:
            raise GalleryValidationError(f"state must be one of {', '.join(ALERT_STATES)}")
        with self._store.read_txn() as conn:
            return page(conn, state=state, collection=collection, offset=offset, limit=limit)

    def count(self, state: str | None = "open") -> int:
        return count(self._store.reader(), state)

    def resolve(
        self,
        alert_id: int,
        *,
        state: str,
        resolved_by: str,
        note: str | None = None,
        new_patient_id: str | None = None,
    ) -> AlertRecord | None:
        """Resolve an open alert; a relabel files its image under ``new_patient_id`` in the same
        transaction (see ``Gallery.resolve_alert``)."""
        if state not in RESOLVED_STATES:
            raise GalleryValidationError(f"state must be one of {', '.join(RESOLVED_STATES)}")
        if (state == "relabelled") != (new_patient_id is not None):
            raise GalleryValidationError("new_patient_id is given with state 'relabelled', and only then")
        store = self._store
        with store.write_lock:
            self._check_open()
            with store.write_txn() as conn:
                resolved = resolve(
                    conn,
                    alert_id,
                    state=state,
                    resolved_by=resolved_by,
                    resolved_at=now_iso(),
                    note=note,
                    new_patient_id=new_patient_id,
                )
                if resolved is not None and new_patient_id is not None:
                    store.relabel(conn, resolved.image_id, new_patient_id)
        return resolved

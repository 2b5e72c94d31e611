"""Site calibrations kept in the gallery: the SQL of the ``calibrations`` table.

A calibration fitted on the gallery's labelled images belongs to the embedding model it was fitted
for. The newest active one of the serving model is in force; saving a new one or clearing the site
calibration only marks older rows inactive, so they stay as history. The bodies are JSON; what they
mean is the service's business (``models.scoring``), not the gallery's.

Like ``index/alerts.py`` these are plain functions on a connection: the caller owns the transaction
(``Store.write_txn`` for writes, any reader connection for reads).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any


def save(conn: sqlite3.Connection, model_id: str, body: dict[str, Any], created_at: str) -> int:
    """Store ``body`` as the calibration in force for ``model_id`` (earlier ones become history);
    call inside a write transaction. Returns its id."""
    conn.execute("UPDATE calibrations SET active = 0 WHERE model_id = ?", (model_id,))
    cur = conn.execute(
        "INSERT INTO calibrations (model_id, created_at, body, active) VALUES (?, ?, ?, 1)"
        " RETURNING calibration_id",
        (model_id, created_at, json.dumps(body, allow_nan=False)),
    )
    return int(cur.fetchone()[0])


def active(conn: sqlite3.Connection, model_id: str) -> tuple[int, str, dict[str, Any]] | None:
    """(id, created_at, body) of the calibration in force for ``model_id``, or None."""
    row = conn.execute(
        "SELECT calibration_id, created_at, body FROM calibrations WHERE model_id = ? AND active = 1 "
        "ORDER BY calibration_id DESC LIMIT 1",
        (model_id,),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]), json.loads(row[2]))


def deactivate(conn: sqlite3.Connection, model_id: str) -> int:
    """Take ``model_id``'s calibration out of force (kept as history); returns how many were active."""
    cur = conn.execute("UPDATE calibrations SET active = 0 WHERE model_id = ? AND active = 1", (model_id,))
    return int(cur.rowcount)

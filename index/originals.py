"""The originals a gallery keeps (under ``images/``) or references (``source_path``, bulk enrol
without ``--copy``), checked against its rows: ``reindex`` needs every one of them.

:func:`check_originals` is the full check (``cxr-reid check``): each stored original must be there
as a non-empty regular file (the schema keeps no size, so "non-empty" is what a ``stat`` can tell
without reading it) and, with ``deep``, hash to its name; a referenced original must be there and,
with ``deep``, still hash to the row's ``sha256``. :class:`MissingOriginals` is the cheap count a
readiness probe reads on every call (:meth:`index.Gallery.missing_originals`).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .store import Store

#: Ids listed per kind of problem in a report (the counts are always whole).
LISTED_IDS = 20
#: Stored originals a readiness probe looks at per call, beyond those already known to be missing.
PROBE_SAMPLE = 8


def _file_problem(path: Path, sha256: str | None) -> str | None:
    """None when ``path`` is a non-empty regular file (whose bytes hash to ``sha256``, when given);
    else "missing", "empty" (or not a regular file) or "corrupt" (another hash, or unreadable)."""
    try:
        info = path.stat()
    except OSError:  # not there, a path through a missing folder, or not reachable
        return "missing"
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return "empty"
    if sha256 is None:
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return "corrupt"
    return None if digest.hexdigest() == sha256.lower() else "corrupt"


@dataclass
class OriginalsReport:
    """What :func:`check_originals` found; the lists hold image ids (rows), in id order."""

    deep: bool
    stored: int = 0  # distinct stored originals the rows reference
    referenced: int = 0  # rows whose original is an external file
    stored_problems: dict[str, list[int]] = field(
        default_factory=lambda: {"missing": [], "empty": [], "corrupt": []}
    )
    referenced_problems: dict[str, list[int]] = field(
        default_factory=lambda: {"missing": [], "empty": [], "corrupt": []}
    )

    @property
    def images_with_problems(self) -> int:
        return sum(map(len, self.stored_problems.values())) + sum(map(len, self.referenced_problems.values()))

    @property
    def ok(self) -> bool:
        return self.images_with_problems == 0

    def as_dict(self) -> dict[str, object]:
        """Counts and the first :data:`LISTED_IDS` image ids of each problem (for a JSON report)."""

        def part(problems: dict[str, list[int]]) -> dict[str, object]:
            out: dict[str, object] = {}
            for kind, ids in problems.items():
                if kind == "corrupt" and not self.deep:
                    continue
                out[kind] = len(ids)
                if ids:
                    out[f"{kind}_image_ids"] = ids[:LISTED_IDS]
            return out

        return {
            "ok": self.ok,
            "hashes_checked": self.deep,
            "stored": {"originals": self.stored, **part(self.stored_problems)},
            "referenced": {"images": self.referenced, **part(self.referenced_problems)},
        }

    def summary(self) -> str:
        """One line: what is wrong and what to do (empty when nothing is)."""
        if self.ok:
            return ""
        kinds = (("stored", self.stored_problems), ("referenced", self.referenced_problems))
        parts = [
            f"{len(ids):,} image(s) whose {where} original is {kind} (e.g. image {ids[0]})"
            for where, problems in kinds
            for kind, ids in problems.items()
            if ids
        ]
        return (
            "; ".join(parts) + ": `cxr-reid reindex` cannot re-embed them; restore the data dir's images/ "
            "folder (or the referenced files) from a backup, or delete those images"
        )


def check_originals(store: Store, *, deep: bool = False) -> OriginalsReport:
    """Every row's original, checked as the module docstring says (one ``stat`` per distinct stored
    original and per referenced file; ``deep`` reads and hashes each)."""
    report = OriginalsReport(deep=deep)
    blob_problem: dict[str, str | None] = {}
    for image_id, blob, source, sha in store.original_rows():
        if blob:
            if blob not in blob_problem:
                blob_problem[blob] = _file_problem(store.blob_path(blob), blob if deep else None)
            problem = blob_problem[blob]
            if problem is not None:
                report.stored_problems[problem].append(image_id)
        elif source:
            report.referenced += 1
            problem = _file_problem(Path(source), sha if deep and sha else None)
            if problem is not None:
                report.referenced_problems[problem].append(image_id)
    report.stored = len(blob_problem)
    return report


class MissingOriginals:
    """The stored originals known to be missing, for a readiness probe: counted at open (one listing
    of ``images/`` against the rows' distinct originals), kept current by the gallery's own writes
    (an add stores its originals again, a delete forgets what no row needs), and on each
    :meth:`count` a probe of :data:`PROBE_SAMPLE` originals picked at random through the
    ``blob_sha256`` index (O(log n) each), plus whether ``images/`` is there at all: a file removed
    behind the gallery's back is found by the probe (by a later one, with odds of ``PROBE_SAMPLE``
    in the number of originals per call, when only a few went), and then everything is counted
    again."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._missing: set[str] = set()
        self._rng = random.Random()
        self.recount()

    def recount(self) -> int:
        """Count again from scratch: the rows' distinct originals less the files under ``images/``."""
        store = self._store
        referenced = store.referenced_blobs()
        present = store.present_blobs() if referenced else set()
        with self._lock:
            self._missing = referenced - present
            return len(self._missing)

    def stored(self, shas: set[str]) -> None:
        """These originals were just written (an add writes a missing one again)."""
        with self._lock:
            self._missing -= shas

    def deleted(self, shas: set[str]) -> None:
        """Rows referencing these originals were deleted: forget the ones no row needs any more."""
        with self._lock:
            gone = {sha for sha in shas & self._missing if not self._store.blob_referenced(sha)}
            self._missing -= gone

    def count(self) -> int:
        """Stored originals missing now (the probe first; see the class docstring)."""
        store = self._store
        if not store.images_dir.is_dir():
            return self.recount()
        with self._lock:
            known = set(self._missing)
        sample = store.sample_blobs(self._rng, PROBE_SAMPLE)
        if any(sha not in known and not os.path.isfile(store.blob_path(sha)) for sha in sample):
            return self.recount()
        with self._lock:
            return len(self._missing)

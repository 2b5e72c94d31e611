"""API keys with scopes, stored as salted hashes, and a limit on failed attempts.

A key is ``cxr_<id>_<secret>``: the id names it in the keys file and the logs, the secret is 32
random bytes shown once by ``cxr-reid keys add``. The file (``CXR_REID_KEYS_FILE``, default
``<data dir>/keys.json``, mode 0600) holds per key its id, scope, creation time, a note, a random
salt and sha256(salt + secret); a plain salted SHA-256 is enough for secrets of 256 random bits (no
dictionary to try), and keeps the check per request in microseconds. The running service notices
changes to the file (``keys add`` / ``revoke`` need no restart).

A key may be limited to a list of collections: it then never sees, changes or searches others, and
must name one of its collections where a request could mean every collection.

Scopes nest: ``read`` (embed, verify, search, list, duplicates, metrics, readiness details) <
``write`` (enrol and delete) < ``admin`` (site calibration). Keys given in ``CXR_REID_API_KEYS``
(comma-separated plain keys, the older way) are admin keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "cxr_"


class KeyFileError(ValueError):
    """The keys file cannot be read or holds something other than keys."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the keys file stores it: never the secret itself."""

    key_id: str
    scope: str
    salt: str
    digest: str
    created_at: str
    note: str = ""
    collections: list[str] | None = None  # the only collections it may touch; None = every one

    def allows(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    def allows_collection(self, collection: str | None) -> bool:
        """``collection`` None means every collection, which a restricted key may not ask for."""
        return self.collections is None or (collection is not None and collection in self.collections)

    def public(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "scope": self.scope,
            "collections": self.collections,
            "created_at": self.created_at,
            "note": self.note,
        }


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


class KeyStore:
    """The keys file, re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    def keys(self) -> dict[str, ApiKey]:
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                self._stamp, self._keys = None, {}
                return {}
            if stamp != self._stamp:
                self._keys = self._read()
                self._stamp = stamp
            return dict(self._keys)

    def _read(self) -> dict[str, ApiKey]:
        try:
            rows = json.loads(self.path.read_text())["keys"]
            keys = [ApiKey(**row) for row in rows]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"cannot read the API keys file {self.path}: {exc}") from exc
        return {key.key_id: key for key in keys}

    def _write(self, keys: dict[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(k) for k in keys.values()]}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, scope: str, note: str = "", collections: list[str] | None = None) -> tuple[ApiKey, str]:
        """A new key: its record and the token to hand to the client (shown once, never stored)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        keys = self.keys()
        key_id = secrets.token_hex(4)
        while key_id in keys:
            key_id = secrets.token_hex(4)
        secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        key = ApiKey(
            key_id,
            scope,
            salt,
            _digest(salt, secret),
            created,
            note,
            sorted(set(collections)) if collections else None,
        )
        keys[key_id] = key
        self._write(keys)
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        keys = self.keys()
        if keys.pop(key_id, None) is None:
            return False
        self._write(keys)
        return True

    def verify(self, token: str) -> ApiKey | None:
        """The key a presented token belongs to, or None (constant-time digest comparison)."""
        if not token.startswith(KEY_PREFIX):
            return None
        key_id, _, secret = token[len(KEY_PREFIX) :].partition("_")
        key = self.keys().get(key_id)
        if key is None or not secret:
            return None
        return key if hmac.compare_digest(_digest(key.salt, secret), key.digest) else None


class FailedAuthLimiter:
    """At most ``limit`` failed key checks per client address per ``window`` seconds; beyond that
    the address is refused without a check (``retry_after``), and the log gets one summary line per
    address and window instead of one warning per attempt. ``clock`` gives the time in seconds (a
    test passes a fake one)."""

    def __init__(
        self, limit: int = 20, window: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may try now."""
        now = self.clock()
        with self._lock:
            start, failures = self._failures.get(address, (now, 0))
            if now - start >= self.window:
                self._close_window(address, start, failures)
                return None
            return max(1, round(self.window - (now - start))) if failures >= self.limit else None

    def failed(self, address: str, what: str) -> None:
        now = self.clock()
        with self._lock:
            start, failures = self._failures.get(address, (now, 0))
            if now - start >= self.window:
                self._close_window(address, start, failures)
                start, failures = now, 0
            failures += 1
            self._failures[address] = (start, failures)
        if failures == 1:
            log.warning("rejected API key %s from %s", what, address)

    def _close_window(self, address: str, start: float, failures: int) -> None:
        if failures > 1:
            log.warning(
                "%d rejected API keys from %s in %.0f s",
                failures,
                address,
                min(self.window, self.clock() - start),
            )
        self._failures.pop(address, None)

"""A private PostgreSQL cluster on loopback, for the tests, ``scripts/cluster-demo.sh`` and
``bench/cluster.py``: ``initdb`` in a folder, ``pg_ctl`` on a free port, as an unprivileged user
(PostgreSQL refuses to run as root: as root it runs as the ``postgres`` system user the Debian
package creates). Nothing is installed or registered system-wide; ``stop`` and the folder go.

    python -m app.local_postgres start DIR     # prints the database URL
    python -m app.local_postgres stop DIR
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("local_postgres")

DATABASE = "cxr_reid"
ROLE = "cxr_reid"


class PostgresUnavailableError(RuntimeError):
    """PostgreSQL's server programs are not installed (Debian: ``apt-get install postgresql``)."""


def bindir() -> Path:
    """Where ``initdb`` / ``pg_ctl`` are: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise PostgresUnavailableError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user() -> list[str]:
    """The command prefix that runs PostgreSQL's programs as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class LocalPostgres:
    """One private cluster in ``root`` (data in ``root/data``, socket and log beside it)."""

    root: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*_as_user(), str(bindir() / args[0]), *args[1:]]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if check and done.returncode:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            )
        if not self.port:
            saved = self.root / "port"
            self.port = int(saved.read_text()) if saved.exists() else _free_port()

    def start(self) -> str:
        """Start (initialising on first use) and return the URL of the ready database."""
        self.init()
        (self.root / "port").write_text(str(self.port))
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c max_connections=200 -c fsync=on"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._ensure_database()
        return self.url

    def _psql(self, sql: str, db: str = "postgres") -> str:
        psql = shutil.which("psql") or str(bindir() / "psql")
        cmd = [
            *_as_user(),
            psql,
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            db,
            "-tAc",
            sql,
        ]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()

    def _ensure_database(self) -> None:
        if not self._psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"):
            self._psql(f"CREATE ROLE {ROLE} LOGIN")
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self._psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> float:
        """Stop and start again on the same port; returns the seconds it took."""
        t0 = time.perf_counter()
        self.stop(mode)
        self.start()
        return time.perf_counter() - t0

    def fresh_database(self, name: str) -> str:
        """A new empty database on this cluster (one per test), its URL."""
        self._psql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "restart"))
    parser.add_argument("root", type=Path, help="the cluster's folder (created on start)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pg = LocalPostgres(args.root.resolve())
    if args.action == "stop":
        pg.stop()
        return 0
    if args.action == "restart":
        pg.init()
        pg.restart()
    else:
        pg.start()
    sys.stdout.write(pg.url + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Durability under kill -9: nothing acknowledged is lost, nothing is stored twice.

    python bench/crash.py [--rounds 3] [--threads 8] [--per-thread 200] [--kill-after 6]
                          [--model CKPT] [--json OUT.json]

Each round starts a real server (uvicorn, loopback, a fresh data dir kept across rounds), runs
``--threads`` clients that each enrol ``--per-thread`` distinct images one request at a time, sends
SIGKILL to the server after ``--kill-after`` seconds, restarts it and checks:

- every enrolment that was acknowledged (201) is in the gallery exactly once (by its tag);
- no image is there twice (an enrolment whose answer was lost may be there once or not at all);
- the server is ready again (its FAISS index matches SQLite), and ``cxr-reid check`` agrees offline.

Prints one line per round and a summary; exit 1 if any check failed. Bounded: loopback only, a
temporary data dir, at most rounds x threads x per-thread small PNGs.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.server_process import Server, free_port, server_env, uvicorn_command

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.crash")


def _image(seed: int) -> bytes:
    """A distinct 96 px PNG with radiograph-like texture (passes the quality gate)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:96]
    body = 120 + 80 * np.exp(-(((x - 48) / 30) ** 2 + ((y - 50) / 38) ** 2))
    pixels = np.clip(body + rng.normal(0, 12, (96, 96)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _start_enrolling(
    url: str, round_no: int, threads: int, per_thread: int
) -> tuple[set[str], set[str], list[threading.Thread]]:
    """Start the clients; returns the sets they fill (acknowledged tags, attempted tags) and them."""
    acknowledged: set[str] = set()
    attempted: set[str] = set()
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(per_thread):
                tag = f"r{round_no}-w{worker}-i{i}"
                with lock:
                    attempted.add(tag)
                data = _image(zlib.crc32(tag.encode()))
                try:
                    answer = http.post(
                        "/images",
                        files={"file": (f"{tag}.png", data)},
                        data={"patient_id": f"p{worker}", "tags": json.dumps({"tag": tag})},
                    )
                except httpx.HTTPError:
                    return  # the server died mid-request: this one is unacknowledged
                if answer.status_code == 201:
                    with lock:
                        acknowledged.add(tag)

    workers = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(threads)]
    for w in workers:
        w.start()
    return acknowledged, attempted, workers


def _stored_tags(url: str) -> Counter[str]:
    tags: Counter[str] = Counter()
    offset = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        while True:
            page = http.get("/images", params={"collection": "*", "offset": offset, "limit": 1000}).json()
            tags.update(item["tags"].get("tag", "") for item in page["items"])
            offset += len(page["items"])
            if offset >= page["total"] or not page["items"]:
                return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=200)
    parser.add_argument("--kill-after", type=float, default=6.0, help="seconds of enrolling before SIGKILL")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    work = Path(tempfile.mkdtemp(prefix="cxr-reid-crash-"))
    env = server_env(work / "data", args.model)
    all_acknowledged: set[str] = set()
    results, failures = [], 0
    for round_no in range(1, args.rounds + 1):
        port = free_port()
        server = Server(uvicorn_command(port), env, port, work / "server.log")
        acknowledged, attempted, workers = _start_enrolling(
            server.url, round_no, args.threads, args.per_thread
        )
        time.sleep(args.kill_after)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        for w in workers:
            w.join(timeout=60)
        all_acknowledged |= acknowledged

        port = free_port()
        restarted = Server(uvicorn_command(port), env, port, work / "server.log")  # waits for /readyz 200
        stored = _stored_tags(restarted.url)
        restarted.stop()
        lost = sorted(all_acknowledged - set(stored))
        twice = sorted(tag for tag, n in stored.items() if n > 1)
        check = subprocess.run(
            [sys.executable, "-m", "app.cli", "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        ok = not lost and not twice and check.returncode == 0
        failures += not ok
        row = {
            "round": round_no,
            "acknowledged": len(acknowledged),
            "attempted": len(attempted),
            "stored_total": sum(stored.values()),
            "lost": len(lost),
            "stored_twice": len(twice),
            "unacknowledged_but_stored": len(set(stored) - all_acknowledged),
            "check_ok": check.returncode == 0,
        }
        results.append(row)
        log.info(
            "round %d: %d acknowledged of %d sent before kill -9; after restart %d stored, %d lost, "
            "%d twice, %d stored without an answer; cxr-reid check %s",
            round_no,
            row["acknowledged"],
            row["attempted"],
            row["stored_total"],
            row["lost"],
            row["stored_twice"],
            row["unacknowledged_but_stored"],
            "ok" if row["check_ok"] else f"FAILED: {check.stderr.strip()[-300:]}",
        )
    log.info(
        "%d rounds, %d acknowledged enrolments in all: %s",
        args.rounds,
        len(all_acknowledged),
        "nothing lost, nothing twice" if not failures else f"{failures} round(s) FAILED",
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

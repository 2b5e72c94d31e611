"""Mixed load against a real server: errors, latency per route, server memory.

    python bench/load.py [--clients 32] [--seconds 120] [--model CKPT] [--json OUT.json]

Starts a server (uvicorn, loopback, a temporary data dir), enrols a small gallery, then runs
``--clients`` threads for ``--seconds``, each looping over a mix of requests: embed, enrol, verify
(two files), search, list, duplicates (conflicts only), readyz. Prints per route the count, the
non-2xx answers, p50 and p99 latency, then 5xx and transport errors in all and the server's RSS at
start and end and its peak (VmHWM). Exit 1 on any 5xx or transport error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

from app.server_process import Server, free_port, server_env, uvicorn_command

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.load")


def _memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _images(count: int) -> list[bytes]:
    from PIL import Image

    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:160, 0:160]
        body = 110 + 90 * np.exp(-(((x - 80) / 50) ** 2 + ((y - 84) / 62) ** 2))
        pixels = np.clip(body + rng.normal(0, 14, (160, 160)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    work = Path(tempfile.mkdtemp(prefix="cxr-reid-load-"))
    env = server_env(work / "data", args.model)
    port = free_port()
    server = Server(uvicorn_command(port), env, port, work / "server.log")
    images = _images(64)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i, data in enumerate(images[:32]):
            http.post("/images", files={"file": (f"seed{i}.png", data)}, data={"patient_id": f"p{i % 8}"})
    start_memory = _memory_mib(server.process.pid)

    timings: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, list[int]] = defaultdict(list)
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def one(http: httpx.Client, rng: random.Random) -> tuple[str, int]:
        data = rng.choice(images)
        kind = rng.choice(["embed", "enrol", "verify", "search", "search", "list", "duplicates", "readyz"])
        if kind == "embed":
            return kind, http.post("/embed", files={"file": ("a.png", data)}).status_code
        if kind == "enrol":
            files = {"file": ("a.png", data)}
            return kind, http.post(
                "/images", files=files, data={"patient_id": f"p{rng.randrange(8)}"}
            ).status_code
        if kind == "verify":
            files = {"file_a": ("a.png", data), "file_b": ("b.png", rng.choice(images))}
            return kind, http.post("/verify", files=files).status_code
        if kind == "search":
            return kind, http.post("/search", files={"file": ("a.png", data)}, data={"k": 5}).status_code
        if kind == "list":
            return kind, http.get("/images", params={"limit": 50}).status_code
        if kind == "duplicates":
            return kind, http.get("/duplicates", params={"conflicts_only": True}).status_code
        return kind, http.get("/readyz").status_code

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    kind, status = one(http, rng)
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(type(exc).__name__)
                    continue
                with lock:
                    timings[kind].append(time.perf_counter() - started)
                    statuses[kind].append(status)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end_memory = _memory_mib(server.process.pid)
    server.stop()

    figures: dict[str, object] = {"clients": args.clients, "seconds": args.seconds, "routes": {}}
    server_errors = 0
    log.info("%-11s %7s %8s %9s %9s", "route", "count", "non-2xx", "p50 ms", "p99 ms")
    for kind in sorted(timings):
        ms = np.array(timings[kind]) * 1000
        bad = [s for s in statuses[kind] if s >= 300]
        server_errors += sum(s >= 500 for s in bad)
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        figures["routes"][kind] = {"count": len(ms), "non_2xx": len(bad), "p50_ms": p50, "p99_ms": p99}
        log.info("%-11s %7d %8d %9.0f %9.0f", kind, len(ms), len(bad), p50, p99)
    figures.update(
        server_errors=server_errors,
        transport_errors=len(errors),
        rss_start_mib=start_memory["VmRSS"],
        rss_end_mib=end_memory["VmRSS"],
        rss_peak_mib=end_memory["VmHWM"],
    )
    log.info(
        "%d requests from %d clients in %.0f s: %d 5xx, %d transport errors; server RSS %.0f -> %.0f MiB "
        "(peak %.0f)",
        sum(len(t) for t in timings.values()),
        args.clients,
        args.seconds,
        server_errors,
        len(errors),
        start_memory["VmRSS"],
        end_memory["VmRSS"],
        end_memory["VmHWM"],
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if server_errors or errors else 0


if __name__ == "__main__":
    sys.exit(main())

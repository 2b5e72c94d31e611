"""Per-route latency and throughput of the real service at concurrency 1, 8 and 32.

    python bench/service.py [--seconds 15] [--concurrency 1 8 32] [--routes embed verify search]
                            [--image FILE] [--model CKPT] [--json]

Issue 11, benchmark 3. Starts uvicorn on loopback with a temporary gallery (the example radiographs
enrolled), then for each route and concurrency runs that many client threads, each sending one
request after another, for ``--seconds`` or ``--max-requests`` in all, whichever comes first. Prints
per cell: requests/s, images/s (``/verify`` embeds two images), p50 and p99 latency. Beside them, in
this process: the image's decode + prepare time and the model's time at batch 1 and batch 32, so the
two goals read directly:

- concurrency 1: p50 latency <= 1.2 x (decode + prepare + model at batch 1);
- concurrency 32: images/s >= 0.8 x the model's batch-32 rate (micro-batching gathers concurrent
  requests into one forward pass).

Clients and server share the machine's cores, so on a small machine the clients' own work counts
against the server; the figures are a floor for a server with the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.server_process import Server, free_port, server_env, uvicorn_command
from models.evaluation.benchkit import median_ms
from models.imaging.preprocess import decode_image, prepare
from models.net.embedder import Embedder

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.service")

EXAMPLES = REPO_ROOT / "examples" / "radiographs"
IMAGES_PER_REQUEST = {"embed": 1, "verify": 2, "search": 1}


def reference_ms(model: Path | None, image: bytes, seconds: float, runtime: str) -> dict[str, Any]:
    """Decode + prepare of ``image`` and the model at batch 1 and 32, in ms per image."""
    embedder = Embedder.from_checkpoint(model, runtime=runtime)  # what the server runs
    config = embedder.preprocess_config
    prepared = prepare(decode_image(image, config=config), config)
    batch = np.stack([prepared] * 32)
    return {
        "runtime": embedder.runtime,
        "decode_prepare_ms": median_ms(lambda: prepare(decode_image(image, config=config), config), seconds),
        "model_batch1_ms": median_ms(lambda: embedder.embed_prepared(batch[:1]), seconds),
        "model_batch32_ms_per_image": median_ms(lambda: embedder.embed_prepared(batch), seconds) / 32,
    }


def request(http: httpx.Client, route: str, image: bytes) -> int:
    if route == "verify":
        files = {"file_a": ("a.jpeg", image), "file_b": ("b.jpeg", image)}
        return http.post("/verify", files=files).status_code
    if route == "search":
        return http.post("/search", files={"file": ("a.jpeg", image)}, data={"k": 5}).status_code
    return http.post("/embed", files={"file": ("a.jpeg", image)}).status_code


def run_cell(url: str, route: str, image: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads on one route until the time or the request budget is spent."""
    latencies: list[float] = []
    failures: list[int] = []
    issued = [0]  # requests started, reserved under the lock: the budget is never overshot
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            request(http, route, image)  # warm the connection; not counted
            while time.monotonic() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                started = time.perf_counter()
                status = request(http, route, image)
                with lock:
                    (latencies if status == 200 else failures).append(
                        time.perf_counter() - started if status == 200 else status
                    )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "failures": len(failures),
        "requests_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * IMAGES_PER_REQUEST[route] / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="per route and concurrency")
    parser.add_argument("--max-requests", type=int, default=2000, help="per route and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--routes", nargs="+", choices=sorted(IMAGES_PER_REQUEST), default=["embed", "verify", "search"]
    )
    parser.add_argument("--image", type=Path, help="the radiograph every request sends (default: an example)")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    parser.add_argument("--runtime", default="auto", help="the server's CXR_REID_RUNTIME (default auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    examples = sorted(EXAMPLES.glob("*.jpeg"))
    image = (args.image or examples[0]).read_bytes()
    figures: dict[str, Any] = {"reference": reference_ms(args.model, image, 2.0, args.runtime), "cells": {}}
    reference = figures["reference"]

    work = Path(tempfile.mkdtemp(prefix="cxr-reid-service-"))
    port = free_port()
    server = Server(
        uvicorn_command(port),
        server_env(work / "data", args.model, CXR_REID_RUNTIME=args.runtime),
        port,
        work / "server.log",
    )
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for path in examples:
                http.post(
                    "/images",
                    files={"file": (path.name, path.read_bytes())},
                    data={"patient_id": path.stem[:7]},
                )
        for route in args.routes:
            for clients in args.concurrency:
                cell = run_cell(server.url, route, image, clients, args.seconds, args.max_requests)
                figures["cells"][f"{route}@{clients}"] = cell
                log.info(
                    "%-7s c=%-3d %6.1f req/s %6.1f img/s  p50 %7.1f ms  p99 %7.1f ms  (%d ok, %d failed)",
                    route,
                    clients,
                    cell["requests_per_s"],
                    cell["images_per_s"],
                    cell["p50_ms"],
                    cell["p99_ms"],
                    cell["requests"],
                    cell["failures"],
                )
    finally:
        server.stop()

    single = reference["decode_prepare_ms"] + reference["model_batch1_ms"]
    batch_rate = 1000 / reference["model_batch32_ms_per_image"]
    figures["goals"] = {
        "latency_c1_limit_ms": 1.2 * single,
        "images_per_s_c32_floor": 0.8 * batch_rate,
        **{
            f"{route}_c1_p50_over_decode_plus_model": figures["cells"][f"{route}@1"]["p50_ms"] / single
            for route in args.routes
            if f"{route}@1" in figures["cells"]
        },
        **{
            f"{route}_c32_images_over_batch32_rate": figures["cells"][f"{route}@32"]["images_per_s"]
            / batch_rate
            for route in args.routes
            if f"{route}@32" in figures["cells"]
        },
    }
    if args.json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        log.info("reference: %s", reference)
        log.info("goals: %s", {k: round(v, 3) for k, v in figures["goals"].items()})
    failed = sum(cell["failures"] for cell in figures["cells"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

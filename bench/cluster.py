"""Replicas on one PostgreSQL gallery: how they scale and follow on this machine.

    python bench/cluster.py [--images 30] [--seconds 20] [--model CKPT] [--json]

Starts a private PostgreSQL and three replicas (app/cluster_process.py ``Cluster``: loopback,
one shared blob dir, the shipped model by default, one compute thread each) and measures:

- search throughput (requests/s, 4 clients per replica in use, for ``--seconds``) through 1, 2 and
  3 replicas, and its ratio to one replica. All replicas share this machine's cores, so the ratio
  shows what replication costs or gives on one host, not what three hosts would give;
- the change-log lag: from a write's commit to its apply on another replica (each replica's own
  ``apply_lag_p50_ms`` / ``p99`` in ``/readyz``), and end to end: enrolled through replica 1 until
  a search on replica 2 finds it (that includes the search itself);
- the enrol rate with 1 writer and with 3 concurrent writers, one per replica;
- PostgreSQL restarted under those 3 writers: how long writes are refused, and that no acknowledged
  image is lost or stored twice;
- each replica's resident memory at the end (``replica_rss_mib``; each holds two networks, see next);
- a model change without downtime (``model_switch``): the replicas run with
  ``CXR_REID_NEXT_MODEL_PATH`` (another network: the model's weights moved by noise), then
  ``cxr-reid reindex --stage-only`` and ``cxr-reid reindex`` run while a client per replica searches
  without pause: how long each step takes, until every replica serves the new model, how the
  searches fared (served, 503, ``mixed``: answered from two networks' vectors, must be 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.cluster_process import (
    Cluster,
    all_images,
    another_network,
    enrol,
    percentile,
    radiograph_variants,
    readyz,
    search_ids,
)

log = logging.getLogger("bench.cluster")
CLIENTS_PER_REPLICA = 4


def search_throughput(cluster: Cluster, replicas: int, seconds: float, query: tuple[str, bytes]) -> float:
    """Searches answered per second by ``replicas`` replicas, ``CLIENTS_PER_REPLICA`` clients each."""
    name, data = query
    done = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(url: str) -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < end:
                r = http.post(f"{url}/search", files={"file": (name, data, "image/png")}, data={"k": "5"})
                r.raise_for_status()
                with lock:
                    done[0] += 1

    threads = [
        threading.Thread(target=client, args=(cluster.url(i % replicas),))
        for i in range(replicas * CLIENTS_PER_REPLICA)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - t0)


def model_switch(cluster: Cluster, probe: tuple[str, bytes, int], next_model: Path) -> dict:
    """`cxr-reid reindex --stage-only` then `cxr-reid reindex` to ``next_model`` while one client per
    replica searches with an enrolled radiograph (``probe``: name, bytes, its image id) without pause.
    Every answer must be that image at cosine ~1: a query of one network against a stored vector of
    the other scores far lower (``mixed``). Returns the timings and how the searches fared."""
    name, data, image_id = probe
    answers: list[tuple[int, int | None, float | None, float]] = []  # status, top id, cosine, seconds
    lock = threading.Lock()
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                t = time.perf_counter()
                r = http.post(f"{url}/search", files={"file": (name, data, "image/png")}, data={"k": "1"})
                took = time.perf_counter() - t
                top = r.json().get("matches", [None])[0] if r.status_code == 200 else None
                with lock:
                    answers.append((r.status_code, top and top["image_id"], top and top["cosine"], took))

    def reindex(*flags: str) -> float:
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "reindex", "--no-progress", *flags],
            env=cluster.job_env(next_model),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cxr-reid reindex {' '.join(flags)} failed: {done.stderr[-2000:]}")
        return time.perf_counter() - t

    stage_s = reindex("--stage-only")
    threads = [threading.Thread(target=client, args=(cluster.url(i),)) for i in range(cluster.replicas)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    switch_s = reindex()
    t0 = time.perf_counter()
    target = readyz(cluster.url(0)).get("model_id")
    while any(readyz(cluster.url(i)).get("model_id") != target for i in range(cluster.replicas)):
        time.sleep(0.02)
    all_switched_s = time.perf_counter() - t0
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    served = [a for a in answers if a[0] == 200]
    took = [a[3] for a in answers]
    return {
        "stage_only_s": round(stage_s, 2),
        "switch_command_s": round(switch_s, 2),
        "all_replicas_switched_after_command_s": round(all_switched_s, 2),
        "searches": len(answers),
        "served": len(served),
        "answered_503": sum(1 for a in answers if a[0] == 503),
        "other_status": sum(1 for a in answers if a[0] not in (200, 503)),
        "mixed": sum(1 for a in served if a[1] != image_id or abs(a[2] - 1.0) > 1e-3),
        "search_ms_p50": round(1000 * statistics.median(took), 1),
        "search_ms_max": round(1000 * max(took), 1),
    }


def enrol_rate(cluster: Cluster, writers: int, batch: list[tuple[str, str, bytes]]) -> tuple[float, dict]:
    """Images/s enrolled by ``writers`` threads, writer i through replica i; returns the acknowledged."""
    acked: dict[str, int] = {}
    parts = [batch[i::writers] for i in range(writers)]

    def writer(i: int) -> None:
        for patient, name, data in parts[i]:
            acked[name] = enrol(cluster.url(i), patient, name, data)["image_id"]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(acked) / (time.monotonic() - t0), acked


def _rss_mib(pid: int) -> float | None:
    """Resident memory of a replica process (Linux /proc), MiB: the model, the runtime, the index of
    this small gallery; the index grows by the bytes per vector of BENCHMARKS.md section 4."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run(root: Path, *, images: int, seconds: float, model: Path | None) -> dict:
    next_model = root / "next-model.pt"
    another_network(model, next_model)
    cluster = Cluster(root, model=model, next_model=next_model)
    cluster.start()
    figures: dict = {"machine_cores": os.cpu_count(), "replicas": 3}
    variants = radiograph_variants(4 * images + 1, seed=7)
    try:
        # enrol rates (these images are also the gallery the searches run against)
        one, acked = enrol_rate(cluster, 1, variants[:images])
        three, more = enrol_rate(cluster, 3, variants[images : 2 * images])
        acked.update(more)
        figures["enrol_images_per_s_1_writer"] = round(one, 2)
        figures["enrol_images_per_s_3_writers"] = round(three, 2)
        # lag: commit -> apply on the others, and enrol -> found by a search elsewhere
        e2e = []
        for patient, name, data in variants[2 * images : 2 * images + min(images, 20)]:
            image_id = enrol(cluster.url(0), patient, name, data)["image_id"]
            acked[name] = image_id
            t = time.perf_counter()
            while image_id not in search_ids(cluster.url(1), name, data, k=10):
                time.sleep(0.01)
            e2e.append(time.perf_counter() - t)
        states = cluster.converged()
        reps = [s["replication"] for s in states]
        figures["apply_lag_ms_p50_per_replica"] = [r["apply_lag_p50_ms"] for r in reps]
        figures["apply_lag_ms_p99_per_replica"] = [r["apply_lag_p99_ms"] for r in reps]
        figures["enrolled_to_searchable_elsewhere_ms_p50"] = round(1000 * statistics.median(e2e), 1)
        figures["enrolled_to_searchable_elsewhere_ms_p99"] = round(1000 * percentile(e2e, 0.99), 1)
        # search throughput through 1, 2, 3 replicas
        query = (variants[-1][1], variants[-1][2])
        rates = [search_throughput(cluster, k, seconds, query) for k in (1, 2, 3)]
        figures["search_per_s_1_2_3_replicas"] = [round(r, 2) for r in rates]
        figures["search_ratio_to_1_replica"] = [round(r / rates[0], 2) for r in rates]
        # PostgreSQL restart under 3 writers
        load = variants[3 * images : 4 * images]
        result: dict = {}
        writers = threading.Thread(target=lambda: result.update(enrol_rate(cluster, 3, load)[1]))
        writers.start()
        time.sleep(1.0)
        t = time.perf_counter()
        cluster.pg.restart("fast")
        probe = radiograph_variants(1, seed=1234)[0]
        acked[probe[1]] = enrol(cluster.url(0), *probe)["image_id"]
        figures["postgres_restart_to_write_acknowledged_s"] = round(time.perf_counter() - t, 2)
        writers.join()
        acked.update(result)
        cluster.converged()
        stored = all_images(cluster.url(2))
        ids = {img["image_id"] for img in stored}
        keys = [(img["collection"], img["sha256"], img["patient_id"]) for img in stored]
        figures["acknowledged"] = len(acked)
        figures["lost"] = sum(1 for i in acked.values() if i not in ids)
        figures["stored_twice"] = len(keys) - len(set(keys))
        figures["replica_images"] = [readyz(cluster.url(i))["gallery_images"] for i in range(3)]
        figures["replica_rss_mib"] = [_rss_mib(cluster.servers[i].process.pid) for i in range(3)]
        _, name, data = variants[2 * images]  # enrolled above, through replica 1
        figures["model_switch"] = model_switch(cluster, (name, data, acked[name]), next_model)
    finally:
        cluster.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="images per enrolment phase")
    parser.add_argument("--seconds", type=float, default=20.0, help="search load per replica count")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="cxr-reid-bench-cluster-"))
    try:
        figures = run(root, images=args.images, seconds=args.seconds, model=args.model)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:45s} {value}")
    ok = figures["lost"] == 0 and figures["stored_twice"] == 0 and figures["model_switch"]["mixed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Milvus Lite beside in-process FAISS on the same vectors: insert rate, single-query latency, recall.

    nice -n 10 python bench/milvus.py [--n 100000] [--queries 200] [--lite-indexes FLAT,HNSW]
                                      [--faiss auto] [--seed 0] [--json]

The gallery and queries are bench/search.py's (patient clusters fitted to the shipped model: its
``Patients`` generator is imported, not copied), so the figures sit beside BENCHMARKS.md's FAISS ones.
For each engine: ``insert_per_s`` (vectors a second through the product's write path: FAISS
``add_with_ids``, Milvus ``MilvusIndex.add``, i.e. upserts of 4096 rows, then a flush), ``build_s``
(everything until the first search can run: insert, flush, Lite's background index build),
``p50_ms`` / ``p99_ms`` of one query per call (k=10, how the service searches, through
``MilvusIndex.search`` for Milvus: gRPC to the in-process Lite server included) and ``recall_at_10``
against FAISS exact Flat on the same vectors.

Engines: ``faiss-Flat`` (exact, the reference), ``faiss-auto`` (what the gallery builds today at
this size: index/faiss_index.py ``auto_layout``, built by ``VectorIndex.build``), and
``milvus-lite-<TYPE>`` for each of ``--lite-indexes`` (FLAT is what ``choose_index`` gives Lite;
HNSW M=32 efConstruction=200 ef=128 to show what an ANN index buys on Lite). Milvus Lite keeps its
data in a temp folder (``--dir``), removed at the end. Milvus Lite's HNSW is built per segment in a
background thread; the script waits for it through the in-process server's engine (a private API,
only for the timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import faiss
import numpy as np

from index.faiss_index import AUTO, AUTO_NPROBE, VectorIndex, auto_layout
from index.milvus_index import IndexChoice, MilvusIndex

BENCH_DIR = Path(__file__).resolve().parent

log = logging.getLogger("bench.milvus")
LITE_INDEXES = {
    "FLAT": IndexChoice("FLAT", {}, {}, "benchmark"),
    "HNSW": IndexChoice("HNSW", {"M": 32, "efConstruction": 200}, {"ef": 128}, "benchmark"),
    "IVF_FLAT": IndexChoice("IVF_FLAT", {"nlist": 1024}, {"nprobe": 64}, "benchmark"),
}


def _search_module() -> ModuleType:
    """bench/search.py (bench/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_search", BENCH_DIR / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(engine: str, n: int, insert_s: float, build_s: float, p50: float, p99: float, rec: float) -> dict:
    row = {
        "engine": engine,
        "n": n,
        "insert_per_s": n / insert_s if insert_s > 0 else float("inf"),
        "build_s": build_s,
        "p50_ms": p50,
        "p99_ms": p99,
        "recall_at_10": rec,
    }
    log.info(
        "%-20s n %8d  insert %9.0f /s  build %7.1f s  p50 %8.2f ms  p99 %8.2f ms  recall@10 %.4f",
        engine,
        n,
        row["insert_per_s"],
        build_s,
        p50,
        p99,
        rec,
    )
    return row


def _wait_for_lite_indexes(path: Path, name: str) -> None:
    """Block until Milvus Lite's background segment index builds are done (private API, timing only)."""
    try:
        from milvus_lite import server_manager_instance

        db = server_manager_instance._servers[str(path.absolute())][1]
        db.get_collection(name)._wait_for_bg()
    except Exception:
        log.warning("could not wait for Milvus Lite's background index build: timings may include it")


def run(args: argparse.Namespace) -> dict:
    sb = _search_module()
    faiss.omp_set_num_threads(args.threads)
    dim, impostor_median, _ = sb.model_figures()
    patients = sb.Patients(dim, decay=1.5, seed=args.seed)
    patients.fit(sb.GENUINE_MEAN, impostor_median)
    t0 = time.perf_counter()
    x, queries = patients.draw(args.n, args.queries)
    n = x.shape[0]
    ids = np.arange(n, dtype=np.int64)
    log.info("drew %d x %d vectors and %d queries in %.1f s", n, dim, len(queries), time.perf_counter() - t0)
    out: dict = {
        "n": n,
        "dim": dim,
        "queries": int(queries.shape[0]),
        "k": sb.K,
        "threads": faiss.omp_get_max_threads(),
        "faiss": faiss.__version__,
        "seed": args.seed,
        "results": [],
    }
    try:
        import milvus_lite
        import pymilvus

        out["pymilvus"], out["milvus_lite"] = pymilvus.__version__, milvus_lite.__version__
    except ImportError:
        pass
    results: list[dict] = out["results"]

    # FAISS exact Flat: the reference, and the ground truth of every recall
    t0 = time.perf_counter()
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    for s in range(0, n, sb.CHUNK):
        flat.add_with_ids(x[s : s + sb.CHUNK], ids[s : s + sb.CHUNK])
    build = time.perf_counter() - t0
    _, truth = flat.search(queries, sb.K)
    p50, p99 = sb.latencies_ms(lambda q: flat.search(q, sb.K), queries)
    results.append(_row("faiss-Flat", n, build, build, p50, p99, 1.0))
    flat = None  # free its memory before the next engine

    if args.faiss_auto:
        layout = auto_layout(n, dim=dim)
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed + 5)
        index = VectorIndex.build(  # as the gallery builds it (index/live_index.py)
            dim,
            AUTO,
            nprobe=AUTO_NPROBE,
            ef_search=64,
            count=n,
            train_sample=lambda m: x[rng.choice(n, size=m, replace=False)],
            chunks=lambda: ((ids[s : s + sb.CHUNK], x[s : s + sb.CHUNK]) for s in range(0, n, sb.CHUNK)),
            layout=layout,
        )
        build = time.perf_counter() - t0
        found = np.stack(
            [np.pad(index.search(q[None], sb.K)[1], (0, sb.K), constant_values=-1)[: sb.K] for q in queries]
        )
        p50, p99 = sb.latencies_ms(lambda q: index.search(q, sb.K), queries)
        results.append(
            _row(f"faiss-{index.effective_factory}", n, build, build, p50, p99, sb.recall(found, truth))
        )
        index = None

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cxr-milvus-bench-"))
    try:
        for kind in args.lite_indexes:
            path = folder / f"{kind.lower()}.db"
            idx = MilvusIndex.open(str(path), "bench", dim, model_id="bench", choice=LITE_INDEXES[kind])
            t0 = time.perf_counter()
            for s in range(0, n, sb.CHUNK):
                idx.add(x[s : s + sb.CHUNK], ids[s : s + sb.CHUNK], "default")
            idx.flush()
            insert = time.perf_counter() - t0
            _wait_for_lite_indexes(path, idx.name)
            build = time.perf_counter() - t0
            if idx.ntotal != n:
                raise RuntimeError(f"Milvus Lite holds {idx.ntotal} vectors, expected {n}")
            found = np.stack(
                [np.pad(idx.search(q, sb.K)[1], (0, sb.K), constant_values=-1)[: sb.K] for q in queries]
            )
            p50, p99 = sb.latencies_ms(lambda q, idx=idx: idx.search(q, sb.K), queries)
            p50c, p99c = sb.latencies_ms(
                lambda q, idx=idx: idx.search(q, sb.K, collection="default"), queries
            )
            results.append(_row(f"milvus-lite-{kind}", n, insert, build, p50, p99, sb.recall(found, truth)))
            results[-1]["collection_search_p50_ms"] = p50c
            results[-1]["collection_search_p99_ms"] = p99c
            results[-1]["disk_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            idx.close()
            from milvus_lite import server_manager_instance

            server_manager_instance.release_server(str(path))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def table(out: dict) -> str:
    head = f"{'engine':<28}{'n':>9}{'insert/s':>11}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}"
    lines = [head, "-" * len(head)]
    for r in out["results"]:
        lines.append(
            f"{r['engine']:<28}{r['n']:>9}{r['insert_per_s']:>11.0f}{r['build_s']:>9.1f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['recall_at_10']:>11.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="gallery images")
    parser.add_argument("--queries", type=int, default=200, help="held-out query images (one per call)")
    parser.add_argument(
        "--lite-indexes",
        type=lambda s: [i.strip().upper() for i in s.split(",") if i.strip()],
        default=["FLAT"],
        help=f"comma-separated Milvus Lite index types, of {','.join(LITE_INDEXES)}",
    )
    parser.add_argument("--no-faiss-auto", dest="faiss_auto", action="store_false", help="skip faiss-auto")
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    parser.add_argument("--dir", help="keep Milvus Lite's files here (default: a temp folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if set(args.lite_indexes) - set(LITE_INDEXES) or args.n < 1 or args.queries < 1:
        parser.error(f"--lite-indexes takes {','.join(LITE_INDEXES)}; --n and --queries must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: --json keeps stdout clean
    out = run(args)
    sys.stdout.write((json.dumps(out, indent=2) if args.json else table(out)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

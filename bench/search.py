"""Which FAISS index should a gallery of n images use: recall, latency, memory and build time.

    python bench/search.py [--n 100000] [--queries 1000]
                           [--indexes Flat,HNSW32,IVF-Flat,IVF-SQ8,IVF-PQ,IVF-PQfs-RFlat]
                           [--threads N] [--search-threads N] [--seed 0] [--json]

For each index (and each search setting: HNSW32 efSearch, IVF nprobe, IVF-PQfs-RFlat nprobe and
k_factor) it measures ``recall_at_10``
(the share of the exact Flat top 10 it returns, on the same vectors), ``p50_ms`` / ``p99_ms`` of
single-query search (one query per call, k=10: how the service searches), ``bytes_per_vector``
(``faiss.serialize_index`` size / n) and ``build_s`` (train + add; the IVF variants share one coarse
k-means, whose time is counted in each of them). IVF has ~4 sqrt(n) lists (a power of two); IVF-PQ
stores ``--pq-m`` bytes a vector (PQ32x8 by default; PQ64 trains for minutes in FAISS 1.15, and any
PQ trains very slowly on fewer than 39 * 256 vectors). ``--train-per-list`` / ``--kmeans-iter`` trade
the coarse k-means' quality for its time at large n.

IVF-PQfs-RFlat is what the gallery's ``index_factory="auto"`` builds from 1e5 vectors
(index/faiss_index.py): the same lists holding 4-bit fast-scan PQ codes (``PQ<dim/--pqfs-dims>x4fs``,
128 bytes a vector at 512-d) whose ``k * k_factor`` best candidates are re-scored exactly against
the float vectors (``IVF<nlist>,PQ256x4fs,RFlat``). It is built and searched through the service's
own ``index.faiss_index.VectorIndex`` (ids, re-ranking and all), so its latency is the service's;
its bytes per vector are the saved file's (in memory the id map's hash table adds some more).

Uniform random vectors would flatter or punish an index for the wrong reasons: ours are clusters,
one per patient. So the gallery is drawn like ours: patient centres (a shared direction, as the
model's impostor scores are not centred on 0, plus a random-orientation Gaussian whose variances
fall off as j**-decay, since an embedding uses some directions far more than others), then each
image of a patient is its centre plus isotropic noise. The noise sets the genuine (same patient)
cosine, the shared direction the impostor cosine; they are fitted to the shipped model:
- impostor: the median impostor cosine, read from the checkpoint's calibration (its FAR curve at
  FAR 0.5); the calibration stores thresholds, not genuine statistics, so
- genuine: the mean genuine cosine of the shipped model on its test patients, 0.52 (kermany 0.521,
  nih 0.525 in MODEL_CARD.md's breakdown table).
The decay (default 1.5) widens the impostor tail towards the model's (its 99th percentile, the
FAR 1e-2 threshold); it does not reach it, and the JSON reports both. Queries are further images of
enrolled patients (another draw around the same centre), never in the index.

Threads (``--threads``, default all cores) are set with ``faiss.omp_set_num_threads`` and reported;
a single query mostly runs on one of them. ``--search-threads`` (default ``--threads``) sets them
again before the searches, so builds can use every core and searches one. Memory: the n x dim
float32 vectors once, plus one index at a time (n = 1e6, dim 512: 2 GB + the index).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.search")

INDEXES = ("Flat", "HNSW32", "IVF-Flat", "IVF-SQ8", "IVF-PQ", "IVF-PQfs-RFlat")
EF_SEARCH = (16, 32, 64, 128, 256)
NPROBE = (8, 16, 32, 64, 96, 128)
REFINE_NPROBE = (32, 64, 128, 256)
K_FACTORS = (10, 20, 30, 50)
K = 10
GENUINE_MEAN = 0.52  # MODEL_CARD.md: mean genuine score of the shipped model, kermany / nih test patients
IMAGES_PER_PATIENT = 4
CHUNK = 65_536


# ---------------------------------------------------------------------------------------------- data
def model_figures() -> tuple[int, float, float]:
    """(dim, median impostor cosine, 99th percentile impostor cosine) of the shipped model."""
    from models.net.embedder import Embedder

    embedder = Embedder.from_checkpoint(None)
    cal = embedder.calibration
    fars = np.asarray(cal.far_points)
    thresholds = np.asarray(cal.far_thresholds)
    median = float(thresholds[np.argmin(np.abs(fars - 0.5))])
    return embedder.dim, median, float(cal.thresholds["1e-2"])


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Patients:
    """Patient centres and their images, drawn reproducibly chunk by chunk (memory stays bounded)."""

    def __init__(self, dim: int, *, decay: float, seed: int) -> None:
        self.dim = dim
        rng = np.random.default_rng(seed)
        self.rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.shared = self.rotation[0].copy()
        scale = np.arange(1, dim + 1, dtype=np.float64) ** -decay
        self.scale = np.sqrt(scale / scale.sum())
        self.offset = 0.0  # weight of the shared direction: sets the impostor cosine
        self.noise = 0.0  # per-image noise (norm ~ noise): sets the genuine cosine
        self.seed = seed

    def centres(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = (rng.standard_normal((n, self.dim)) * self.scale) @ self.rotation
        return _unit(z + self.offset * self.shared)

    def images(self, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal(centres.shape) * (self.noise / math.sqrt(self.dim))
        return _unit(centres + noise).astype(np.float32)

    def pair_cosines(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Genuine (two images of one patient) and impostor (images of two patients) cosines."""
        rng = np.random.default_rng(seed)
        c = self.centres(rng, n)
        a, b = self.images(rng, c), self.images(rng, c)
        return (a * b).sum(axis=1), (a[:-1] * b[1:]).sum(axis=1)

    def fit(self, genuine: float, impostor_median: float, samples: int = 10_000) -> None:
        """Noise for the genuine mean (cos ~ 1 / (1 + noise^2)), then the offset by bisection on the
        impostor median (one draw, reused by every step)."""
        self.noise = math.sqrt(1.0 / genuine - 1.0)
        rng = np.random.default_rng(self.seed + 1)
        z = (rng.standard_normal((samples, self.dim)) * self.scale) @ self.rotation
        noise_a, noise_b = rng.standard_normal((2, samples, self.dim)) * (self.noise / math.sqrt(self.dim))
        lo, hi = 0.0, 4.0
        for _ in range(20):
            self.offset = 0.5 * (lo + hi)
            c = _unit(z + self.offset * self.shared)
            a, b = _unit(c + noise_a), _unit(c + noise_b)
            impostor = np.median((a[:-1] * b[1:]).sum(axis=1))
            lo, hi = (self.offset, hi) if impostor < impostor_median else (lo, self.offset)

    def draw(self, n: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
        """n gallery images (IMAGES_PER_PATIENT per patient) and n_queries held-out images of
        enrolled patients, generated patient chunk by patient chunk."""
        patients = max(1, math.ceil(n / IMAGES_PER_PATIENT))
        rng = np.random.default_rng(self.seed + 2)
        asked = np.sort(rng.choice(patients, size=n_queries, replace=n_queries > patients))
        x = np.empty((n, self.dim), dtype=np.float32)
        queries = []
        per_chunk = CHUNK // IMAGES_PER_PATIENT
        for first in range(0, patients, per_chunk):
            count = min(per_chunk, patients - first)
            crng = np.random.default_rng([self.seed, 3, first])
            centres = self.centres(crng, count)
            rows = np.repeat(centres, IMAGES_PER_PATIENT, axis=0)
            start = first * IMAGES_PER_PATIENT
            stop = min(n, start + rows.shape[0])
            x[start:stop] = self.images(crng, rows[: stop - start])
            mine = asked[(asked >= first) & (asked < first + count)] - first
            if mine.size:
                queries.append(self.images(crng, centres[mine]))
        return x, np.concatenate(queries)


# ---------------------------------------------------------------------------------------------- indexes
def nlist_for(n: int) -> int:
    """About 4 * sqrt(n) lists, a power of two, with the 39 training points per list k-means wants."""
    want = 2 ** round(math.log2(max(4.0 * math.sqrt(n), 1.0)))
    return int(max(1, min(want, 2 ** int(math.log2(max(n // 39, 1))))))


def serialized_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def add_chunked(index: faiss.Index, x: np.ndarray) -> None:
    for s in range(0, x.shape[0], CHUNK):
        index.add(x[s : s + CHUNK])


def latencies_ms(search: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[float, float]:
    """p50 and p99 of one-query-per-call search, in ms (two warm-up calls)."""
    for q in queries[:2]:
        search(q[None, :])
    times = np.empty(queries.shape[0])
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        search(q[None, :])
        times[i] = time.perf_counter() - t0
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return float(p50), float(p99)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def measure(
    name: str,
    index: faiss.Index,
    build_s: float,
    x_n: int,
    queries: np.ndarray,
    truth: np.ndarray,
    settings: Iterator[tuple[str, Callable[[], None]]],
    search_one: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[dict]:
    """Rows for each setting of ``index``; ``search_one`` (one (1, dim) query -> 1-d scores, ids)
    searches instead of ``index.search`` when given (the service's VectorIndex)."""
    size = serialized_bytes(index)
    rows = []
    for setting, apply in settings:
        apply()
        if search_one is None:
            _, found = index.search(queries, K)
            p50, p99 = latencies_ms(lambda q: index.search(q, K), queries)
        else:
            found = np.full((queries.shape[0], K), -1, dtype=np.int64)
            for i, q in enumerate(queries):
                ids = search_one(q[None, :])[1]
                found[i, : ids.size] = ids
            p50, p99 = latencies_ms(search_one, queries)
        rows.append(
            {
                "index": name,
                "setting": setting,
                "recall_at_10": recall(found, truth),
                "p50_ms": p50,
                "p99_ms": p99,
                "bytes_per_vector": size / x_n,
                "build_s": build_s,
            }
        )
        log.info(
            "%-14s %-20s recall@10 %.4f  p50 %7.3f ms  p99 %7.3f ms  %7.1f B/vec  build %6.1f s",
            name,
            setting,
            rows[-1]["recall_at_10"],
            p50,
            p99,
            size / x_n,
            build_s,
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    faiss.omp_set_num_threads(args.threads)
    dim, impostor_median, impostor_p99 = model_figures()
    dim = args.dim or dim
    patients = Patients(dim, decay=args.decay, seed=args.seed)
    patients.fit(GENUINE_MEAN, impostor_median)
    genuine, impostor = patients.pair_cosines(10_000, args.seed + 4)
    t0 = time.perf_counter()
    x, queries = patients.draw(args.n, args.queries)
    n = x.shape[0]
    log.info("drew %d x %d vectors and %d queries in %.1f s", n, dim, len(queries), time.perf_counter() - t0)
    nlist = nlist_for(n)
    out: dict = {
        "n": n,
        "dim": dim,
        "queries": int(queries.shape[0]),
        "k": K,
        "threads": faiss.omp_get_max_threads(),
        "search_threads": args.search_threads,
        "faiss": faiss.__version__,
        "seed": args.seed,
        "data": {
            "images_per_patient": IMAGES_PER_PATIENT,
            "spectrum_decay": args.decay,
            "shared_direction_weight": patients.offset,
            "noise_norm": patients.noise,
            "target_genuine_cosine": GENUINE_MEAN,
            "target_impostor_median_cosine": impostor_median,
            "model_impostor_p99_cosine": impostor_p99,
            "mean_genuine_cosine": float(genuine.mean()),
            "mean_impostor_cosine": float(impostor.mean()),
            "median_impostor_cosine": float(np.median(impostor)),
            "impostor_p99_cosine": float(np.quantile(impostor, 0.99)),
        },
        "nlist": nlist,
        "ivf_training": {"vectors_per_list": args.train_per_list, "kmeans_iterations": args.kmeans_iter},
        "results": [],
    }
    wanted = set(args.indexes)
    results: list[dict] = out["results"]

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    add_chunked(flat, x)
    flat_build = time.perf_counter() - t0
    _, truth = flat.search(queries, K)  # the exact top 10: ground truth for every index
    faiss.omp_set_num_threads(args.search_threads)
    if "Flat" in wanted:
        results += measure("Flat", flat, flat_build, n, queries, truth, iter([("exact", lambda: None)]))
    del flat

    if "HNSW32" in wanted:
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        add_chunked(hnsw, x)
        build = time.perf_counter() - t0
        faiss.omp_set_num_threads(args.search_threads)

        def ef(value: int) -> Callable[[], None]:
            return lambda: setattr(hnsw.hnsw, "efSearch", value)

        results += measure(
            "HNSW32", hnsw, build, n, queries, truth, ((f"efSearch={e}", ef(e)) for e in EF_SEARCH)
        )
        del hnsw

    ivf_kinds = {"IVF-Flat": "Flat", "IVF-SQ8": "SQ8", "IVF-PQ": f"PQ{args.pq_m}"}
    if wanted & (set(ivf_kinds) | {"IVF-PQfs-RFlat"}):
        train_n = min(n, args.train_per_list * nlist)
        train = x[np.random.default_rng(args.seed + 5).choice(n, size=train_n, replace=False)]
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(dim)
        kmeans = faiss.Clustering(dim, nlist)
        kmeans.spherical = True  # IVF over inner product: unit centroids, as index_factory trains
        kmeans.niter = args.kmeans_iter
        kmeans.train(train, quantizer)
        coarse_s = time.perf_counter() - t0
        out["ivf_coarse_train_s"] = coarse_s
        log.info("coarse k-means: %d lists on %d vectors in %.1f s", nlist, train_n, coarse_s)
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), nlist * dim).reshape(nlist, dim)
        for name, code in ivf_kinds.items():
            if name not in wanted:
                continue
            faiss.omp_set_num_threads(args.threads)
            t0 = time.perf_counter()
            index = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.quantizer.add(centroids)
            ivf.quantizer.is_trained = True
            index.train(train)  # the coarse quantizer is already filled: trains only the codes
            add_chunked(index, x)
            build = coarse_s + time.perf_counter() - t0
            faiss.omp_set_num_threads(args.search_threads)

            def probe(value: int, ivf: faiss.IndexIVF = ivf) -> Callable[[], None]:
                return lambda: setattr(ivf, "nprobe", value)

            settings = ((f"nprobe={p}", probe(p)) for p in NPROBE if p <= nlist)
            results += measure(f"{name}", index, build, n, queries, truth, settings)
            del index, ivf
        if "IVF-PQfs-RFlat" in wanted:
            results += measure_refined(args, dim, nlist, centroids, coarse_s, train, x, queries, truth)
    return out


def measure_refined(
    args: argparse.Namespace,
    dim: int,
    nlist: int,
    centroids: np.ndarray,
    coarse_s: float,
    train: np.ndarray,
    x: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
) -> list[dict]:
    """IVF-PQfs-RFlat as the gallery builds and searches it: index.faiss_index.VectorIndex."""
    from index.faiss_index import VectorIndex

    faiss.omp_set_num_threads(args.threads)
    layout = f"IVF{nlist},PQ{dim // args.pqfs_dims}x4fs,RFlat"
    t0 = time.perf_counter()
    vi = VectorIndex.empty(dim, layout, nprobe=REFINE_NPROBE[0], ef_search=16)
    container = vi._index  # IndexRefine(IVF fast-scan, IndexIDMap2(IndexFlatIP)): what save() writes
    ivf = faiss.extract_index_ivf(container)
    ivf.quantizer.add(centroids)
    ivf.quantizer.is_trained = True
    container.train(train)  # the coarse quantizer is already filled: trains only the PQ codes
    for s in range(0, x.shape[0], CHUNK):
        vi.add(x[s : s + CHUNK], np.arange(s, min(s + CHUNK, x.shape[0]), dtype=np.int64))
    build = coarse_s + time.perf_counter() - t0
    faiss.omp_set_num_threads(args.search_threads)

    def setting(nprobe: int, k_factor: int) -> Callable[[], None]:
        def apply() -> None:
            vi.nprobe, vi.k_factor = nprobe, float(k_factor)  # read at each search

        return apply

    settings = (
        (f"nprobe={p},k_factor={f}", setting(p, f)) for p in REFINE_NPROBE if p <= nlist for f in K_FACTORS
    )
    log.info("IVF-PQfs-RFlat is %s", layout)
    return measure(
        "IVF-PQfs-RFlat",
        container,
        build,
        x.shape[0],
        queries,
        truth,
        settings,
        search_one=lambda q: vi.search(q, K),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="gallery images")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query images")
    parser.add_argument("--dim", type=int, help="vector length (default: the shipped model's)")
    parser.add_argument(
        "--indexes",
        type=lambda s: [i.strip() for i in s.split(",") if i.strip()],
        default=list(INDEXES),
        help=f"comma-separated subset of {','.join(INDEXES)}",
    )
    parser.add_argument(
        "--pq-m", type=int, default=32, help="IVF-PQ code bytes per vector (PQ<m>x8; PQ64 trains very slowly)"
    )
    parser.add_argument(
        "--pqfs-dims",
        type=int,
        default=2,
        help="IVF-PQfs-RFlat: dimensions per 4-bit sub-quantizer (dim / this of them; must divide dim)",
    )
    parser.add_argument(
        "--train-per-list", type=int, default=64, help="IVF k-means training vectors per list (>= 39)"
    )
    parser.add_argument(
        "--kmeans-iter", type=int, default=25, help="IVF k-means iterations (FAISS's default)"
    )
    parser.add_argument("--decay", type=float, default=1.5, help="spectrum of the patient centres: j**-decay")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="faiss OpenMP threads (builds; one query uses one)",
    )
    parser.add_argument(
        "--search-threads", type=int, help="faiss OpenMP threads while searching (default: --threads)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    unknown = set(args.indexes) - set(INDEXES)
    if unknown or args.n < 1 or args.queries < 1:
        parser.error(f"--indexes takes {','.join(INDEXES)}; --n and --queries must be >= 1")
    if args.search_threads is None:
        args.search_threads = args.threads
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: --json keeps stdout clean

    out = run(args)
    if args.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        for key, value in out.items():
            if key != "results":
                log.info("%-22s %s", key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())

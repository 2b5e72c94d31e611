"""Embedding throughput and latency on this machine: decode, model forward, gallery search.

    python bench/speed.py [--model CKPT] [--quick] [--budget SECONDS] [--sizes N ...]
                          [--factories Flat HNSW32] [--threads N] [--json OUT.json]

Three stages, one table:
- decode + prepare, per image, from bytes already in memory: a 512 px 16-bit PNG and an uncompressed
  512 px DICOM (both phantoms from ``models.imaging.phantom``), and pydicom-data's RG1_J2KR.dcm (JPEG 2000
  lossless, 1955 x 1841) next to RG1_UNCR.dcm (the same image uncompressed) when pydicom-data is
  installed; ``prepare`` uses the checkpoint's preprocessing.
- model forward (``Embedder.embed_prepared``) at batch 1 and 32, in images/s. Without a checkpoint
  (no ``--model`` and no shipped default) a random-weight model built from ``--variant/--depth/
  --width/--embedding-dim/--input-size`` is timed instead; speed depends on the architecture, not
  the weights.
- gallery search (``index.Gallery.search``, k = 10) over N random unit vectors, Flat and HNSW32,
  with recall@k of HNSW against exact search. Random vectors have no cluster structure, the hard
  case for HNSW recall.

Run time is bounded: every stage takes a share of ``--budget`` (55 s by default, 14 s with
``--quick``), and a gallery whose build would not fit in what is left is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# Build-time model of a gallery (SQLite + FAISS), to skip what cannot fit the budget: seconds per
# vector at N = 10k and 256-d (measured on a busy 2-core machine, linear in the dimension), growing
# as N ** exponent (HNSW insertion slows as the graph grows: 10k -> 100k took 25x, not 10x). A size
# after the first extrapolates the build time measured at the previous size instead.
_BUILD_SECONDS_PER_VECTOR = {"Flat": 3e-5, "HNSW": 1.5e-4}
_BUILD_EXPONENT = {"Flat": 1.1, "HNSW": 1.45}


@dataclass
class Row:
    """One line of the table; times in milliseconds."""

    stage: str
    case: str
    runs: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    rate: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Budget:
    """Wall-clock budget shared by the stages."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def repeat(fn: Callable[[], Any], *, seconds: float, max_runs: int, min_runs: int = 1) -> list[float]:
    """Call ``fn`` until ``max_runs`` calls or ``seconds`` spent (at least ``min_runs``); times in s."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _p(times_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(times_s) * 1000.0, q))


# ---------------------------------------------------------------------------------------------- model
def load_embedder(args: argparse.Namespace) -> tuple[Any, str]:
    """The checkpoint to time, or a random-weight model from the flags; returns it and a note."""
    from models.net.embedder import DEFAULT_CHECKPOINT, Embedder

    if args.model is not None or DEFAULT_CHECKPOINT.is_file():
        embedder = Embedder.from_checkpoint(args.model, runtime="auto")  # the serving path
        return embedder, f"checkpoint {embedder.source} ({embedder.model_id})"

    import torch

    from models.imaging.preprocess import PreprocessConfig
    from models.net.backbones import BackboneConfig, build_backbone
    from models.scoring.calibration import Calibration

    defaults = BackboneConfig()
    config = BackboneConfig(
        variant=args.variant or defaults.variant,
        depth=args.depth or defaults.depth,
        width=args.width or defaults.width,
        embedding_dim=args.embedding_dim or defaults.embedding_dim,
    )
    preprocess = PreprocessConfig(size=args.input_size or PreprocessConfig().size)
    torch.manual_seed(0)
    network = build_backbone(config)
    checkpoint = {
        "model_id": "random-weights",
        "name": "random-weights",
        "backbone": config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "calibration": Calibration(thresholds={"1e-2": 0.5, "1e-3": 0.6, "1e-4": 0.7}).to_dict(),
        "state_dict": network.state_dict(),
    }
    note = (
        f"NOTE: {DEFAULT_CHECKPOINT.name} not shipped yet and no --model: timing a random-weight "
        f"{config.variant}-{config.depth} (width {config.width}, {config.embedding_dim}-d, "
        f"{preprocess.size} px); forward speed depends on the architecture, not the weights"
    )
    return Embedder(checkpoint), note


# ---------------------------------------------------------------------------------------------- stages
def decode_cases(workdir: Path) -> list[tuple[str, bytes]]:
    """(label, file bytes) for each decode case available here."""
    from models.imaging.phantom import write_phantom_set

    cases = []
    for fmt, label in (
        ("png", "PNG 512 px, 16-bit (phantom)"),
        ("dicom", "DICOM 512 px, uncompressed (phantom)"),
    ):
        manifest = write_phantom_set(workdir / fmt, 1, 1, size=512, fmt=fmt, seed=0)
        image = next(p for p in manifest.parent.rglob("*") if p.suffix in (".png", ".dcm"))
        cases.append((label, image.read_bytes()))
    try:
        from pydicom.data import get_testdata_file

        for name, label in (
            ("RG1_J2KR.dcm", "DICOM 1955x1841, JPEG 2000 lossless (RG1_J2KR)"),
            ("RG1_UNCR.dcm", "DICOM 1955x1841, uncompressed (RG1_UNCR)"),
        ):
            path = get_testdata_file(name, download=False)  # pydicom-data only: never the network
            if path:
                cases.append((label, Path(path).read_bytes()))
    except Exception as exc:  # pydicom-data missing or broken: the phantom rows still stand
        print(f"(pydicom-data test files unavailable: {exc})", file=sys.stderr)
    return cases


def _decode_once(data: bytes, config: Any, decode_s: list[float], prepare_s: list[float]) -> None:
    """Decode and prepare one image, recording the two times separately."""
    from models.imaging.preprocess import decode_image, prepare

    t0 = time.perf_counter()
    image = decode_image(data, config=config)  # at the resolution the model needs, as served
    t1 = time.perf_counter()
    prepare(image, config)
    prepare_s.append(time.perf_counter() - t1)
    decode_s.append(t1 - t0)


def bench_decode(embedder: Any, cases: Sequence[tuple[str, bytes]], seconds: float) -> list[Row]:
    """Per-image decode_image + prepare time of each case."""
    rows = []
    per_case = seconds / max(len(cases), 1)
    for label, data in cases:
        decode_s: list[float] = []
        prepare_s: list[float] = []
        once = partial(_decode_once, data, embedder.preprocess_config, decode_s, prepare_s)
        once()  # warm-up: plugin imports, caches
        decode_s.clear()
        prepare_s.clear()
        repeat(once, seconds=per_case, max_runs=50)
        times = [d + p for d, p in zip(decode_s, prepare_s, strict=True)]
        p50 = _p(times, 50)
        rows.append(
            Row(
                "decode+prepare",
                label,
                len(times),
                p50,
                _p(times, 95),
                f"{1000.0 / p50:.0f} img/s",
                f"decode {_p(decode_s, 50):.1f} + prepare {_p(prepare_s, 50):.1f} ms "
                f"({len(data) / 1e6:.2f} MB file)",
            )
        )
    return rows


def bench_forward(embedder: Any, batch_sizes: Sequence[int], seconds: float) -> list[Row]:
    """embed_prepared on random prepared images, images/s at each batch size."""
    size = embedder.preprocess_config.size
    views = 1 + embedder.preprocess_config.tta  # test-time views: each image costs this many forwards
    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        inputs = rng.random((batch, size, size), dtype=np.float32)
        embedder.embed_prepared(inputs)  # warm-up
        times = repeat(
            partial(embedder.embed_prepared, inputs),
            seconds=seconds / len(batch_sizes),
            max_runs=200,
        )
        p50 = _p(times, 50)
        rows.append(
            Row(
                "model forward",
                f"batch {batch}, {size} px",
                len(times),
                p50,
                _p(times, 95),
                f"{batch * 1000.0 / p50:.1f} img/s",
                f"{embedder.dim}-d; {views} test-time view{'s' if views > 1 else ''} averaged per image",
            )
        )
    return rows


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _exact_top_k(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact k nearest (inner product) per query (all rows when k >= N)."""
    scores = queries @ x.T
    k = min(k, x.shape[0])
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _search_once(gallery: Any, queries: np.ndarray, k: int, found: list[list[int]]) -> None:
    """Search the next query; keep the ids found (for recall)."""
    q = queries[len(found) % len(queries)]
    found.append([m.record.image_id for m in gallery.search(q, k=k)])


def bench_gallery(
    dim: int,
    sizes: Sequence[int],
    factories: Sequence[str],
    *,
    k: int,
    budget: Budget,
    search_seconds: float,
    max_queries: int,
    ef_search: int = 64,
) -> list[Row]:
    """Gallery.search latency over N random unit vectors for each size and index layout."""
    from index import Gallery, NewImage

    rows = []
    measured: dict[str, tuple[int, float]] = {}  # factory -> (N, build seconds) of the last build
    for n in sorted(sizes):
        x = _unit_vectors(n, dim, seed=n)
        queries = _unit_vectors(max_queries, dim, seed=n + 1)
        n_recall = min(50, max_queries)
        exact_rows = None
        for factory in factories:
            family = "HNSW" if factory.upper().startswith("HNSW") else "Flat"
            if factory in measured:
                n0, t0 = measured[factory]
                estimate = t0 * (n / n0) ** _BUILD_EXPONENT[family]
            else:
                base = _BUILD_SECONDS_PER_VECTOR[family] * 10_000 * max(dim, 64) / 256
                estimate = base * (n / 10_000) ** _BUILD_EXPONENT[family]
            case = f"{factory}, N={n:,}, k={k}"
            if estimate + search_seconds > budget.left():
                rows.append(
                    Row(
                        "gallery search",
                        case,
                        notes=f"skipped: build needs ~{estimate:.0f} s, {max(budget.left(), 0):.0f} s "
                        "of the budget left (raise --budget)",
                    )
                )
                continue
            with tempfile.TemporaryDirectory(prefix="cxr-reid-speed-") as tmp:
                t0 = time.perf_counter()
                gallery = Gallery(
                    tmp,
                    dim=dim,
                    model_id="bench",
                    index_factory=factory,
                    ef_search=ef_search,
                    autosave_seconds=None,
                )
                try:
                    records = gallery.add(x, [NewImage(patient_id=f"p{i}") for i in range(n)])
                    build = time.perf_counter() - t0
                    layout = gallery.effective_index_factory
                    measured[factory] = (n, build)
                    ids = np.array([r.image_id for r in records])
                    gallery.search(queries[0], k=k)  # warm-up
                    found: list[list[int]] = []
                    times = repeat(
                        partial(_search_once, gallery, queries, k, found),
                        seconds=search_seconds,
                        max_runs=max_queries,
                        min_runs=10,
                    )
                finally:
                    gallery.close()
            if exact_rows is None:
                exact_rows = _exact_top_k(x, queries[:n_recall], k)
            got = found[: min(n_recall, len(found))]
            recall = float(
                np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, ids[exact_rows], strict=False)])
            )
            p50 = _p(times, 50)
            rows.append(
                Row(
                    "gallery search",
                    case,
                    len(times),
                    p50,
                    _p(times, 95),
                    f"{1000.0 / p50:.0f} queries/s",
                    f"recall@{k} {recall:.3f}; build {build:.1f} s; {dim}-d"
                    + (f"; efSearch {ef_search}" if family == "HNSW" else "")
                    + (
                        f"; ran as {layout} (too few vectors to train {factory})" if layout != factory else ""
                    ),
                    {"recall": recall, "build_s": build},
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    header = ("stage", "case", "runs", "p50 ms", "p95 ms", "rate", "notes")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r.stage,
            r.case,
            str(r.runs) if r.runs else "-",
            f"{r.p50_ms:.2f}" if r.p50_ms is not None else "-",
            f"{r.p95_ms:.2f}" if r.p95_ms is not None else "-",
            r.rate or "-",
            r.notes,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    """What the figures depend on: cores, threads, load."""
    import faiss
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{os.cpu_count()} cores; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads; load average {load}"
    )


def busy_warning(threads: int | None) -> str | None:
    """A warning when other processes already keep the cores busy (before this run started)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.5 * cores:
        return None
    advice = (
        "re-run on an idle machine"
        if threads == 1
        else "multi-threaded torch / FAISS (OpenMP) can be many times slower on busy cores; "
        "re-run on an idle machine, or with --threads 1 for per-core figures"
    )
    return (
        f"WARNING: load average {load:.2f} on {cores} cores before this run, "
        f"so the figures are contended; {advice}."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Embedding throughput and search latency on this machine.")
    parser.add_argument("--model", help="checkpoint (default: the shipped model, else a random-weight model)")
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 15 s): N = 10k only")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 55, --quick 14)")
    parser.add_argument("--sizes", type=int, nargs="+", help="gallery sizes (default 10000 100000)")
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"], help="FAISS index layouts")
    parser.add_argument("--k", type=int, default=10, help="neighbours per search")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch (the gallery's default: 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, help="torch and FAISS threads (default: theirs)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    fallback = parser.add_argument_group("random-weight model when there is no checkpoint")
    fallback.add_argument("--variant", help="ir | ir_se | sphere | resnet (default: BackboneConfig's)")
    fallback.add_argument("--depth", type=int)
    fallback.add_argument("--width", type=int)
    fallback.add_argument("--embedding-dim", type=int)
    fallback.add_argument("--input-size", type=int, help="model input side in pixels")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warning = busy_warning(args.threads)  # before this process adds to the load
    budget = Budget(args.budget or (14.0 if args.quick else 55.0))
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000])
    if args.model is not None and not Path(args.model).is_file():
        print(f"error: checkpoint not found: {args.model}", file=sys.stderr)
        return 2
    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    embedder, model_note = load_embedder(args)
    print(model_note)
    print(machine_line())
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cxr-reid-speed-") as tmp:
        cases = decode_cases(Path(tmp))
    rows += bench_decode(embedder, cases, seconds=0.1 * budget.seconds)
    rows += bench_forward(embedder, args.batch_sizes, seconds=0.2 * budget.seconds)
    rows += bench_gallery(
        embedder.dim,
        sizes,
        args.factories,
        k=args.k,
        budget=budget,
        search_seconds=min(3.0, 0.05 * budget.seconds),
        max_queries=50 if args.quick else 200,
        ef_search=args.ef_search,
    )
    print(format_table(rows))
    if warning:
        print(warning)
    print(f"total {budget.elapsed():.1f} s (budget {budget.seconds:.0f} s)")
    if args.json:
        payload = {
            "model": model_note,
            "machine": machine_line(),
            "warning": warning,
            "rows": [asdict(r) for r in rows],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

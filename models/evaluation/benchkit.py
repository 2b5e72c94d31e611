"""What the benchmarks under ``bench/`` share: timing loops, result tables and strict JSON.

The benchmarks are scripts (``python bench/<name>.py``), not a package, so what more than one of them
needs lives here rather than in one script another imports by path.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: How a table shows a metric that is undefined (no pairs, one class).
NOT_AVAILABLE = "n/a"

#: What a benchmark says when the real sets are not there: they are not shipped, and how to make some.
NO_DATA = (
    "nothing to measure; this benchmark needs the real sets (a folder of set folders, each with a "
    "manifest.csv; `cxr-reid data SOURCE ROOT --out DIR/NAME/manifest.csv` makes one from a public set "
    "or a DICOM folder: docs/train-your-own-data.md)"
)


def rate(run: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of ``run`` (one warm-up call, then repeated for about ``seconds``)."""
    run()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        run()
        calls += 1
    return items * calls / elapsed


def median_ms(run: Callable[[], object], seconds: float) -> float:
    """Median wall time of ``run`` in ms: one warm-up, then repeated for about ``seconds`` (>= 3 runs)."""
    run()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def embed_in_batches(embedder: Any, prepared: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """Embeddings of many prepared images, ``batch`` at a time (bounded memory)."""
    return np.concatenate(
        [embedder.embed_prepared(np.stack(prepared[i : i + batch])) for i in range(0, len(prepared), batch)]
    )


def num(value: Any, digits: int = 4) -> str:
    """A metric value, or n/a when undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return NOT_AVAILABLE
    return f"{float(value):.{digits}f}"


def with_ci(result: dict[str, Any], key: str, digits: int = 4) -> str:
    """``0.9512 [0.9301, 0.9688]``: the value and its 95% bootstrap interval when there is one."""
    text = num(result.get(key), digits)
    interval = (result.get("ci") or {}).get(key)
    if text != NOT_AVAILABLE and interval:
        text += f" [{num(interval[0], digits)}, {num(interval[1], digits)}]"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; a "|" inside a cell becomes "/"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Non-finite floats become None so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

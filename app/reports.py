"""Self-contained HTML reports (``cxr-reid audit``, ``cxr-reid risk``): one file a person can open
offline and pass on, with thumbnails as data URIs and charts as inline SVG.

Templates live in ``app/templates`` (Jinja2, autoescaped: file names and patient ids in a report
are data, never markup). The shared page frame, styles and the table sorting / filtering script
are in ``_base.html.j2``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from index._fs import atomic_write_bytes

TEMPLATES = Path(__file__).with_name("templates")

#: Colours of the series in a chart, in order (colour-blind safe: Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda x, digits=1: "n/a" if x is None else f"{100 * x:.{digits}f}%"
    env.filters["num"] = lambda x, digits=4: "n/a" if x is None else f"{x:.{digits}f}"
    return env


@cache
def package_version() -> str:
    """cxr-reid's installed version, which every report and page names ("dev" from a bare checkout)."""
    try:
        return version("cxr-reid")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
        return "dev"


def render(template: str, **context: Any) -> str:
    """Render one of the report templates."""
    return _environment().get_template(template).render(**context)


def png_data_uri(pixels: np.ndarray | None) -> str:
    """A grey uint8 image as a ``data:image/png;base64`` URI ("" for None: no thumbnail)."""
    if pixels is None:
        return ""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_svg(
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    markers: Mapping[str, float] | None = None,
    bins: int = 50,
    x_label: str = "score",
    width: int = 640,
    height: int = 220,
) -> str:
    """Overlaid histograms (each normalised to its own count, so sets of different sizes compare)
    with labelled vertical markers (thresholds), as an inline SVG string.

    The y axis is the share of each series per bin; a marker's label sits on the side of its line
    with room for it, and labels of several markers are stacked, so none is clipped or overlaps."""
    data = {name: np.asarray(values, dtype=np.float64) for name, values in series.items()}
    data = {name: v[np.isfinite(v)] for name, v in data.items()}
    values = [v for v in data.values() if v.size]
    marks = dict(markers or {})
    if not values:
        return '<p class="muted">no scores to plot</p>'
    lo = (
        min(min(float(v.min()) for v in values), *marks.values())
        if marks
        else min(float(v.min()) for v in values)
    )
    hi = (
        max(max(float(v.max()) for v in values), *marks.values())
        if marks
        else max(float(v.max()) for v in values)
    )
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    legend_h = 14 * len(data)  # the legend above the plot, so no bar or marker label runs under it
    left, right, top, bottom = 56, 10, 10 + legend_h, 36
    height += legend_h
    plot_w, plot_h = width - left - right, height - top - bottom
    heights = {name: np.histogram(v, bins=edges)[0] / max(v.size, 1) for name, v in data.items()}
    peak = max(float(h.max()) for h in heights.values()) or 1.0

    def x(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    def y(share: float) -> float:
        return top + plot_h - share / peak * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444" class="y-axis"/>',
        f'<text x="12" y="{top + plot_h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2})">share per bin</text>',
    ]
    for k in range(3):  # 0, half the peak, the peak: the share of its series one bin holds
        share = peak * k / 2
        parts.append(
            f'<line x1="{left - 3}" y1="{y(share):.1f}" x2="{left}" y2="{y(share):.1f}" stroke="#444"/>'
            f'<text x="{left - 5}" y="{y(share) + 3:.1f}" font-size="10" text-anchor="end" class="y-tick">'
            f"{share:.0%}</text>"
        )
    for k in range(6):
        tick = lo + (hi - lo) * k / 5
        anchor = "start" if k == 0 else "end" if k == 5 else "middle"  # the outer two stay inside
        parts.append(
            f'<text x="{x(tick):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="{anchor}">'
            f"{tick:.2f}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
        f"{_escape(x_label)}</text>"
    )
    for h, colour in zip(heights.values(), PALETTE, strict=False):
        points = [f"{x(edges[0]):.1f},{y(0):.1f}"]
        for i, share in enumerate(h):
            points += [f"{x(edges[i]):.1f},{y(share):.1f}", f"{x(edges[i + 1]):.1f},{y(share):.1f}"]
        points.append(f"{x(edges[-1]):.1f},{y(0):.1f}")
        parts.append(
            f'<polyline fill="{colour}" fill-opacity="0.25" stroke="{colour}" points="{" ".join(points)}"/>'
        )
    legend_y = 12
    for (name, v), colour in zip(data.items(), PALETTE, strict=False):
        parts.append(
            f'<text x="{left + 8}" y="{legend_y}" font-size="11" fill="{colour}">'
            f"{_escape(name)} ({v.size:,})</text>"
        )
        legend_y += 14
    for k, (name, value) in enumerate(marks.items()):
        at = x(value)
        # the label on the side of the line with room for it (a threshold near the right edge would be
        # cut off to its right), one line lower for each marker so two close ones do not overlap
        side = f'x="{at - 3:.1f}" text-anchor="end"' if at > left + plot_w / 2 else f'x="{at + 3:.1f}"'
        parts.append(
            f'<line x1="{at:.1f}" y1="{top}" x2="{at:.1f}" y2="{top + plot_h}" '
            'stroke="#000" stroke-dasharray="4 3"/>'
            f'<text {side} y="{top + 10 + 12 * k}" font-size="10" class="marker">'
            f"{_escape(name)} {value:.3f}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_label: str,
    y_label: str,
    log_x: bool = True,
    bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
    width: int = 640,
    height: int = 260,
) -> str:
    """Line chart of (x, y) points per series, y in [0, 1], optional (x, low, high) bands, x on a log
    scale by default (false-accept rates), as an inline SVG string.

    The legend sits above the plot (a line near 1.0 would run through it); the outermost tick labels
    are anchored inwards so neither is cut off at the chart's edge."""
    points = [p for c in curves.values() for p in c]
    if not points:
        return '<p class="muted">nothing to plot</p>'
    xs = np.asarray([p[0] for p in points], dtype=np.float64)
    tx = np.log10 if log_x else (lambda v: v)
    lo, hi = float(tx(xs.min())), float(tx(xs.max()))
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    legend_h = 14 * len(curves)
    left, right, top, bottom = 44, 10, 10 + legend_h, 36
    height += legend_h
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(value: float) -> float:
        return left + (float(tx(value)) - lo) / (hi - lo) * plot_w

    def py(share: float) -> float:
        return top + plot_h - share * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>',
    ]
    for k in range(6):
        share = k / 5
        parts.append(
            f'<text x="{left - 4}" y="{py(share) + 3:.1f}" font-size="10" text-anchor="end">'
            f"{share:.1f}</text>"
        )
    ticks = sorted({p[0] for p in points})
    for k, tick in enumerate(ticks):
        label = far_label(tick) if log_x else f"{tick:g}"
        anchor = "start" if k == 0 and len(ticks) > 1 else "end" if k == len(ticks) - 1 else "middle"
        parts.append(
            f'<text x="{px(tick):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="{anchor}" '
            f'class="x-tick">{label}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
        f"{_escape(x_label)}</text>"
        f'<text x="12" y="{top + plot_h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_h / 2})">{_escape(y_label)}</text>'
    )
    for (name, curve), colour in zip(curves.items(), PALETTE, strict=False):
        band = (bands or {}).get(name)
        if band:
            upper = [f"{px(x):.1f},{py(h):.1f}" for x, _, h in band]
            lower = [f"{px(x):.1f},{py(low):.1f}" for x, low, _ in reversed(band)]
            parts.append(f'<polygon fill="{colour}" fill-opacity="0.15" points="{" ".join(upper + lower)}"/>')
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in curve)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        for x, y in curve:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
    legend_y = 12
    for name, colour in zip(curves, PALETTE, strict=False):
        parts.append(
            f'<text x="{left + 8}" y="{legend_y}" font-size="11" fill="{colour}">{_escape(name)}</text>'
        )
        legend_y += 14
    parts.append("</svg>")
    return "".join(parts)


def far_label(value: float) -> str:
    """A rate as people write it: 1e-3, 3e-5, 0.1 (not 1e-03 or 1.0e-01)."""
    if value >= 0.1:
        return f"{value:g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e-{int(exponent[1:])}" if exponent.startswith("-") else f"{mantissa}e{int(exponent)}"


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def json_ready(value: Any) -> Any:
    """numpy scalars and arrays to plain JSON values; NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: Path, text: str) -> None:
    """Write a report file atomically: a reader never sees half of one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(json_ready(value), indent=2) + "\n")


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """The report folder, created if needed; refuses a path that is a file."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file; give a folder for the report")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def report_out_dir(out: str | os.PathLike) -> Iterator[Path]:
    """The report folder of one run (``prepare_out_dir``), taken back if the run fails: what this run
    created (the folder, and any missing parents) is removed on any exception, Ctrl-C included, so a
    failed run leaves no half-made report behind. A folder that was already there is kept as it is
    (it may hold an earlier report and its embedding cache)."""
    folder = Path(out)
    first_new = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        first_new = candidate
    prepared = prepare_out_dir(folder)
    try:
        yield prepared
    except BaseException:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        raise

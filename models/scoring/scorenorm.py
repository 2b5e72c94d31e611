"""Adaptive symmetric score normalisation (AS-norm): a pair's cosine measured against how much each
side resembles other patients of the site.

At a hospital the model never saw, radiographs of different patients tend to look alike (one
scanner, one protocol, one population), so their raw cosines run high and a threshold that
separates patients elsewhere admits many of them. AS-norm (Matejka et al., Interspeech 2017; the
standard in speaker verification) scores each side against a *cohort* of the site's own images:
with ``mu``/``sd`` the mean and standard deviation of a side's ``top_k`` highest cohort scores
(its nearest impostors),

    s_norm(a, b) = 0.5 * ((s - mu_a) / sd_a + (s - mu_b) / sd_b),   s = cos(a, b).

An image that resembles everyone is pulled down, a distinctive one is not.

Leave-pair-out: a side's statistics leave out cohort images of *either* patient of the pair (and
the image itself), since they are not impostors of that pair. So the cohort can be the very images
the thresholds are fitted on (no data is set aside), and a query of a patient already in the
cohort is not pulled down by its own earlier images when it is compared with them. Each side keeps
its ``top_k + 2 * MAX_PER_PATIENT`` nearest cohort scores; the cohort holds at most
``MAX_PER_PATIENT`` images of one patient, so leaving two patients out always leaves ``top_k``.

The cohort travels with the calibration fitted on its normalised scores (``Calibration.score_norm``)
as float16 vectors and one-way patient keys (``patient_key``): no patient id is stored.
"""

from __future__ import annotations

import base64
import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_TOP_K = 20
MAX_COHORT = 1000  # images: one side's statistics cost one (MAX_COHORT x dim) product
MAX_PER_PATIENT = 10
SELF_SCORE = 1.0 - 1e-4  # a cohort score this high is the image itself (or a byte copy)
UNKNOWN = -1  # the code of an unknown patient: excludes nothing
_CHUNK = 100_000  # pairs normalised at a time


def patient_key(patient: str | None) -> str:
    """A short one-way key of a patient id; "" for an unknown patient."""
    if not patient:
        return ""
    return hashlib.sha256(patient.encode("utf-8")).hexdigest()[:16]


def choose_cohort(patient_keys: Sequence[str], *, size: int = MAX_COHORT, seed: int = 0) -> np.ndarray:
    """Indices of a cohort: at most ``MAX_PER_PATIENT`` images of a patient, ``size`` in all, drawn
    at random (seeded) so that no patient and no part of the site dominates it."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patient_keys))
    taken: dict[str, int] = {}
    chosen = []
    for i in order:
        key = patient_keys[i]
        if taken.get(key, 0) >= MAX_PER_PATIENT:
            continue
        taken[key] = taken.get(key, 0) + 1
        chosen.append(i)
        if len(chosen) == size:
            break
    return np.sort(np.asarray(chosen, dtype=np.int64))


@dataclass
class Neighbours:
    """One side's nearest cohort scores (best first) and the patient codes they belong to."""

    scores: np.ndarray  # (N, m) float32, -inf where fewer than m
    codes: np.ndarray  # (N, m) int64


@dataclass
class ScoreNorm:
    cohort: np.ndarray  # (C, dim) unit vectors of the site's images
    cohort_keys: list[str] = field(default_factory=list)  # patient_key() of each; "" unknown
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self) -> None:
        self.cohort = np.ascontiguousarray(self.cohort, dtype=np.float32)
        if self.cohort.ndim != 2 or self.cohort.shape[0] < 2:
            raise ValueError("an AS-norm cohort needs at least two images")
        if not self.cohort_keys:
            self.cohort_keys = [""] * self.cohort.shape[0]
        if len(self.cohort_keys) != self.cohort.shape[0]:
            raise ValueError("one key per cohort image")
        if self.top_k < 2:
            raise ValueError("top_k must be at least 2")
        self._code_of: dict[str, int] = {}
        codes = []
        for i, key in enumerate(self.cohort_keys):
            # unknown cohort patients get codes of their own that no query names
            codes.append(self._code_of.setdefault(key, len(self._code_of)) if key else -2 - i)
        self._cohort_codes = np.asarray(codes, dtype=np.int64)

    @property
    def dim(self) -> int:
        return int(self.cohort.shape[1])

    def codes(self, keys: Sequence[str]) -> np.ndarray:
        """Patient codes of ``patient_key`` values; ``UNKNOWN`` for keys the cohort does not hold."""
        return np.asarray([self._code_of.get(k, UNKNOWN) if k else UNKNOWN for k in keys], dtype=np.int64)

    def neighbours(self, embeddings: np.ndarray) -> Neighbours:
        """Each embedding's nearest cohort scores, itself left out."""
        e = np.asarray(embeddings, np.float32).reshape(-1, self.dim)
        # one matrix-vector product per image: a matrix product would round an image's scores
        # differently with the number of images, and one pair must get one score on every route
        scores = np.empty((e.shape[0], self.cohort.shape[0]), np.float32)
        for i, row in enumerate(e):
            scores[i] = self.cohort @ row
        scores[scores >= SELF_SCORE] = -np.inf
        m = min(self.top_k + 2 * MAX_PER_PATIENT, scores.shape[1])
        top = np.argpartition(-scores, m - 1, axis=1)[:, :m]
        picked = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        return Neighbours(
            np.take_along_axis(picked, order, axis=1),
            self._cohort_codes[np.take_along_axis(top, order, axis=1)],
        )

    def side_stats(
        self, side: Neighbours, rows: np.ndarray, exclude_a: np.ndarray, exclude_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sd) of the ``top_k`` best cohort scores of ``side``'s ``rows``, leaving out cohort
        images of the patients ``exclude_a`` / ``exclude_b`` (codes per row; UNKNOWN = none)."""
        scores, codes = side.scores[rows], side.codes[rows]
        valid = np.isfinite(scores) & (codes != exclude_a[:, None]) & (codes != exclude_b[:, None])
        keep = valid & (np.cumsum(valid, axis=1) <= self.top_k)
        count = np.maximum(keep.sum(1), 1)
        filled = np.where(keep, scores, 0.0)
        mu = filled.sum(1) / count
        var = np.where(keep, (scores - mu[:, None]) ** 2, 0.0).sum(1) / count
        return mu, np.maximum(np.sqrt(var), 1e-3)

    def normalise_pairs(
        self,
        raw: np.ndarray,
        a: Neighbours,
        rows_a: np.ndarray,
        codes_a: np.ndarray,
        b: Neighbours,
        rows_b: np.ndarray,
        codes_b: np.ndarray,
    ) -> np.ndarray:
        """AS-norm of raw cosines of pairs (row ``rows_a[i]`` of ``a`` with row ``rows_b[i]`` of
        ``b``), each side leaving out both patients (``codes_a[i]``, ``codes_b[i]``)."""
        out = np.empty(len(raw), dtype=np.float64)
        for start in range(0, len(raw), _CHUNK):
            part = slice(start, start + _CHUNK)
            ca, cb = codes_a[part], codes_b[part]
            mu_a, sd_a = self.side_stats(a, rows_a[part], ca, cb)
            mu_b, sd_b = self.side_stats(b, rows_b[part], ca, cb)
            out[part] = 0.5 * ((raw[part] - mu_a) / sd_a + (raw[part] - mu_b) / sd_b)
        return out

    def normalise_within(
        self, embeddings: np.ndarray, keys: Sequence[str], scores: np.ndarray, pairs: np.ndarray
    ) -> np.ndarray:
        """AS-norm of pair ``scores`` between rows ``pairs`` (M, 2) of one set of embeddings."""
        side = self.neighbours(embeddings)
        codes = self.codes(keys)
        a, b = pairs[:, 0], pairs[:, 1]
        return self.normalise_pairs(np.asarray(scores, np.float64), side, a, codes[a], side, b, codes[b])

    def bounds(self, side: Neighbours) -> np.ndarray:
        """(N, 3) per row of ``side``: the lowest ``mu`` and the lowest and highest ``sd`` its
        statistics can take whatever two patients a pair leaves out (a top-k subset of its list:
        ``mu`` is at least the mean of the deepest k; for sorted scores the tightest k-subset is a
        run of k neighbours; no k values spread wider than half their range)."""
        scores = np.where(np.isfinite(side.scores), side.scores, np.nan)
        n, m = scores.shape
        k = min(self.top_k, m)
        out = np.empty((n, 3))
        windows = np.lib.stride_tricks.sliding_window_view(scores, k, axis=1)  # (N, m - k + 1, k)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rows with fewer than k finite scores
            out[:, 0] = np.nanmin(np.nanmean(windows, axis=2), axis=1)
            out[:, 1] = np.nanmin(np.nanstd(windows, axis=2), axis=1)
            out[:, 2] = (np.nanmax(scores, axis=1) - np.nanmin(scores, axis=1)) / 2
        out[:, 1] = np.maximum(np.nan_to_num(out[:, 1], nan=0.0), 1e-3)
        out[:, 2] = np.maximum(np.nan_to_num(out[:, 2], nan=0.0), 1e-3)
        out[:, 0] = np.nan_to_num(out[:, 0], nan=-1.0)
        return out

    @staticmethod
    def raw_floor(threshold: float, bounds: np.ndarray) -> float:
        """The lowest raw cosine at which a pair with a side among ``bounds`` (rows of
        :meth:`bounds`) can reach a normalised ``threshold``. The normalised score is the mean of
        (s - mu) / sd over the two sides, so it reaches t only if s >= t * sd + mu for one of them.
        Range searches start there and every candidate is re-scored exactly."""
        if len(bounds) == 0:
            return math.inf
        return float(np.min(ScoreNorm.floors(threshold, bounds)))

    @staticmethod
    def floors(threshold: float, bounds: np.ndarray) -> np.ndarray:
        """Per row of ``bounds``, the lowest raw cosine at which a pair with that side can reach a
        normalised ``threshold`` (see :meth:`raw_floor`)."""
        sd = bounds[:, 1] if threshold >= 0 else bounds[:, 2]
        return threshold * sd + bounds[:, 0]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        data = self.cohort.astype("<f2").tobytes()
        return {
            "method": "as-norm",
            "top_k": int(self.top_k),
            "shape": list(self.cohort.shape),
            "cohort_f16": base64.b64encode(data).decode("ascii"),
            "cohort_keys": list(self.cohort_keys),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreNorm:
        if d.get("method") != "as-norm":
            raise ValueError(f"unknown score normalisation {d.get('method')!r}")
        rows, dim = d["shape"]
        cohort = np.frombuffer(base64.b64decode(d["cohort_f16"]), dtype="<f2").astype(np.float32)
        return cls(cohort.reshape(rows, dim), list(d.get("cohort_keys") or []), int(d["top_k"]))

    def describe(self) -> str:
        return f"as-norm: top {self.top_k} of {self.cohort.shape[0]} cohort images"

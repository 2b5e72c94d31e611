"""Verification and retrieval metrics for identity embeddings, with patient-level bootstrap CIs.

Reported like Packhaeuser et al. (Sci Rep 2022) and Ueda & Morishita (J Digit Imaging 2023), so our
numbers sit next to theirs: ROC AUC, EER, TAR at FAR 1e-2 / 1e-3 / 1e-4 on image pairs; P@1,
R-precision and MAP@R (Musgrave et al. 2020) for leave-one-out retrieval; 95% bootstrap intervals
that resample patients (images of one patient are not independent); breakdowns by view pair and by
time gap; ROC and score-histogram plots.

Conventions
- Embeddings are unit vectors; the score of a pair is the dot product (cosine similarity).
- A pair is accepted when ``score >= threshold``.
- Ties in retrieval are broken pessimistically: a different-patient image with the same score as a
  same-patient image ranks first. A degenerate model (all embeddings equal) therefore scores 0, not 1.
- Undefined values (e.g. no query with a second image) are ``None`` so results stay valid JSON.

Why one module of this size: each figure sits next to its bootstrap interval and its conventions;
splitting them would separate a figure from the interval reported beside it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FAR_TARGETS: dict[str, float] = {"1e-2": 1e-2, "1e-3": 1e-3, "1e-4": 1e-4}
TIME_GAP_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("0", 0, 0),
    ("1-30", 1, 30),
    ("31-365", 31, 365),
    (">365", 366, math.inf),
)
#: ChestX-ray14's "Follow-up #" orders a patient's visits but says nothing of days between them.
FOLLOW_UP_GAP_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2-5", 2, 5),
    ("6-20", 6, 20),
    (">20", 21, math.inf),
)
MIN_BUCKET_PAIRS = 5
_BLOCK_ELEMENTS = 4_000_000  # floats per score block (16 MB float32)


# ---------------------------------------------------------------------------------------------- helpers
def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    e = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if e.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings contain NaN or inf")
    return e


def _encode_labels(labels: Sequence[Any] | np.ndarray, n: int) -> np.ndarray:
    """Integer patient codes 0..P-1 for arbitrary hashable labels (str, int)."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    _, codes = np.unique(lab, return_inverse=True)
    return codes.astype(np.int64).ravel()


def _opt(x: float) -> float | None:
    """float, or None when undefined (NaN), so results serialise as strict JSON."""
    x = float(x)
    return None if math.isnan(x) else x


def _pair_dots(e: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Row-wise dot products of the given index pairs, in chunks (no (M, D) giant temporaries)."""
    out = np.empty(len(pairs), dtype=np.float64)
    step = max(1024, _BLOCK_ELEMENTS // max(1, e.shape[1]))
    for s in range(0, len(pairs), step):
        p = pairs[s : s + step]
        out[s : s + step] = np.einsum("ij,ij->i", e[p[:, 0]], e[p[:, 1]])
    return out


def _genuine_pairs(codes: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, with the same label; vectorised per group size, sorted."""
    n = codes.size
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if n else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, n])
    chunks = []
    for k in np.unique(sizes[sizes >= 2]):
        st = starts[sizes == k]
        a, b = np.triu_indices(int(k), 1)
        ia = order[st[:, None] + a[None, :]].ravel()
        ib = order[st[:, None] + b[None, :]].ravel()
        chunks.append(np.stack([np.minimum(ia, ib), np.maximum(ia, ib)], axis=1))
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(chunks).astype(np.int64)
    return pairs[np.argsort(pairs[:, 0] * n + pairs[:, 1], kind="stable")]


def _linear_to_pair(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map linear indices of the strict upper triangle (row-major) to (i, j), i < j."""
    k = np.asarray(k, dtype=np.int64)
    m = 2 * n - 1
    i = np.floor((m - np.sqrt(np.maximum(float(m) * m - 8.0 * k, 0.0))) / 2.0).astype(np.int64)
    i = np.clip(i, 0, max(n - 2, 0))
    for _ in range(2):  # fix float rounding at row boundaries
        off = i * (m - i) // 2
        i = np.where(off > k, i - 1, i)
        nxt = (i + 1) * (m - i - 1) // 2
        i = np.where(nxt <= k, i + 1, i)
    off = i * (m - i) // 2
    j = k - off + i + 1
    return i, j


def _all_impostors(e: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every different-label pair (i < j) with its score, computed in row blocks."""
    n = e.shape[0]
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    pairs, scores = [], []
    cols = np.arange(n)
    for a in range(0, n, step):
        b = min(n, a + step)
        s = e[a:b] @ e.T
        mask = (cols[None, :] > np.arange(a, b)[:, None]) & (codes[a:b, None] != codes[None, :])
        r, c = np.nonzero(mask)
        pairs.append(np.stack([r + a, c], axis=1))
        scores.append(s[r, c].astype(np.float64))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    return np.concatenate(pairs).astype(np.int64), np.concatenate(scores)


# ---------------------------------------------------------------------------------------------- pairs
def pair_scores(
    embeddings: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    max_impostor_pairs: int = 1_000_000,
    rng_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Genuine and impostor pair scores: ``(genuine, impostor, genuine_pairs, impostor_pairs)``.

    All genuine pairs (i < j, same label); all impostor pairs when there are at most
    ``max_impostor_pairs``, else a uniform random sample of that many without duplicates (5k images
    make 12.5M pairs: the sample keeps the impostor side of the ROC tractable). Pairs are (M, 2)
    int64 arrays sorted row-major; scores are float64 dot products.
    """
    e = _check_embeddings(embeddings)
    n = e.shape[0]
    codes = _encode_labels(labels, n)
    gp = _genuine_pairs(codes)
    g = _pair_dots(e, gp)
    total = n * (n - 1) // 2
    n_imp = total - len(gp)
    cap = int(max_impostor_pairs)
    if cap < 0:
        raise ValueError("max_impostor_pairs must be >= 0")
    rng = np.random.default_rng(rng_seed)
    if n_imp <= cap:
        ip, isc = _all_impostors(e, codes)
    elif n_imp <= 4 * cap:
        # most pairs are wanted: enumerate them and pick a subset
        ip_all, isc_all = _all_impostors(e, codes)
        keep = np.sort(rng.choice(len(ip_all), size=cap, replace=False))
        ip, isc = ip_all[keep], isc_all[keep]
    else:
        # draw linear pair indices with replacement, dedupe, drop genuine pairs; repeat if short
        frac = n_imp / total
        draw = int(cap / frac * 1.1) + 1000
        while True:
            k = np.unique(rng.integers(0, total, size=min(draw, 4 * total)))
            k = k[rng.permutation(k.size)]
            i, j = _linear_to_pair(k, n)
            ok = codes[i] != codes[j]
            if ok.sum() >= cap:
                sel = np.sort(k[ok][:cap])
                break
            draw = int(draw * 1.5)
        i, j = _linear_to_pair(sel, n)
        ip = np.stack([i, j], axis=1)
        isc = _pair_dots(e, ip)
    return g, isc, gp, ip


# ---------------------------------------------------------------------------------------------- verification
def _eer_from_roc(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> tuple[float, float]:
    """EER and its threshold, linearly interpolated where FNR - FPR changes sign."""
    d = (1.0 - tpr) - fpr  # starts at 1 (accept nothing), ends at -1 (accept everything)
    k = int(np.argmax(d <= 0))
    if d[k] == 0 or k == 0:
        t = thr[k] if np.isfinite(thr[k]) else thr[min(k + 1, len(thr) - 1)]
        return float(fpr[k]), float(t)
    a = d[k - 1] / (d[k - 1] - d[k])
    eer = fpr[k - 1] + a * (fpr[k] - fpr[k - 1])
    t0 = thr[k - 1] if np.isfinite(thr[k - 1]) else thr[k]
    t = t0 + a * (thr[k] - t0)
    return float(eer), float(t)


def _tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray, far: float) -> tuple[float, float]:
    """TAR and threshold at the lowest threshold whose FAR is <= ``far`` (ROC point with max TPR)."""
    ok = np.flatnonzero(fpr <= far + 1e-12)
    k = ok[np.argmax(tpr[ok])]
    t = thr[k] if np.isfinite(thr[k]) else math.inf
    return float(tpr[k]), float(t)


def _roc_summary(fpr: np.ndarray, tpr: np.ndarray, thr: np.ndarray) -> dict[str, float]:
    eer, eer_t = _eer_from_roc(fpr, tpr, thr)
    out: dict[str, float] = {"eer": eer, "eer_threshold": eer_t}
    for key, far in FAR_TARGETS.items():
        tar, t = _tar_at_far(fpr, tpr, thr, far)
        out[f"tar_at_far_{key}"] = tar
        out[f"threshold_at_far_{key}"] = t
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def verification_metrics(
    genuine: np.ndarray, impostor: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """Pair-level verification metrics from genuine and impostor scores.

    Keys: auc, eer, eer_threshold, tar_at_far_{1e-2,1e-3,1e-4} (TAR at the lowest threshold whose
    FAR on these impostors is <= the target), threshold_at_far_* (that threshold; None when no
    genuine pair scores above every impostor), n_genuine_pairs, n_impostor_pairs, min_resolvable_far (1 / n
    impostors: TAR at a smaller FAR is measured on fewer than one impostor). With ``threshold``:
    threshold, tar_at_threshold, far_at_threshold and balanced_accuracy: (TAR + 1 - FAR) / 2 at that
    threshold, the mean of the share of same-patient pairs accepted and the share of different-patient
    pairs rejected, whatever the mix of pairs (Packhaeuser et al. report accuracy on balanced pair
    sets, which this matches). Plain accuracy over the pairs is not given: with a thousand
    different-patient pairs to each same-patient one it measures the mix, not the model.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    g = np.asarray(genuine, dtype=np.float64).ravel()
    imp = np.asarray(impostor, dtype=np.float64).ravel()
    if g.size == 0 or imp.size == 0:
        raise ValueError(
            f"need genuine and impostor pairs (have {g.size} genuine, {imp.size} impostor): "
            "is there a patient with two or more images, and more than one patient?"
        )
    y = np.r_[np.ones(g.size), np.zeros(imp.size)]
    s = np.r_[g, imp]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    out: dict[str, Any] = {"auc": float(roc_auc_score(y, s))}
    out.update(_roc_summary(fpr, tpr, thr))
    for key in FAR_TARGETS:
        out[f"threshold_at_far_{key}"] = _finite_or_none(out[f"threshold_at_far_{key}"])
    out["n_genuine_pairs"] = int(g.size)
    out["n_impostor_pairs"] = int(imp.size)
    out["min_resolvable_far"] = 1.0 / imp.size
    if threshold is not None:
        t = float(threshold)
        tp = int(np.sum(g >= t))
        fp = int(np.sum(imp >= t))
        tar, far = tp / g.size, fp / imp.size
        out.update(
            threshold=t,
            tar_at_threshold=tar,
            far_at_threshold=far,
            balanced_accuracy=0.5 * (tar + 1.0 - far),
        )
    return out


@dataclass
class _SortedPairs:
    """Pair scores sorted high to low with patient codes, for weighted (bootstrap) ROC in O(n)."""

    scores: np.ndarray
    is_pos: np.ndarray
    pa: np.ndarray
    pb: np.ndarray
    ends: np.ndarray  # last index of each run of equal scores
    n_at_threshold: int | None  # number of scores >= threshold

    @classmethod
    def build(
        cls,
        g: np.ndarray,
        imp: np.ndarray,
        g_pat: np.ndarray,
        imp_pa: np.ndarray,
        imp_pb: np.ndarray,
        threshold: float | None,
    ) -> _SortedPairs:
        s = np.r_[g, imp]
        order = np.argsort(-s, kind="stable")
        s = s[order]
        is_pos = np.r_[np.ones(g.size, bool), np.zeros(imp.size, bool)][order]
        pa = np.r_[g_pat, imp_pa][order]
        pb = np.r_[g_pat, imp_pb][order]
        ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
        n_thr = None if threshold is None else int(np.sum(s >= threshold))
        return cls(s, is_pos, pa, pb, ends, n_thr)

    def metrics(self, counts: np.ndarray) -> dict[str, float]:
        """Metrics when patient p is drawn counts[p] times: genuine pairs weigh c_p, impostors c_a c_b."""
        w = np.where(self.is_pos, counts[self.pa], counts[self.pa] * counts[self.pb]).astype(np.float64)
        wp = np.where(self.is_pos, w, 0.0)
        wn = w - wp
        cp, cn = np.cumsum(wp), np.cumsum(wn)
        P, N = cp[-1], cn[-1]
        if P <= 0 or N <= 0:
            return {}
        tpr = np.r_[0.0, cp[self.ends] / P]
        fpr = np.r_[0.0, cn[self.ends] / N]
        thr = np.r_[np.inf, self.scores[self.ends]]
        out = {"auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) * 0.5)}
        out.update(_roc_summary(fpr, tpr, thr))
        if self.n_at_threshold is not None:
            m = self.n_at_threshold
            tp = cp[m - 1] if m else 0.0
            fp = cn[m - 1] if m else 0.0
            out["balanced_accuracy"] = float(0.5 * (tp / P + 1.0 - fp / N))
        return out


# ---------------------------------------------------------------------------------------------- retrieval
@dataclass
class _Retrieval:
    """Per-query leave-one-out retrieval values (P@1, R-precision, AP@R) and each query's patient.

    The bootstrap re-weights queries by how often their patient is drawn and keeps the gallery
    fixed. Resampling the gallery too would be wrong for ranking metrics: a patient drawn twice
    adds an identical copy, not a new distinct distractor, so a resampled gallery holds ~37% fewer
    distinct distractors and P@1 rises (on a hard 4.9k-image synthetic set the point estimate fell
    below such an interval). Gallery-size dependence is why the intervals are conditional on it.
    """

    q_code: np.ndarray  # (Q,) patient code of each query
    p1: np.ndarray  # (Q,) 1 if the nearest other image is the same patient
    rp: np.ndarray  # (Q,) R-precision
    ap_r: np.ndarray  # (Q,) average precision at R

    @property
    def n_queries(self) -> int:
        return int(self.q_code.size)

    @classmethod
    def build(cls, e: np.ndarray, codes: np.ndarray) -> _Retrieval:
        n = e.shape[0]
        per_code = np.bincount(codes) if n else np.zeros(0, dtype=np.int64)
        queries = np.flatnonzero(per_code[codes] >= 2) if n else np.zeros(0, dtype=np.int64)
        p1 = np.zeros(queries.size)
        rp = np.zeros(queries.size)
        ap = np.zeros(queries.size)
        step = max(1, _BLOCK_ELEMENTS // max(n, 1))
        neg_inf = np.float32(-np.inf)
        for a in range(0, queries.size, step):
            qb = queries[a : a + step]
            rows = np.arange(qb.size)
            s = e[qb] @ e.T  # float32
            s[rows, qb] = neg_inf  # leave the query out
            pos = codes[None, :] == codes[qb][:, None]
            pos[rows, qb] = False
            s[pos] = np.nextafter(s[pos], neg_inf)  # pessimistic ties: negatives first
            for r in range(qb.size):
                row, prow = s[r], pos[r]
                # only ranks down to the last same-patient image matter
                cand = np.flatnonzero(row >= row[prow].min())
                ranked = cand[np.argsort(-row[cand], kind="stable")]
                k = np.flatnonzero(prow[ranked])  # 0-based ranks of the R positives
                big_r = k.size
                top = k < big_r
                p1[a + r] = float(k[0] == 0)
                rp[a + r] = top.sum() / big_r
                ap[a + r] = np.sum((np.arange(1, big_r + 1) / (k + 1))[top]) / big_r
        return cls(q_code=codes[queries], p1=p1, rp=rp, ap_r=ap)

    def metrics(self, counts: np.ndarray | None = None) -> dict[str, float]:
        """Means over queries; with ``counts`` each query weighs counts[its patient]."""
        w = np.ones(self.n_queries) if counts is None else counts[self.q_code].astype(np.float64)
        tot = w.sum()
        if self.n_queries == 0 or tot <= 0:
            return {"precision_at_1": math.nan, "r_precision": math.nan, "map_at_r": math.nan}
        return {
            "precision_at_1": float(np.dot(w, self.p1) / tot),
            "r_precision": float(np.dot(w, self.rp) / tot),
            "map_at_r": float(np.dot(w, self.ap_r) / tot),
        }


def retrieval_metrics(embeddings: np.ndarray, labels: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """Leave-one-out retrieval: P@1, R-precision, MAP@R (Musgrave et al. 2020), n_queries.

    Every image of a patient with >= 2 images is a query; its gallery is every other image,
    single-image patients included as distractors; R = the number of other images of its patient.
    MAP@R = mean over queries of (1/R) * sum_{k <= R, item k correct} precision@k.
    """
    e = _check_embeddings(embeddings)
    codes = _encode_labels(labels, e.shape[0])
    rd = _Retrieval.build(e, codes)
    out: dict[str, Any] = {k: _opt(v) for k, v in rd.metrics().items()}
    out["n_queries"] = rd.n_queries
    return out


# ---------------------------------------------------------------------------------------------- breakdowns
def _auc_vs_sorted(g: np.ndarray, imp_sorted: np.ndarray) -> float:
    """Mann-Whitney AUC of genuine scores against sorted impostor scores (ties count 1/2)."""
    lo = np.searchsorted(imp_sorted, g, side="left")
    hi = np.searchsorted(imp_sorted, g, side="right")
    return float(np.mean(lo + 0.5 * (hi - lo)) / imp_sorted.size)


def _to_float(x: Any) -> float:
    """A day offset as float; missing or unparsable (None, "", "n/a") -> NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _norm_view(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "unknown"
    s = str(v).strip().upper()
    return s or "unknown"


def _breakdown(
    g: np.ndarray,
    gp: np.ndarray,
    imp: np.ndarray,
    ip: np.ndarray,
    *,
    views: Sequence[Any] | None,
    offsets: Sequence[Any] | None,
    far_threshold: float,
    follow_ups: Sequence[Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Genuine-pair metrics by view pair, by time gap in days and by follow-up (visit) gap;
    buckets with < 5 genuine pairs skipped."""
    imp_sorted = np.sort(imp)
    out: dict[str, dict[str, dict[str, Any]]] = {}

    def summary(gs: np.ndarray) -> dict[str, Any]:
        return {
            "n_genuine_pairs": int(gs.size),
            "auc_vs_all_impostors": _auc_vs_sorted(gs, imp_sorted),
            "tar_at_far_1e-3": float(np.mean(gs >= far_threshold)),
            "mean_genuine_score": float(np.mean(gs)),
        }

    if views is not None:
        names, vc = np.unique(np.array([_norm_view(v) for v in views], dtype=str), return_inverse=True)
        vc = vc.ravel().astype(np.int64)
        nv = len(names)

        def pair_key(pairs: np.ndarray) -> np.ndarray:
            a, b = vc[pairs[:, 0]], vc[pairs[:, 1]]
            return np.minimum(a, b) * nv + np.maximum(a, b)  # names sorted: "AP-PA", not "PA-AP"

        gk, ik = pair_key(gp), pair_key(ip)
        by_view: dict[str, dict[str, Any]] = {}
        for kc in np.unique(gk):
            key = f"{names[kc // nv]}-{names[kc % nv]}"
            gs = g[gk == kc]
            if gs.size < MIN_BUCKET_PAIRS:
                continue
            row = summary(gs)
            same = imp[ik == kc]
            row["n_impostor_pairs"] = int(same.size)
            row["auc"] = _auc_vs_sorted(gs, np.sort(same)) if same.size >= MIN_BUCKET_PAIRS else None
            by_view[key] = row
        out["view_pair"] = by_view

    def by_gap(values: Sequence[Any], buckets: tuple[tuple[str, float, float], ...]) -> dict[str, Any]:
        position = np.array([_to_float(v) for v in values], dtype=np.float64)
        gap = np.rint(np.abs(position[gp[:, 0]] - position[gp[:, 1]]))
        rows: dict[str, dict[str, Any]] = {}
        for key, lo, hi in buckets:
            gs = g[(gap >= lo) & (gap <= hi)]  # NaN gaps fall in no bucket
            if gs.size < MIN_BUCKET_PAIRS:
                continue
            row = summary(gs)
            row["auc"] = row["auc_vs_all_impostors"]
            rows[key] = row
        return rows

    if offsets is not None:
        out["time_gap_days"] = by_gap(offsets, TIME_GAP_BUCKETS)
    if follow_ups is not None:
        out["follow_up_gap"] = by_gap(follow_ups, FOLLOW_UP_GAP_BUCKETS)
    return out


# ---------------------------------------------------------------------------------------------- evaluate
# The figures every evaluation reports (verification, then retrieval); the threshold figures
# ("balanced_accuracy") comes on top of them where a threshold is known.
HEADLINE_METRICS: tuple[str, ...] = (
    "auc",
    "eer",
    "tar_at_far_1e-2",
    "tar_at_far_1e-3",
    "tar_at_far_1e-4",
    "precision_at_1",
    "r_precision",
    "map_at_r",
)
CI_KEYS: tuple[str, ...] = (*HEADLINE_METRICS, "balanced_accuracy")


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    threshold: float | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    max_impostor_pairs: int = 1_000_000,
    bootstrap_impostor_pairs: int = 200_000,
    views: Sequence[Any] | None = None,
    offsets: Sequence[Any] | None = None,
    follow_ups: Sequence[Any] | None = None,
    pair_transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """All headline metrics in one flat dict, plus ``ci`` and ``breakdown``.

    ``pair_transform(scores, pairs)`` maps pair cosines to the scores decisions use (AS-norm), for
    every verification metric; retrieval metrics rank by cosine.

    Keys: everything from :func:`verification_metrics` and :func:`retrieval_metrics`, n_images,
    n_patients, ``ci`` = {metric: [lo, hi]} (95% percentile intervals over ``bootstrap`` patient
    resamples; {} when bootstrap = 0) and ``breakdown`` = {"view_pair": {...}, "time_gap_days": {...},
    "follow_up_gap": {...}} (present when ``views`` / ``offsets`` / ``follow_ups`` are given).

    Bootstrap: patients are drawn with replacement. Pair metrics: a patient drawn c times counts as
    c distinct patients, whose genuine pairs weigh c, whose impostor pairs with a patient drawn c'
    times weigh c * c', and whose copies are never compared with each other (they are the same
    images); a fixed sample of ``bootstrap_impostor_pairs`` impostor pairs is re-weighted. Retrieval
    metrics: queries weigh c, the gallery stays the full set (see ``_Retrieval`` for why).

    View-pair breakdown: ``auc`` is genuine pairs of that view pair against impostor pairs of the
    same view pair (the harder, like-for-like comparison; None with < 5 such impostors);
    ``auc_vs_all_impostors`` against all impostors. Time-gap breakdown (|offset_i - offset_j| in
    days, rounded) and follow-up gap (difference of visit numbers, where a set numbers visits
    instead of dating them): genuine pairs of that gap against all impostors. ``tar_at_far_1e-3``
    everywhere uses the overall FAR 1e-3 threshold.
    """
    t0 = time.perf_counter()
    e = _check_embeddings(embeddings)
    n = e.shape[0]
    codes = _encode_labels(labels, n)
    for name, seq in (("views", views), ("offsets", offsets), ("follow_ups", follow_ups)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} images")
    g, imp, gp, ip = pair_scores(e, codes, max_impostor_pairs=max_impostor_pairs, rng_seed=seed)
    if pair_transform is not None:
        g, imp = pair_transform(g, gp), pair_transform(imp, ip)
    out: dict[str, Any] = verification_metrics(g, imp, threshold)
    rd = _Retrieval.build(e, codes)
    out.update({k: _opt(v) for k, v in rd.metrics().items()})
    out["n_queries"] = rd.n_queries
    out["n_images"] = int(n)
    out["n_patients"] = int(codes.max() + 1) if n else 0

    ci: dict[str, list[float]] = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        m = min(len(imp), int(bootstrap_impostor_pairs))
        sub = np.sort(rng.choice(len(imp), size=m, replace=False)) if m < len(imp) else np.arange(len(imp))
        sp = _SortedPairs.build(
            g,
            imp[sub],
            codes[gp[:, 0]],
            codes[ip[sub, 0]],
            codes[ip[sub, 1]],
            threshold,
        )
        n_pat = int(codes.max()) + 1
        draws: dict[str, list[float]] = {k: [] for k in CI_KEYS}
        for _ in range(int(bootstrap)):
            counts = np.bincount(rng.integers(0, n_pat, size=n_pat), minlength=n_pat)
            vals = {**sp.metrics(counts), **rd.metrics(counts)}
            for k in CI_KEYS:
                if k in out:
                    draws[k].append(vals.get(k, math.nan))
        for k, v in draws.items():
            a = np.asarray(v, dtype=np.float64)
            if a.size and np.any(np.isfinite(a)):
                lo, hi = np.nanpercentile(a, [2.5, 97.5])
                ci[k] = [float(lo), float(hi)]
    out["ci"] = ci
    t_1e3 = out["threshold_at_far_1e-3"]
    out["breakdown"] = _breakdown(
        g,
        gp,
        imp,
        ip,
        views=views,
        offsets=offsets,
        follow_ups=follow_ups,
        far_threshold=math.inf if t_1e3 is None else t_1e3,
    )
    logger.info(
        "evaluated %d images / %d patients: auc %.4f, eer %.4f, P@1 %s (%d bootstrap, %.1f s)",
        n,
        out["n_patients"],
        out["auc"],
        out["eer"],
        out["precision_at_1"],
        bootstrap,
        time.perf_counter() - t0,
    )
    return out


# ---------------------------------------------------------------------------------------------- plots
def save_plots(
    genuine: np.ndarray,
    impostor: np.ndarray,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    title: str = "",
) -> list[Path]:
    """Write ``roc.png`` (TAR against FAR on a log axis) and ``score_histogram.png``; return the paths.

    matplotlib is imported here, not at module import, so the service never loads it; figures are
    drawn on the Agg canvas directly, leaving pyplot's global state alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    g = np.asarray(genuine, dtype=np.float64).ravel()
    imp = np.asarray(impostor, dtype=np.float64).ravel()
    if g.size == 0 or imp.size == 0:
        raise ValueError("need genuine and impostor scores to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.r_[np.ones(g.size), np.zeros(imp.size)]
    s = np.r_[g, imp]
    fpr, tpr, _ = roc_curve(y, s)
    auc = roc_auc_score(y, s)
    paths: list[Path] = []

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 0.5 / imp.size
    ax.plot(np.maximum(fpr, floor), tpr, lw=1.5, label=f"AUC {auc:.4f}")
    for far in FAR_TARGETS.values():
        if far >= floor:
            ax.axvline(far, color="grey", ls=":", lw=0.8)
    if threshold is not None:
        far_t = float(np.mean(imp >= threshold))
        tar_t = float(np.mean(g >= threshold))
        ax.plot([max(far_t, floor)], [tar_t], "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel(f"false accept rate (FAR), {imp.size:,} impostor pairs")
    ax.set_ylabel(f"true accept rate (TAR), {g.size:,} genuine pairs")
    ax.set_title(title or "ROC", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    p = out / "roc.png"
    fig.savefig(p)
    paths.append(p)

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = np.linspace(min(g.min(), imp.min()), max(g.max(), imp.max()), 101)
    if bins[0] == bins[-1]:
        bins = np.linspace(bins[0] - 0.5, bins[0] + 0.5, 101)
    ax.hist(imp, bins=bins, density=True, alpha=0.55, color="C0", label=f"impostor ({imp.size:,})")
    ax.hist(g, bins=bins, density=True, alpha=0.55, color="C1", label=f"genuine ({g.size:,})")
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls="--", lw=1.2, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("score (cosine similarity)")
    ax.set_ylabel("density")
    ax.set_title(title or "score distributions", fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    p = out / "score_histogram.png"
    fig.savefig(p)
    paths.append(p)
    logger.info("wrote %s", ", ".join(str(x) for x in paths))
    return paths

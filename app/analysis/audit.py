"""``cxr-reid audit``: what is wrong with a data set of labelled radiographs, found by anatomy.

Five kinds of finding, each a cluster (one patient under three ids is one finding, not three pairs):

- ``leakage``: one patient in more than one split: by id (the same ``patient_id`` in two splits) or
  by image (images under different ids, in different splits, that the model calls one patient);
- ``mislabel``: images under one patient id that look like another person: an image far from the
  rest of its patient's images (told by the set's own score distribution), all the more when it
  looks like another patient;
- ``duplicate_identity``: different ids (in one split) that look like one person;
- ``exact_duplicate``: the same file (content hash), the same picture in another file (pixel
  hash) or a near-exact copy (re-encoded, rescaled: content signatures correlate at
  ``NEAR_EXACT``), told apart from look-alikes;
- ``outlier``: images that do not belong: unreadable or blank files, inverted (negative) images,
  images unlike the set's radiographs (laterals among frontals, other body parts, far outliers).

The same-patient decision is the service's (the calibration in force, site calibration when the
checkpoint carries one, at ``--far`` / ``--threshold``); pairs come from an exact FAISS range search
(:func:`index.pairs_above`), so no O(N^2) Python loop and memory bounded by the pairs found.

Why one module of this size: the phases of :func:`find_issues` share their intermediate scores; each
phase is a function and ``find_issues`` reads as the list of them.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import faiss
import numpy as np

from app.analysis.corpus import CorpusError, EmbeddedCorpus, embed_corpus, load_corpus
from index import PairLimitError, UnionFind, pairs_above
from models.net.embedder import Embedder
from models.scoring.calibration import Calibration
from models.scoring.decide import PairScorer
from models.scoring.scorenorm import patient_key

log = logging.getLogger(__name__)

#: Finding types, in the order a report lists them.
FINDING_TYPES = ("leakage", "mislabel", "duplicate_identity", "exact_duplicate", "outlier")
#: Correlation of two content signatures (mean-centred) above which two different files are the
#: same picture re-encoded or rescaled, not two exposures (bench/audit.py measures both sides).
NEAR_EXACT = 0.985
#: Neighbours averaged into an image's typicality (its mean cosine to its nearest images).
TYPICAL_NEIGHBOURS = 5
#: Robust z-score (median / MAD) below which an image is unlike the rest of the set.
OUTLIER_Z = 5.0
#: An image whose best score to its own patient's other images is below this quantile of the set's
#: different-patient pair scores looks like a stranger to them (a site-adaptive bar: at an unseen site
#: every score shifts; bench/audit.py measures precision and recall of planted relabels).
MISLABEL_QUANTILE = 0.5
#: Share of two ids' image pairs that must match for the ids to count as one patient.
MIN_SUPPORT = 0.3
#: Matching image pairs at which two ids' link counts as fully supported, for ranking.
STRONG_PAIRS = 4
#: Chance matches per image above which the default FAR gives way to a stricter one of the calibration.
CHANCE_PAIRS_PER_IMAGE = 1
#: Rows per chunk of the signature arithmetic (bounded memory on large sets and many pairs).
CHUNK = 16_384
#: Random different-patient pairs scored for that bar (and the report's histogram).
IMPOSTOR_SAMPLE = 20_000
#: Correlation with the set's median layout below which an image is unlike its radiographs (and two
#: robust spreads below the median, so a set of unusual images is not all flagged): 85% of
#: covid-collection's laterals, about 2% of its frontals.
UNLIKE_BELOW = 0.35
#: Pairs a range search may hold before the audit asks for a stricter threshold.
MAX_PAIRS = 5_000_000


@dataclass
class Finding:
    """One cluster of evidence; ``images`` are corpus rows, ``flagged`` the ones it points at."""

    type: str
    kind: str
    summary: str
    images: list[int]
    flagged: list[int] = field(default_factory=list)
    pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (row, row, decision score)
    confidence: float = 1.0  # ranking: higher first within a type
    id: str = ""
    across_splits: bool = False  # a copy filed in several splits: the leak it causes reports it


@dataclass
class AuditResult:
    corpus: EmbeddedCorpus
    findings: list[Finding]
    threshold: float
    far: float | None
    calibration: dict[str, Any]
    stats: dict[str, np.ndarray]  # per-image scores behind the findings (histograms)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(f.type for f in self.findings)
        return {kind: counted.get(kind, 0) for kind in FINDING_TYPES}

    @property
    def clean(self) -> bool:
        return not self.findings


# --------------------------------------------------------------------------------------------------
# scoring


def _pair_scorer(calibration: Calibration, corpus: EmbeddedCorpus) -> PairScorer:
    """The service's decision scores over the corpus's rows (AS-norm keys from each image's patient)."""
    keys = [patient_key(image.key) if image.key else "" for image in corpus.images]
    return PairScorer(calibration, corpus.vectors, keys)


def _impostor_sample(corpus: EmbeddedCorpus, scorer: PairScorer, seed: int = 0) -> tuple[np.ndarray, int]:
    """Decision scores of pairs of images under different patient ids, and how many such pairs the set
    holds: every pair when there are at most IMPOSTOR_SAMPLE (a small set's histogram and bar count
    each pair once, not the same few pairs over and over), else IMPOSTOR_SAMPLE random ones."""
    labelled = np.asarray(
        [
            i
            for i, image in enumerate(corpus.images)
            if corpus.errors[i] is None and image.patient_id is not None
        ]
    )
    if labelled.size < 2:
        return np.zeros(0), 0
    ids = [image.patient_id for image in corpus.images]
    _, sizes = np.unique(np.asarray([ids[i] for i in labelled], dtype=object), return_counts=True)
    total = int(labelled.size * (labelled.size - 1) // 2 - np.sum(sizes * (sizes - 1) // 2))
    if total <= IMPOSTOR_SAMPLE:
        ia, ib = np.triu_indices(labelled.size, 1)
        a, b = labelled[ia], labelled[ib]
        keep = np.asarray([ids[x] != ids[y] for x, y in zip(a, b, strict=True)], dtype=bool)
        a, b = a[keep], b[keep]
        return (scorer.score(a, b) if a.size else np.zeros(0)), total
    rng = np.random.default_rng(seed)
    a = labelled[rng.integers(0, labelled.size, 2 * IMPOSTOR_SAMPLE)]
    b = labelled[rng.integers(0, labelled.size, 2 * IMPOSTOR_SAMPLE)]
    keep = np.asarray([ids[x] != ids[y] for x, y in zip(a, b, strict=True)], dtype=bool)
    a, b = a[keep][:IMPOSTOR_SAMPLE], b[keep][:IMPOSTOR_SAMPLE]
    return (scorer.score(a, b) if a.size else np.zeros(0)), total


def _chance_bar(impostors: np.ndarray, images: int) -> float:
    """The score one random different-patient pair of the set exceeds with probability 1 / (its number
    of pairs): the mean plus the normal quantile times the spread of the set's own impostor sample."""
    if impostors.size < 100 or images < 2:
        return math.inf
    pairs = images * (images - 1) / 2
    return float(impostors.mean() + NormalDist().inv_cdf(1.0 - 1.0 / max(pairs, 2.0)) * impostors.std())


def _correlations(signatures: np.ndarray, rows: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Correlation of each row's signature with a centred unit ``template``, in chunks (a float copy
    of every signature would be 4 KB per image)."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        out[start : start + len(part)] = _centred(signatures[part]) @ template
    return out


def _pair_correlations(signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of the signatures of row pairs (a[i], b[i]), in chunks."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), CHUNK):
        part = slice(start, start + CHUNK)
        out[part] = np.einsum("ij,ij->i", _centred(signatures[a[part]]), _centred(signatures[b[part]]))
    return out


def _median_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and robust spread (1.4826 x the median absolute deviation: a normal's sd)."""
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def _robust_z(values: np.ndarray) -> np.ndarray:
    median, spread = _median_spread(values)
    return (values - median) / max(spread, 1e-6)


def _centred(signatures: np.ndarray) -> np.ndarray:
    """Signatures as mean-centred unit rows: their inner product is the pixel correlation."""
    s = signatures.astype(np.float32)
    s -= s.mean(axis=1, keepdims=True)
    return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-6)


@dataclass
class _Pairs:
    """Image pairs at or above the decision threshold: corpus rows ``a[i]``, ``b[i]`` and their score."""

    a: np.ndarray
    b: np.ndarray
    decided: np.ndarray

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return zip(self.a, self.b, self.decided, strict=True)


def find_issues(
    corpus: EmbeddedCorpus, calibration: Calibration, threshold: float
) -> tuple[list[Finding], dict[str, np.ndarray]]:
    """Every finding of the module docstring, ranked, and the per-image statistics behind them.

    The phases run in this order because each leaves out what an earlier one explained: strays
    (laterals, inverted images) and copies stay out of the mislabels, and all of them out of the
    identities.
    """
    rows = np.flatnonzero(corpus.ok)
    scorer = _pair_scorer(calibration, corpus)
    pairs = _pairs_above(corpus, scorer, rows, threshold)
    typicality, best_other = _neighbour_scores(corpus, scorer, rows)
    own_best, by_patient = _own_patient_scores(corpus, scorer, rows)
    impostors, impostor_pairs = _impostor_sample(corpus, scorer)
    outliers, strays, template_corr = _outliers(corpus, rows, typicality)
    copies, same_picture = _copies(corpus, rows, pairs)
    low = min(float(np.quantile(impostors, MISLABEL_QUANTILE)) if impostors.size else threshold, threshold)
    mislabels, mislabelled = _mislabels(corpus, pairs, by_patient, own_best, low, same_picture, strays)
    single_bar = _chance_bar(impostors, rows.size)
    explained = mislabelled | strays | set(same_picture)
    misfiled, misfiled_rows = _misfiled(corpus, pairs, by_patient, own_best, threshold, explained)
    identities = _identities(corpus, pairs, mislabelled | strays | misfiled_rows, same_picture, single_bar)
    stats = {
        "own_best": own_best,
        "best_other": best_other,
        "typicality": typicality,
        "template_corr": template_corr,
        "mislabel_below": np.asarray(low),
        "impostors": impostors,
        "impostor_pairs": np.asarray(impostor_pairs),  # in the set; ``impostors`` holds all or a sample
        "single_pair_bar": np.asarray(single_bar),
    }
    return _ranked(outliers + copies + mislabels + misfiled + identities), stats


def _pairs_above(corpus: EmbeddedCorpus, scorer: PairScorer, rows: np.ndarray, threshold: float) -> _Pairs:
    """Every pair at or above the decision threshold: a range search from the score floors, each
    candidate re-scored exactly."""
    a = b = np.zeros(0, dtype=np.int64)
    decided = np.zeros(0)
    if rows.size >= 2:
        try:
            ia, ib, _ = pairs_above(
                corpus.vectors[rows], scorer.floors(threshold)[rows].astype(np.float32), max_pairs=MAX_PAIRS
            )
        except PairLimitError as exc:
            raise CorpusError(f"{exc}: give a stricter --far or a higher --threshold") from None
        a, b = rows[ia], rows[ib]
        decided = scorer.score(a, b)  # re-scored exactly, as the service does
        keep = decided >= threshold
        a, b, decided = a[keep], b[keep], decided[keep]
    return _Pairs(a, b, decided)


def _neighbour_scores(
    corpus: EmbeddedCorpus, scorer: PairScorer, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: typicality (mean cosine of its nearest neighbours) and its best score to another
    patient's image among them."""
    images, n = corpus.images, len(corpus)
    k = int(min(rows.size, 16))
    typicality = np.full(n, np.nan)
    best_other = np.full(n, np.nan)
    if k >= 2:
        flat = faiss.IndexFlatIP(corpus.vectors.shape[1])
        flat.add(np.ascontiguousarray(corpus.vectors[rows]))
        sims, nbr = flat.search(np.ascontiguousarray(corpus.vectors[rows]), k)
        nbr = rows[np.clip(nbr, 0, None)]
        not_self = nbr != rows[:, None]
        typicality[rows] = np.asarray(
            [s[m][:TYPICAL_NEIGHBOURS].mean() for s, m in zip(sims, not_self, strict=True)]
        )
        ids = np.asarray([image.patient_id or f"\x00{i}" for i, image in enumerate(images)], dtype=object)
        other = not_self & (ids[nbr] != ids[rows][:, None])
        first = np.where(other.any(1), other.argmax(1), -1)
        has = first >= 0
        best_other[rows[has]] = scorer.score(rows[has], nbr[has, first[has]])
    return typicality, best_other


def _own_patient_scores(
    corpus: EmbeddedCorpus, scorer: PairScorer, rows: np.ndarray
) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Per image, its best score to the other images under its id; and the usable rows of each id."""
    images, n = corpus.images, len(corpus)
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i in rows:
        if images[i].patient_id is not None:
            by_patient[images[i].patient_id].append(int(i))
    own_best = np.full(n, np.nan)
    for members in by_patient.values():
        if len(members) < 2:
            continue
        m = np.asarray(members)
        pa, pb = np.triu_indices(len(m), 1)
        s = scorer.score(m[pa], m[pb])
        square = np.full((len(m), len(m)), -np.inf)
        square[pa, pb] = s
        square[pb, pa] = s
        own_best[m] = square.max(1)
    return own_best, by_patient


def _outliers(
    corpus: EmbeddedCorpus, rows: np.ndarray, typicality: np.ndarray
) -> tuple[list[Finding], set[int], np.ndarray]:
    """Images that do not belong: unreadable, blank, inverted, unlike the set's layout, or far from
    every other image. They stay out of the identity findings: a lateral or an inverted image scores
    low against its patient's frontals and high against other patients' laterals."""
    n, ok = len(corpus), corpus.ok
    findings: list[Finding] = []
    strays: set[int] = set()
    for i in np.flatnonzero(~ok):
        reason = corpus.errors[i] or ""
        kind = "blank" if "blank" in reason else "unreadable"
        findings.append(Finding("outlier", kind, f"{kind} file: {reason}", [int(i)], flagged=[int(i)]))
    template_corr = np.full(n, np.nan)
    if rows.size >= 3:
        template = np.median(corpus.signatures[rows].astype(np.float32), axis=0)
        t = _centred(template[None, :])[0]
        template_corr[rows] = _correlations(corpus.signatures, rows, t)
        inverted = _correlations(255 - corpus.signatures, rows, t)
        z_template = _robust_z(template_corr[rows])
        median, spread = _median_spread(template_corr[rows])
        unlike_below = min(UNLIKE_BELOW, median - 2.0 * spread)
        z_typical = _robust_z(typicality[rows])
        for j, i in enumerate(rows):
            if inverted[j] > 0.3 and inverted[j] > template_corr[i] + 0.3:
                kind, why = (
                    "inverted",
                    f"looks inverted (negative): correlation {inverted[j]:.2f} when flipped",
                )
            elif template_corr[i] < unlike_below:
                kind = "unlike the set"
                why = (
                    f"unlike the set's radiographs (lateral view, another body part?): layout correlation "
                    f"{template_corr[i]:.2f}"
                )
            elif z_typical[j] < -OUTLIER_Z:
                kind, why = "far outlier", f"far from every other image (typicality {typicality[i]:.3f})"
            else:
                continue
            strays.add(int(i))
            severity = float(max(-min(z_template[j], z_typical[j]), 0.0))
            findings.append(
                Finding("outlier", kind, why, [int(i)], flagged=[int(i)], confidence=min(1.0, severity / 20))
            )
    return findings, strays, template_corr


def _copies(corpus: EmbeddedCorpus, rows: np.ndarray, pairs: _Pairs) -> tuple[list[Finding], dict[int, int]]:
    """Exact and near-exact copies (identical files, identical pixels, near-identical pictures), and
    the group of each copied row."""
    images = corpus.images
    a, b = pairs.a, pairs.b
    findings: list[Finding] = []
    copies: UnionFind[int] = UnionFind()
    copy_kind: dict[tuple[int, int], str] = {}
    for key, kind in ((corpus.sha256, "identical files"), (corpus.pixel_hash, "identical pixels")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i in rows:
            groups[key[i]].append(int(i))
        for members in groups.values():
            for j in members[1:]:
                copies.union(members[0], j)
                copy_kind.setdefault((members[0], j), kind)
    correlation = _pair_correlations(corpus.signatures, a, b)
    for x, y, c in zip(a, b, correlation, strict=True):
        if c >= NEAR_EXACT:
            copies.union(int(x), int(y))
            copy_kind.setdefault((int(x), int(y)), "near-identical pictures")
    for group in copies.groups():
        if len(group) < 2:
            continue
        group = sorted(group)
        kinds = {kind for (x, _), kind in copy_kind.items() if x in group}
        kind = next(
            k for k in ("identical files", "identical pixels", "near-identical pictures") if k in kinds
        )
        pids = sorted({images[i].patient_id or "?" for i in group})
        splits = sorted({images[i].split for i in group if images[i].split})
        where = []
        if len(pids) > 1:
            where.append(f"under {len(pids)} patient ids")
        if len(splits) > 1:
            where.append(f"across splits {', '.join(splits)}")
        findings.append(
            Finding(
                "exact_duplicate",
                kind,
                f"{len(group)} {kind}" + (f" {' and '.join(where)}" if where else ""),
                group,
                flagged=group[1:],
                confidence=1.0 if kind != "near-identical pictures" else 0.99,
                across_splits=len(splits) > 1,
            )
        )
    same_picture = {i: copies.find(i) for i in copies.parent}
    return findings, same_picture


def _mislabels(
    corpus: EmbeddedCorpus,
    pairs: _Pairs,
    by_patient: dict[str, list[int]],
    own_best: np.ndarray,
    low: float,
    same_picture: dict[int, int],
    strays: set[int],
) -> tuple[list[Finding], set[int]]:
    """Possible mislabels: images far (below ``low``) from the rest of their patient's images."""
    images = corpus.images
    findings: list[Finding] = []
    matched_other: dict[int, tuple[int, float]] = {}
    for x, y, s in pairs:
        px, py = images[x].patient_id, images[y].patient_id
        if px is None or py is None or px == py:
            continue
        for i, j in ((int(x), int(y)), (int(y), int(x))):
            if s > matched_other.get(i, (-1, -np.inf))[1]:
                matched_other[i] = (j, float(s))
    mislabelled: set[int] = set()
    for pid, members in sorted(by_patient.items()):
        if len(members) < 2:
            continue
        far_off = [
            i for i in members if own_best[i] < low and same_picture.get(i) is None and i not in strays
        ]
        if not far_off:
            continue
        mislabelled.update(far_off)
        others = [i for i in members if i not in far_off]
        looks_like = sorted(
            {images[matched_other[i][0]].patient_id for i in far_off if i in matched_other} - {None, pid}
        )
        if others:
            summary = f"{len(far_off)} of {len(members)} images of {pid} look like another person"
        else:
            summary = f"the {len(members)} images of {pid} do not look like one person"
        if looks_like:
            summary += f" (like {', '.join(looks_like[:3])}{'...' if len(looks_like) > 3 else ''})"
        pairs = [(i, matched_other[i][0], matched_other[i][1]) for i in far_off if i in matched_other]
        strength = float(np.clip((low - np.nanmin(own_best[far_off])) / max(1.0 - low, 1e-6), 0, 1))
        findings.append(
            Finding(
                "mislabel",
                "matches another patient" if looks_like else "far from its patient's other images",
                summary,
                sorted(members) + [p[1] for p in pairs],
                flagged=far_off,
                pairs=pairs,
                confidence=min(1.0, 0.5 * strength + (0.5 if looks_like else 0.0)),
            )
        )
    return findings, mislabelled


def _misfiled(
    corpus: EmbeddedCorpus,
    pairs: _Pairs,
    by_patient: dict[str, list[int]],
    own_best: np.ndarray,
    threshold: float,
    explained: set[int],
) -> tuple[list[Finding], set[int]]:
    """Misfiled images: one image of an id that matches several images of another patient but none of
    its own id's other images, while those others do not match that patient. That is a mislabel (the
    image belongs to the other patient), not two ids of one person, which the identity phase would
    otherwise report; returns the findings and the rows they explain."""
    images = corpus.images
    matches: dict[int, dict[str, list[tuple[int, int, float]]]] = defaultdict(lambda: defaultdict(list))
    for x, y, s in pairs:
        px, py = images[x].patient_id, images[y].patient_id
        if px is None or py is None or px == py:
            continue
        matches[int(x)][py].append((int(x), int(y), float(s)))
        matches[int(y)][px].append((int(y), int(x), float(s)))
    findings: list[Finding] = []
    rows: set[int] = set()
    for i, by_other in sorted(matches.items()):
        own = images[i].patient_id
        siblings = [j for j in by_patient.get(own or "", []) if j != i]
        if i in explained or not siblings or not own_best[i] < threshold:
            continue
        for other, found in sorted(by_other.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            matched = sorted({y for _, y, _ in found})
            if len(matched) < 2 or any(other in matches.get(j, {}) for j in siblings):
                continue  # one chance match, or the id's other images match too: one person, two ids
            total = len(by_patient.get(other, []))
            findings.append(
                Finding(
                    "mislabel",
                    "filed under another patient",
                    f"{images[i].shown} is filed under {own} but looks like {other}: it matches "
                    f"{len(matched)} of {other}'s {total} images and none of {own}'s other {len(siblings)}",
                    [i, *sorted(siblings), *matched],
                    flagged=[i],
                    pairs=sorted(found, key=lambda p: -p[2]),
                    confidence=min(1.0, 0.5 + 0.5 * min(1.0, len(matched) / STRONG_PAIRS)),
                )
            )
            rows.add(i)
            break
    return findings, rows


def _identities(
    corpus: EmbeddedCorpus,
    pairs: _Pairs,
    left_out: set[int],
    same_picture: dict[int, int],
    single_bar: float,
) -> list[Finding]:
    """Ids linked by images the model calls one patient (duplicate identities), and ids or linked
    images in several splits (leakage). ``left_out``: rows explained already (mislabels, strays)."""
    images, ok = corpus.images, corpus.ok
    findings: list[Finding] = []
    link: UnionFind[str] = UnionFind()
    evidence: dict[tuple[str, str], list[tuple[int, int, float]]] = defaultdict(list)
    for x, y, s in pairs:
        px, py = images[x].patient_id, images[y].patient_id
        if px is None or py is None or px == py or {x, y} & left_out:
            continue
        evidence[tuple(sorted((px, py)))].append((int(x), int(y), float(s)))
    splits_of: dict[str, set[str]] = defaultdict(set)
    count_of: Counter[str] = Counter()
    rows_of: dict[str, list[int]] = defaultdict(list)  # every row of each id, usable or not
    for i, image in enumerate(images):
        if image.patient_id is not None:
            rows_of[image.patient_id].append(i)
            link.find(image.patient_id)
            count_of[image.patient_id] += bool(ok[i])
            if image.split:
                splits_of[image.patient_id].add(image.split)
    # One matching pair is no evidence in a large set: at FAR 1e-3, N images hold ~N^2/2000 chance
    # matches (9,000 in a set of 4,264). A link rests on a shared picture, on several matching pairs
    # (MIN_SUPPORT of the possible ones), or on one pair above the score the set's own random pairs
    # of different patients reach once in all its pairs (a normal tail fitted to them).
    for (px, py), pairs in list(evidence.items()):
        copied = any(same_picture.get(x, -1) == same_picture.get(y, -2) for x, y, _ in pairs)
        several = len(pairs) > 1 and len(pairs) >= MIN_SUPPORT * count_of[px] * count_of[py]
        if copied or several or max(p[2] for p in pairs) >= single_bar:
            link.union(px, py)
        else:
            del evidence[(px, py)]
    clusters = [sorted(ids) for ids in link.groups()]
    linked_pairs: dict[str, list[tuple[int, int, float]]] = defaultdict(list)  # per cluster root
    possible_pairs: Counter[str] = Counter()
    for (px, py), pairs in evidence.items():
        linked_pairs[link.find(px)].extend(pairs)
        possible_pairs[link.find(px)] += count_of[px] * count_of[py]

    def emit(ids: list[str]) -> None:
        splits = sorted(set().union(*(splits_of[p] for p in ids)))
        id_leaks = [p for p in ids if len(splits_of[p]) > 1]
        pairs = sorted(linked_pairs.get(link.find(ids[0]), []), key=lambda p: -p[2])
        cross = [
            p
            for p in pairs
            if images[p[0]].split and images[p[1]].split and images[p[0]].split != images[p[1]].split
        ]
        if len(ids) < 2 and not id_leaks:
            return
        members = sorted(i for p in ids for i in rows_of[p])
        if pairs:
            possible = possible_pairs[link.find(ids[0])]
            # more matching pairs, and a larger share of the possible ones, make a stronger case (one
            # pair at a high score is as often a chance look-alike: it ranks below an alias with many)
            support = len(pairs) / max(possible, 1)
            confidence = 0.5 * support + 0.5 * min(1.0, len(pairs) / STRONG_PAIRS)
        else:
            confidence = 1.0
        if len(splits) > 1 and (id_leaks or cross):
            how = []
            if id_leaks:
                how.append(f"{len(id_leaks)} id(s) in several splits")
            if cross:
                how.append(f"{len(cross)} image pair(s) across splits under different ids")
            findings.append(
                Finding(
                    "leakage",
                    "by id" if id_leaks and not cross else "by image" if not id_leaks else "by id and image",
                    f"patient {' = '.join(ids[:4])}{'...' if len(ids) > 4 else ''} in splits "
                    f"{', '.join(splits)}: {'; '.join(how)}",
                    members,
                    flagged=sorted(
                        {i for p in cross for i in p[:2]}
                        | {i for i in members if images[i].patient_id in id_leaks}
                    ),
                    pairs=cross or pairs,
                    confidence=1.0 if id_leaks else confidence,
                )
            )
        elif len(ids) > 1:
            findings.append(
                Finding(
                    "duplicate_identity",
                    "one person under several ids",
                    f"{len(ids)} ids look like one person: "
                    f"{', '.join(ids[:4])}{'...' if len(ids) > 4 else ''} "
                    f"({len(pairs)} matching image pair(s), best {pairs[0][2]:.3f})",
                    members,
                    flagged=sorted({i for p in pairs for i in p[:2]}),
                    pairs=pairs,
                    confidence=confidence,
                )
            )

    for ids in clusters:
        emit(ids)
    return findings


def _ranked(findings: list[Finding]) -> list[Finding]:
    """Findings by type, strongest first within a type, each file pointed at by one finding only
    (:func:`_once_per_file`), each given its id ("mislabel-3")."""
    order = {kind: k for k, kind in enumerate(FINDING_TYPES)}
    findings.sort(key=lambda f: (order[f.type], -f.confidence, -len(f.images), f.images[0]))
    findings = _once_per_file(findings)
    numbers: Counter[str] = Counter()
    for finding in findings:
        numbers[finding.type] += 1
        finding.id = f"{finding.type}-{numbers[finding.type]}"
    return findings


#: Confidence from which a finding is certain (a leak by id, a shared file or picture, an unreadable
#: file): certain findings take their files before any finding that rests on the model's scores.
CERTAIN = 0.99


def _once_per_file(ranked: list[Finding]) -> list[Finding]:
    """Each file flagged by one finding, its strongest. A copy filed in several splits is the leak it
    causes: folded into that leakage finding. Then certain findings take their files first, those
    resting on the model's scores after, each group in FINDING_TYPES order (a byte copy within a split
    stays a duplicate, whatever look-alike the model sees in it). A finding keeps the files no
    stronger one flagged; one with none left is folded into the finding that took its first file, its
    summary added there ("also ..."), so a reviewer reads each file once. ``ranked`` keeps its order."""
    order = {kind: k for k, kind in enumerate(FINDING_TYPES)}
    folded: set[int] = set()

    def fold(finding: Finding, owner: Finding) -> None:
        owner.summary += f"; also {finding.kind}: {finding.summary}"
        owner.images += [i for i in finding.images if i not in owner.images]
        folded.add(id(finding))

    leaks = [f for f in ranked if f.type == "leakage"]
    for copy in (f for f in ranked if f.type == "exact_duplicate" and f.across_splits):
        owner = next((leak for leak in leaks if set(copy.flagged) <= set(leak.flagged)), None)
        if owner is not None:  # the copy is the leak: one finding, the leakage
            fold(copy, owner)
    claimed: dict[int, Finding] = {}
    rest_of = [f for f in ranked if id(f) not in folded]
    for finding in sorted(rest_of, key=lambda f: (f.confidence < CERTAIN, order[f.type])):
        rest = [i for i in finding.flagged if i not in claimed]
        if finding.flagged and not rest:
            fold(finding, claimed[finding.flagged[0]])
            continue
        finding.flagged = rest
        claimed.update(dict.fromkeys(rest, finding))
    return [finding for finding in ranked if id(finding) not in folded]


# --------------------------------------------------------------------------------------------------
# the command


def operating_point(
    calibration: Calibration,
    far: str | None,
    threshold: float | None,
    default_far: str,
    images: int = 0,
) -> tuple[float, float | None]:
    """(threshold, FAR it stands for) from --far / --threshold / the default FAR.

    The default gives way to a stricter FAR of the calibration when a set of ``images`` would hold
    more than CHANCE_PAIRS_PER_IMAGE chance matches per image at it (N^2/2 pairs times the FAR: at
    FAR 1e-3, 100k images hold 5 million), so that a large set's report is not chance pairs.
    """
    if far is not None and threshold is not None:
        raise CorpusError("give --far or --threshold, not both")
    if threshold is not None:
        return float(threshold), calibration.far_at(threshold)
    chosen = far or default_far
    if far is None:
        pairs = images * (images - 1) / 2
        stricter = sorted(
            (k for k in calibration.thresholds if float(k) <= float(chosen)), key=float, reverse=True
        )
        for key in stricter:
            chosen = key
            if pairs * float(key) <= CHANCE_PAIRS_PER_IMAGE * max(images, 1):
                break
        if chosen != default_far:
            log.info(
                "%d images: FAR %s instead of the default %s, so that chance matches stay under %d per "
                "image (--far overrides)",
                images,
                chosen,
                default_far,
                CHANCE_PAIRS_PER_IMAGE,
            )
    try:
        return calibration.threshold_for(chosen), float(chosen)
    except ValueError as exc:
        raise CorpusError(f"--far: {exc}") from None


def run_audit(
    embedder: Embedder,
    sources: Sequence[str | os.PathLike],
    out_dir: Path,
    *,
    far: str | None = None,
    threshold: float | None = None,
    default_far: str = "1e-3",
    split_level: int | None = None,
    batch_size: int = 32,
    max_pixels: int = 50_000_000,
    progress: bool = True,
) -> AuditResult:
    """Read, embed (cached in ``out_dir/cache``) and examine ``sources``; see the module docstring."""
    calibration = embedder.calibration
    operating_point(calibration, far, threshold, default_far)  # a bad --far fails before any work
    images = load_corpus(sources, split_level=split_level)
    point, point_far = operating_point(calibration, far, threshold, default_far, len(images))
    corpus = embed_corpus(
        embedder,
        images,
        cache_dir=out_dir / "cache",
        batch_size=batch_size,
        max_pixels=max_pixels,
        progress=progress,
        desc="audit: embed",
    )
    if corpus.cached:
        log.info(
            "%d of %d embeddings came from the cache in %s", corpus.cached, len(corpus), out_dir / "cache"
        )
    if not corpus.ok.any():
        raise CorpusError(f"none of the {len(corpus)} images could be read: {corpus.errors[0]}")
    findings, stats = find_issues(corpus, calibration, point)
    return AuditResult(corpus, findings, point, point_far, calibration.summary(), stats)

"""``cxr-reid risk``: how many images of an "anonymised" release can be linked back to identified
radiographs someone already holds (Packhaeuser et al., Sci Rep 2022: a network does it at AUC 0.99).

The attacker is modelled as the service itself: each released image is compared with every
reference image (a manifest, a folder, or a gallery's data dir) and its best match is a *link* at a
false-accept rate (FAR) when its score reaches the model's calibrated threshold for that FAR. With
AS-norm in the calibration (``Calibration.score_norm``) the ``TOP_K`` best raw cosines of each
released image are re-scored with AS-norm and the best normalised score decides, as the service
decides; otherwise the raw cosine does.

Ground truth (patient ids on both sides): a released patient with at least one reference image is
*linked* at a FAR when one of their released images has its best match above the threshold and
that match is the same patient; a best match above the threshold that is another patient is a
*wrong link* (an attacker acting on it names the wrong person). Each patient is linked or not, so a
share of patients is a binomial proportion: it comes with its exact 95% interval (Clopper-Pearson,
``scipy.stats.binomtest``), which holds at any sample size. A bootstrap interval does not: it collapses
to a point when every (or no) patient is linked, and "2 of 2 linked [95% CI 2-2]" reads as certainty.
Below :func:`min_patients` (36 at 95%: the fewest patients whose interval can be narrower than
``BOUND_WIDTH``, 10 points, whatever is seen) the report says the sample is too small to bound the
risk, and why, instead of a share. Without ground truth the report gives the
*expected* number of true links, the sum of the calibrated P(same patient | best score) over the
released images: an estimate under the calibration's 50/50 prior, stated as such.

Candidate defences (``app/analysis/defences.py``: blur, noise, lower resolution, crop, with their
cost in image fidelity) are applied to the released images and measured on the same data.

Why this module is still long: it is one report, read top to bottom (the reference side, linking,
the linkability arithmetic, assembling and writing the report); splitting it further would scatter
one computation over files that are only ever used together.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from app.analysis.corpus import CorpusError, CorpusImage, embed_corpus, load_corpus, load_for_display
from app.analysis.defences import DEFENCE_FAMILIES, Defence, defence_catalogue, embed_defended
from app.reports import (
    curve_svg,
    package_version,
    png_data_uri,
    prepare_out_dir,
    render,
    report_out_dir,
    write_json,
    write_text,
)
from index import GalleryError, GallerySnapshot, is_gallery_dir
from models.net.embedder import Embedder
from models.scoring.calibration import Calibration
from models.scoring.decide import PairScorer, image_key, pair_cosines, parse_fars

log = logging.getLogger(__name__)

DEFAULT_FARS = ("1e-2", "1e-3", "1e-4")
#: The FAR of the report's headline sentence (when it is among those asked for).
HEADLINE_FAR = "1e-3"
#: Raw candidates per released image re-scored with AS-norm.
TOP_K = 20
#: Pairs shown with thumbnails, best score first.
CLOSEST_PAIRS = 24
#: Confidence level of every interval in the report.
CI_LEVEL = 0.95
#: The widest interval (as a share of patients) that still bounds the risk: a sample whose interval
#: cannot be narrower than this, even when none or all of its patients are linked, is too small.
BOUND_WIDTH = 0.10
#: Released images scored against the reference at a time (bounds the score matrix).
_SCORE_ROWS = 1024


class RiskError(ValueError):
    """The risk report cannot be made from these inputs (exit 2): the message says why."""


# --------------------------------------------------------------------------------------------------
# defences (their mechanics are in app/analysis/defences.py)


def choose_defences(spec: str | None, model_side: int) -> list[Defence]:
    """``--defences``: "all" (default), "none", or comma-separated names or families."""
    known = defence_catalogue(model_side)
    text = (spec or "all").strip().lower()
    if text == "all":
        return list(known.values())
    if text in ("none", ""):
        return []
    chosen: dict[str, Defence] = {}
    for word in (w.strip() for w in text.split(",") if w.strip()):
        family = "lowres" if word in ("resolution", "res") else word
        matched = [d for d in known.values() if d.name == word or d.family == family]
        if not matched:
            raise RiskError(
                f"--defences: unknown defence {word!r}; give all, none, families "
                f"({', '.join(DEFENCE_FAMILIES)}) or names ({', '.join(known)})"
            )
        chosen.update((d.name, d) for d in matched)
    return list(chosen.values())


# --------------------------------------------------------------------------------------------------
# the reference side


@dataclass
class Reference:
    """Identified images the attacker holds: vectors, patient ids, where to show them from."""

    kind: str  # "manifest" | "folder" | "gallery"
    source: str
    images: list[CorpusImage]
    vectors: np.ndarray
    ok: np.ndarray
    keys: list[str]  # AS-norm keys (what the service would leave out); "" unknown
    errors: list[str | None] = field(default_factory=list)

    @property
    def patient_ids(self) -> list[str | None]:
        return [image.patient_id for image in self.images]


def is_gallery(path: Path) -> bool:
    return is_gallery_dir(path)


def read_gallery(data_dir: Path, embedder: Embedder) -> Reference:
    """Every vector of a gallery, read through a read-only snapshot (``index.GallerySnapshot``):
    nothing is written and a running service (which holds the gallery's lock) need not stop.
    Refuses vectors of another model: their scores would mean nothing against this model's
    thresholds."""
    try:
        snapshot = GallerySnapshot.read(data_dir)
    except GalleryError as exc:
        raise RiskError(str(exc)) from None
    stored = snapshot.model_id
    if len(snapshot) and (
        stored != embedder.model_id or any(m != embedder.model_id for m in snapshot.row_model_ids)
    ):
        raise RiskError(
            f"the gallery {data_dir} holds vectors of model {stored!r}, not {embedder.model_id!r}: pass "
            "the gallery's checkpoint with --model (or reindex the gallery with this model)"
        )
    if len(snapshot) and (snapshot.dim if snapshot.dim is not None else embedder.dim) != embedder.dim:
        raise RiskError(
            f"the gallery {data_dir} stores {snapshot.dim}-d vectors, the model makes {embedder.dim}"
        )
    images, keys = [], []
    rows = zip(
        snapshot.image_ids.tolist(),
        snapshot.patient_ids,
        snapshot.collections,
        snapshot.source_paths,
        snapshot.stored_paths,
        strict=True,
    )
    for image_id, patient, collection, source_path, stored_path in rows:
        images.append(
            CorpusImage(
                path=stored_path or Path(source_path or ""),
                shown=f"{collection}/{image_id}" + (f" ({Path(source_path).name})" if source_path else ""),
                patient_id=patient,
                split=None,
                source=str(data_dir),
                key=f"{collection}:{patient}" if patient else "",
            )
        )
        keys.append(image_key(patient, collection))
    matrix = snapshot.vectors if len(snapshot) else np.zeros((0, embedder.dim), np.float32)
    return Reference(
        kind="gallery",
        source=str(data_dir),
        images=images,
        vectors=matrix,
        ok=np.ones(len(images), dtype=bool),
        keys=keys,
        errors=[None] * len(images),
    )


# --------------------------------------------------------------------------------------------------
# linking


@dataclass
class Links:
    """Each released image's best reference match (-1: none, the image unusable)."""

    best: np.ndarray  # (N,) int
    score: np.ndarray  # (N,) the decision score (AS-norm or cosine); nan where none
    cosine: np.ndarray  # (N,) raw cosine of that pair


def best_matches(
    release: np.ndarray,
    release_ok: np.ndarray,
    reference: np.ndarray,
    reference_ok: np.ndarray,
    *,
    calibration: Calibration,
    reference_keys: Sequence[str] | None = None,
    top_k: int = TOP_K,
) -> Links:
    """Best reference match of every usable released image: raw cosine, or, when the calibration
    normalises scores, AS-norm of the ``top_k`` best cosines (the released side's patient is unknown
    to the attacker, so it leaves nobody out; a reference image leaves out its own patient's key)."""
    n = release.shape[0]
    best = np.full(n, -1, dtype=np.int64)
    score = np.full(n, np.nan)
    cosine = np.full(n, np.nan)
    columns = np.flatnonzero(reference_ok)
    rows = np.flatnonzero(release_ok)
    if columns.size == 0 or rows.size == 0:
        return Links(best, score, cosine)
    ref = np.ascontiguousarray(reference[columns], dtype=np.float32)
    k = 1 if calibration.score_norm is None else min(top_k, columns.size)
    candidates = np.empty((rows.size, k), dtype=np.int64)
    for start in range(0, rows.size, _SCORE_ROWS):  # candidates by a float32 product, then re-scored
        part = rows[start : start + _SCORE_ROWS]
        scores = np.asarray(release[part], dtype=np.float32) @ ref.T
        if k < scores.shape[1]:
            candidates[start : start + part.size] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            candidates[start : start + part.size] = np.arange(scores.shape[1])
    # exact decision scores, as the service computes them; the released side's patient is unknown
    # (leaves nobody out), a reference image leaves out its own patient
    used = np.unique(candidates)
    keys = list(reference_keys) if reference_keys is not None else [""] * reference.shape[0]
    scorer = PairScorer(
        calibration,
        np.concatenate([np.asarray(release[rows], dtype=np.float32), ref[used]]),
        [""] * rows.size + [keys[columns[j]] for j in used],
    )
    position = np.full(columns.size, -1, dtype=np.int64)
    position[used] = rows.size + np.arange(used.size)
    flat_rows = np.repeat(np.arange(rows.size), k)
    flat_cols = position[candidates.ravel()]
    raw = pair_cosines(scorer.vectors[flat_rows], scorer.vectors[flat_cols]).reshape(rows.size, k)
    decided = scorer.score(flat_rows, flat_cols).reshape(rows.size, k)
    pick = np.argmax(decided, axis=1)
    best[rows] = columns[candidates[np.arange(rows.size), pick]]
    score[rows] = decided[np.arange(rows.size), pick]
    cosine[rows] = raw[np.arange(rows.size), pick]
    return Links(best, score, cosine)


def exact_interval(k: int, n: int) -> list[float | None]:
    """The exact (Clopper-Pearson) ``CI_LEVEL`` interval of a share of ``k`` in ``n``; [None, None]
    when ``n`` is 0. Exact: it covers the true share at least ``CI_LEVEL`` of the time at any ``n``."""
    if n <= 0:
        return [None, None]
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=CI_LEVEL, method="exact")
    return [float(ci.low), float(ci.high)]


def min_patients(width: float = BOUND_WIDTH, level: float = CI_LEVEL) -> int:
    """The fewest patients whose exact interval can be narrower than ``width``: its narrowest case,
    none (or all) linked, is [0, 1 - ((1 - level) / 2) ** (1 / n)]. Below it no outcome bounds the share
    to ``width``, so the report calls the sample too small rather than print a share."""
    return math.ceil(math.log((1 - level) / 2) / math.log(1 - width))


def too_small_reason(patients: int, ci: Sequence[float | None]) -> str | None:
    """Why ``patients`` cannot bound the risk (None when they can): the one sentence the report shows."""
    least = min_patients()
    if patients >= least:
        return None
    if patients == 0:
        return "no released patient has a reference image, so nobody could be linked and nothing is measured"
    narrowest = exact_interval(0, patients)[1] or 1.0
    lo, hi = ci
    return (
        f"{patients} released patient(s) with a reference image: even if none or all of them were linked, "
        f"the exact {CI_LEVEL:.0%} interval of the share would span {narrowest:.0%} of the range, and a "
        f"bound needs it within {BOUND_WIDTH:.0%}, which takes at least {least} patients. Any share from "
        f"{lo:.1%} to {hi:.1%} fits what was seen here"
    )


def linkability(
    release_patients: Sequence[str | None],
    reference_patients: Sequence[str | None],
    links: Links,
    thresholds: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Patient-level linkability per FAR, with ground truth on both sides (see the module docstring).

    Per FAR: ``patients`` (released patients with a reference image), ``linked``, ``share`` and its
    exact interval ``share_ci`` (``linked_ci`` is ``share_ci`` times ``patients``: the question is
    "what share of such patients", the count follows), ``too_small`` / ``too_small_reason`` (fewer
    than :func:`min_patients`: the share is not a bound, ``share`` is then None and the reason says
    why), ``wrong_link_images`` / ``wrong_link_patients`` (best match above the threshold but another
    patient, any released patient) with the exact interval of the latter over the released patients,
    and ``flagged_images`` (best match above the threshold at all).
    """
    on_reference = {p for p in reference_patients if p}
    patients = sorted({p for p, b in zip(release_patients, links.best, strict=True) if p and b >= 0})
    index = {p: i for i, p in enumerate(patients)}
    n_pat, fars = len(patients), list(thresholds)
    eligible = np.asarray([p in on_reference for p in patients], dtype=bool)
    linked = np.zeros((n_pat, len(fars)), dtype=bool)
    wrong_patient = np.zeros((n_pat, len(fars)), dtype=bool)
    wrong_images = np.zeros((n_pat, len(fars)), dtype=np.int64)
    flagged = np.zeros(len(fars), dtype=np.int64)
    for i, (patient, b) in enumerate(zip(release_patients, links.best, strict=True)):
        if b < 0:
            continue
        for f, far in enumerate(fars):
            if not links.score[i] >= thresholds[far]:
                continue
            flagged[f] += 1
            if not patient:
                continue
            same = reference_patients[b] == patient
            if same:
                linked[index[patient], f] = True
            else:
                wrong_patient[index[patient], f] = True
                wrong_images[index[patient], f] += 1
    m = int(eligible.sum())
    out: dict[str, dict[str, Any]] = {}
    for f, far in enumerate(fars):
        hits = int((linked[:, f] & eligible).sum())
        share_ci = exact_interval(hits, m)
        wrong = int(wrong_patient[:, f].sum())
        wrong_ci = exact_interval(wrong, n_pat)
        reason = too_small_reason(m, share_ci)
        out[far] = {
            "threshold": float(thresholds[far]),
            "patients": m,
            "linked": hits,
            "share": float(hits / m) if m and reason is None else None,
            "share_ci": share_ci,
            "linked_ci": [None if v is None else v * m for v in share_ci],
            "too_small": reason is not None,
            "too_small_reason": reason,
            "wrong_link_images": int(wrong_images[:, f].sum()),
            "wrong_link_patients": wrong,
            "wrong_link_patients_ci": [None if v is None else v * n_pat for v in wrong_ci],
            "flagged_images": int(flagged[f]),
            "released_patients": n_pat,
        }
    return out


def expected_links(
    links: Links, calibration: Calibration, thresholds: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Without ground truth: per FAR, images whose best match reaches the threshold and the
    expected number of true links among them, sum of the calibrated P(same | score) (50/50 prior);
    ``"any"`` sums over every released image, whatever its score."""
    usable = links.best >= 0
    if calibration.score_points:
        p = np.zeros(links.score.shape)
        p[usable] = np.asarray(calibration.probability(links.score[usable]), dtype=np.float64)
    else:
        p = np.full(links.score.shape, np.nan)
    out: dict[str, dict[str, Any]] = {}
    for far, t in thresholds.items():
        above = usable & (np.nan_to_num(links.score, nan=-np.inf) >= t)
        out[far] = {
            "threshold": float(t),
            "flagged_images": int(above.sum()),
            "expected_true_links": float(p[above].sum()) if calibration.score_points else None,
        }
    out["any"] = {"expected_true_links": float(p[usable].sum()) if calibration.score_points else None}
    return out


# --------------------------------------------------------------------------------------------------
# the whole report


@dataclass
class RiskInputs:
    release: str
    reference: str
    out: str
    fars: Sequence[str] = DEFAULT_FARS
    defences: str | None = "all"
    batch_size: int = 32
    max_pixels: int = 50_000_000
    progress: bool = True


def far_thresholds(text: str | Sequence[str] | None, calibration: Calibration) -> dict[str, float]:
    """FARs asked for (``DEFAULT_FARS`` when None) -> thresholds of the model's calibration, highest
    FAR first; RiskError for a FAR it cannot place."""
    try:
        items = parse_fars(DEFAULT_FARS if text is None else text)
    except ValueError as exc:
        raise RiskError(f"--far: {exc}") from None
    out: dict[str, float] = {}
    for item in items:
        value = float(item)
        try:
            threshold = calibration.threshold_for(item)
        except ValueError as exc:
            raise RiskError(f"--far {item}: {exc}") from None
        if value < calibration.min_resolvable_far * (1 - 1e-9):
            log.warning(
                "FAR %s is below what the model's calibration measured (%d impostor pairs): its "
                "threshold is an extrapolation",
                item,
                calibration.n_impostor,
            )
        key = next((k for k in calibration.thresholds if math.isclose(float(k), value)), f"{value:.3g}")
        out[key] = threshold
    return dict(sorted(out.items(), key=lambda kv: -float(kv[0])))


def _curve_fars(calibration: Calibration, asked: dict[str, float]) -> dict[float, float]:
    """The FARs of the linkability curve: the calibration's grid from 1e-5 to 1e-1 in half-decade
    steps, and the FARs asked for."""
    grid = [f for f in calibration.far_points if 1e-5 * (1 - 1e-9) <= f <= 0.1 * (1 + 1e-9)][::5]
    out = {float(f): calibration.threshold_for(f) for f in grid}
    for key, threshold in asked.items():
        out = {f: t for f, t in out.items() if not math.isclose(f, float(key))}
        out[float(key)] = threshold
    return dict(sorted(out.items()))


def _load_side(
    path: str, embedder: Embedder, cache: Path, inputs: RiskInputs, what: str
) -> tuple[str, list[CorpusImage], np.ndarray, np.ndarray, list[str | None]]:
    source = Path(path)
    if not source.exists():
        raise RiskError(f"{what} {path} not found (give a manifest CSV or a folder of images)")
    try:
        images = load_corpus([source])
    except CorpusError as exc:
        raise RiskError(f"{what}: {exc}") from None
    embedded = embed_corpus(
        embedder,
        images,
        cache_dir=cache,
        batch_size=inputs.batch_size,
        max_pixels=inputs.max_pixels,
        progress=inputs.progress,
        desc=what,
    )
    kind = "folder" if source.is_dir() else "manifest"
    return kind, embedded.images, embedded.vectors, embedded.ok, embedded.errors


def _side_summary(kind: str, source: str, images: list[CorpusImage], ok: np.ndarray, errors: list) -> dict:
    return {
        "kind": kind,
        "source": source,
        "images": len(images),
        "usable": int(ok.sum()),
        "patients": len({i.patient_id for i, good in zip(images, ok, strict=True) if good and i.patient_id}),
        "unlabelled": int(sum(1 for i, good in zip(images, ok, strict=True) if good and not i.patient_id)),
        "unusable": [
            {"path": image.shown, "error": error}
            for image, error in zip(images, errors, strict=True)
            if error is not None
        ],
    }


def _measure(
    links: Links,
    release_patients: list[str | None],
    reference_patients: list[str | None],
    thresholds: dict[str, float],
    calibration: Calibration,
    ground_truth: bool,
) -> dict[str, Any]:
    result: dict[str, Any] = {"estimate": expected_links(links, calibration, thresholds)}
    if ground_truth:
        result["measured"] = linkability(release_patients, reference_patients, links, thresholds)
    return result


def assess(inputs: RiskInputs, embedder: Embedder) -> dict[str, Any]:
    """Everything ``risk.json`` holds (see the module docstring); raises RiskError when the inputs
    cannot give a report."""
    calibration = embedder.calibration
    thresholds = far_thresholds(inputs.fars, calibration)
    defences = choose_defences(inputs.defences, embedder.preprocess_config.size)
    try:
        out = prepare_out_dir(inputs.out)
    except (NotADirectoryError, OSError) as exc:
        raise RiskError(str(exc)) from None
    cache = out / "cache"
    kind, release, release_vectors, release_ok, release_errors = _load_side(
        inputs.release, embedder, cache, inputs, "release"
    )
    reference_path = Path(inputs.reference)
    if is_gallery(reference_path):
        reference = read_gallery(reference_path, embedder)
    else:
        ref_kind, images, vectors, ok, errors = _load_side(
            inputs.reference, embedder, cache, inputs, "reference"
        )
        reference = Reference(ref_kind, inputs.reference, images, vectors, ok, [""] * len(images), errors)
    if not release_ok.any():
        raise RiskError(f"release {inputs.release}: none of its {len(release)} image(s) could be used")
    if not reference.ok.any():
        raise RiskError(
            f"reference {inputs.reference}: none of its {len(reference.images)} image(s) could be used"
        )

    release_patients = [i.patient_id for i in release]
    reference_patients = reference.patient_ids
    ground_truth = all(p for p, good in zip(release_patients, release_ok, strict=True) if good) and all(
        p for p, good in zip(reference_patients, reference.ok, strict=True) if good
    )
    match = {"calibration": calibration, "reference_keys": reference.keys}
    links = best_matches(release_vectors, release_ok, reference.vectors, reference.ok, **match)
    measure = {
        "release_patients": release_patients,
        "reference_patients": reference_patients,
        "calibration": calibration,
        "ground_truth": ground_truth,
    }
    headline = _measure(links, thresholds=thresholds, **measure)
    curve_fars = _curve_fars(calibration, thresholds)
    curve = _measure(links, thresholds=curve_fars, **measure)

    defended = embed_defended(
        embedder,
        [i.path for i in release],
        release_ok,
        defences,
        batch_size=inputs.batch_size,
        max_pixels=inputs.max_pixels,
        progress=inputs.progress,
    )
    defence_rows = [
        {
            "name": "none",
            "label": "the release as it is",
            "psnr_db": None,
            "ssim": 1.0,
            "usable": int(release_ok.sum()),
            **_measure(links, thresholds=thresholds, **measure),
        }
    ]
    for item in defended:
        ok = release_ok & ~np.isnan(item.psnr)  # nan: the image failed under this defence
        d_links = best_matches(item.vectors, ok, reference.vectors, reference.ok, **match)
        defence_rows.append(
            {
                "name": item.defence.name,
                "label": item.defence.label,
                # inf (identical input: the defence changed nothing at this size) counts as 99 dB
                "psnr_db": float(np.mean(np.minimum(item.psnr[ok], 99.0))) if ok.any() else None,
                "ssim": float(np.nanmean(item.ssim[ok])) if ok.any() else None,
                "usable": int(ok.sum()),
                **_measure(d_links, thresholds=thresholds, **measure),
            }
        )

    probability = (
        np.asarray(calibration.probability(np.nan_to_num(links.score, nan=-1.0)), dtype=np.float64)
        if calibration.score_points
        else np.full(len(release), np.nan)
    )
    per_image = []
    for i, image in enumerate(release):
        b = int(links.best[i])
        ref_image = reference.images[b] if b >= 0 else None
        link = "none"
        if b >= 0:
            if not image.patient_id or not ref_image.patient_id:
                link = "unknown"
            else:
                link = "correct" if image.patient_id == ref_image.patient_id else "wrong"
        per_image.append(
            {
                "path": image.shown,
                "patient_id": image.patient_id,
                "error": release_errors[i],
                "best_reference": ref_image.shown if ref_image else None,
                "reference_row": b if b >= 0 else None,  # row of the reference manifest / gallery order
                "best_reference_patient_id": ref_image.patient_id if ref_image else None,
                "score": float(links.score[i]) if b >= 0 else None,
                "cosine": float(links.cosine[i]) if b >= 0 else None,
                "probability": float(probability[i]) if b >= 0 and calibration.score_points else None,
                "linkable": {far: bool(b >= 0 and links.score[i] >= t) for far, t in thresholds.items()},
                "same_patient": None if link in ("none", "unknown") else link == "correct",
                "link": link,
            }
        )
    headline_far = HEADLINE_FAR if HEADLINE_FAR in thresholds else next(iter(thresholds))
    return {
        "version": package_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_id": embedder.model_id,
        "calibration": calibration.summary(),
        "score": f"AS-norm of the top {TOP_K} cosines" if calibration.score_norm else "raw cosine",
        "release": _side_summary(kind, inputs.release, release, release_ok, release_errors),
        "reference": _side_summary(
            reference.kind, reference.source, reference.images, reference.ok, reference.errors
        ),
        "ground_truth": ground_truth,
        # how every interval of the measured figures is made, and the sample a bound needs
        "interval": {
            "method": "Clopper-Pearson (exact binomial)",
            "level": CI_LEVEL,
            "min_patients": min_patients(),
            "bound_width": BOUND_WIDTH,
        },
        "thresholds": thresholds,
        # a FAR is per comparison: against R reference images, an image of someone the reference
        # does not hold still finds a false match above the threshold with about this chance
        "false_link_chance_per_image": {
            far: 1.0 - (1.0 - float(far)) ** int(reference.ok.sum()) for far in thresholds
        },
        "headline_far": headline_far,
        "headline": headline_sentence(headline, headline_far, ground_truth, int(release_ok.sum())),
        "linkability": headline,
        "curve": [
            {"far": float(far), **_curve_point(curve, far, ground_truth, int(release_ok.sum()))}
            for far in curve_fars
        ],
        "defences": defence_rows,
        "images": per_image,
        # for the HTML report's thumbnails only; write_report drops them from risk.json
        "_release_images": release,
        "_reference_images": reference.images,
    }


def _curve_point(curve: dict[str, Any], far: str, ground_truth: bool, usable: int) -> dict[str, Any]:
    if ground_truth:
        m = curve["measured"][far]
        return {"threshold": m["threshold"], "share": m["share"], "share_ci": m["share_ci"]}
    e = curve["estimate"][far]
    expected = e["expected_true_links"]
    return {
        "threshold": e["threshold"],
        "share": None if expected is None else expected / max(usable, 1),
        "share_ci": [None, None],
    }


def headline_sentence(result: dict[str, Any], far: str, ground_truth: bool, usable: int) -> str:
    """The report's first sentence."""
    if ground_truth:
        m = result["measured"][far]
        wrong = f"{m['wrong_link_images']} released image(s) wrongly linked to another patient"
        if m["too_small"]:
            lo, hi = m["share_ci"]
            bound = "" if lo is None else f": any share from {100 * lo:.1f}% to {100 * hi:.1f}% fits"
            return (
                f"{m['linked']} of {m['patients']} patients linkable at FAR {far}, too few to bound the "
                f"risk (at least {min_patients()} needed{bound}); {wrong}"
            )
        lo, hi = m["linked_ci"]
        return (
            f"{m['linked']} of {m['patients']} patients ({100 * m['share']:.1f}%) linkable at FAR {far} "
            f"[{CI_LEVEL:.0%} CI {lo:.0f}–{hi:.0f}]; {wrong}"
        )
    e = result["estimate"][far]
    expected = e["expected_true_links"]
    what = "n/a" if expected is None else f"{expected:.1f}"
    return (
        f"estimated {what} true links among {e['flagged_images']} of {usable} released images "
        f"whose best match reaches FAR {far} (an estimate from the model's calibrated probabilities: "
        "no ground truth)"
    )


# --------------------------------------------------------------------------------------------------
# writing


def write_report(report: dict[str, Any], embedder: Embedder, out: Path) -> None:
    """``risk.json`` (everything but thumbnails) and the self-contained ``report.html``."""
    release_images: list[CorpusImage] = report.pop("_release_images")
    reference_images: list[CorpusImage] = report.pop("_reference_images")
    write_json(out / "risk.json", report)
    order = sorted(
        (i for i, row in enumerate(report["images"]) if row["score"] is not None),
        key=lambda i: -report["images"][i]["score"],
    )[:CLOSEST_PAIRS]
    thumbs: dict[tuple[str, int], str] = {}

    def thumb(side: str, images: list[CorpusImage], row: int | None) -> str:
        if row is None or row < 0:
            return ""
        if (side, row) not in thumbs:
            thumbs[side, row] = png_data_uri(load_for_display(images[row], embedder, side=128))
        return thumbs[side, row]

    pairs = []
    for i in order:
        row = report["images"][i]
        pairs.append(
            {
                **row,
                "release_thumb": thumb("release", release_images, i),
                "reference_thumb": thumb("reference", reference_images, row["reference_row"]),
            }
        )
    fars = list(report["thresholds"])
    truth = report["ground_truth"]
    series = {"measured share of patients linked" if truth else "expected true links / released images": []}
    bands: dict[str, list[tuple[float, float, float]]] = {}
    name = next(iter(series))
    for point in report["curve"]:
        if point["share"] is not None:
            series[name].append((point["far"], point["share"]))
            lo, hi = point["share_ci"]
            if lo is not None:
                bands.setdefault(name, []).append((point["far"], lo, hi))
    chart = curve_svg(series, x_label="false-accept rate (FAR)", y_label="linkable", bands=bands)
    html = render(
        "risk.html.j2",
        version=report["version"],
        model_id=report["model_id"],
        created=report["created"],
        report=report,
        fars=fars,
        chart=chart,
        pairs=pairs,
    )
    write_text(out / "report.html", html)


def run(inputs: RiskInputs, embedder: Embedder) -> dict[str, Any]:
    """Assess the release and write ``risk.json`` and ``report.html`` under ``inputs.out``; a run that
    fails removes the folder it made (``report_out_dir``): no half-made report is left behind."""
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(report_out_dir(inputs.out))
        except OSError as exc:  # --out is a file, or cannot be made
            raise RiskError(str(exc)) from None
        report = assess(inputs, embedder)
        write_report(report, embedder, out)
    return report


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """risk.json without the per-image rows: what ``--json`` prints."""
    return {k: v for k, v in report.items() if k not in ("images",)}

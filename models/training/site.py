"""Site calibration: thresholds fitted on the user's own labelled images, so the FAR promised is
the FAR delivered at that site, plus the tools that measure whether it is.

A threshold fitted on the model's validation patients holds on sites like the training data and
not elsewhere (MODEL_CARD.md: the FAR-1e-3 threshold admits 16-57% of impostor pairs at an unseen
site). A site's gallery already holds patient ids, so it can fit its own:

- :func:`fit_site_calibration` embeds nothing; it takes the site's embeddings and patient ids,
  refuses (:class:`CalibrationRefusedError`, saying how many more labelled images would do) when the
  pairs cannot resolve a FAR asked for, and returns a :class:`~models.scoring.calibration.Calibration`
  whose provenance records the data, the date and a patient-bootstrap interval of each threshold.
- :func:`split_half` measures the promise honestly: calibrate on half of a site's patients,
  count false accepts on the other half.
- AS-norm (``models/scoring/scorenorm.py``) normalises scores against a cohort of the site's own images;
  :func:`split_half` measures it with ``snorm_top_k``.

Rules of refusal: a FAR f needs at least ``MIN_FALSE_ACCEPTS / f`` impostor pairs (so that the
threshold rests on that many false accepts, not on the single highest impostor score), at least
``MIN_GENUINE_PAIRS`` same-patient pairs (for the probability map and the TAR) and at least
``MIN_PATIENTS`` patients.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.metrics import pair_scores
from models.scoring.calibration import DEFAULT_FAR, FAR_KEYS, Calibration
from models.scoring.scorenorm import ScoreNorm, choose_cohort, patient_key

MIN_FALSE_ACCEPTS = 10
MIN_GENUINE_PAIRS = 30
MIN_PATIENTS = 20
#: The AUC of same- against different-patient scores below which the images hold no identity the
#: model can see (noise, labels that do not follow the people, or not chest radiographs). The worst
#: unseen hospital in MODEL_CARD.md scores 0.81; 230 noise images score about 0.5 and would move
#: the thresholds every request is decided at.
MIN_IDENTITY_AUC = 0.6


class CalibrationRefusedError(ValueError):
    """The labelled data cannot support the calibration asked for; the message says what is missing."""


@dataclass(frozen=True)
class PairCounts:
    images: int
    patients: int
    genuine: int
    impostor: int


def pair_counts(labels: Sequence[Any] | np.ndarray) -> PairCounts:
    """Images, patients and the numbers of same- and different-patient pairs, without forming pairs."""
    _, sizes = np.unique(np.asarray(labels), return_counts=True)
    n = int(sizes.sum())
    genuine = int(np.sum(sizes * (sizes - 1) // 2))
    return PairCounts(n, int(sizes.size), genuine, n * (n - 1) // 2 - genuine)


def required_impostor_pairs(far: float) -> int:
    return math.ceil(MIN_FALSE_ACCEPTS / far)


def _more_images_for_impostors(counts: PairCounts, needed_pairs: int) -> int:
    """Images of new patients to add so that the different-patient pairs reach ``needed_pairs``."""
    n, have = counts.images, counts.impostor
    if have >= needed_pairs:
        return 0
    # every added image of a new patient pairs with every image there is: solve n*x + x(x-1)/2 >= missing
    missing = needed_pairs - have
    x = (-(2 * n - 1) + math.sqrt((2 * n - 1) ** 2 + 8 * missing)) / 2
    return max(1, math.ceil(x))


def resolvable_fars(counts: PairCounts, fars: Sequence[str]) -> list[str]:
    """The FARs of ``fars`` these pairs can calibrate by the rule of :func:`calibration_problems`
    (none when the patients or same-patient pairs are too few), largest first."""
    if counts.patients < MIN_PATIENTS or counts.genuine < MIN_GENUINE_PAIRS:
        return []
    return [
        far
        for far in sorted(fars, key=float, reverse=True)
        if counts.impostor >= required_impostor_pairs(float(far))
    ]


def check_resolvable(counts: PairCounts, fars: Sequence[str]) -> None:
    """Raise :class:`CalibrationRefusedError` when the data cannot support every FAR in ``fars``."""
    problems = calibration_problems(counts, fars)
    if problems:
        raise CalibrationRefusedError(
            f"cannot calibrate on {counts.images} images of {counts.patients} patients: "
            + "; ".join(problems)
        )


def calibration_problems(counts: PairCounts, fars: Sequence[str]) -> list[str]:
    """What these pairs lack to calibrate ``fars``, each with how much more would do: the one rule
    of ``cxr-reid calibrate``, ``adapt`` and training's own calibration (empty: nothing lacks)."""
    problems = []
    if counts.patients < MIN_PATIENTS:
        problems.append(
            f"{counts.patients} patient(s); at least {MIN_PATIENTS} are needed (add images of "
            f"{MIN_PATIENTS - counts.patients} more patients)"
        )
    if counts.genuine < MIN_GENUINE_PAIRS:
        per_image = counts.genuine / counts.images if counts.images and counts.genuine else 0.5
        extra = math.ceil((MIN_GENUINE_PAIRS - counts.genuine) / max(per_image, 0.5))
        problems.append(
            f"{counts.genuine} same-patient pair(s); at least {MIN_GENUINE_PAIRS} are needed for a stable "
            f"threshold and probability map (about {extra} more images of patients already present)"
        )
    for far in sorted(fars, key=float, reverse=True):
        needed = required_impostor_pairs(float(far))
        if counts.impostor < needed:
            more = _more_images_for_impostors(counts, needed)
            problems.append(
                f"FAR {far} needs at least {needed:,} different-patient pairs ({MIN_FALSE_ACCEPTS} false "
                f"accepts), there are {counts.impostor:,}: about {more:,} more labelled images of new "
                f"patients are needed, or calibrate fewer FARs (--far)"
            )
    return problems


def _weighted_thresholds(sorted_desc: np.ndarray, weights: np.ndarray, fars: Sequence[float]) -> np.ndarray:
    """Thresholds where the weighted share of impostor scores (sorted high to low) at or above them
    is at most each FAR: the score of the first impostor whose acceptance would break it."""
    share = np.cumsum(weights) / max(float(weights.sum()), 1e-12)
    index = np.searchsorted(share, np.asarray(fars), side="right").clip(0, sorted_desc.size - 1)
    return sorted_desc[index]


def threshold_intervals(
    impostor: np.ndarray,
    impostor_pairs: np.ndarray,
    patient_codes: np.ndarray,
    fars: Sequence[str],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    max_pairs: int = 1_000_000,
) -> dict[str, list[float]]:
    """95% patient-bootstrap interval of each FAR's threshold: resample patients, weight each
    impostor pair by how often both its patients were drawn, take the weighted FAR quantile.
    At most ``max_pairs`` impostor pairs (a uniform sample) enter, so it stays a few seconds."""
    if bootstrap <= 0:
        return {}
    rng = np.random.default_rng(seed)
    if impostor.size > max_pairs:
        keep = rng.choice(impostor.size, size=max_pairs, replace=False)
        impostor, impostor_pairs = impostor[keep], impostor_pairs[keep]
    order = np.argsort(-impostor, kind="stable")
    scores = impostor[order]
    pa = patient_codes[impostor_pairs[order, 0]]
    pb = patient_codes[impostor_pairs[order, 1]]
    n_patients = int(patient_codes.max()) + 1
    values = [float(f) for f in fars]
    draws = np.empty((bootstrap, len(values)))
    for b in range(bootstrap):
        counts = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients).astype(float)
        draws[b] = _weighted_thresholds(scores, counts[pa] * counts[pb], values)
    return {
        far: [float(np.percentile(draws[:, i], 2.5)), float(np.percentile(draws[:, i], 97.5))]
        for i, far in enumerate(fars)
    }


def separation_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """P(a same-patient pair scores above a different-patient pair), ties counted half."""
    ordered = np.sort(np.asarray(impostor, dtype=np.float64))
    below = np.searchsorted(ordered, genuine, side="left")
    not_above = np.searchsorted(ordered, genuine, side="right")
    return float(np.mean((below + not_above) / 2) / max(ordered.size, 1))


def check_identity(genuine: np.ndarray, impostor: np.ndarray) -> None:
    """CalibrationRefusedError when same-patient pairs score no higher than different-patient ones:
    thresholds fitted there would be noise, and they would decide for every collection."""
    auc = separation_auc(genuine, impostor)
    if auc < MIN_IDENTITY_AUC:
        raise CalibrationRefusedError(
            f"same-patient and different-patient pairs score alike here (AUC {auc:.2f} over "
            f"{genuine.size:,} same-patient and {impostor.size:,} different-patient pairs; a site the "
            f"model never saw scores 0.8 or more): these images do not look like chest radiographs "
            f"filed under their patients (noise, wrong labels, other images), so no thresholds were fitted"
        )


def fit_site_calibration(
    embeddings: np.ndarray,
    patient_ids: Sequence[Any],
    *,
    fars: Sequence[str] = FAR_KEYS,
    default_far: str = DEFAULT_FAR,
    bootstrap: int = 200,
    provenance: dict[str, Any] | None = None,
    score_norm: bool = True,
    max_impostor_pairs: int = 5_000_000,
    seed: int = 0,
) -> Calibration:
    """Thresholds at ``fars`` and the probability map from a site's own labelled images.

    With ``score_norm`` (the default, measured in MODEL_CARD.md to raise TAR at unseen sites) the
    scores are AS-normalised first against a cohort drawn from these images, leave-pair-out
    (``models/scoring/scorenorm.py``), and the cohort is kept with the calibration. Raises
    :class:`CalibrationRefusedError` before any fitting when the data cannot support the request.
    """
    fars = tuple(dict.fromkeys(str(f) for f in fars))
    if default_far not in fars:
        raise CalibrationRefusedError(
            f"the default FAR {default_far} must be one of the FARs calibrated {list(fars)}"
        )
    ids = [str(p) for p in patient_ids]
    codes = np.unique(np.asarray(ids), return_inverse=True)[1]
    counts = pair_counts(codes)
    check_resolvable(counts, fars)
    genuine, impostor, genuine_pairs, impostor_pairs = pair_scores(
        embeddings, codes, max_impostor_pairs=max_impostor_pairs, rng_seed=seed
    )
    check_identity(genuine, impostor)
    norm = None
    if score_norm:
        keys = [patient_key(p) for p in ids]
        cohort = choose_cohort(keys, seed=seed)
        norm = ScoreNorm(np.asarray(embeddings)[cohort], [keys[i] for i in cohort])
        genuine = norm.normalise_within(embeddings, keys, genuine, genuine_pairs)
        impostor = norm.normalise_within(embeddings, keys, impostor, impostor_pairs)
    min_far = MIN_FALSE_ACCEPTS / impostor.size  # the pairs fitted on (a sample when there are very many)
    record = {
        "images": counts.images,
        "patients": counts.patients,
        "genuine_pairs": int(genuine.size),
        "impostor_pairs": int(impostor.size),
        "impostor_pairs_sampled": impostor.size < counts.impostor,
        "fitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "min_resolvable_far": min_far,
        "score_norm": None if norm is None else norm.describe(),
        "threshold_ci": threshold_intervals(
            impostor, impostor_pairs, codes, fars, bootstrap=bootstrap, seed=seed
        ),
        "bootstrap": bootstrap,
        **(provenance or {}),
    }
    calibration = Calibration.fit(
        genuine,
        impostor,
        default_far=default_far,
        fars=fars,
        min_far=min_far,
        source="site",
        provenance=record,
        score_norm=None if norm is None else norm.to_dict(),
    )
    # the catch rate a site reads beside each threshold: the share of these same-patient pairs at or
    # above it (a misfile is flagged as its true patient when it scores so against an earlier image)
    calibration.provenance["catch_rate"] = {
        far: float(np.mean(genuine >= threshold)) for far, threshold in calibration.thresholds.items()
    }
    return calibration


# --- measuring the promise --------------------------------------------------------------------------


def half_split(patient_ids: Sequence[Any], seed: int) -> np.ndarray:
    """True for images whose patient falls in the first half (patients shuffled with ``seed``)."""
    patients, codes = np.unique(np.asarray(patient_ids), return_inverse=True)
    first = np.random.default_rng(seed).permutation(patients.size) < patients.size // 2
    return first[codes]


def _far_tar(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> tuple[float, float]:
    return float(np.mean(impostor >= threshold)), float(np.mean(genuine >= threshold))


def split_half(
    embeddings: np.ndarray,
    patient_ids: Sequence[Any],
    *,
    fars: Sequence[str] = ("1e-2", "1e-3"),
    repeats: int = 5,
    seed: int = 0,
    shipped: Calibration | None = None,
    snorm_top_k: int | None = None,
    max_impostor_pairs: int = 2_000_000,
) -> dict[str, Any]:
    """Calibrate on half of a site's patients, measure FAR and TAR on the other half, both ways,
    over ``repeats`` random halvings.

    Returns, per FAR, the promised FAR and the mean, min and max delivered FAR and mean TAR of:
    ``site`` (thresholds fitted on raw cosines of the calibration half); with ``shipped``, that
    calibration's thresholds (what a user gets without calibrating); with ``snorm_top_k``,
    ``snorm``: AS-norm as :func:`fit_site_calibration` does it, the cohort drawn from the
    calibration half and every pair of that half normalised leave-pair-out
    (``models/scoring/scorenorm.py``). AUC of the measured half, raw and normalised, comes with the first
    FAR.
    """
    e = np.asarray(embeddings, np.float32)
    ids = np.asarray(patient_ids)
    rows: dict[str, dict[str, list[float]]] = {f: {} for f in fars}

    def add(far: str, key: str, value: float) -> None:
        rows[far].setdefault(key, []).append(value)

    def pairs_of(index: np.ndarray) -> tuple[np.ndarray, ...]:
        g, i, gp, ip = pair_scores(e[index], ids[index], max_impostor_pairs=max_impostor_pairs)
        return g, i, gp, ip

    for r in range(repeats):
        first = half_split(ids, seed + r)
        for fit_mask in (first, ~first):
            fit_idx, test_idx = np.flatnonzero(fit_mask), np.flatnonzero(~fit_mask)
            g_fit, i_fit, _, _ = pairs_of(fit_idx)
            g_test, i_test, gp_test, ip_test = pairs_of(test_idx)
            site = Calibration.fit(g_fit, i_fit, fars=tuple(fars), source="site")
            for far in fars:
                delivered, tar = _far_tar(g_test, i_test, site.thresholds[far])
                add(far, "site_far", delivered)
                add(far, "site_tar", tar)
                if shipped is not None:
                    far_s, tar_s = _far_tar(g_test, i_test, shipped.threshold_for(far))
                    add(far, "shipped_far", far_s)
                    add(far, "shipped_tar", tar_s)
            add(fars[0], "auc_raw", _auc(g_test, i_test))
            if snorm_top_k:
                keys = [patient_key(str(p)) for p in ids]
                fit_keys = [keys[i] for i in fit_idx]
                cohort = fit_idx[choose_cohort(fit_keys, seed=seed + r)]
                norm = ScoreNorm(e[cohort], [keys[i] for i in cohort], top_k=snorm_top_k)
                _, _, gp_fit, ip_fit = pairs_of(fit_idx)
                normed = Calibration.fit(
                    norm.normalise_within(e[fit_idx], fit_keys, g_fit, gp_fit),
                    norm.normalise_within(e[fit_idx], fit_keys, i_fit, ip_fit),
                    fars=tuple(fars),
                )
                test_keys = [keys[i] for i in test_idx]
                gn_test = norm.normalise_within(e[test_idx], test_keys, g_test, gp_test)
                in_test = norm.normalise_within(e[test_idx], test_keys, i_test, ip_test)
                for far in fars:
                    delivered, tar = _far_tar(gn_test, in_test, normed.thresholds[far])
                    add(far, "snorm_far", delivered)
                    add(far, "snorm_tar", tar)
                add(fars[0], "auc_snorm", _auc(gn_test, in_test))

    out: dict[str, Any] = {"repeats": repeats, "fars": {}}
    for far, values in rows.items():
        summary: dict[str, Any] = {"promised": float(far)}
        for key, series in values.items():
            arr = np.asarray(series)
            summary[key] = {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}
        out["fars"][far] = summary
    return out


def _auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(genuine.size), np.zeros(impostor.size)]
    return float(roc_auc_score(y, np.r_[genuine, impostor]))


# --- the manifest form of ``cxr-reid calibrate`` -------------------------------------------------------


def calibrate_checkpoint(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    fars: Sequence[str] = FAR_KEYS,
    default_far: str = DEFAULT_FAR,
    bootstrap: int = 200,
    score_norm: bool = True,
    progress: bool = True,
) -> Calibration:
    """Embed every image of a site's manifest, fit a site calibration, and write a copy of the
    checkpoint (default: the shipped one) carrying it to ``out``. Nothing is written when refused.

    The manifest is read and its pair counts checked before the model loads, so a wrong path or a
    too-small site fails in a moment, not after embedding.
    """
    from models.data import check_files_exist, read_manifest
    from models.evaluation.evaluate import embed_samples
    from models.net.checkpoint import with_calibration
    from models.net.embedder import DEFAULT_CHECKPOINT, Embedder

    fars = tuple(dict.fromkeys(str(f) for f in fars))
    if default_far not in fars:
        raise CalibrationRefusedError(
            f"the default FAR {default_far} must be one of the FARs calibrated {list(fars)}"
        )
    samples = read_manifest(manifest)
    ids = [s.patient_id for s in samples]
    check_resolvable(pair_counts(ids), fars)
    check_files_exist(samples, manifest)
    source = Path(model) if model is not None else DEFAULT_CHECKPOINT
    embedder = Embedder.from_checkpoint(source)
    embeddings = embed_samples(embedder, samples, progress=progress)
    calibration = fit_site_calibration(
        embeddings,
        ids,
        fars=fars,
        default_far=default_far,
        bootstrap=bootstrap,
        score_norm=score_norm,
        provenance={
            "data": "manifest",
            "manifest": Path(manifest).name,
            "manifest_sha256": hashlib.sha256(Path(manifest).read_bytes()).hexdigest(),
            "model_id": embedder.model_id,
        },
    )
    with_calibration(source, out, calibration.to_dict())
    return calibration

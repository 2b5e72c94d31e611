"""Metrics against brute force on small cases, the pair sampler, the patient bootstrap, breakdowns, plots."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import metrics as M
from models.evaluation.metrics import (
    evaluate_embeddings,
    pair_scores,
    retrieval_metrics,
    save_plots,
    verification_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(
    n_patients: int, per_patient: int, *, noise: float, dim: int = 16, singles: int = 0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Patient centres plus per-image noise; ``singles`` extra one-image patients as distractors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_patients + singles, dim))
    labels = np.r_[np.repeat(np.arange(n_patients), per_patient), np.arange(n_patients, n_patients + singles)]
    return _unit(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels


# ------------------------------------------------------------------------------------------- brute force
def brute_pairs(e, labels):
    gen, imp = [], []
    for i, j in combinations(range(len(labels)), 2):
        (gen if labels[i] == labels[j] else imp).append(float(e[i] @ e[j]))
    return np.array(gen), np.array(imp)


def brute_auc(gen, imp):
    total = 0.0
    for g in gen:
        for s in imp:
            total += 1.0 if g > s else 0.5 if g == s else 0.0
    return total / (len(gen) * len(imp))


def brute_tar_at_far(gen, imp, far):
    best = 0.0
    for t in np.r_[gen, imp]:
        if np.mean(imp >= t) <= far:
            best = max(best, float(np.mean(gen >= t)))
    return best


def brute_retrieval(e, labels):
    sims = e @ e.T
    p1, rp, mapr = [], [], []
    for q in range(len(labels)):
        r = int(np.sum(labels == labels[q])) - 1
        if r < 1:
            continue
        ranked = [j for j in np.argsort(-sims[q], kind="stable") if j != q]
        rel = [labels[j] == labels[q] for j in ranked]
        p1.append(float(rel[0]))
        rp.append(sum(rel[:r]) / r)
        hits, ap = 0, 0.0
        for k in range(r):
            if rel[k]:
                hits += 1
                ap += hits / (k + 1)
        mapr.append(ap / r)
    return np.mean(p1), np.mean(rp), np.mean(mapr), len(p1)


@pytest.fixture(scope="module")
def small():
    # 12 patients x 3 images (noisy enough to make mistakes) + 6 single-image distractors
    return synthetic(12, 3, noise=0.9, dim=8, singles=6, seed=1)


def test_pair_scores_match_brute_force(small):
    e, labels = small
    g, imp, gp, ip = pair_scores(e, labels)
    bg, bi = brute_pairs(e, labels)
    assert len(g) == len(bg) == 12 * 3 and len(imp) == len(bi)
    assert np.allclose(np.sort(g), np.sort(bg), atol=1e-6)
    assert np.allclose(np.sort(imp), np.sort(bi), atol=1e-6)
    assert np.all(gp[:, 0] < gp[:, 1]) and np.all(labels[gp[:, 0]] == labels[gp[:, 1]])
    assert np.all(ip[:, 0] < ip[:, 1]) and np.all(labels[ip[:, 0]] != labels[ip[:, 1]])
    assert np.allclose(g, np.einsum("ij,ij->i", e[gp[:, 0]], e[gp[:, 1]]), atol=1e-6)


def test_verification_matches_brute_force(small):
    e, labels = small
    g, imp, _, _ = pair_scores(e, labels)
    v = verification_metrics(g, imp, threshold=0.5)
    assert v["auc"] == pytest.approx(brute_auc(g, imp), abs=1e-12)
    for key, far in M.FAR_TARGETS.items():
        assert v[f"tar_at_far_{key}"] == pytest.approx(brute_tar_at_far(g, imp, far))
    assert v["n_genuine_pairs"] == len(g) and v["n_impostor_pairs"] == len(imp)
    tp, fp = np.sum(g >= 0.5), np.sum(imp >= 0.5)
    assert "accuracy" not in v  # the share of all pairs right measures the mix of pairs, not the model
    assert v["balanced_accuracy"] == pytest.approx(0.5 * (tp / len(g) + 1 - fp / len(imp)))
    json.dumps(v, allow_nan=False)


def test_eer_on_a_hand_case():
    # at t = 0.7: one of four genuine rejected (0.3), one of four impostors accepted (0.75)
    g = np.array([0.9, 0.8, 0.7, 0.3])
    imp = np.array([0.75, 0.2, 0.1, 0.0])
    v = verification_metrics(g, imp)
    assert v["eer"] == pytest.approx(0.25)
    assert 0.3 <= v["eer_threshold"] <= 0.75
    assert np.mean(g < v["eer_threshold"]) == pytest.approx(0.25)


def test_retrieval_matches_brute_force(small):
    e, labels = small
    r = retrieval_metrics(e, labels)
    p1, rp, mapr, nq = brute_retrieval(e, labels)
    assert r["n_queries"] == nq == 36
    assert r["precision_at_1"] == pytest.approx(p1)
    assert r["r_precision"] == pytest.approx(rp)
    assert r["map_at_r"] == pytest.approx(mapr)
    assert 0 < r["map_at_r"] < 1  # the case is not trivial
    # string labels work the same
    r2 = retrieval_metrics(e, np.array([f"p{x}" for x in labels]))
    assert r2 == r


def test_retrieval_agrees_with_pytorch_metric_learning(small):
    torch = pytest.importorskip("torch")
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    e, labels = small
    calc = acc.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    pml = calc.get_accuracy(torch.tensor(e), torch.tensor(labels), ref_includes_query=True)
    ours = retrieval_metrics(e, labels)
    assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"])
    assert ours["r_precision"] == pytest.approx(pml["r_precision"])
    assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"])


def test_ties_are_pessimistic():
    e = _unit(np.ones((6, 4)))
    r = retrieval_metrics(e, np.array([0, 0, 1, 1, 2, 2]))
    assert r["precision_at_1"] == 0.0 and r["map_at_r"] == 0.0


def test_perfect_separation():
    e, labels = synthetic(20, 4, noise=0.01, dim=32, singles=5, seed=2)
    out = evaluate_embeddings(e, labels, bootstrap=20)
    assert out["auc"] == 1.0 and out["eer"] == 0.0
    assert out["precision_at_1"] == out["r_precision"] == out["map_at_r"] == 1.0
    assert out["tar_at_far_1e-2"] == 1.0
    assert out["ci"]["auc"][0] == pytest.approx(1.0)


def test_random_embeddings_are_at_chance():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(100), 4)
    e = _unit(rng.normal(size=(labels.size, 16)))
    out = evaluate_embeddings(e, labels, bootstrap=0)
    assert out["auc"] == pytest.approx(0.5, abs=0.04)
    assert out["eer"] == pytest.approx(0.5, abs=0.05)
    assert out["precision_at_1"] < 0.1
    assert out["ci"] == {}


def test_linear_pair_index_round_trip():
    for n in (2, 3, 17, 200):
        i, j = np.triu_indices(n, 1)
        a, b = M._linear_to_pair(np.arange(n * (n - 1) // 2), n)
        assert np.array_equal(a, i) and np.array_equal(b, j)


@pytest.mark.parametrize("cap", [4000, 20_000, 10**7])  # sparse sample, dense sample, all pairs
def test_impostor_sampling_caps_and_has_no_duplicates(cap):
    e, labels = synthetic(100, 3, noise=0.5, singles=20)
    n = labels.size
    n_imp_all = n * (n - 1) // 2 - 100 * 3
    g, imp, gp, ip = pair_scores(e, labels, max_impostor_pairs=cap, rng_seed=3)
    assert len(imp) == min(cap, n_imp_all) == len(ip)
    assert len(g) == 300
    lin = ip[:, 0] * n + ip[:, 1]
    assert np.unique(lin).size == len(lin)
    assert np.all(ip[:, 0] < ip[:, 1]) and np.all(labels[ip[:, 0]] != labels[ip[:, 1]])
    assert np.allclose(imp, np.einsum("ij,ij->i", e[ip[:, 0]], e[ip[:, 1]]), atol=1e-6)
    # deterministic for a seed
    _, imp2, _, ip2 = pair_scores(e, labels, max_impostor_pairs=cap, rng_seed=3)
    assert np.array_equal(ip, ip2)
    if cap < n_imp_all:  # roughly uniform: both ends of the index range are sampled
        assert ip[:, 0].min() < n // 10 and ip[:, 1].max() > n - n // 10


def test_bootstrap_weights_equal_an_explicit_resample():
    """The weighted shortcut must equal recomputing on a resampled data set with one label per draw,
    copies of one patient never compared with each other."""
    e, labels = synthetic(15, 3, noise=0.9, dim=8, singles=4, seed=7)
    g, imp, gp, ip = pair_scores(e, labels)
    sp = M._SortedPairs.build(g, imp, labels[gp[:, 0]], labels[ip[:, 0]], labels[ip[:, 1]], 0.5)
    n_pat = labels.max() + 1
    ones = sp.metrics(np.ones(n_pat, dtype=np.int64))
    direct = verification_metrics(g, imp, threshold=0.5)
    for k, v in ones.items():
        if v is not None and direct.get(k) is not None:
            assert v == pytest.approx(direct[k]), k

    counts = np.bincount(np.random.default_rng(1).integers(0, n_pat, n_pat), minlength=n_pat)
    assert counts.max() >= 2 and (counts == 0).any()
    # explicit: images of each draw with the draw's own label; pairs across copies excluded
    idx, draw, orig = [], [], []
    d = 0
    for p in range(n_pat):
        for _ in range(counts[p]):
            members = np.flatnonzero(labels == p)
            idx += members.tolist()
            draw += [d] * len(members)
            orig += [p] * len(members)
            d += 1
    idx, draw, orig = np.array(idx), np.array(draw), np.array(orig)
    gen, im = [], []
    for a, b in combinations(range(len(idx)), 2):
        s = float(e[idx[a]] @ e[idx[b]])
        if draw[a] == draw[b]:
            gen.append(s)
        elif orig[a] != orig[b]:
            im.append(s)
    expected = verification_metrics(np.array(gen), np.array(im), threshold=0.5)
    got = sp.metrics(counts)
    for k in ("auc", "eer", "tar_at_far_1e-2", "balanced_accuracy"):
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k

    # retrieval: queries weigh their patient's count, the gallery stays whole
    rd = M._Retrieval.build(e, labels)
    weights = counts[rd.q_code]
    got_r = rd.metrics(counts)
    assert got_r["precision_at_1"] == pytest.approx(np.average(rd.p1, weights=weights))
    assert got_r["map_at_r"] == pytest.approx(np.average(rd.ap_r, weights=weights))


@pytest.mark.slow
def test_bootstrap_ci_contains_point_and_narrows_with_more_patients():
    few_e, few_l = synthetic(40, 3, noise=1.3, singles=10, seed=11)
    many_e, many_l = synthetic(400, 3, noise=1.3, singles=100, seed=11)
    few = evaluate_embeddings(few_e, few_l, threshold=0.5, bootstrap=200, seed=1)
    many = evaluate_embeddings(many_e, many_l, threshold=0.5, bootstrap=200, seed=1)
    for out in (few, many):
        assert set(M.CI_KEYS) <= set(out["ci"])
        for k, (lo, hi) in out["ci"].items():
            assert lo <= hi
            assert lo - 1e-9 <= out[k] <= hi + 1e-9, (k, out[k], lo, hi)
    for k in ("auc", "eer", "precision_at_1", "map_at_r"):
        width = lambda o, k=k: o["ci"][k][1] - o["ci"][k][0]  # noqa: E731
        assert width(many) < width(few), k


def test_evaluate_keys_and_json(small):
    e, labels = small
    out = evaluate_embeddings(e, labels, threshold=0.5, bootstrap=10)
    keys = [
        *("auc", "eer", "eer_threshold", "tar_at_far_1e-2", "tar_at_far_1e-3", "tar_at_far_1e-4"),
        *("precision_at_1", "r_precision", "map_at_r", "n_images", "n_patients", "n_queries"),
        *("n_genuine_pairs", "n_impostor_pairs", "balanced_accuracy", "ci", "breakdown"),
    ]
    for key in keys:
        assert key in out, key
    assert out["n_images"] == 42 and out["n_patients"] == 18
    json.dumps(out, allow_nan=False)


def test_breakdown_by_view_pair_and_time_gap():
    e, labels = synthetic(60, 4, noise=0.8, singles=10, seed=4)
    n = labels.size
    rng = np.random.default_rng(0)
    views = rng.choice(["PA", "AP", "LATERAL"], size=n).tolist()
    views[0] = None  # unknown view is its own bucket
    offsets = rng.choice([0, 0, 10, 200, 1000], size=n).astype(float).tolist()
    offsets[1] = None  # missing offset: that image's genuine pairs have no gap
    out = evaluate_embeddings(e, labels, bootstrap=0, views=views, offsets=offsets)
    g, imp, gp, ip = pair_scores(e, labels)
    bd = out["breakdown"]

    vp = bd["view_pair"]
    assert {"AP-PA", "LATERAL-PA", "PA-PA"} <= set(vp)
    assert "PA-AP" not in vp
    norm = np.array(["unknown" if v is None else v for v in views])
    for key, row in vp.items():
        assert row["n_genuine_pairs"] >= M.MIN_BUCKET_PAIRS
        a, b = key.split("-")
        mask = lambda pairs, a=a, b=b: np.array(  # noqa: E731
            [sorted((norm[i], norm[j])) == sorted((a, b)) for i, j in pairs]
        )
        gs, ims = g[mask(gp)], imp[mask(ip)]
        assert row["n_genuine_pairs"] == gs.size and row["n_impostor_pairs"] == ims.size
        assert row["auc"] == pytest.approx(brute_auc(gs, ims))
        assert row["auc_vs_all_impostors"] == pytest.approx(verification_metrics(gs, imp)["auc"])

    tg = bd["time_gap_days"]
    off = np.array([np.nan if o is None else o for o in offsets])
    gap = np.abs(off[gp[:, 0]] - off[gp[:, 1]])
    expected = {"0": gap == 0, "1-30": (gap >= 1) & (gap <= 30), "31-365": (gap > 30) & (gap <= 365)}
    expected[">365"] = gap > 365
    for key, m in expected.items():
        if m.sum() < M.MIN_BUCKET_PAIRS:
            assert key not in tg
            continue
        assert tg[key]["n_genuine_pairs"] == m.sum()
        assert tg[key]["auc"] == pytest.approx(verification_metrics(g[m], imp)["auc"])
    assert sum(r["n_genuine_pairs"] for r in tg.values()) <= len(g) - np.sum((gp == 1).any(axis=1))

    # visit numbers (ChestX-ray14's follow-up #) get their own breakdown, never read as days
    visits = rng.integers(0, 8, size=n).astype(float).tolist()
    by_visit = evaluate_embeddings(e, labels, bootstrap=0, follow_ups=visits)["breakdown"]
    assert "time_gap_days" not in by_visit
    step = np.abs(np.array(visits)[gp[:, 0]] - np.array(visits)[gp[:, 1]])
    for key, m in {"0": step == 0, "1": step == 1, "2-5": (step >= 2) & (step <= 5)}.items():
        if m.sum() >= M.MIN_BUCKET_PAIRS:
            assert by_visit["follow_up_gap"][key]["n_genuine_pairs"] == m.sum()

    # a bucket under 5 pairs is skipped
    few_views = ["PA"] * n
    few_views[gp[0, 0]] = few_views[gp[0, 1]] = "AP"
    out = evaluate_embeddings(e, labels, bootstrap=0, views=few_views)
    assert "AP-AP" not in out["breakdown"]["view_pair"] and "PA-PA" in out["breakdown"]["view_pair"]


def test_no_genuine_pairs_is_an_error():
    e = _unit(np.random.default_rng(0).normal(size=(5, 4)))
    with pytest.raises(ValueError, match="genuine"):
        evaluate_embeddings(e, np.arange(5), bootstrap=0)


def test_save_plots(tmp_path, small):
    e, labels = small
    g, imp, _, _ = pair_scores(e, labels)
    paths = save_plots(g, imp, tmp_path / "plots", threshold=0.5, title="small")
    assert [p.name for p in paths] == ["roc.png", "score_histogram.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_import_is_light():
    code = (
        "import sys, models.evaluation.metrics, models.scoring.calibration; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

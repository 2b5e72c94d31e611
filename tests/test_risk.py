"""``cxr-reid risk``: the linkability arithmetic on synthetic vectors, the command on phantoms with
planted links, its refusals (exit 2) and the HTML report as Chromium shows it."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.analysis.defences import gaussian_blur, global_ssim, psnr
from app.analysis.risk import (
    BOUND_WIDTH,
    Links,
    RiskError,
    best_matches,
    choose_defences,
    exact_interval,
    expected_links,
    far_thresholds,
    headline_sentence,
    linkability,
    min_patients,
    read_gallery,
    too_small_reason,
)
from app.cli import main
from app.service.scoring import Scorer
from models.imaging.preprocess import Radiograph
from models.scoring.calibration import Calibration
from models.scoring.scorenorm import ScoreNorm
from tests.browser import needs_chromium, render

# --------------------------------------------------------------------------------------------------
# pure functions


def _links(best: list[int], score: list[float]) -> Links:
    return Links(np.asarray(best), np.asarray(score, dtype=np.float64), np.asarray(score, dtype=np.float64))


def test_linkability_counts_patients_links_and_wrong_links() -> None:
    # released: a twice (one image linked), b (links to x: wrong), c (below threshold), d (no reference,
    # links to a: wrong), an unusable image of e (best -1)
    release = ["a", "a", "b", "c", "d", "e"]
    reference = ["a", "b", "c", "x"]
    links = _links([0, 1, 3, 2, 0, -1], [0.95, 0.4, 0.9, 0.3, 0.8, math.nan])
    out = linkability(release, reference, links, {"1e-3": 0.5, "1e-4": 0.85})
    at3, at4 = out["1e-3"], out["1e-4"]
    assert at3["patients"] == 3  # a, b, c have reference images; d does not; e is unusable
    assert at3["linked"] == 1
    assert at3["wrong_link_images"] == 2 and at3["wrong_link_patients"] == 2  # b -> x, d -> a
    assert at3["flagged_images"] == 3
    assert at4["linked"] == 1 and at4["wrong_link_images"] == 1 and at4["flagged_images"] == 2
    # 3 patients cannot bound a share: no share, the exact interval and the reason instead
    assert at3["too_small"] and at3["share"] is None
    lo, hi = at3["share_ci"]
    assert 0.0 < lo < 1 / 3 < hi < 1.0
    assert at3["linked_ci"] == pytest.approx([lo * 3, hi * 3])
    assert "3 released patient(s) with a reference image" in at3["too_small_reason"]
    assert f"at least {min_patients()} patients" in at3["too_small_reason"]
    wlo, whi = at3["wrong_link_patients_ci"]  # 2 of the 4 released patients a, b, c, d
    assert 0 < wlo < 2 < whi < 4


def test_the_exact_interval_matches_clopper_pearson_and_never_collapses() -> None:
    """2 of 2 linked is not "[100%, 100%]": the exact interval's lower end is 0.025 ** (1 / 2)."""
    lo, hi = exact_interval(2, 2)
    assert lo == pytest.approx(0.025**0.5) and hi == 1.0
    assert exact_interval(0, 10) == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)])
    # a textbook value (Clopper-Pearson 1934 / any table): 3 of 10 -> [0.0667, 0.6525]
    assert exact_interval(3, 10) == pytest.approx([0.0667, 0.6525], abs=1e-4)
    assert exact_interval(0, 0) == [None, None]


def test_the_minimum_sample_is_the_first_whose_interval_can_be_narrow_enough() -> None:
    least = min_patients()
    assert exact_interval(0, least)[1] <= BOUND_WIDTH < exact_interval(0, least - 1)[1]
    assert exact_interval(least, least)[0] >= 1 - BOUND_WIDTH
    assert too_small_reason(least, exact_interval(least // 2, least)) is None
    reason = too_small_reason(least - 1, exact_interval(0, least - 1))
    assert reason is not None and f"which takes at least {least} patients" in reason


def test_below_the_minimum_every_figure_says_the_sample_is_too_small() -> None:
    two = ["a", "b"]
    small = linkability(two, two, _links([0, 1], [0.9, 0.9]), {"1e-3": 0.5})
    m = small["1e-3"]
    assert m["linked"] == 2 and m["too_small"] and m["share"] is None
    headline = headline_sentence({"measured": small}, "1e-3", True, 2)
    assert headline.startswith("2 of 2 patients linkable at FAR 1e-3, too few to bound the risk")
    assert f"at least {min_patients()} needed: any share from 15.8% to 100.0% fits" in headline
    assert "100.0% [" not in headline and "CI 2" not in headline
    n = min_patients()
    patients = [f"p{i}" for i in range(n)]
    big = linkability(patients, patients, _links(list(range(n)), [0.9] * n), {"1e-3": 0.5})
    assert not big["1e-3"]["too_small"] and big["1e-3"]["share"] == 1.0
    headline = headline_sentence({"measured": big}, "1e-3", True, n)
    assert headline.startswith(f"{n} of {n} patients (100.0%) linkable at FAR 1e-3 [95% CI ")
    assert big["1e-3"]["share_ci"][0] < 1.0  # even all linked is a bound, not a certainty


def test_the_interval_narrows_with_more_patients() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        patients = [f"p{i}" for i in range(n)]
        linked = rng.random(n) < 0.4
        links = _links(list(range(n)), [0.9 if hit else 0.1 for hit in linked])
        m = linkability(patients, patients, links, {"1e-3": 0.5})["1e-3"]
        assert m["share_ci"][0] <= m["share"] <= m["share_ci"][1]
        return m["share_ci"][1] - m["share_ci"][0]

    assert width(400) < width(40) / 2


def test_no_ground_truth_estimate_sums_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    calibration = Calibration.fit(rng.normal(0.8, 0.05, 500), rng.normal(0.2, 0.1, 5000))
    score = [0.95, 0.85, 0.3, math.nan]
    links = _links([0, 1, 2, -1], score)
    t = calibration.threshold_for("1e-3")
    out = expected_links(links, calibration, {"1e-3": t})
    p = calibration.probability(np.asarray(score[:3]))
    assert out["1e-3"]["flagged_images"] == 2
    assert out["1e-3"]["expected_true_links"] == pytest.approx(float(p[0] + p[1]))
    assert out["any"]["expected_true_links"] == pytest.approx(float(p.sum()))


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_best_matches_raw_cosine_skips_unusable_rows() -> None:
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(30, 16)))
    release = _unit(reference[[3, 7, 11]] + 0.05 * rng.normal(size=(3, 16)))
    release_ok = np.asarray([True, False, True])
    ref_ok = np.ones(30, dtype=bool)
    ref_ok[11] = False  # its copy's best match must be another image
    calibration = Calibration(thresholds={"1e-3": 0.5})
    links = best_matches(release, release_ok, reference, ref_ok, calibration=calibration)
    assert links.best[0] == 3 and links.best[1] == -1 and links.best[2] != 11
    assert links.score[0] == pytest.approx(float(release[0] @ reference[3]), abs=1e-6)
    assert math.isnan(links.score[1])


def test_best_matches_with_as_norm_scores_as_the_service_does() -> None:
    rng = np.random.default_rng(1)
    cohort = _unit(rng.normal(size=(60, 16)))
    norm = ScoreNorm(cohort, top_k=5)
    calibration = Calibration(thresholds={"1e-3": 2.0}, score_norm=norm.to_dict())
    reference = _unit(rng.normal(size=(25, 16)))
    release = _unit(reference[[0, 5]] + 0.3 * rng.normal(size=(2, 16)))
    keys = [""] * 25
    links = best_matches(
        release, np.ones(2, bool), reference, np.ones(25, bool), calibration=calibration, reference_keys=keys
    )
    scorer = Scorer(calibration)
    for i in range(2):
        raw, decided = scorer.scores(release[i], "", reference, keys)
        top = np.argsort(-raw)[:20]  # the candidates best_matches re-scores
        j = top[np.argmax(decided[top])]
        assert links.best[i] == j
        assert links.score[i] == pytest.approx(decided[j], rel=1e-5)
        assert links.cosine[i] == pytest.approx(raw[j], abs=1e-6)


def test_defences_and_fidelity_figures() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((60, 80)).astype(np.float32)
    blurred = gaussian_blur(pixels, 2.0)
    assert blurred.shape == pixels.shape and blurred.std() < pixels.std() / 2
    assert blurred.mean() == pytest.approx(pixels.mean(), rel=1e-3)
    assert psnr(pixels, pixels) == math.inf and global_ssim(pixels, pixels) == pytest.approx(1.0)
    assert psnr(pixels, blurred) < 30 and global_ssim(pixels, blurred) < 1.0
    image = Radiograph(pixels=pixels, source_format="png")
    defences = {d.name: d for d in choose_defences("all", 64)}
    cropped, shown = defences["crop-55"].apply(image, seed=0)
    assert cropped.pixels.shape == (33, 44) and shown.pixels.shape == pixels.shape
    small, _ = defences["lowres-quarter"].apply(image, seed=0)
    assert max(small.pixels.shape) == 16 and small.shape == (60, 80)  # stored geometry kept
    a, _ = defences["noise-5"].apply(image, seed=3)
    b, _ = defences["noise-5"].apply(image, seed=3)
    assert np.array_equal(a.pixels, b.pixels) and not np.array_equal(a.pixels, pixels)


def test_choosing_defences_and_fars() -> None:
    assert [d.name for d in choose_defences("blur,crop-75", 128)] == ["blur-1", "blur-2", "crop-75"]
    assert [d.family for d in choose_defences("resolution", 128)] == ["lowres", "lowres"]
    assert choose_defences("none", 128) == []
    with pytest.raises(RiskError, match="unknown defence 'sharpen'"):
        choose_defences("sharpen", 128)
    rng = np.random.default_rng(0)
    calibration = Calibration.fit(rng.normal(0.8, 0.05, 500), rng.normal(0.2, 0.1, 5000))
    fars = far_thresholds("1e-4, 1e-2,1e-3", calibration)
    assert list(fars) == ["1e-2", "1e-3", "1e-4"] and fars["1e-3"] == calibration.thresholds["1e-3"]
    with pytest.raises(RiskError, match="--far 0.9"):
        far_thresholds("0.9", calibration)


# --------------------------------------------------------------------------------------------------
# the command on phantoms


@pytest.fixture(scope="module")
def risk_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test net (same seeded weights as ``tiny_checkpoint``) with a calibration fitted to what
    it really scores on phantoms: different phantoms score 0.56-0.89 with random weights, so its
    thresholds at FAR 1e-3 / 1e-4 (about 0.92 / 0.95) pass copies of an image (1.0) and no other pair."""
    from conftest import save_random_checkpoint

    return save_random_checkpoint(
        tmp_path_factory.mktemp("risk-model") / "tiny-risk.pt",
        name="tiny-risk",
        seed=0,
        embedding_dim=128,
        genuine=(0.9, 0.05, 500),
        impostor=(0.76, 0.05, 20_000),
        training_summary={"note": "random weights for tests"},
        metrics={},
    )


def _write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def planted(phantom_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(release, reference) manifests with known links. Reference: study 0 of the 6 phantom patients.
    Release: patients 0-2 as re-saved copies of their reference image (planted links), patients 3-5
    as study 1 (in the reference only through another study), and a "stranger" who is not in the
    reference but whose image is a copy of patient 3's reference image (a planted wrong link)."""
    root = tmp_path_factory.mktemp("risk-sets")
    with phantom_set.open() as handle:
        rows = list(csv.DictReader(handle))
    study = {(r["patient_id"], Path(r["path"]).stem): phantom_set.parent / r["path"] for r in rows}
    patients = sorted({r["patient_id"] for r in rows})
    reference = _write_manifest(root / "reference.csv", [(str(study[p, "0"]), p) for p in patients])
    (root / "release").mkdir()
    released = []
    for p in patients[:3]:
        copy = root / "release" / f"{p}-copy.png"
        Image.open(study[p, "0"]).save(copy, compress_level=1)  # other bytes, same picture
        released.append((str(copy), p))
    released += [(str(study[p, "1"]), p) for p in patients[3:]]
    stranger = root / "release" / "stranger.png"
    Image.open(study[patients[3], "0"]).save(stranger, compress_level=9)
    released.append((str(stranger), "stranger"))
    return _write_manifest(root / "release.csv", released), reference


@pytest.fixture(scope="module")
def risk_run(
    planted: tuple[Path, Path], risk_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    release, reference = planted
    out = tmp_path_factory.mktemp("risk-out")
    code = main(
        [
            "risk",
            str(release),
            "--reference",
            str(reference),
            "--out",
            str(out),
            "--model",
            str(risk_checkpoint),
            "--far",
            "1e-3,1e-4",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_risk_finds_the_planted_links_within_its_interval(risk_run: Path) -> None:
    report = json.loads((risk_run / "risk.json").read_text())
    assert report["ground_truth"] is True
    for far in ("1e-3", "1e-4"):
        m = report["linkability"]["measured"][far]
        assert m["patients"] == 6 and m["linked"] == 3, m  # the three copies, not the other studies
        lo, hi = m["linked_ci"]
        assert lo <= 3 <= hi
        assert m["wrong_link_images"] == 1 and m["wrong_link_patients"] == 1  # the stranger
        assert m["too_small"] and m["share"] is None  # 6 patients cannot bound a share
    assert report["interval"]["min_patients"] == min_patients()
    assert report["headline"].startswith("3 of 6 patients linkable at FAR 1e-3, too few to bound the risk")
    rows = {Path(r["path"]).name: r for r in report["images"]}
    assert rows["stranger.png"]["link"] == "wrong" and rows["stranger.png"]["linkable"]["1e-3"]
    assert rows["stranger.png"]["best_reference_patient_id"] != "stranger"
    copies = [r for name, r in rows.items() if name.endswith("-copy.png")]
    assert len(copies) == 3 and all(r["link"] == "correct" and r["score"] > 0.999 for r in copies)
    # every defence was measured, with a fidelity cost, on the same images
    names = [d["name"] for d in report["defences"]]
    assert names[0] == "none" and {"blur-1", "noise-15", "lowres-quarter", "crop-75"} <= set(names)
    for row in report["defences"][1:]:
        assert row["usable"] == 7 and row["ssim"] < 1.0 and row["measured"]["1e-3"]["patients"] == 6
    curve = report["curve"]
    assert [p["far"] for p in curve] == sorted(p["far"] for p in curve) and len(curve) >= 5


@pytest.mark.browser
@needs_chromium
def test_risk_report_renders_with_counts_rows_and_thumbnails(risk_run: Path) -> None:
    dom = render(risk_run / "report.html")
    assert "3 of 6 patients linkable at FAR 1e-3, too few to bound the risk" in dom
    assert 'id="too-small"' in dom and "6 released patient(s) with a reference image" in dom
    assert 'id="no-curve"' in dom and "50.0%" not in dom
    assert len(re.findall(r'<tr data-defence="', dom)) == 9  # none + 8 defences
    assert len(re.findall(r'<tr class="pair" data-link="', dom)) == 7
    assert 'data-link="wrong"' in dom and "wrong link" in dom
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert images == loaded == 14


def test_risk_without_ground_truth_prints_an_estimate(
    planted: tuple[Path, Path], risk_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release, reference = planted
    code = main(
        [
            "risk",
            str(release.parent / "release"),  # a folder of PNGs: nobody's patient id is known
            "--reference",
            str(reference),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(risk_checkpoint),
            "--far",
            "1e-3",
            "--defences",
            "none",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ground_truth"] is False and "images" not in summary
    estimate = summary["linkability"]["estimate"]["1e-3"]
    assert estimate["flagged_images"] == 4 and estimate["expected_true_links"] > 3  # 3 copies + stranger
    assert "estimate" in summary["headline"] and "no ground truth" in summary["headline"]
    assert [d["name"] for d in summary["defences"]] == ["none"]
    assert "no ground truth" in (tmp_path / "out" / "report.html").read_text().lower()


def test_risk_reads_a_gallery_and_refuses_another_models(
    planted: tuple[Path, Path], risk_checkpoint: Path, tmp_path: Path
) -> None:
    from index import Gallery, NewImage
    from models.net.embedder import Embedder

    embedder = Embedder.from_checkpoint(risk_checkpoint)
    _, reference = planted
    with reference.open() as handle:
        rows = list(csv.DictReader(handle))
    vectors = embedder.embed([r["path"] for r in rows])
    with Gallery(tmp_path / "g", dim=embedder.dim, model_id=embedder.model_id) as gallery:
        gallery.add(vectors, [NewImage(patient_id=r["patient_id"], source_path=r["path"]) for r in rows])
    found = read_gallery(tmp_path / "g", embedder)
    assert found.kind == "gallery" and found.patient_ids == [r["patient_id"] for r in rows]
    assert np.allclose(found.vectors, vectors) and all(i.path.is_file() for i in found.images)
    with Gallery(tmp_path / "other", dim=embedder.dim, model_id="another-model") as gallery:
        gallery.add(vectors[:2], [NewImage(patient_id="p", source_path=rows[0]["path"])] * 2)
    with pytest.raises(RiskError, match="holds vectors of model 'another-model'"):
        read_gallery(tmp_path / "other", embedder)


@pytest.mark.parametrize(
    "case", ["missing-reference", "empty-folder", "bad-manifest", "bad-far", "other-model"]
)
def test_risk_exit_2_with_a_message(
    case: str,
    planted: tuple[Path, Path],
    risk_checkpoint: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    release, reference = planted
    args = {"release": str(release), "reference": str(reference), "far": "1e-3"}
    expected = {
        "missing-reference": "nowhere.csv not found",
        "empty-folder": "no DICOM, PNG, JPEG or TIFF files",
        "bad-manifest": "missing column(s) patient_id",
        "bad-far": "--far 0.7",
        "other-model": "holds vectors of model 'another-model'",
    }[case]
    if case == "missing-reference":
        args["reference"] = str(tmp_path / "nowhere.csv")
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args["release"] = str(tmp_path / "empty")
    elif case == "bad-manifest":
        (tmp_path / "bad.csv").write_text("path,patient\nx.png,p\n")
        args["reference"] = str(tmp_path / "bad.csv")
    elif case == "bad-far":
        args["far"] = "0.7"
    else:
        from index import Gallery, NewImage

        with Gallery(tmp_path / "g", dim=128, model_id="another-model") as gallery:
            gallery.add(np.eye(128, dtype=np.float32)[:1], [NewImage(patient_id="p", source_path="x.png")])
        args["reference"] = str(tmp_path / "g")
    code = main(
        [
            "risk",
            args["release"],
            "--reference",
            args["reference"],
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(risk_checkpoint),
            "--far",
            args["far"],
            "--defences",
            "none",
            "--no-progress",
        ]
    )
    assert code == 2
    assert expected in caplog.text
    assert "Traceback" not in caplog.text


# --------------------------------------------------------------------------------------------------
# bench/risk.py


def _bench() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_risk", Path(__file__).parents[1] / "bench" / "risk.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_split_keeps_earlier_images_of_overlap_patients_in_the_reference(
    phantom_set: Path, tmp_path: Path
) -> None:
    from models.data import read_manifest

    release, reference, counts = _bench().split_release(phantom_set, tmp_path, seed=0)
    assert counts == {"overlap": 3, "release_only": 2, "reference_only": 1}
    released, held = read_manifest(release), read_manifest(reference)
    assert all(Path(s.path).is_file() for s in released + held)
    assert not {s.path for s in released} & {s.path for s in held}
    both = {s.patient_id for s in released} & {s.patient_id for s in held}
    assert len(both) == 3
    for patient in both:  # the attacker holds the earlier studies
        first_released = min(s.offset_days for s in released if s.patient_id == patient)
        assert max(s.offset_days for s in held if s.patient_id == patient) <= first_released


def test_bench_without_data_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench().main(["--data-dir", str(tmp_path / "nowhere")]) == 0
    assert "nothing to measure" in capsys.readouterr().out


def test_readme_example_manifests_load() -> None:
    from app.analysis.corpus import load_corpus

    examples = Path(__file__).parents[1] / "examples" / "radiographs"
    release = load_corpus([examples / "risk-release.csv"])
    reference = load_corpus([examples / "risk-reference.csv"])
    assert {i.patient_id for i in release} == {"A", "B", "C"}
    assert {i.patient_id for i in reference} == {"A", "B"}


@pytest.mark.slow
@pytest.mark.browser
@needs_chromium
def test_the_readme_example_says_two_patients_cannot_bound_the_risk(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The privacy guide's `cxr-reid risk` example (two children linked, the shipped model), as written: the
    headline, the CLI line, risk.json and the report in Chromium say the sample is too small to bound
    the risk. CXR_REID_RISK_SCREENSHOT=docs/risk-too-small.png keeps the guide's picture of it."""
    import logging
    import os

    from tests.browser import screenshot

    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs" / "privacy.md").read_text()  # the guide that holds the example
    command = next(line for line in readme.splitlines() if line.startswith("cxr-reid risk examples/"))
    said = readme.split(command, 1)[1].split("```", 1)[0]
    said = " ".join(line.lstrip("#").strip() for line in said.strip().splitlines())
    said = said.removeprefix("INFO cxr_reid: ").split("; report:", 1)[0]
    argv = command.split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "risk-example")
    monkeypatch.chdir(root)  # as written, from the repository root
    caplog.set_level(logging.INFO)

    assert main([*argv, "--json", "--no-progress"]) == 0

    summary = json.loads(capsys.readouterr().out)
    m = summary["linkability"]["measured"]["1e-3"]
    assert m["patients"] == 2 and m["linked"] == 2 and m["too_small"] and m["share"] is None
    assert m["share_ci"] == pytest.approx([0.025**0.5, 1.0])
    assert summary["headline"] == said  # the guide quotes what the command says
    assert f"{said}; report:" in caplog.text
    page = tmp_path / "risk-example" / "report.html"
    dom = render(page)
    assert 'id="too-small"' in dom and "too few to bound" in dom and "100.0% [" not in dom
    shot = screenshot(page, tmp_path / "risk.png", size="1100,1000")
    if os.environ.get("CXR_REID_RISK_SCREENSHOT"):
        Image.open(shot).convert("RGB").quantize(colors=128).save(
            os.environ["CXR_REID_RISK_SCREENSHOT"], optimize=True
        )

"""cxr-reid audit: planted leaks, mislabels, duplicate identities, copies and outliers are found, as
clusters, and nothing else; exit codes; the cache; the HTML report as Chromium renders it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from browser import needs_chromium, render
from conftest import dicom_dataset
from PIL import Image

from app.analysis.audit import find_issues
from app.analysis.corpus import SIGNATURE_SIDE, CorpusImage, EmbeddedCorpus
from app.cli import main
from models.scoring.calibration import Calibration


def cli(*args: object) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- the findings, planted
def _signature(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A radiograph-like layout (the shared base) with image-specific detail: two different images
    correlate about 0.7, far below a near-exact copy."""
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def planted_corpus() -> tuple[EmbeddedCorpus, Calibration]:
    """12 patients x 3 images (unit vectors around a centre per patient), then one of each error."""
    rng = np.random.default_rng(7)
    dim = 48
    yy, xx = np.mgrid[0:SIGNATURE_SIDE, 0:SIGNATURE_SIDE]
    base = (128 + 90 * np.cos((xx - 16) / 6.0) * np.exp(-((yy - 16) ** 2) / 300)).reshape(-1)
    centres = {f"p{p}": rng.normal(size=dim) for p in range(12)}

    def vector(centre: np.ndarray) -> np.ndarray:
        v = centre + rng.normal(size=dim) * 0.25
        return v / np.linalg.norm(v)

    rows: list[tuple[str, str | None, np.ndarray, np.ndarray]] = []  # id, split, vector, signature
    for p, centre in centres.items():
        for _ in range(3):
            rows.append(
                (p, "test" if p in ("p9", "p10", "p11") else "train", vector(centre), _signature(rng, base))
            )
    # leakage by id: p0 also in test
    rows.append(("p0", "test", vector(centres["p0"]), _signature(rng, base)))
    # leakage by image: p1's anatomy under a new id in test
    rows.append(("alias-of-p1", "test", vector(centres["p1"]), _signature(rng, base)))
    # mislabel: an image of p3 filed under p2
    rows.append(("p2", "train", vector(centres["p3"]), _signature(rng, base)))
    # duplicate identity: p4 also under "p4-again", same split
    rows += [("p4-again", "train", vector(centres["p4"]), _signature(rng, base)) for _ in range(2)]
    vectors = np.stack([r[2] for r in rows]).astype(np.float32)
    signatures = np.stack([r[3] for r in rows])
    n = len(rows)
    shas = [f"sha{i}" for i in range(n)]
    pixels = [f"px{i}" for i in range(n)]
    ids = [r[0] for r in rows]
    splits = [r[1] for r in rows]
    errors: list[str | None] = [None] * n
    # an exact copy of p5's first image (same bytes), a near-exact re-encoding of p6's first image
    first5, first6 = ids.index("p5"), ids.index("p6")
    extra = [(first5, "identical"), (first6, "near")]
    for source, how in extra:
        vectors = np.vstack([vectors, vectors[source] + (0 if how == "identical" else 0.003)])
        vectors[-1] /= np.linalg.norm(vectors[-1])
        near = np.clip(signatures[source].astype(int) + rng.integers(-2, 3, signatures.shape[1]), 0, 255)
        signatures = np.vstack(
            [signatures, signatures[source] if how == "identical" else near.astype(np.uint8)]
        )
        shas.append(shas[source] if how == "identical" else f"sha-near{source}")
        pixels.append(pixels[source] if how == "identical" else f"px-near{source}")
        ids.append(ids[source])
        splits.append(splits[source])
        errors.append(None)
    # outliers: a blank file, an inverted image, a picture of something else
    for kind in ("blank", "inverted", "other"):
        vectors = np.vstack([vectors, np.zeros(dim) if kind == "blank" else vector(rng.normal(size=dim))])
        sig = {"blank": np.zeros_like(base), "inverted": 255 - base, "other": 255.0 * (yy > 16).reshape(-1)}[
            kind
        ]
        signatures = np.vstack([signatures, np.clip(sig, 0, 255).astype(np.uint8)])
        shas.append(f"sha-{kind}")
        pixels.append(f"px-{kind}")
        ids.append(f"solo-{kind}")
        splits.append("train")
        errors.append("the file is blank or nearly constant (1 grey level(s))" if kind == "blank" else None)
    images = [
        CorpusImage(path=Path(f"/x/{i}.png"), shown=f"{i}.png", patient_id=pid, split=split, key=f"set:{pid}")
        for i, (pid, split) in enumerate(zip(ids, splits, strict=True))
    ]
    corpus = EmbeddedCorpus(images, vectors.astype(np.float32), signatures, shas, pixels, errors, "synthetic")
    genuine = [float(vector(c) @ vector(c)) for c in centres.values() for _ in range(40)]
    impostor = [float(vector(rng.normal(size=dim)) @ vector(rng.normal(size=dim))) for _ in range(20_000)]
    return corpus, Calibration.fit(np.asarray(genuine), np.asarray(impostor))


def test_every_planted_error_is_found_once_as_a_cluster_and_nothing_else() -> None:
    corpus, calibration = planted_corpus()
    findings, stats = find_issues(corpus, calibration, calibration.threshold_for("1e-3"))
    by_type: dict[str, list] = {}
    for finding in findings:
        by_type.setdefault(finding.type, []).append(finding)
    ids = [image.patient_id for image in corpus.images]

    def patients(finding) -> set[str]:  # noqa: ANN001
        return {ids[i] for i in finding.images}

    assert sorted(by_type) == ["duplicate_identity", "exact_duplicate", "leakage", "mislabel", "outlier"]
    assert sorted(sorted(patients(f)) for f in by_type["leakage"]) == [["alias-of-p1", "p1"], ["p0"]]
    by_image = next(f for f in by_type["leakage"] if "alias-of-p1" in patients(f))
    assert by_image.kind == "by image" and by_image.pairs and all(s >= 0.7 for _, _, s in by_image.pairs)
    (mislabel,) = by_type["mislabel"]
    assert patients(mislabel) >= {"p2", "p3"} and mislabel.kind == "matches another patient"
    assert [ids[i] for i in mislabel.flagged] == ["p2"] and "like p3" in mislabel.summary
    (alias,) = by_type["duplicate_identity"]
    assert patients(alias) == {"p4", "p4-again"} and alias.summary.startswith("2 ids look like one person")
    copies = sorted((f.kind, sorted(patients(f))) for f in by_type["exact_duplicate"])
    assert copies == [("identical files", ["p5"]), ("near-identical pictures", ["p6"])]
    outliers = sorted((f.kind, ids[f.images[0]]) for f in by_type["outlier"])
    assert outliers == [
        ("blank", "solo-blank"),
        ("inverted", "solo-inverted"),
        ("unlike the set", "solo-other"),
    ]
    # the histograms' statistics: every usable image has a typicality; labelled ones an own-best score;
    # a set this small has its every different-patient pair scored once (not 20,000 draws of them)
    assert np.isfinite(stats["typicality"][corpus.ok]).all()
    assert stats["impostors"].size == int(stats["impostor_pairs"]) > 900
    assert [f.id for f in by_type["leakage"]] == ["leakage-1", "leakage-2"]


def test_a_misfiled_image_is_a_mislabel_not_two_ids_of_one_person() -> None:
    """One image of p3 filed under p2, close enough to p2's look not to fall under the plain mislabel
    bar: it matches p3's images and none of p2's, so it is misfiled, not "p2 and p3 are one person"."""
    _, calibration = planted_corpus()
    rng = np.random.default_rng(5)
    dim = 48
    yy, xx = np.mgrid[0:SIGNATURE_SIDE, 0:SIGNATURE_SIDE]
    base = (128 + 90 * np.cos((xx - 16) / 6.0) * np.exp(-((yy - 16) ** 2) / 300)).reshape(-1)
    centres = {f"p{p}": rng.normal(size=dim) for p in range(12)}

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    rows = [(p, unit(c + rng.normal(size=dim) * 0.25)) for p, c in centres.items() for _ in range(4)]
    misfiled = 8  # p2's first image: p3's anatomy with a little of p2's look
    rows[misfiled] = (
        "p2",
        unit(unit(centres["p3"]) + 0.3 * unit(centres["p2"]) + rng.normal(size=dim) * 0.02),
    )
    n = len(rows)
    corpus = EmbeddedCorpus(
        [
            CorpusImage(
                path=Path(f"/x/{i}.png"), shown=f"{i}.png", patient_id=p, split="train", key=f"set:{p}"
            )
            for i, (p, _) in enumerate(rows)
        ],
        np.stack([v for _, v in rows]).astype(np.float32),
        np.stack([_signature(rng, base) for _ in rows]),
        [f"sha{i}" for i in range(n)],
        [f"px{i}" for i in range(n)],
        [None] * n,
        "synthetic",
    )
    threshold = calibration.threshold_for("1e-3")
    findings, stats = find_issues(corpus, calibration, threshold)
    assert float(stats["mislabel_below"]) < stats["own_best"][misfiled] < threshold  # not the plain bar
    (finding,) = findings
    assert (finding.type, finding.kind, finding.flagged) == (
        "mislabel",
        "filed under another patient",
        [misfiled],
    )
    assert finding.summary.startswith("8.png is filed under p2 but looks like p3: it matches 4 of p3's 4")


def test_a_clean_set_has_no_findings() -> None:
    corpus, calibration = planted_corpus()
    keep = [
        i
        for i, image in enumerate(corpus.images)
        if image.patient_id in {f"p{p}" for p in range(12)} and i < 36  # the 12 x 3 originals
    ]
    clean = EmbeddedCorpus(
        [corpus.images[i] for i in keep],
        corpus.vectors[keep],
        corpus.signatures[keep],
        [corpus.sha256[i] for i in keep],
        [corpus.pixel_hash[i] for i in keep],
        [None] * len(keep),
        "synthetic",
    )
    findings, _ = find_issues(clean, calibration, calibration.threshold_for("1e-3"))
    assert findings == []


# ------------------------------------------------------------------------------- the command, files
@pytest.fixture
def planted_set(phantom_set: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """One study per phantom patient (a random-weight model cannot tell a patient's studies apart, but
    scores identical pictures 1.0), plus a copy, a copy under a new id in another split, an id in
    two splits, an unreadable file and a blank one."""
    rows = list(csv.DictReader(phantom_set.open()))
    firsts = {}
    for row in rows:
        firsts.setdefault(row["patient_id"], row)
    folder = tmp_path / "set"
    shutil.copytree(phantom_set.parent / "images", folder / "images")
    kept = [dict(r, path=r["path"]) for r in firsts.values()]
    train = next(r for r in kept if r["split"] == "train")
    other = next(r for r in kept if r["split"] != "train" and r is not train)
    shutil.copy(folder / train["path"], folder / "images" / "copy.png")
    planted = {"copy": "images/copy.png", "renamed": train["path"], "two-splits": other["path"]}
    kept.append(dict(train, path="images/copy.png"))  # same bytes, same patient: exact duplicate
    kept.append(dict(train, patient_id="renamed", split=other["split"]))  # same file, new id, other split
    second = next(r for r in rows if r["patient_id"] == other["patient_id"] and r["path"] != other["path"])
    kept.append(dict(second, split="train" if other["split"] != "train" else "test"))  # id in two splits
    (folder / "images" / "broken.png").write_bytes(Image.new("L", (1, 1)).tobytes() + b"\x89PNG broken")
    Image.new("L", (96, 96), 128).save(folder / "images" / "blank.png")
    kept.append(dict(train, path="images/broken.png", patient_id="b1"))
    kept.append(dict(train, path="images/blank.png", patient_id="b2"))
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    planted.update(train=train["patient_id"], other=other["patient_id"])
    return manifest, planted


STRICT = ("--threshold", "0.9999", "--no-progress")


def test_audit_command_finds_the_planted_files_and_exits_1(
    tiny_checkpoint: Path,
    planted_set: tuple[Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    manifest, planted = planted_set
    out = tmp_path / "report"
    assert cli("audit", manifest, "--out", out, "--model", tiny_checkpoint, *STRICT) == 1
    summary = capsys.readouterr().out
    assert "FINDINGS:" in summary and "report.html" in summary
    report = json.loads((out / "findings.json").read_text())
    # the copies of the train image are reported once, under the leakage they cause, not again as copies
    assert report["counts"] == {
        "leakage": 2,
        "mislabel": 0,
        "duplicate_identity": 0,
        "exact_duplicate": 0,
        "outlier": 2,
    }
    leaks = {tuple(f["patient_ids"]): f for f in report["findings"] if f["type"] == "leakage"}
    assert set(leaks) == {(planted["other"],), tuple(sorted([planted["train"], "renamed"]))}
    assert leaks[(planted["other"],)]["kind"] == "by id"
    assert leaks[tuple(sorted([planted["train"], "renamed"]))]["pairs"][0]["score"] == pytest.approx(1.0)
    copied = leaks[tuple(sorted([planted["train"], "renamed"]))]
    assert "also identical files: 3 identical files under 2 patient ids" in copied["summary"]
    assert planted["copy"] in {
        image["path"] for image in copied["images"]
    }  # paths as the manifest gives them
    flagged = [(i["path"], i["patient_id"]) for f in report["findings"] for i in f["images"] if i["flagged"]]
    assert len(flagged) == len(set(flagged))  # each file pointed at by one finding
    outliers = {f["kind"]: f["images"][0]["path"] for f in report["findings"] if f["type"] == "outlier"}
    assert outliers == {"unreadable": "images/broken.png", "blank": "images/blank.png"}
    rows = list(csv.DictReader((out / "findings.csv").open()))
    assert {r["finding"] for r in rows} == {f["id"] for f in report["findings"]}
    assert all(not Path(r["path"]).is_absolute() for r in rows)

    # a re-run reads every embedding from the cache and finds the same
    assert cli("audit", manifest, "--out", out, "--model", tiny_checkpoint, *STRICT, "--json") == 1
    again = json.loads(capsys.readouterr().out)
    assert again["counts"] == report["counts"] and list((out / "cache").rglob("part-*.npz"))


def test_audit_command_exit_codes(
    tiny_checkpoint: Path, phantom_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = list(csv.DictReader(phantom_set.open()))
    one_each = {}
    for row in rows:
        one_each.setdefault(row["patient_id"], row)
    clean = phantom_set.parent / "one-each.csv"
    with clean.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(one_each.values())
    model = ("--model", tiny_checkpoint)
    assert cli("audit", clean, "--out", tmp_path / "a", *model, *STRICT) == 0
    assert "CLEAN" in capsys.readouterr().out
    assert cli("audit", tmp_path / "missing.csv", "--out", tmp_path / "b", *model) == 2
    (tmp_path / "empty").mkdir()
    assert cli("audit", tmp_path / "empty", "--out", tmp_path / "c", *model) == 2
    assert cli("audit", clean, "--out", tmp_path / "d", *model, "--far", "1e-3", "--threshold", "0.5") == 2
    (tmp_path / "file").write_text("x")
    assert cli("audit", clean, "--out", tmp_path / "file", *model) == 2


def test_audit_of_dicom_folders_takes_ids_from_tags_and_splits_from_folders(
    tiny_checkpoint: Path, phantom_images: list[Path], tmp_path: Path
) -> None:
    root = tmp_path / "pacs-export"
    for split, patients in (("train", ["A", "B"]), ("test", ["C", "A"])):
        (root / split).mkdir(parents=True)
        for k, patient in enumerate(patients):
            pixels = np.asarray(Image.open(phantom_images[3 * (ord(patient) - 65) + k]), dtype=np.uint16)
            ds = dicom_dataset(pixels, Modality="DX", PatientID=patient, ViewPosition="PA")
            ds.save_as(root / split / f"{patient}{k}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    code = cli("audit", root, "--split-level", "0", "--out", out, "--model", tiny_checkpoint, *STRICT)
    report = json.loads((out / "findings.json").read_text())
    assert code == 1 and report["splits"] == {"test": 2, "train": 2} and report["patients"] == 3
    (leak,) = [f for f in report["findings"] if f["type"] == "leakage"]
    assert leak["patient_ids"] == ["A"] and leak["splits"] == ["test", "train"]


@pytest.mark.browser
@needs_chromium
def test_audit_report_renders_in_chromium(
    tiny_checkpoint: Path, planted_set: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    manifest, _ = planted_set
    out = tmp_path / "report"
    cli("audit", manifest, "--out", out, "--model", tiny_checkpoint, *STRICT)
    report = json.loads((out / "findings.json").read_text())
    dom = render(out / "report.html")
    for kind, count in report["counts"].items():
        assert f'data-count="{kind}">{count}<' in dom
    assert dom.count('class="finding"') == len(report["findings"])
    images = int(dom.split('data-images="')[1].split('"')[0])
    loaded = int(dom.split('data-images-loaded="')[1].split('"')[0])
    assert images > 0 and loaded == images  # every thumbnail decodes
    assert "<svg" in dom and "same-patient threshold" in dom


def test_one_manifest_per_split_takes_the_split_from_the_file_name(
    tiny_checkpoint: Path, phantom_set: Path, tmp_path: Path
) -> None:
    rows = list(csv.DictReader(phantom_set.open()))
    fields = ["path", "patient_id"]  # no split column
    for name, chosen in (("train", rows[:6]), ("test", rows[5:9])):  # rows[5] in both
        with (phantom_set.parent / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(chosen)
    out = tmp_path / "out"
    sources = [phantom_set.parent / "train.csv", phantom_set.parent / "test.csv"]
    assert cli("audit", *sources, "--out", out, "--model", tiny_checkpoint, *STRICT) == 1
    report = json.loads((out / "findings.json").read_text())
    assert report["splits"] == {"test": 4, "train": 6}
    leaks = [f for f in report["findings"] if f["type"] == "leakage"]
    assert {p for f in leaks for p in f["patient_ids"]} >= {rows[5]["patient_id"]}
    assert all(f["splits"] == ["test", "train"] for f in leaks)

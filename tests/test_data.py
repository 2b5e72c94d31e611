"""Manifests, public-set readers, patient-disjoint splits, augmentation and P x K sampling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import (
    AugmentConfig,
    ManifestError,
    PKSampler,
    assign_splits,
    augment,
    read_chestxray14,
    read_chexpert,
    read_manifest,
    read_manifests,
    read_mimic_cxr,
    split_of,
    write_manifest,
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_manifest_paths_resolve_against_csv_folder(tmp_path: Path) -> None:
    manifest = _write(
        tmp_path / "site-a" / "manifest.csv",
        "path,patient_id,view,offset_days,extra_col\nimages/x.png,p1,PA,3,foo\nimages/y.png,p1,,,\n",
    )
    samples = read_manifest(manifest)
    assert samples[0].path == str((tmp_path / "site-a" / "images" / "x.png").resolve())
    assert samples[0].patient_id == "site-a:p1" and samples[0].dataset == "site-a"
    assert samples[0].view == "PA" and samples[0].offset_days == 3.0
    assert samples[0].extra == {"extra_col": "foo"}
    assert samples[1].view is None and samples[1].offset_days is None


def test_manifests_keep_patient_ids_apart(tmp_path: Path) -> None:
    a = _write(tmp_path / "a" / "manifest.csv", "path,patient_id\n1.png,p1\n")
    b = _write(tmp_path / "b" / "manifest.csv", "path,patient_id\n1.png,p1\n")
    samples = read_manifests([a, b])
    assert {s.patient_id for s in samples} == {"a:p1", "b:p1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,patient\nx.png,p1\n", "missing column.*found path, patient; the first line must name"),
        ("path;patient_id\nx.png;p1\n", "found path;patient_id; the header looks ';'-separated"),
        ("path,patient_id\n", "no rows"),
        ("path,patient_id\nx.png,\n", "empty path or patient_id"),
        ("path,patient_id,split\nx.png,p1,holdout\n", "split must be one of"),
    ],
)
def test_bad_manifests_are_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path / "s" / "manifest.csv", text))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found.*relative to the CSV's folder"):
        read_manifest(tmp_path / "nope.csv")
    # a folder is not "not found": say what to give instead
    manifest = _write(tmp_path / "set" / "manifest.csv", "path,patient_id\nx.png,p1\n")
    with pytest.raises(ManifestError, match=f"is a folder, not a manifest: did you mean {manifest}"):
        read_manifest(manifest.parent)


def test_write_manifest_round_trips(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "s" / "manifest.csv", "path,patient_id,view,age\nimg/1.png,p1,PA,40\n")
    samples = assign_splits(read_manifest(manifest), val_fraction=0.0, test_fraction=0.0)
    out = write_manifest(samples, tmp_path / "s" / "copy.csv")
    again = read_manifest(out)
    assert again[0].path == samples[0].path and again[0].patient_id == "s:p1"
    assert again[0].split == "train" and again[0].age == 40


def test_splits_are_deterministic_patient_disjoint_and_sized(tmp_path: Path) -> None:
    rows = "".join(f"{i}_{j}.png,p{i}\n" for i in range(2000) for j in range(2))
    samples = read_manifest(_write(tmp_path / "s" / "manifest.csv", "path,patient_id\n" + rows))
    assign_splits(samples, val_fraction=0.1, test_fraction=0.2, seed=3)
    per_patient: dict[str, set[str | None]] = {}
    for s in samples:
        per_patient.setdefault(s.patient_id, set()).add(s.split)
    assert all(len(v) == 1 for v in per_patient.values())
    counts = Counter(next(iter(v)) for v in per_patient.values())
    assert abs(counts["test"] / 2000 - 0.2) < 0.04 and abs(counts["val"] / 2000 - 0.1) < 0.03
    assert split_of("s:p7", val_fraction=0.1, test_fraction=0.2, seed=3) == samples[14].split
    assert split_of("s:p7", val_fraction=0.1, test_fraction=0.2, seed=3) == split_of(
        "s:p7", val_fraction=0.1, test_fraction=0.2, seed=3
    )


def test_a_manifest_split_that_leaks_a_patient_is_refused(tmp_path: Path) -> None:
    text = "path,patient_id,split\n1.png,p1,train\n2.png,p1,test\n"
    with pytest.raises(ManifestError, match="more than one split"):
        assign_splits(read_manifest(_write(tmp_path / "s" / "manifest.csv", text)))


def test_chestxray14_reader(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "Data_Entry_2017.csv",
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegaly,0,1,058Y,M,PA\n00000001_001.png,No Finding,1,1,58,M,AP\n",
    )
    samples = read_chestxray14(csv_path, tmp_path / "images")
    assert [s.patient_id for s in samples] == ["chestxray14:1", "chestxray14:1"]
    assert samples[0].age == 58 and samples[1].view == "AP"
    assert samples[1].follow_up == 1 and samples[1].offset_days is None  # a visit number, not days
    assert samples[0].path.endswith("images/00000001_000.png")


def test_chexpert_reader_takes_patient_from_path(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "train.csv",
        "Path,Sex,Age,Frontal/Lateral,AP/PA\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP\n"
        "CheXpert-v1.0-small/train/patient00001/study2/view1_lateral.jpg,Female,68,Lateral,\n",
    )
    samples = read_chexpert(csv_path, tmp_path)
    assert {s.patient_id for s in samples} == {"chexpert:patient00001"}
    assert samples[0].view == "AP" and samples[1].view == "L" and samples[1].offset_days == 2


def test_mimic_reader_builds_paths_and_day_offsets(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "meta.csv",
        "dicom_id,subject_id,study_id,ViewPosition,StudyDate\n"
        "abc,10000032,50414267,PA,21800506\ndef,10000032,53189527,AP,21800626\n",
    )
    samples = read_mimic_cxr(csv_path, tmp_path)
    assert samples[0].path.endswith("files/p10/p10000032/s50414267/abc.jpg")
    assert samples[0].offset_days == 0 and samples[1].offset_days == 51
    assert samples[1].patient_id == "mimic-cxr:10000032"


def test_augment_keeps_shape_range_and_is_seeded() -> None:
    batch = torch.rand(6, 1, 48, 40)
    out1 = augment(batch, AugmentConfig(), torch.Generator().manual_seed(1))
    out2 = augment(batch, AugmentConfig(), torch.Generator().manual_seed(1))
    out3 = augment(batch, AugmentConfig(), torch.Generator().manual_seed(2))
    assert out1.shape == batch.shape
    assert float(out1.min()) >= 0 and float(out1.max()) <= 1
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)


def test_augment_without_flip_never_mirrors() -> None:
    # A left-bright image stays left-bright: no horizontal flip by default.
    image = torch.zeros(16, 1, 32, 32)
    image[..., :12] = 1.0
    quiet = AugmentConfig(
        rotation_deg=0,
        scale=(1, 1),
        shift=0,
        crop_scale=(1, 1),
        brightness=0,
        contrast=0,
        gamma=(1, 1),
        blur_prob=0,
        noise_std=0,
        erase_prob=0,
    )
    out = augment(image, quiet, torch.Generator().manual_seed(0))
    assert torch.allclose(out, image, atol=1e-4)
    left, right = out[..., :16].mean(), out[..., 16:].mean()
    assert left > right


def test_pk_sampler_batches_p_patients_k_images() -> None:
    labels = [0] * 5 + [1] * 1 + [2] * 3 + [3] * 2 + [4] * 1 + [5] * 4
    sampler = PKSampler(labels, patients_per_batch=3, images_per_patient=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        assert len(batch) == 6
        per_label = Counter(labels[i] for i in batch)
        assert len(per_label) == 3 and all(count == 2 for count in per_label.values())
    seen = {labels[i] for batch in batches for i in batch}
    assert len(seen) == 6  # every patient once per epoch, one-image patients included
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_pk_sampler_shards_for_ddp() -> None:
    labels = np.repeat(np.arange(40), 2)
    rank0 = PKSampler(labels, 4, 2, seed=0, rank=0, world_size=2)
    rank1 = PKSampler(labels, 4, 2, seed=0, rank=1, world_size=2)
    flat0 = {i for b in rank0 for i in b}
    flat1 = {i for b in rank1 for i in b}
    assert len(rank0) == len(rank1) == 5 and not flat0 & flat1


def test_pk_sampler_balances_sets_when_given_groups() -> None:
    # 90 patients of a big set, 10 of a small one, two images each
    labels = np.repeat(np.arange(100), 2)
    groups = ["big" if label < 90 else "small" for label in labels]
    plain = PKSampler(labels, 10, 2, seed=0)
    balanced = PKSampler(labels, 10, 2, groups=groups, seed=0)
    assert len(balanced) == len(plain) == 10  # the epoch keeps its length

    def small_share(sampler: PKSampler) -> float:
        drawn = [labels[i] for batch in sampler for i in batch]
        return sum(label >= 90 for label in drawn) / len(drawn)

    assert small_share(plain) == 0.1
    assert small_share(balanced) == 0.5
    small_drawn = Counter(labels[i] for batch in balanced for i in batch if labels[i] >= 90)
    assert len(small_drawn) == 10 and set(small_drawn.values()) == {10}  # each small patient 5x, K=2
    with pytest.raises(ValueError, match="groups"):
        PKSampler(labels, 10, 2, groups=groups[:-1])


def test_chestxray14_sets_read_offset_days_as_a_visit_number(tmp_path: Path) -> None:
    """nih-cxr14's manifest puts the follow-up number in offset_days: it is read as what it is."""
    for name in ("nih-cxr14-64px", "covid"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.csv").write_text("path,patient_id,offset_days\na.png,p1,013\n")
    (nih,) = read_manifest(tmp_path / "nih-cxr14-64px" / "manifest.csv")
    (other,) = read_manifest(tmp_path / "covid" / "manifest.csv")
    assert (nih.follow_up, nih.offset_days) == (13.0, None)
    assert (other.follow_up, other.offset_days) == (None, 13.0)

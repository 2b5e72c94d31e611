"""``cxr-reid adapt``: the network learns a phantom site where the base is weak, proves it on held-back
patients, refuses what it cannot do, resumes after kill -9, and serves a gallery only once re-embedded."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import dicom_dataset
from PIL import Image

from app.cli import main
from app.server_process import ROOT, Server, free_port, uvicorn_command
from models.data import read_dicom_folder, read_manifest
from models.imaging.phantom import write_phantom_set
from models.net.checkpoint import load_checkpoint
from models.net.embedder import Embedder
from models.training.adapt import AdaptRefusedError, AdaptSettings, SiteData, adapt, split_patients

#: what makes the phantom site's adaptation clearly better than its base (measured: AUC 0.69 -> 0.89)
STEPS, LR = 120, 1e-3


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small network trained on ordinary phantoms: it knows phantom identity (AUC ~0.98 there)."""
    from models.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("base")
    manifest = write_phantom_set(root / "train", 150, 4, size=64, seed=11)
    config = TrainConfig.from_dict(
        {
            "name": "phantom-base",
            "output_dir": str(root / "run"),
            "data": {"manifests": [str(manifest)], "val_fraction": 0.2, "test_fraction": 0.0},
            "backbone": {"variant": "ir", "depth": 18, "width": 8, "embedding_dim": 64},
            "preprocess": {"size": 64},
            "head": {"name": "arcface", "s": 16.0, "margins": {"arcface": 0.2}},
            "optim": {
                "epochs": 10,
                "patients_per_batch": 16,
                "lr": 3e-3,
                "warmup_epochs": 1,
                "device": "cpu",
            },
        }
    )
    config.data.cache_dir = str(root / "cache")
    return train(config, progress=False)


def write_site(folder: Path, patients: int, *, seed: int, shuffle_ids: bool = False) -> Path:
    """Phantoms as another hospital renders them (grey scale inverted, strong gamma): a look the base
    never saw, so it is weak there. ``shuffle_ids`` files the images under random patients."""
    manifest = write_phantom_set(folder, patients, 3, size=64, seed=seed)
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        path = folder / row["path"]
        pixels = np.asarray(Image.open(path)).astype(np.float64)
        pixels /= max(pixels.max(), 1.0)
        Image.fromarray(((1 - pixels) ** 2.2 * 65535).astype(np.uint16)).save(path)
    if shuffle_ids:
        ids = [row["patient_id"] for row in rows]
        random.Random(seed).shuffle(ids)
        for row, patient in zip(rows, ids, strict=True):
            row["patient_id"] = patient
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return manifest


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("site") / "site", 80, seed=777)


@pytest.fixture(scope="module")
def adapted(base_model: Path, site: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("adapted") / "adapted.pt"
    result = adapt(
        SiteData(read_manifest(site), "manifest site.csv"),
        out,
        model=base_model,
        settings=AdaptSettings(steps=STEPS, lr=LR, bootstrap=100),
        progress=False,
    )
    return out, result


def cli(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.mark.slow
# ------------------------------------------------------------------------------------------ learning
def test_adapt_learns_a_site_where_the_base_is_weak(
    adapted: tuple[Path, object], base_model: Path, site: Path
) -> None:
    out, result = adapted
    assert result.written and result.improved, result.reason
    assert result.after["auc"] > result.before["auc"] + 0.05
    low, high = result.delta_auc_ci
    assert 0 < low <= result.delta_auc <= high
    assert not out.with_name(out.name + ".adapt").exists()  # the work folder goes when the run ends

    payload = load_checkpoint(out)
    base = load_checkpoint(base_model)
    assert payload["model_id"] != base["model_id"] and payload["backbone"] == base["backbone"]
    record = payload["training"]["adaptation"]
    assert record["base_model_id"] == base["model_id"]
    assert record["site"]["images"] == 240 and record["site"]["patients"] == 80
    assert len(record["site"]["listing_sha256"]) == 64
    assert record["steps_run"] == STEPS and record["split"]["proof_patients"] == 24
    assert record["held_back"]["after"]["ci"]["auc"][0] < record["held_back"]["after"]["auc"]
    calibration = payload["calibration"]
    assert calibration["source"] == "site"
    assert calibration["provenance"]["fitted_on"] == "held-back patients of the adaptation"
    assert calibration["provenance"]["patients"] == 24  # the held-back patients only

    # The written network is the one that was measured: re-embedding the held-back images agrees.
    samples = read_manifest(site)
    held = split_patients(samples, 0.3, 0)
    proof = [s for s, h in zip(samples, held, strict=True) if h]
    from models.evaluation.metrics import evaluate_embeddings

    vectors = Embedder.from_checkpoint(out).embed([s.path for s in proof])
    again = evaluate_embeddings(vectors, [s.patient_id for s in proof], bootstrap=0)
    assert again["auc"] == pytest.approx(result.after["auc"], abs=0.01)


def test_the_split_holds_back_patients_not_images() -> None:
    from models.data import Sample

    samples = [
        Sample(path=f"/x/{p}-{k}.png", patient_id=f"s:{p}", dataset="s") for p in range(50) for k in range(3)
    ]
    held = split_patients(samples, 0.3, seed=0)
    held_patients = {s.patient_id for s, h in zip(samples, held, strict=True) if h}
    kept_patients = {s.patient_id for s, h in zip(samples, held, strict=True) if not h}
    assert not held_patients & kept_patients and len(held_patients) == 15
    assert (split_patients(samples, 0.3, seed=0) == held).all()  # stable
    assert (split_patients(samples, 0.3, seed=1) != held).any()


@pytest.mark.slow
# ------------------------------------------------------------------------------------------ refusals
def test_a_site_too_small_is_refused_with_how_many_more(base_model: Path, tmp_path: Path, caplog) -> None:
    small = write_site(tmp_path / "small", 12, seed=5)
    with pytest.raises(AdaptRefusedError, match=r"at least 20 are needed \(about \d+ more patients\)"):
        adapt(SiteData(read_manifest(small), "small"), tmp_path / "out.pt", model=base_model, progress=False)
    code = cli(
        "adapt", "--manifest", small, "--out", tmp_path / "out.pt", "--model", base_model, "--no-progress"
    )
    assert code == 2
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.pt.adapt").exists()
    assert "nothing written" in caplog.text


@pytest.mark.slow
def test_no_identity_to_learn_means_exit_1_and_nothing_written(
    base_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noise = write_site(tmp_path / "noise", 70, seed=9, shuffle_ids=True)  # labels unrelated to the images
    out = tmp_path / "out.pt"
    code = cli(
        "adapt",
        "--manifest",
        noise,
        "--out",
        out,
        "--model",
        base_model,
        "--steps",
        20,
        "--no-progress",
        "--json",
    )
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["written"] is False and "does not beat the base" in report["reason"]
    assert report["after"]["ci"]["auc"][0] <= 0.5  # chance either way: nothing was learnt
    assert not out.exists() and not (tmp_path / "out.pt.adapt").exists()


@pytest.mark.slow
def test_arguments_are_checked_before_any_work(base_model: Path, tmp_path: Path) -> None:
    assert cli("adapt", "--out", tmp_path / "o.pt") == 2  # no data named
    assert cli("adapt", "--manifest", tmp_path / "none.csv", "--out", tmp_path / "o.pt") == 2
    assert cli("adapt", "--data-dir", tmp_path / "no-gallery", "--out", tmp_path / "o.pt") == 2
    assert not (tmp_path / "no-gallery").exists()  # a read of a gallery never creates one
    assert cli("adapt", "--manifest", tmp_path / "none.csv", "--out", tmp_path / "o.pt", "--far", "2") == 2


@pytest.mark.server
@pytest.mark.slow
# ------------------------------------------------------------------------------------------ resume
def test_adapt_resumes_after_kill_9(base_model: Path, site: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "adapted.pt", tmp_path / "work"
    command = [sys.executable, "-m", "app.cli", "adapt", "--manifest", str(site), "--out", str(out)]
    command += ["--model", str(base_model), "--steps", str(STEPS), "--lr", str(LR), "--work", str(work)]
    command += ["--save-every", "0"]
    command += ["--no-progress", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    state = work / "state.pt"
    while time.monotonic() < deadline and first.poll() is None:
        if state.is_file():
            try:
                if torch.load(state, weights_only=True)["step"] >= 10:
                    break
            except (RuntimeError, EOFError, OSError):  # replaced while read: read again
                pass
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not out.exists() and state.is_file()

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "resuming the adaptation at step" in second.stderr, second.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads(second.stdout)
    assert report["steps_run"] == STEPS and report["written"]
    assert out.is_file() and not work.exists()


# ------------------------------------------------------------------------------------------ sources
def test_a_dicom_folder_is_read_by_patient_id(tmp_path: Path) -> None:
    folder = tmp_path / "pacs"
    write_phantom_set(folder, 4, 2, size=32, fmt="dicom", seed=2)
    (folder / "images" / "notes.txt").write_text("not DICOM")
    anonymous = dicom_dataset(np.zeros((8, 8), np.uint16))
    anonymous.save_as(folder / "images" / "anon.dcm", enforce_file_format=True)
    (folder / ".hidden.dcm").write_bytes((folder / "images" / "anon.dcm").read_bytes())
    samples, skipped = read_dicom_folder(folder)
    assert len(samples) == 8 and skipped == 3  # manifest.csv, notes.txt, the file without PatientID
    assert len({s.patient_id for s in samples}) == 4
    assert all(s.patient_id.startswith("pacs:") and s.dataset == "pacs" for s in samples)


@pytest.mark.server
@pytest.mark.slow
def test_the_adapted_model_serves_a_gallery_only_after_reindex(
    adapted: tuple[Path, object], base_model: Path, site: Path, tmp_path: Path, servers: list
) -> None:
    out, _ = adapted
    data = tmp_path / "data"
    assert cli("enroll", site, "--data-dir", data, "--model", base_model, "--no-progress") == 0

    # The gallery form reads the gallery's labelled images (the server stopped).
    report_file = tmp_path / "gallery-adapt.json"
    with report_file.open("w") as handle:
        code = subprocess.run(
            [sys.executable, "-m", "app.cli", "adapt", "--data-dir", str(data), "--model", str(base_model)]
            + ["--out", str(tmp_path / "g.pt"), "--steps", "5", "--json", "--no-progress"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=handle,
            timeout=600,
        ).returncode
    assert code in (0, 1)
    split = json.loads(report_file.read_text())["split"]
    assert split["train_images"] + split["proof_images"] == 240

    # The gallery holds the base network's vectors: the adapted model refuses to serve it ...
    base_id, adapted_id = load_checkpoint(base_model)["model_id"], load_checkpoint(out)["model_id"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_REID_")}
    env.update(CXR_REID_DATA_DIR=str(data), CXR_REID_MODEL_PATH=str(out), PYTHONPATH=str(ROOT))
    env["CXR_REID_TORCH_THREADS"] = "1"
    port = free_port()
    mixed = subprocess.Popen(uvicorn_command(port), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        answer = None
        deadline = time.monotonic() + 120
        while answer is None and time.monotonic() < deadline and mixed.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.3)
        assert answer is not None and answer.status_code == 503
        assert "reindex" in answer.json()["detail"]
    finally:
        mixed.kill()
        mixed.wait()
    assert gallery_model(data, out) == base_id

    # ... until every image is re-embedded with it.
    assert cli("reindex", "--data-dir", data, "--model", out, "--no-progress") == 0
    assert gallery_model(data, out) == adapted_id
    port = free_port()
    server = Server(uvicorn_command(port), env, port, tmp_path / "server.log")
    servers.append(server)
    ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
    assert ready["model_id"] == adapted_id
    assert ready["adaptation"]["base_model_id"] == base_id
    assert (
        ready["adaptation"]["site_images"] == 240 and ready["adaptation"]["site_data"] == "manifest site.csv"
    )


def gallery_model(data: Path, model: Path) -> str:
    """The model id a gallery's vectors carry, as `cxr-reid check` reports it."""
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "check", "--data-dir", str(data), "--model", str(model)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(result.stdout)["gallery_model_id"]

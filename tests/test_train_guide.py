"""docs/train-your-own-data.md runs as written: its commands, on a miniature ChestX-ray14 copy (the
real metadata file and columns, Kaggle's one-folder-per-archive layout, phantom images) and a
phantom site's DICOM folder, build the manifests, train, evaluate and adapt.

The guide's words for the user's folders (``NIH_ROOT``, ``SITE_DICOM``) and the config's path are
replaced by the test's; training commands get the short schedule the guide gives for a first check,
so the run takes seconds, not the recipe's hour."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from app.server_process import ROOT
from models.data import read_manifest
from models.imaging.phantom import write_phantom_set
from models.net.checkpoint import load_checkpoint
from models.training.config import load_config

GUIDE = ROOT / "docs" / "train-your-own-data.md"
#: what the guide says to add for a first short run, and the same for adapt (its own flag)
SHORT = {"train": "--epochs 1 --set optim.steps_per_epoch=3", "adapt": "--steps 3"}


def guide_commands() -> list[str]:
    """Every ``cxr-reid`` line of the guide's bash blocks, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("cxr-reid ")]


def miniature_chestxray14(root: Path, work: Path) -> None:
    """``Data_Entry_2017_v2020.csv`` with its real header and ``images_00N/images/*.png``: phantom
    patients renamed as NIH numbers, their studies as follow-ups."""
    phantoms = read_manifest(write_phantom_set(work / "phantoms", 40, 3, size=64, seed=5))
    number = {p: i + 1 for i, p in enumerate(sorted({s.patient_id for s in phantoms}))}
    follow_ups: Counter[int] = Counter()
    rows = []
    for sample in phantoms:
        patient = number[sample.patient_id]
        follow_up = follow_ups[patient]
        follow_ups[patient] += 1
        name = f"{patient:08d}_{follow_up:03d}.png"
        folder = root / f"images_{1 + patient % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(sample.path).save(folder / name)
        rows.append([name, "No Finding", follow_up, patient, 50, "M", "PA", 64, 64, 0.143, 0.143])
    with (root / "Data_Entry_2017_v2020.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "Image Index",
                "Finding Labels",
                "Follow-up #",
                "Patient ID",
                "Patient Age",
                "Patient Gender",
                "View Position",
                "OriginalImage[Width",
                "Height]",
                "OriginalImagePixelSpacing[x",
                "y]",
            ]
        )
        writer.writerows(rows)


def test_the_guide_covers_the_whole_path() -> None:
    commands = [shlex.split(c)[1:3] for c in guide_commands()]
    assert [c[0] for c in commands] == ["data", "train", "evaluate", "data", "adapt"]
    assert commands[0][1] == "chestxray14" and commands[3][1] == "dicom"
    text = GUIDE.read_text()
    assert SHORT["train"] in text and SHORT["adapt"] in text
    from models.data import SOURCES

    for source in SOURCES.values():  # every source the command reads is in the guide, with its page
        assert f"`{source.name}`" in text and source.url in text


@pytest.mark.slow
@pytest.mark.server
def test_the_guide_runs_on_a_miniature_set(tmp_path: Path) -> None:
    nih, site, work = tmp_path / "download" / "nih", tmp_path / "site-dicom", tmp_path / "work"
    nih.mkdir(parents=True)
    work.mkdir()
    miniature_chestxray14(nih, tmp_path)
    site_set = write_phantom_set(tmp_path / "site", 70, 3, size=64, fmt="dicom", seed=9)
    (site_set.parent / "images").rename(site)  # the DICOM files alone, without the phantom manifest
    places = {"NIH_ROOT": str(nih), "SITE_DICOM": str(site), "configs/": f"{ROOT / 'configs'}/"}
    outputs = []
    for command in guide_commands():
        for word, path in places.items():
            command = command.replace(word, path)
        args = shlex.split(command)[1:]
        args += shlex.split(SHORT.get(args[0], ""))
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=work,
            check=False,
        )
        outputs.append(done)
        if args[0] == "adapt":  # kept only when better on the site's held-back patients; else exit 1
            assert done.returncode in (0, 1), done.stderr[-3000:]
            assert "held back to prove the change" in done.stdout
            assert (work / "site.pt").is_file() == (done.returncode == 0)
        else:
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert "120 images of 40 patients, 40 with 2 or more images" in outputs[0].stdout
    assert {s.patient_id for s in read_manifest(work / "sets" / "chestxray14" / "manifest.csv")} == {
        f"chestxray14:{n}" for n in range(1, 41)
    }
    # --manifest replaced the config's data and kept the rest of its recipe
    payload = load_checkpoint(work / "runs" / "chestxray14" / "model.pt")
    recipe = load_config(ROOT / "configs" / "default.toml")
    assert payload["backbone"] == recipe.backbone.to_dict()
    assert payload["preprocess"]["size"] == recipe.preprocess.size
    assert "test patients of the checkpoint's split" in outputs[2].stdout and "auc" in outputs[2].stdout
    assert "210 images of 70 patients" in outputs[3].stdout

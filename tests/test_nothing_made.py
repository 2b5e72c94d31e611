"""Commands that only read or repair a gallery never start one, and a run that fails leaves nothing
half-made: ``check``, ``reindex``, ``calibrate`` and ``adapt`` on a data dir without a gallery fail
without creating it; ``sync`` asks the PACS before it opens (and so creates) a gallery; a failed
``audit`` or ``risk`` takes back the ``--out`` folder it made, and keeps one that was already there.

Real galleries (SQLite, FAISS), the real command line (``app.cli.main``), real loopback ports.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from app.cli import main
from app.reports import report_out_dir
from app.server_process import free_port
from index import Gallery, GalleryIntegrityError, GalleryNotFoundError
from models.net.embedder import Embedder


@pytest.fixture(autouse=True)
def _no_data_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_REID_DATA_DIR", raising=False)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_gallery_opened_without_create_refuses_a_dir_without_one_and_makes_nothing(
    tmp_path: Path, embedder: Embedder
) -> None:
    options = {"dim": embedder.dim, "model_id": embedder.model_id, "create": False}
    with pytest.raises(GalleryNotFoundError, match="no gallery in .*nothing was created"):
        Gallery(tmp_path / "typo", **options)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(GalleryNotFoundError):
        Gallery(tmp_path / "empty", **options)
    assert _tree(tmp_path / "empty") == []
    with Gallery(tmp_path / "real", dim=embedder.dim, model_id=embedder.model_id):
        pass  # made by a caller meant to
    with Gallery(tmp_path / "real", **options) as gallery:
        assert len(gallery) == 0


def test_check_of_a_mistyped_data_dir_fails_and_creates_nothing(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"
    assert main(["check", "--data-dir", str(typo), "--model", str(tiny_checkpoint)]) == 1
    err = capsys.readouterr().err
    assert f"check failed: no gallery in {typo}" in err and "nothing was created" in err
    assert "`cxr-reid serve`, `enroll` and `sync` start a new one" in err
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", "--data-dir", str(empty), "--model", str(tiny_checkpoint)]) == 1
    assert _tree(empty) == []


def test_check_still_names_a_lost_database_next_to_stored_originals(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stored data without its database is not "no gallery": the integrity message says what to do."""
    data = tmp_path / "data"
    (data / "images" / "ab").mkdir(parents=True)
    (data / "images" / "ab" / ("ab" + "0" * 62)).write_bytes(b"an original")
    assert main(["check", "--data-dir", str(data), "--model", str(tiny_checkpoint)]) == 1
    assert "is the right volume mounted?" in capsys.readouterr().err
    assert not (data / "gallery.sqlite").exists()
    with pytest.raises(GalleryIntegrityError):
        Gallery(data, dim=8, model_id="m", create=False)


def test_reindex_of_a_mistyped_data_dir_fails_and_creates_nothing(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = tmp_path / "typo"
    assert main(["reindex", "--data-dir", str(typo), "--model", str(tiny_checkpoint), "--no-progress"]) == 2
    assert f"no gallery in {typo}" in caplog.text
    assert not typo.exists()


def test_calibrate_without_arguments_creates_no_gallery_and_says_what_to_give(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--model", str(tiny_checkpoint)]) == 2
    assert "no gallery in cxr-reid-data" in caplog.text
    assert "--manifest SITE.csv --out SITE.pt" in caplog.text
    assert _tree(tmp_path) == []


def test_adapt_on_a_folder_without_a_gallery_makes_no_database_there(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "not-a-gallery"
    folder.mkdir()
    argv = ["adapt", "--data-dir", str(folder), "--out", str(tmp_path / "site.pt")]
    assert main([*argv, "--model", str(tiny_checkpoint), "--no-progress"]) == 2
    assert f"no gallery in {folder}" in caplog.text
    assert _tree(folder) == [] and not (tmp_path / "site.pt").exists()


@pytest.mark.parametrize("source", ["--dicomweb", "--orthanc-changes"])
def test_sync_to_an_unreachable_pacs_creates_no_gallery(
    tmp_path: Path, source: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    nobody = f"http://127.0.0.1:{free_port()}"
    url = f"{nobody}/dicom-web" if source == "--dicomweb" else nobody
    data = tmp_path / "data"
    argv = ["sync", source, url, "--data-dir", str(data), "--no-progress"]
    assert main([*argv, "--once"] if source == "--orthanc-changes" else argv) == 2
    assert "sync could not run" in caplog.text and "nothing was created" in caplog.text
    assert not data.exists()


def test_a_failed_audit_leaves_no_out_folder_and_keeps_an_earlier_one(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = tmp_path / "set.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "patient_id"], ["missing-1.png", "p1"], ["missing-2.png", "p2"]])
    out = tmp_path / "reports" / "audit"
    argv = ["audit", str(manifest), "--model", str(tiny_checkpoint), "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "audit could not run" in caplog.text
    assert not (tmp_path / "reports").exists()  # the parent it made is taken back too

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.html").write_text("an earlier report")
    assert main([*argv, "--out", str(earlier)]) == 2
    assert (earlier / "report.html").read_text() == "an earlier report"


def test_a_failed_risk_run_leaves_no_out_folder(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "risk"
    argv = ["risk", str(tmp_path / "no-such-release.csv"), "--reference", str(tmp_path / "nope.csv")]
    assert main([*argv, "--out", str(out), "--model", str(tiny_checkpoint), "--no-progress"]) == 2
    assert "not found" in caplog.text
    assert not out.exists()


def test_report_out_dir_takes_back_what_a_failing_run_made_on_ctrl_c_too(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt), report_out_dir(out) as folder:
        (folder / "cache").mkdir()
        raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
    with report_out_dir(out) as folder:
        (folder / "report.html").write_text("done")
    assert (out / "report.html").read_text() == "done"
    with pytest.raises(NotADirectoryError), report_out_dir(out / "report.html"):
        pass

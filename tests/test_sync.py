"""`cxr-reid sync` (issue 13 part 2): radiographs pulled from a real Orthanc PACS into a gallery.

pydicom-written radiographs of the example children, child B's third image misfiled under child A and
an MR, stored in Orthanc through its REST API; `cxr-reid sync --dicomweb` (QIDO-RS + WADO-RS) run in
process with the shipped model: the gallery rows, the refused MR, the misfile's wrong-patient alert,
the cursor (a second run fetches nothing), --since, and `--orthanc-changes --once` picking up an
instance stored afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import dicom_dataset
from PIL import Image

from app.cli import main
from app.server_process import ROOT, free_port
from index import Gallery
from models.net.embedder import Embedder
from tests.orthanc import Orthanc, missing_reason

EXAMPLES = ROOT / "examples" / "radiographs"
CR_STORAGE, MR_STORAGE = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.4"
STUDY_A, STUDY_B, STUDY_A2, STUDY_C = STUDIES = tuple(f"1.2.826.0.1.3680043.8.498.7{n}" for n in range(1, 5))

needs_orthanc = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")


def radiograph(
    image: str, patient_id: str, study: str, date: str, *, view: str = "PA", modality: str = "CR"
) -> tuple[str, bytes]:
    """An example JPEG as a 16-bit grey DICOM file: its SOPInstanceUID and bytes. An MR gets its own
    series and the MR SOP class."""
    grey = np.asarray(Image.open(EXAMPLES / image).convert("L"), dtype=np.uint16) * 257
    ds = dicom_dataset(
        grey,
        PatientID=patient_id,
        StudyInstanceUID=study,
        SeriesInstanceUID=study + (".1" if modality == "CR" else ".2"),
        Modality=modality,
        ViewPosition=view,
        StudyDate=date,
    )
    if modality == "MR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return str(ds.SOPInstanceUID), buffer.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, tuple[str, bytes]]:
    """Child A (1 May), child B's two images (2 May), B's third misfiled under child A (3 May) and an
    MR in child A's first study; child C arrives later (the change-feed test)."""
    return {
        "a1": radiograph("child-a-1.jpeg", "child-A", STUDY_A, "20240501"),
        "mr": radiograph("child-a-2.jpeg", "child-A", STUDY_A, "20240501", modality="MR"),
        "b1": radiograph("child-b-1.jpeg", "child-B", STUDY_B, "20240502"),
        "b2": radiograph("child-b-2.jpeg", "child-B", STUDY_B, "20240502", view="AP"),
        "misfiled": radiograph("child-b-3.jpeg", "child-A", STUDY_A2, "20240503"),
        "c1": radiograph("child-c-1.jpeg", "child-C", STUDY_C, "20240504"),
    }


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, files: dict[str, tuple[str, bytes]]):
    if missing_reason() is not None:
        pytest.skip(missing_reason() or "")
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        for name in ("a1", "mr", "b1", "b2", "misfiled"):
            assert orthanc.store(files[name][1])["Status"] == "Success"
        yield orthanc
    finally:
        orthanc.stop()


@pytest.fixture(autouse=True)
def fast_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_REID_RUNTIME", "torch")  # no ONNX export at each command's model load
    monkeypatch.delenv("CXR_REID_DATA_DIR", raising=False)
    monkeypatch.delenv("CXR_REID_MODEL_PATH", raising=False)


def rows(data_dir: Path) -> dict[str, tuple[str | None, str | None, str | None]]:
    """SOPInstanceUID -> (patient id, study uid, view) of every gallery image."""
    shipped = Embedder.from_checkpoint(None, runtime="torch")
    with Gallery(data_dir, dim=shipped.dim, model_id=shipped.model_id) as gallery:
        records, _ = gallery.list_images(limit=1000)
    return {r.sop_instance_uid: (r.patient_id, r.study_instance_uid, r.view) for r in records}


def alerts(data_dir: Path) -> list:
    shipped = Embedder.from_checkpoint(None, runtime="torch")
    with Gallery(data_dir, dim=shipped.dim, model_id=shipped.model_id) as gallery:
        return gallery.list_alerts()[0]


def summary(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sync http")]
    assert lines, caplog.text
    caplog.clear()
    return lines[-1]


def sync(*args: str) -> int:
    return main(["sync", *args, "--no-progress"])


@pytest.mark.pacs
@needs_orthanc
def test_sync_dicomweb_then_orthanc_changes(
    pacs: Orthanc, files: dict[str, tuple[str, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    f = files
    assert sync("--dicomweb", pacs.dicomweb, "--data-dir", str(data)) == 0, caplog.text
    line = summary(caplog)
    assert "studies 3 (+0 done before)" in line
    assert "instances seen 5, enrolled 4, already there 0, refused 1, conflicting 0, failed 0" in line
    # studies oldest first: A, then B, then the misfile, which matches child B's images
    got = rows(data)
    assert got == {
        f["a1"][0]: ("child-A", STUDY_A, "PA"),
        f["b1"][0]: ("child-B", STUDY_B, "PA"),
        f["b2"][0]: ("child-B", STUDY_B, "AP"),
        f["misfiled"][0]: ("child-A", STUDY_A2, "PA"),
    }
    # the originals kept for reindex went through the basic profile; the UIDs the rows hold stayed
    originals = [pydicom.dcmread(p) for p in (data / "images").rglob("*") if p.is_file()]
    assert sorted(ds.SOPInstanceUID for ds in originals) == sorted(got)
    for ds in originals:
        assert ds.PatientIdentityRemoved == "YES" and not ds.PatientID.startswith("child-")
        assert ds.StudyDate not in ("20240501", "20240502", "20240503") and ds.StudyInstanceUID in STUDIES
    alert = re.search(r"alerts 1 \(image (\d+) matches_other_patient alert (\d+)\)", line)
    assert alert, line
    misfile_image = int(alert.group(1))
    stored = alerts(data)  # the gallery's alerts table, for review (GET /alerts)
    assert [(a.alert_id, a.image_id, a.kind, a.patient_id, a.other_patient_id, a.state) for a in stored] == [
        (int(alert.group(2)), misfile_image, "matches_other_patient", "child-A", "child-B", "open")
    ]
    assert "newest StudyDate 20240503" in line
    state = json.loads((data / "sync-state.json").read_text())
    [cursor] = state["sources"].values()
    assert set(cursor["done_studies"]) == {STUDY_A, STUDY_B, STUDY_A2}

    # the cursor: nothing is fetched again
    assert sync("--dicomweb", pacs.dicomweb, "--data-dir", str(data)) == 0
    line = summary(caplog)
    assert "studies 0 (+3 done before)" in line and "instances seen 0, enrolled 0" in line

    # a new study in the PACS, followed through Orthanc's change feed from its start: the earlier
    # instances are already there (the MR refused from its tags), child C's is enrolled
    pacs.store(f["c1"][1])
    assert sync("--orthanc-changes", pacs.url, "--once", "--data-dir", str(data)) == 0, caplog.text
    line = summary(caplog)
    seen = "instances seen 6, enrolled 1, already there 4, refused 1, conflicting 0, failed 0; alerts 0"
    assert seen in line
    assert rows(data)[f["c1"][0]] == ("child-C", STUDY_C, "PA")
    # ... and from its stored sequence number the next time
    assert sync("--orthanc-changes", pacs.url, "--once", "--data-dir", str(data)) == 0
    assert "instances seen 0" in summary(caplog)


@pytest.mark.pacs
@needs_orthanc
def test_sync_since(
    pacs: Orthanc, files: dict[str, tuple[str, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pacs.store(files["c1"][1])  # (already there when the test above ran first)
    data = tmp_path / "data"
    assert sync("--dicomweb", pacs.dicomweb, "--since", "2024-05-02", "--data-dir", str(data)) == 0
    line = summary(caplog)
    assert "studies 3 (+0 done before)" in line and "enrolled 4" in line
    assert sorted(p for p, _, _ in rows(data).values()) == ["child-A", "child-B", "child-B", "child-C"]
    assert "matches_other_patient" in line  # B's images came first, then the misfile
    # --since last: from the newest StudyDate seen (4 May): child C's study, done already
    assert sync("--dicomweb", pacs.dicomweb, "--since", "last", "--data-dir", str(data)) == 0
    assert "studies 0 (+1 done before)" in summary(caplog)


def test_sync_cannot_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Exit 2 with the reason: nothing answers at the URL, or the arguments make no sense."""
    caplog.set_level(logging.INFO)
    data = str(tmp_path / "data")
    nobody = f"http://127.0.0.1:{free_port()}"
    assert sync("--dicomweb", f"{nobody}/dicom-web", "--data-dir", data) == 2
    assert "did not answer the study query" in caplog.text
    assert sync("--orthanc-changes", nobody, "--once", "--data-dir", data) == 2
    assert "did not answer GET /changes" in caplog.text
    assert sync("--dicomweb", f"{nobody}/dicom-web", "--modality", "CR,MR", "--data-dir", data) == 2
    assert "only projection radiographs" in caplog.text
    assert sync("--dicomweb", f"{nobody}/dicom-web", "--since", "May", "--data-dir", data) == 2


class FakeOrthanc:
    """requests.Session stand-in answering Orthanc's REST routes from a script; a route mapped to an
    exception raises it once (Orthanc restarting)."""

    def __init__(self, routes: dict[str, object]) -> None:
        self.routes, self.headers, self.asked = routes, {}, []

    def get(self, url: str, **_: object) -> object:
        import requests

        path = url.removeprefix("http://pacs")
        self.asked.append(path)
        answer = self.routes[path]
        if isinstance(answer, Exception):
            self.routes[path] = self.routes[path + " (after)"]
            raise answer
        status, body = answer if isinstance(answer, tuple) else (200, answer)
        response = requests.Response()
        response.status_code = status
        response._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response._content_consumed = True  # streamed by the sync: iter_content gives _content
        response.url = url
        return response

    def close(self) -> None:
        pass


def test_orthanc_changes_survive_errors_bad_instances_and_a_new_database(
    embedder: Embedder, files: dict[str, tuple[str, bytes]], tmp_path: Path
) -> None:
    """No Orthanc needed: a connection error is retried after a pause, an unreadable instance is counted
    as failed while the next one is enrolled, and a change log that restarts below the stored sequence
    number (a new Orthanc database) is followed from 0."""
    import requests

    from app.pacs.sync import SyncState, follow_orthanc_changes
    from app.service.reid import ReidService

    sop, good = files["c1"]
    change = {"ChangeType": "NewInstance", "ResourceType": "Instance"}
    routes: dict[str, object] = {
        "/changes?last": {"Changes": [], "Done": True, "Last": 3},
        "/changes?since=0&limit=100": requests.ConnectionError("connection refused"),
        "/changes?since=0&limit=100 (after)": {
            "Changes": [{**change, "ID": "bad", "Seq": 1}, {**change, "ID": "good", "Seq": 2}],
            "Done": True,
            "Last": 3,
        },
        "/instances/bad/tags?simplify": {"SOPInstanceUID": "1.2.3.4", "Modality": "CR"},
        "/instances/bad/file": b"\0" * 200,
        "/instances/good/tags?simplify": {"SOPInstanceUID": sop, "Modality": "CR"},
        "/instances/good/file": good,
    }
    pauses: list[float] = []
    with Gallery(tmp_path / "data", dim=embedder.dim, model_id=embedder.model_id) as gallery:
        service = ReidService(embedder, gallery)
        state = SyncState(tmp_path / "data")
        run = {"state": state, "once": True, "progress": False, "sleep": lambda _, s: pauses.append(s)}
        first = follow_orthanc_changes(service, "http://pacs", session=FakeOrthanc(routes), **run)
        assert (first.seen, first.enrolled, first.last_change) == (2, 1, 3)
        assert [name for name, _ in first.failed] == ["1.2.3.4"] and pauses == [1.0]
        assert gallery.find_by_sop_instance_uid(sop).patient_id == "child-C"

        # Orthanc comes back with a new database: its log ends at 1, below the stored 3
        routes["/changes?last"] = {"Changes": [], "Done": True, "Last": 1}
        routes["/changes?since=3&limit=100"] = {"Changes": [], "Done": True, "Last": 1}
        routes["/changes?since=0&limit=100"] = {
            "Changes": [{**change, "ID": "good", "Seq": 1}],
            "Done": True,
            "Last": 1,
        }
        fake = FakeOrthanc(routes)
        again = follow_orthanc_changes(service, "http://pacs", session=fake, **run)
        assert (again.seen, again.already, again.enrolled, again.last_change) == (1, 1, 0, 1)
        assert "/instances/good/file" not in fake.asked  # known from its tags: not downloaded
        assert json.loads(state.path.read_text())["sources"]["orthanc-changes http://pacs default"] == {
            "since": 1
        }

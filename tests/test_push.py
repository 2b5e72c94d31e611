"""`cxr-reid enroll --to URL` and `sync --to URL`: feeding a running server without stopping it.

A real uvicorn server holds the gallery (and its lock); the CLI runs in this process and sends to it:
enroll through POST /images (labels of the manifest kept, a rerun skips everything, a refused file
fails alone, a missing key stops the run), sync from a real Orthanc through STOW-RS with its cursor
in the data dir. The local path, run beside the server, says to use --to.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import httpx
import pytest

from app.cli import main
from app.pacs.push import Pushed, ServiceClient, ServiceUnreachableError
from app.server_process import Server, free_port, uvicorn_command
from tests.orthanc import Orthanc, missing_reason

KEY = "push-test-key"


@pytest.fixture
def server(server_env: dict[str, str], servers: list[Server], tmp_path: Path) -> Server:
    """A real server on the tiny model, holding the gallery of ``server_env``, with one API key."""
    port = free_port()
    env = {**server_env, "CXR_REID_API_KEYS": KEY, "CXR_REID_RUNTIME": "torch"}
    servers.append(Server(uvicorn_command(port), env, port, tmp_path / "server.log"))
    return servers[-1]


def images(server: Server) -> list[dict]:
    answer = httpx.get(f"{server.url}/images?limit=500", headers={"X-API-Key": KEY}).json()
    return answer["items"]


def last_summary(caplog: pytest.LogCaptureFixture, start: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]
    assert lines, caplog.text
    caplog.clear()
    return lines[-1]


@pytest.mark.server
@pytest.mark.slow
def test_enroll_to_a_running_server(
    server: Server,
    server_env: dict[str, str],
    phantom_set: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("CXR_REID_API_KEY", raising=False)
    # a manifest of the phantoms plus one blank image, which the quality gate refuses
    manifest = tmp_path / "manifest.csv"
    with phantom_set.open() as handle:
        rows = list(csv.DictReader(handle))[:6]
    from PIL import Image

    Image.new("L", (128, 128)).save(tmp_path / "blank.png")
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "view", "split"])
        for row in rows:
            writer.writerow([str(phantom_set.parent / row["path"]), row["patient_id"], "PA", "test"])
        writer.writerow([str(tmp_path / "blank.png"), "blank-patient", "PA", "test"])
    args = ["enroll", str(manifest), "--to", server.url, "--collection", "ward", "--no-progress"]

    assert main(args) == 2  # no key: the server refuses writing, nothing is sent
    assert "CXR_REID_API_KEY" in caplog.text and images(server) == []
    caplog.clear()

    monkeypatch.setenv("CXR_REID_API_KEY", KEY)
    assert main(args) == 1  # the blank image fails alone
    assert "blank.png" in caplog.text and KEY not in caplog.text
    line = last_summary(caplog, "enrolled")
    assert line == "enrolled 6, skipped 0 already in collection 'ward', failed 1 (of 7 files)"
    stored = images(server)
    assert len(stored) == 6 and {(r["collection"], r["view"], r["split"]) for r in stored} == {
        ("ward", "PA", "test")
    }
    assert sorted(r["patient_id"] for r in stored) == sorted(row["patient_id"].split(":")[-1] for row in rows)

    assert main([*args, "--concurrency", "2"]) == 1  # a rerun: everything is there already
    assert last_summary(caplog, "enrolled") == (
        "enrolled 0, skipped 6 already in collection 'ward', failed 1 (of 7 files)"
    )
    assert len(images(server)) == 6

    # the local path beside the running server: the lock's message says how to feed it instead
    data_dir = server_env["CXR_REID_DATA_DIR"]
    local = [
        "enroll",
        str(manifest),
        "--data-dir",
        data_dir,
        "--model",
        str(tiny_checkpoint),
        "--no-progress",
    ]
    assert main([*local, "--no-progress"]) == 2
    assert "already open in another process" in caplog.text and "--to URL" in caplog.text


def test_retries_wait_for_retry_after_then_give_up() -> None:
    """503 and 429 are tried again (Retry-After honoured), any other answer is final."""
    answers = iter([503, 429, 201])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = next(answers)
        if status == 201:
            body = {"images": [{"already_enrolled": True, "alert": None}]}
            return httpx.Response(201, json=body)
        return httpx.Response(status, headers={"Retry-After": "0"}, json={"detail": "busy"})

    client = ServiceClient("http://service.invalid", "secret")
    client._client = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    path = Path(__file__)
    assert client.enrol_file(path, collection="c").status == "already"
    assert seen == ["/images"] * 3

    refused = httpx.Client(
        base_url=client.url,
        transport=httpx.MockTransport(lambda r: httpx.Response(422, json={"detail": "bad"})),
    )
    client._client = refused
    pushed = client.enrol_file(path, collection="c")
    assert pushed.status == "failed" and "bad" in pushed.reason


@pytest.mark.pacs
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_sync_to_a_running_server(
    server: Server,
    server_env: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_sync import STUDY_A, STUDY_A2, STUDY_B, radiograph

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("CXR_REID_API_KEY", KEY)
    files = {
        "a1": radiograph("child-a-1.jpeg", "child-A", STUDY_A, "20240501"),
        "mr": radiograph("child-a-2.jpeg", "child-A", STUDY_A, "20240501", modality="MR"),
        "b1": radiograph("child-b-1.jpeg", "child-B", STUDY_B, "20240502"),
        "misfiled": radiograph("child-b-3.jpeg", "child-A", STUDY_A2, "20240503"),
    }
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        for _, data in files.values():
            assert pacs.store(data)["Status"] == "Success"
        data_dir = server_env["CXR_REID_DATA_DIR"]
        args = [
            "sync",
            "--dicomweb",
            pacs.dicomweb,
            "--to",
            server.url,
            "--data-dir",
            data_dir,
            "--no-progress",
        ]
        # the service goes away during the second study: the run stops (exit 2), the first is kept
        stow, calls = ServiceClient.stow, []

        def going(self: ServiceClient, data: bytes, *, collection: str) -> Pushed:
            calls.append(data)
            if len(calls) == 2:
                raise ServiceUnreachableError("the service went away")
            return stow(self, data, collection=collection)

        monkeypatch.setattr(ServiceClient, "stow", going)
        assert main(args) == 2
        assert "sync stopped: the service went away" in caplog.text
        monkeypatch.setattr(ServiceClient, "stow", stow)
        assert [r["sop_instance_uid"] for r in images(server)] == [files["a1"][0]]

        assert main(args) == 0  # resumes after the study done
        line = last_summary(caplog, "sync http")
        assert "studies 2 (+1 done before)" in line and "enrolled 2, already there 0, refused 0" in line
        assert KEY not in caplog.text
        stored = images(server)
        assert sorted(r["sop_instance_uid"] for r in stored) == sorted(
            files[name][0] for name in ("a1", "b1", "misfiled")
        )
        assert (Path(data_dir) / "sync-state.json").exists()  # the cursor where the local path keeps it

        assert main(args) == 0  # the cursor: nothing fetched again
        assert "studies 0 (+3 done before)" in last_summary(caplog, "sync http")

        # the change feed from its start: the server says what it holds already
        changes = [
            "sync",
            "--orthanc-changes",
            pacs.url,
            "--once",
            "--to",
            server.url,
            "--data-dir",
            data_dir,
        ]
        assert main([*changes, "--no-progress"]) == 0
        assert "enrolled 0, already there 3, refused 1" in last_summary(caplog, "sync http")
        assert len(images(server)) == 3
    finally:
        pacs.stop()


@pytest.mark.pacs
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_orthanc_push_with_a_refused_instance(server: Server, tmp_path: Path) -> None:
    """Orthanc's DICOMweb client fails a whole push when the STOW-RS answer lists any failure (or
    references fewer instances than it sent), whatever the status: no answer that PS3.18 allows for
    partial success passes it. The instances cxr-reid took are stored all the same, and pushing the
    radiograph series only (Orthanc's /tools/find by Modality), as docs/pacs.md says, succeeds."""
    from tests.test_sync import STUDY_A, STUDY_B, radiograph

    a1 = radiograph("child-a-1.jpeg", "child-A", STUDY_A, "20240501")
    mr = radiograph("child-a-2.jpeg", "child-A", STUDY_A, "20240501", modality="MR")
    b1 = radiograph("child-b-1.jpeg", "child-B", STUDY_B, "20240502")
    peer = {"cxr-reid": {"Url": f"{server.url}/dicomweb/", "HttpHeaders": {"X-API-Key": KEY}}}
    pacs = Orthanc(tmp_path / "orthanc", dicomweb_servers=peer)
    try:
        ids = [pacs.store(data)["ID"] for _, data in (a1, mr)]
        stow = f"{pacs.url}/dicom-web/servers/cxr-reid/stow"
        failed = httpx.post(stow, json={"Resources": ids}, timeout=120)
        assert failed.status_code == 500, failed.text
        assert failed.json()["OrthancError"] == "Error encountered within the plugin engine"
        assert "only able to receive 1 instances out of 2" in pacs.log()
        assert [r["sop_instance_uid"] for r in images(server)] == [a1[0]]  # the CR is stored

        pacs.store(b1[1])
        query = {"Level": "Series", "Query": {"Modality": "CR\\DX\\DR\\RG"}}
        series = httpx.post(f"{pacs.url}/tools/find", json=query, timeout=30).json()
        assert len(series) == 2  # child A's CR series and child B's, not the MR
        pushed = httpx.post(stow, json={"Resources": series}, timeout=120)
        assert pushed.status_code == 200, (pushed.text, pacs.log())
        assert sorted(r["sop_instance_uid"] for r in images(server)) == sorted([a1[0], b1[0]])
    finally:
        pacs.stop()


def test_enroll_to_interrupted(
    phantom_set: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during `enroll --to`: exit 130, what the service took is counted, and the rerun named."""
    caplog.set_level(logging.INFO)
    sent: list[Path] = []

    def enrol_file(self: ServiceClient, path: Path, **labels: object) -> Pushed:
        if len(sent) == 3:
            raise KeyboardInterrupt
        sent.append(path)
        return Pushed("enrolled")

    monkeypatch.setattr(ServiceClient, "check", lambda self: None)
    monkeypatch.setattr(ServiceClient, "enrol_file", enrol_file)
    args = ["enroll", str(phantom_set), "--to", "http://service.invalid", "--concurrency", "1"]
    assert main([*args, "--no-progress"]) == 130
    assert len(sent) == 3
    assert "interrupted: 3 image(s) enrolled and kept in collection 'default'" in caplog.text
    assert "run the same command again to resume" in caplog.text

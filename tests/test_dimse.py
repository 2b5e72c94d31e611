"""The DICOM C-STORE / C-ECHO receiver (app/pacs/dimse.py): pynetdicom's own SCU, its storescu /
echoscu apps and a real Orthanc send real DICOM files to a real listening socket; the instances go
through the STOW-RS ingest (same refusal codes, same wrong-patient alerts), unknown AE titles are
rejected and an instance over the upload limit aborts its association."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from app.pacs.dimse import ERROR_COMMENT_CHARS, DicomReceiver, error_comment, transfer_syntaxes
from app.server_process import Server, free_port
from app.settings import Settings
from tests.orthanc import Orthanc, missing_reason
from tests.test_dicomweb import (
    FAILED,
    FAILURE_REASON,
    STUDY_A,
    _as_patient,
    items,
    radiograph,
    stow,
    value,
)

AE_TITLE = "CXRREID"


@pytest.fixture(scope="module")
def files() -> dict[str, tuple[str, bytes]]:
    """Child A's and child B's radiographs, B's third misfiled under A, a CT-labelled CR instance,
    one with a PatientID holding a control character, and A's first resent under another patient."""
    a1 = radiograph("child-a-1.jpeg", "child-A", STUDY_A)
    return {
        "a1": a1,
        "b1": radiograph("child-b-1.jpeg", "child-B", "1.2.826.0.1.3680043.8.498.21"),
        "b2": radiograph("child-b-2.jpeg", "child-B", "1.2.826.0.1.3680043.8.498.21", view="AP"),
        "misfiled": radiograph("child-b-3.jpeg", "child-A", "1.2.826.0.1.3680043.8.498.22"),
        "ct": radiograph("child-a-2.jpeg", "child-A", STUDY_A, modality="CT"),
        "bad_id": radiograph("child-a-2.jpeg", "child\x01A", STUDY_A),
        "moved": (a1[0], _as_patient(a1[1], "child-Z")),
    }


def dataset(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def scu(calling: str = "MODALITY", syntaxes: list[str] | None = None) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage, syntaxes or transfer_syntaxes()[:2])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def send(port: int, *instances: bytes, calling: str = "MODALITY", called: str = AE_TITLE) -> list[Dataset]:
    """C-STORE each instance on one association; the response status datasets."""
    assoc = scu(calling).associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not accepted"
    try:
        return [assoc.send_c_store(dataset(data)) for data in instances]
    finally:
        assoc.release()


@pytest.fixture
def receiving(make_client: Any, tmp_path: Path) -> Iterator[Any]:
    """Start the app (HTTP in-process, the DICOM receiver on a real loopback port) with ``settings``."""

    def _start(**settings: Any) -> Any:
        settings.setdefault("dicom_port", free_port())
        return make_client(tmp_path / f"data-{len(settings)}-{settings['dicom_port']}", **settings)

    yield _start


@pytest.fixture(scope="module")
def shipped_model() -> Any:
    from models.net.embedder import Embedder

    return Embedder.from_checkpoint(None, runtime="torch")


@pytest.fixture
def make_client(tmp_path: Path, shipped_model: Any) -> Iterator[Any]:
    """Apps on the shipped model (it tells the example children apart, so the misfile is alerted)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    opened: list[TestClient] = []

    def _make(data_dir: Path, **settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(data_dir=data_dir, **settings), embedder=shipped_model))
        client.__enter__()
        opened.append(client)
        return client

    yield _make
    for client in reversed(opened):
        client.__exit__(None, None, None)


def test_c_echo_and_c_store_enrol_as_stow_does(receiving: Any, files: dict[str, tuple[str, bytes]]) -> None:
    """C-ECHO answers; radiographs are enrolled under their tags, the misfile with its wrong-patient
    alert (stored, counted); a resend is a success and enrols nothing; refusals come back as the
    failure status STOW-RS gives the same instance, with the reason in ErrorComment."""
    client = receiving(ae_title=AE_TITLE)
    port = client.app.state.dicom_receiver.port
    assoc = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    stored = send(port, *(files[name][1] for name in ("a1", "b1", "b2", "misfiled")))
    assert [answer.Status for answer in stored] == [0x0000] * 4
    rows = client.get("/images").json()["items"]
    assert sorted((r["patient_id"], r["view"], r["sop_instance_uid"]) for r in rows) == sorted(
        [
            ("child-A", "PA", files["a1"][0]),
            ("child-B", "PA", files["b1"][0]),
            ("child-B", "AP", files["b2"][0]),
            ("child-A", "PA", files["misfiled"][0]),
        ]
    )
    [alert] = client.get("/alerts").json()["items"]
    assert alert["kind"] == "matches_other_patient"
    assert 'cxr_reid_alerts_total{kind="matches_other_patient"} 1.0' in client.get("/metrics").text

    [again] = send(port, files["a1"][1])
    assert again.Status == 0x0000 and client.get("/images").json()["total"] == 4  # idempotent

    refused = send(port, files["ct"][1], files["bad_id"][1], files["moved"][1])
    assert [answer.Status for answer in refused] == [0x0122, 0xC000, 0x0111]
    comments = [str(answer.ErrorComment) for answer in refused]
    assert all(0 < len(comment) <= ERROR_COMMENT_CHARS for comment in comments)
    assert comments[0].startswith("has Modality CT")
    assert comments[1].startswith("its DICOM PatientID contains control characters")
    assert "another PatientID" in comments[2]
    assert "child" not in " ".join(comments)  # the comments name no patient
    assert client.get("/images").json()["total"] == 4

    # the same instances over STOW-RS fail with the same codes: one table answers both
    metrics = client.get("/metrics").text
    for status, count in (("0x0000", 5), ("0x0122", 1), ("0xC000", 1), ("0x0111", 1)):
        assert f'cxr_reid_dicom_stores_total{{status="{status}"}} {count}.0' in metrics

    answer = stow(client, [files[name][1] for name in ("ct", "bad_id", "moved")])
    assert [value(item, FAILURE_REASON) for item in items(answer.json(), FAILED)] == [0x0122, 0xC000, 0x0111]


def test_compressed_and_deflated_instances_are_taken_as_sent(
    receiving: Any, files: dict[str, tuple[str, bytes]]
) -> None:
    """An SCU that offers only RLE lossless, or only deflated explicit VR, gets that context and the
    instance is enrolled from it (decoded by the same reader as an upload)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

    assert {RLELossless, DeflatedExplicitVRLittleEndian} <= set(transfer_syntaxes())
    client = receiving()
    port = client.app.state.dicom_receiver.port
    rle = dataset(files["b1"][1])
    rle.compress(RLELossless)
    deflated = dataset(files["b2"][1])
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    for ds, syntax in ((rle, RLELossless), (deflated, DeflatedExplicitVRLittleEndian)):
        assoc = scu(syntaxes=[syntax]).associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.is_established and assoc.accepted_contexts[0].transfer_syntax[0] == syntax
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    assert client.get("/images").json()["total"] == 2


def test_a_locked_gallery_answers_out_of_resources_until_it_opens(
    make_client: Any, tmp_path: Path, files: dict[str, tuple[str, bytes]]
) -> None:
    """While another process holds the gallery, C-STORE fails with 0xA700 (send it again later) and
    the reason; once it is free the same instance is enrolled, into CXR_REID_DICOM_COLLECTION."""
    import os

    from index.lock import acquire_process_lock

    data_dir = tmp_path / "locked"
    data_dir.mkdir()
    held = acquire_process_lock(data_dir)
    assert held is not None
    client = make_client(data_dir, dicom_port=free_port(), dicom_collection="ward-3", lock_retry_seconds=0.2)
    port = client.app.state.dicom_receiver.port
    [busy] = send(port, files["a1"][1])
    assert busy.Status == 0xA700 and "lock" in str(busy.ErrorComment).lower()
    os.close(held)
    deadline = time.monotonic() + 20
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the gallery did not open once free"
        time.sleep(0.2)
    [stored] = send(port, files["a1"][1])
    assert stored.Status == 0x0000
    [row] = client.get("/images", params={"collection": "ward-3"}).json()["items"]
    assert row["sop_instance_uid"] == files["a1"][0] and row["collection"] == "ward-3"


def test_unknown_calling_or_called_ae_titles_are_rejected(
    receiving: Any, files: dict[str, tuple[str, bytes]]
) -> None:
    """With an allow-list only those calling AE titles associate; a wrong called AE title is rejected
    whatever the caller; nothing is stored by a rejected one."""
    client = receiving(allowed_aes="ORTHANC, MODALITY")
    port = client.app.state.dicom_receiver.port
    intruder = scu("INTRUDER").associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert intruder.is_rejected
    wrong_called = scu("MODALITY").associate("127.0.0.1", port, ae_title="ANY-SCP")
    assert wrong_called.is_rejected
    assert [answer.Status for answer in send(port, files["a1"][1], calling="MODALITY")] == [0x0000]
    assert client.get("/images").json()["total"] == 1


def test_associations_past_the_maximum_are_rejected(receiving: Any) -> None:
    """CXR_REID_DICOM_MAX_ASSOCIATIONS at once; one more is rejected (transient) until one ends."""
    client = receiving(dicom_max_associations=1)
    port = client.app.state.dicom_receiver.port
    first = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert first.is_established
    second = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert second.is_rejected
    first.release()
    deadline = time.monotonic() + 10  # the first one's thread ends just after its release
    while not (third := scu().associate("127.0.0.1", port, ae_title=AE_TITLE)).is_established:
        assert third.is_rejected and time.monotonic() < deadline
        time.sleep(0.1)
    assert third.send_c_echo().Status == 0x0000
    third.release()


def test_an_instance_over_the_upload_limit_aborts_its_association(
    receiving: Any, files: dict[str, tuple[str, bytes]]
) -> None:
    """The data set is counted as it arrives: past CXR_REID_MAX_UPLOAD_BYTES the association is
    aborted, nothing is stored, and the receiver goes on serving."""
    size = len(files["a1"][1])
    client = receiving(max_upload_bytes=size // 2, dicom_max_pdu=16384)
    port = client.app.state.dicom_receiver.port
    assoc = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    answer = assoc.send_c_store(dataset(files["a1"][1]))
    assert "Status" not in answer  # no response: the association is gone
    assoc.join(10)  # the A-ABORT may land just after send_c_store gives up
    assert assoc.is_aborted
    assert client.get("/images").json()["total"] == 0
    small = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert small.is_established and small.send_c_echo().Status == 0x0000
    small.release()


def test_a_pdu_declaring_more_than_the_limit_closes_the_connection(receiving: Any) -> None:
    """A peer that announces a huge PDU (here an A-ASSOCIATE-RQ of 1 GiB, before any AE title is
    checked) and streams it is cut off at its header: the receiver never buffers it, and serves on."""
    import socket

    client = receiving()
    port = client.app.state.dicom_receiver.port
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(bytes([0x01, 0x00]) + (1 << 30).to_bytes(4, "big"))
        with pytest.raises(OSError):  # reset or broken pipe once the receiver has closed it
            for _ in range(10_000):
                sock.sendall(b"\0" * 65536)
                sent += 65536
            sock.recv(1)  # b"" would mean closed too; a reset raises
            raise ConnectionResetError("closed")
    assert sent < 64 * 1024 * 1024  # cut off long before the 1 GiB it announced
    assoc = scu().associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_stopping_closes_idle_associations_at_once(receiving: Any) -> None:
    """Shutdown does not wait on an association that stores nothing: it is aborted, the port closed."""
    client = receiving()
    receiver = client.app.state.dicom_receiver
    idle = scu().associate("127.0.0.1", receiver.port, ae_title=AE_TITLE)
    assert idle.is_established
    started = time.monotonic()
    receiver.stop()
    assert time.monotonic() - started < 5
    idle.join(10)
    assert idle.is_aborted
    assert not scu().associate("127.0.0.1", receiver.port, ae_title=AE_TITLE).is_established


def test_error_comment_fits_dicom_and_receiver_settings_are_checked(tmp_path: Path) -> None:
    sop = "1.2.3.4"
    assert error_comment(f"instance {sop}: stored elsewhere", sop) == "stored elsewhere"
    long = error_comment("x" * 200 + "é", None)
    assert len(long) == ERROR_COMMENT_CHARS and long.endswith("...")
    with pytest.raises(ValueError, match="AE title"):
        Settings(ae_title="A-TITLE-LONGER-THAN-16")
    with pytest.raises(ValueError, match="AE title"):
        Settings(allowed_aes="ORTHANC,BAD\\TITLE")
    assert Settings(allowed_aes=" ORTHANC , MODALITY,").allowed_ae_list == ["ORTHANC", "MODALITY"]
    with pytest.raises(ValueError, match="DICOM_COLLECTION"):
        DicomReceiver(None, Settings(dicom_port=11112, dicom_collection="*"))  # type: ignore[arg-type]


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        receiver = DicomReceiver(None, Settings(dicom_port=port))  # type: ignore[arg-type]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*--dicom-port"):
            receiver.start()


@pytest.mark.slow
@pytest.mark.server
def test_cli_serve_names_a_dicom_port_in_use_in_one_line(tmp_path: Path, server_env: dict[str, str]) -> None:
    """Before the model loads: exit 2 and one line naming the address and what to do."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())]
        done = subprocess.run(
            [*command, "--dicom-port", str(port)], env=server_env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 2, done.stderr
    assert f"the DICOM receiver cannot listen on 127.0.0.1:{port} (Address already in use)" in done.stderr
    assert "--dicom-port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.server
def test_cli_serve_with_dicom_port_receives_from_storescu_and_echoscu(
    tmp_path: Path, servers: list[Server], server_env: dict[str, str]
) -> None:
    """`cxr-reid serve --dicom-port P --ae-title CXRREID --allowed-ae STORESCU`: pynetdicom's own
    echoscu and storescu apps reach it; pydicom-data's chest CR, uncompressed and as JPEG 2000 (two
    instances), is enrolled twice under its PatientID; an unknown caller is rejected with the reason
    in the log; SIGTERM stops both listeners cleanly."""
    from pydicom.data import get_testdata_file

    port, dicom_port = free_port(), free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--dicom-port", str(dicom_port)]
    command += ["--ae-title", AE_TITLE, "--allowed-ae", "STORESCU", "--allowed-ae", "ECHOSCU"]
    log = tmp_path / "server.log"
    server = Server(command, server_env, port, log)
    servers.append(server)
    app = [sys.executable, "-m", "pynetdicom"]
    target = ["127.0.0.1", str(dicom_port), "-aec", AE_TITLE]
    echo = subprocess.run([*app, "echoscu", *target], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    chest = [get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("RG1_J2KR.dcm")]
    store = subprocess.run(
        [*app, "storescu", *target, *chest, "-cx", "-v"], capture_output=True, text=True, timeout=120
    )
    assert store.returncode == 0, store.stderr
    assert store.stderr.count("Received Store Response (Status: 0x0000 - Success)") == 2, store.stderr
    images = httpx.get(f"{server.url}/images").json()["items"]
    assert sorted((r["patient_id"], r["view"]) for r in images) == [("9RG1", "PA"), ("9RG1", "PA")]
    refused = subprocess.run(
        [*app, "echoscu", "127.0.0.1", str(dicom_port), "-aec", AE_TITLE, "-aet", "INTRUDER"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Association Rejected" in refused.stderr + refused.stdout
    server.stop(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert server.process.returncode in (0, -signal.SIGTERM)
    text = log.read_text()
    assert f"DICOM receiver {AE_TITLE} stopped" in text and "Traceback" not in text
    assert "from INTRUDER at 127.0.0.1 rejected: its calling AE title is not among" in text


@pytest.mark.slow
@pytest.mark.pacs
@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_orthanc_sends_c_store_to_the_receiver(
    receiving: Any, tmp_path: Path, files: dict[str, tuple[str, bytes]]
) -> None:
    """A real Orthanc with the receiver as a DICOM modality: its C-ECHO succeeds, its C-STORE of the
    radiographs enrols them (the misfile alerted), a second push enrols nothing, and a CT-labelled
    instance makes Orthanc's store job fail; an Orthanc whose AE title is not allowed is rejected."""
    client = receiving(allowed_aes="CXRREIDTEST")
    port = client.app.state.dicom_receiver.port
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        modality = {"AET": AE_TITLE, "Host": "127.0.0.1", "Port": port}
        assert httpx.put(f"{pacs.url}/modalities/cxr-reid", json=modality).status_code == 200
        assert httpx.post(f"{pacs.url}/modalities/cxr-reid/echo", json={}, timeout=30).status_code == 200
        ids = {name: pacs.store(files[name][1])["ID"] for name in ("a1", "b1", "b2", "misfiled", "ct")}
        radiographs = [ids[name] for name in ("a1", "b1", "b2", "misfiled")]
        for _ in range(2):
            push = httpx.post(
                f"{pacs.url}/modalities/cxr-reid/store",
                json={"Resources": radiographs, "Synchronous": True},
                timeout=120,
            )
            assert push.status_code == 200, (push.text, pacs.log())
            assert client.get("/images").json()["total"] == 4
        assert [a["kind"] for a in client.get("/alerts").json()["items"]] == ["matches_other_patient"]
        ct = httpx.post(f"{pacs.url}/modalities/cxr-reid/store", json={"Resources": [ids["ct"]]}, timeout=60)
        assert ct.status_code != 200, ct.text  # Orthanc reports the refused C-STORE as a failed job
        assert client.get("/images").json()["total"] == 4
    finally:
        pacs.stop()


@pytest.mark.slow
@pytest.mark.pacs
@pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
def test_an_orthanc_not_on_the_allow_list_is_rejected(receiving: Any, tmp_path: Path) -> None:
    """An Orthanc whose AE title (CXRREIDTEST) is not among CXR_REID_ALLOWED_AES: its C-ECHO fails."""
    client = receiving(allowed_aes="MODALITY")
    port = client.app.state.dicom_receiver.port
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        modality = {"AET": AE_TITLE, "Host": "127.0.0.1", "Port": port}
        assert httpx.put(f"{pacs.url}/modalities/cxr-reid", json=modality).status_code == 200
        echo = httpx.post(f"{pacs.url}/modalities/cxr-reid/echo", json={}, timeout=30)
        assert echo.status_code != 200
    finally:
        pacs.stop()

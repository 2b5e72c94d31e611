"""Wrong-patient alerts out of the enrol response (issue 13, part 3): stored in the gallery with the
enrolment, listed and resolved over HTTP (confirm, dismiss, relabel; who and when), counted in
/metrics, and sent to a webhook (a real local HTTP server) without ever holding up an enrolment."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.api.schemas import StoredAlertOut
from app.main import create_app
from app.server_process import ROOT, free_port
from app.service.keys import KeyStore
from app.service.webhook import AlertWebhook, signature
from app.settings import Settings
from index import AlertNotOpenError, AlertRecord, Gallery, GalleryValidationError, NewAlert, NewImage
from models.net.embedder import Embedder

EXAMPLES = ROOT / "examples" / "radiographs"


@pytest.fixture(scope="module")
def shipped() -> Embedder:
    """The shipped model: it tells the example children apart, so misfiles raise their alerts."""
    return Embedder.from_checkpoint(None, runtime="torch")


@pytest.fixture
def make_app(shipped: Embedder, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    opened: list[TestClient] = []

    def _make(**settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(data_dir=tmp_path / "data", **settings), embedder=shipped))
        client.__enter__()
        opened.append(client)
        return client

    yield _make
    for client in reversed(opened):
        client.__exit__(None, None, None)


def enrol(
    client: TestClient, patient: str, *names: str, collection: str = "default", **kw: Any
) -> list[dict]:
    files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg")) for name in names]
    response = client.post(
        "/images", files=files, data={"patient_id": patient, "collection": collection}, **kw
    )
    assert response.status_code == 201, response.text
    return response.json()["images"]


def metric(client: TestClient, line: str, **kw: Any) -> bool:
    return line in client.get("/metrics", **kw).text


# ------------------------------------------------------------------------------------------ the gallery
def test_gallery_keeps_alerts_with_their_enrolment(tmp_path: Path) -> None:
    g = Gallery(tmp_path / "g", dim=4, model_id="m")
    v = np.eye(4, dtype=np.float32)
    alert = NewAlert(kind="matches_other_patient", message="m", score=0.9, other_patient_id="A")
    with pytest.raises(GalleryValidationError):  # one alert per image, or nothing is written
        g.add_with_alerts(v[:2], [NewImage(patient_id="A"), NewImage(patient_id="B")], [alert])
    assert len(g) == 0 and g.count_alerts(None) == 0
    records, stored = g.add_with_alerts(
        v[:3], [NewImage(patient_id=p) for p in "ABC"], [None, alert, NewAlert(kind="x", message="", score=0)]
    )
    assert stored[0] is None and stored[1].image_id == records[1].image_id and stored[1].patient_id == "B"
    assert [a.alert_id for a in g.list_alerts(state="open")[0]] == [stored[2].alert_id, stored[1].alert_id]
    # deleting an image closes its open alert (kept, as history); a resolved one keeps its state
    g.resolve_alert(stored[1].alert_id, state="dismissed", resolved_by="k")
    g.delete_patient("B")
    g.delete_image(records[2].image_id)
    assert g.get_alert(stored[1].alert_id).state == "dismissed"
    assert g.get_alert(stored[2].alert_id).state == "deleted"
    with pytest.raises(AlertNotOpenError):
        g.resolve_alert(stored[2].alert_id, state="confirmed", resolved_by="k")
    assert g.resolve_alert(999, state="confirmed", resolved_by="k") is None
    g.close()
    # a gallery made before alerts existed gets the table when it is opened
    with sqlite3.connect(tmp_path / "g" / "gallery.sqlite") as conn:
        conn.execute("DROP TABLE alerts")
    g = Gallery(tmp_path / "g", dim=4, model_id="m")
    assert g.count_alerts(None) == 0 and len(g) == 1 and g.is_consistent()
    g.close()


# ------------------------------------------------------------------------------------------ the API
def test_alerts_stored_listed_and_resolved(make_app: Callable[..., TestClient]) -> None:
    client = make_app()
    [a1] = enrol(client, "child-A", "child-a-1.jpeg")
    enrol(client, "child-B", "child-b-1.jpeg", "child-b-2.jpeg")
    enrol(client, "child-C", "child-c-1.jpeg")
    assert client.get("/alerts").json()["total"] == 0

    # B's third radiograph filed under child A: stored with the enrolment, listed with both images
    [misfile] = enrol(client, "child-A", "child-b-3.jpeg")
    raised = misfile["alert"]
    assert raised["kind"] == "matches_other_patient" and raised["alert_id"] >= 1
    listed = client.get("/alerts?state=open").json()
    assert listed["total"] == 1
    [item] = listed["items"]
    assert item["alert_id"] == raised["alert_id"] and item["state"] == "open"
    assert item["image_id"] == misfile["image_id"] and item["image"]["patient_id"] == "child-A"
    assert item["other_patient_id"] == "child-B" and item["other_image"]["patient_id"] == "child-B"
    assert item["message"] == raised["message"] and item["score"] == pytest.approx(raised["score"])
    point = client.get("/readyz").json()["operating_point"]
    assert item["operating_point"]["threshold"] == pytest.approx(point["threshold"])
    assert item["operating_point"]["calibration"]["source"] == "shipped"
    assert item["created_at"] == item["image"]["created_at"] and item["resolved_at"] is None

    # A's second radiograph under child C in another collection, and A's first again there
    enrol(client, "child-A", "child-a-1.jpeg", collection="ward")
    [second] = enrol(client, "child-C", "child-a-2.jpeg", collection="ward")
    assert second["alert"]["kind"] == "matches_other_patient"
    page = client.get("/alerts?limit=1").json()
    assert page["total"] == 2 and [i["alert_id"] for i in page["items"]] == [second["alert"]["alert_id"]]
    assert client.get("/alerts?limit=1&offset=1").json()["items"][0]["alert_id"] == raised["alert_id"]
    assert [i["alert_id"] for i in client.get("/alerts?collection=ward").json()["items"]] == [
        second["alert"]["alert_id"]
    ]
    assert client.get("/alerts?state=dismissed").json()["total"] == 0
    assert metric(client, "cxr_reid_alerts_open 2.0")
    assert client.get(f"/alerts/{raised['alert_id']}").json()["image_id"] == misfile["image_id"]

    # bad requests change nothing
    url = f"/alerts/{raised['alert_id']}"
    assert client.get("/alerts/999").status_code == 404
    assert client.post("/alerts/999", json={"action": "dismiss"}).status_code == 404
    assert client.post(url, json={"action": "forget"}).status_code == 422
    assert client.post(url, json={"action": "confirm", "patient_id": "child-B"}).status_code == 422
    assert client.get("/alerts?state=unknown").status_code == 422

    # relabel: by default to the patient it matched; the gallery changes, who and when are kept
    relabelled = client.post(url, json={"action": "relabel", "note": "checked the PACS"})
    assert relabelled.status_code == 200, relabelled.text
    body = relabelled.json()
    assert body["state"] == "relabelled" and body["new_patient_id"] == "child-B"
    assert body["resolved_by"] == "anonymous" and body["resolved_at"] and body["note"] == "checked the PACS"
    assert body["image"]["patient_id"] == "child-B" and body["patient_id"] == "child-A"
    assert client.get(f"/images/{misfile['image_id']}").json()["patient_id"] == "child-B"
    again = client.post(url, json={"action": "dismiss"})
    assert again.status_code == 409 and "already relabelled" in again.json()["detail"]

    # dismiss the other; then a third misfile, deleted while open, is closed as deleted
    second_url = f"/alerts/{second['alert']['alert_id']}"
    assert client.post(second_url, json={"action": "dismiss"}).json()["state"] == "dismissed"
    assert client.get("/images?collection=ward&patient_id=child-C").json()["total"] == 1  # unchanged
    [third] = enrol(client, "child-C", "child-b-1.jpeg")
    assert client.delete(f"/images/{third['image_id']}").status_code == 200
    closed = client.get(f"/alerts/{third['alert']['alert_id']}").json()
    assert closed["state"] == "deleted" and closed["image"] is None and closed["resolved_at"]
    assert client.post(f"/alerts/{third['alert']['alert_id']}", json={"action": "confirm"}).status_code == 409
    assert client.get("/alerts?state=open").json()["total"] == 0
    for line in (
        'cxr_reid_alerts_resolved_total{action="relabel"} 1.0',
        'cxr_reid_alerts_resolved_total{action="dismiss"} 1.0',
        "cxr_reid_alerts_open 0.0",
        'cxr_reid_alerts_total{kind="matches_other_patient"} 3.0',
    ):
        assert metric(client, line), line
    assert a1["alert"] is None


def test_alert_scopes_and_who_resolved(make_app: Callable[..., TestClient], tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "data" / "keys.json")
    tokens = {scope: store.add(scope) for scope in ("read", "write")}
    read = {"X-API-Key": tokens["read"][1]}
    write = {"X-API-Key": tokens["write"][1]}
    client = make_app()
    enrol(client, "child-A", "child-a-1.jpeg", headers=write)
    [misfile] = enrol(client, "child-A", "child-b-1.jpeg", headers=write)  # looks like none of A's images
    alert = misfile["alert"]
    assert alert["kind"] == "no_match_with_own_images" and alert["other_patient_id"] is None
    url = f"/alerts/{alert['alert_id']}"
    assert client.get("/alerts").status_code == 401
    assert client.get("/alerts", headers=read).json()["total"] == 1
    assert client.get(url, headers=read).status_code == 200
    assert client.post(url, json={"action": "dismiss"}).status_code == 401
    assert client.post(url, json={"action": "dismiss"}, headers=read).status_code == 403
    # relabel needs a patient here: the alert names no other one
    missing = client.post(url, json={"action": "relabel"}, headers=write)
    assert missing.status_code == 422 and "patient_id" in missing.json()["detail"]
    done = client.post(url, json={"action": "relabel", "patient_id": "child-B"}, headers=write).json()
    assert done["resolved_by"] == tokens["write"][0].key_id and done["new_patient_id"] == "child-B"
    assert client.get(f"/images/{misfile['image_id']}", headers=read).json()["patient_id"] == "child-B"
    # a key limited to another collection: that collection's alerts only; this one's are "not found"
    ward = {"X-API-Key": store.add("write", collections=["ward"])[1]}
    assert client.get("/alerts", headers=ward).status_code == 403  # it must name its collection
    assert client.get("/alerts?collection=ward", headers=ward).json()["total"] == 0
    assert client.get(url, headers=ward).status_code == 404
    assert client.post(url, json={"action": "confirm"}, headers=ward).status_code == 404


# ------------------------------------------------------------------------------------------ the webhook
class Receiver:
    """A real HTTP server on loopback that records POSTed JSON; it answers the statuses in
    ``answers`` first (then 200), and holds each request while ``gate`` is clear."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.received: list[tuple[int, dict]] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []  # headers and body as they came
        self.gate = threading.Event()
        self.gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                receiver.gate.wait(10)
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.raw.append((dict(self.headers), raw))
                body = json.loads(raw)
                status = receiver.answers.pop(0) if receiver.answers else 200
                receiver.received.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[tuple[int, dict]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_webhook_delivers_after_a_failure_without_holding_up_enrolment(
    make_app: Callable[..., TestClient], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.service.webhook")
    receiver.answers = [500]
    receiver.gate.clear()  # the receiver holds every request until the enrolment has answered
    client = make_app(alert_webhook=receiver.url, alert_webhook_backoff_seconds=0.05)
    enrol(client, "child-A", "child-a-1.jpeg")
    [misfile] = enrol(client, "child-A", "child-b-1.jpeg")
    assert misfile["alert"] is not None and receiver.received == []  # enrolment did not wait
    receiver.gate.set()
    got = receiver.wait_for(2)
    assert [status for status, _ in got] == [500, 200]
    event = got[1][1]
    assert event["event"] == "raised" and event["alert"]["alert_id"] == misfile["alert"]["alert_id"]
    assert event["alert"]["image_id"] == misfile["image_id"] and event["alert"]["state"] == "open"
    stored = client.get(f"/alerts/{misfile['alert']['alert_id']}").json()
    assert {key: stored[key] for key in event["alert"]} == event["alert"]  # the API's fields, as served
    assert set(StoredAlertOut.model_fields) == set(event["alert"])
    client.post(f"/alerts/{misfile['alert']['alert_id']}", json={"action": "confirm"})
    got = receiver.wait_for(3)
    assert got[2][1]["event"] == "confirmed" and got[2][1]["alert"]["resolved_by"] == "anonymous"
    assert metric(client, 'cxr_reid_alert_webhook_total{outcome="delivered"} 2.0')
    assert metric(client, 'cxr_reid_alert_webhook_total{outcome="retried"} 1.0')
    # the logs name the receiver's host, not the URL's token nor any patient
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "app.service.webhook")
    assert "HTTP 500" in logged and "secret" not in logged and "child-" not in logged


def test_webhook_unreachable_never_blocks_enrolment(make_app: Callable[..., TestClient]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    client = make_app(alert_webhook=dead, alert_webhook_attempts=3, alert_webhook_backoff_seconds=0.05)
    enrol(client, "child-A", "child-a-1.jpeg")
    [misfile] = enrol(client, "child-A", "child-b-1.jpeg")
    assert misfile["alert"]["alert_id"] is not None
    assert client.get("/alerts?state=open").json()["total"] == 1  # the table is the record
    deadline = time.monotonic() + 15
    while not metric(client, 'cxr_reid_alert_webhook_total{outcome="failed"} 1.0'):
        assert time.monotonic() < deadline, client.get("/metrics").text
        time.sleep(0.05)
    assert metric(client, 'cxr_reid_alert_webhook_total{outcome="retried"} 2.0')


def test_webhook_queue_full_drops_and_counts(receiver: Receiver) -> None:
    receiver.gate.clear()
    outcomes: list[str] = []
    hook = AlertWebhook(receiver.url, queue_size=1, on_outcome=outcomes.append)
    alert = AlertRecord(
        kind="matches_other_patient",
        message="m",
        score=0.9,
        alert_id=1,
        image_id=1,
        collection="default",
        patient_id="A",
        state="open",
        created_at="2026-01-01T00:00:00.000+00:00",
    )
    sent = [hook.send("raised", alert) for _ in range(4)]  # one in flight, one queued, two dropped
    assert sent[0] and not all(sent) and outcomes.count("dropped") >= 2
    receiver.gate.set()
    hook.close(timeout=10)
    assert outcomes.count("delivered") + outcomes.count("dropped") == 4


def test_stow_alerts_are_stored_too(make_app: Callable[..., TestClient]) -> None:
    from tests.test_dicomweb import REFERENCED, STUDY_A, STUDY_A2, TEXT, items, radiograph, stow, value

    client = make_app()
    a1, misfiled = (
        radiograph("child-a-1.jpeg", "child-A", STUDY_A),
        radiograph("child-b-1.jpeg", "child-A", STUDY_A2),
    )
    response = stow(client, [a1[1], misfiled[1]])
    assert response.status_code == 200, response.text
    [first, second] = items(response.json(), REFERENCED)
    assert TEXT not in first and value(second, TEXT).startswith(
        "wrong-patient alert (no_match_with_own_images)"
    )
    [stored] = client.get("/alerts").json()["items"]
    assert stored["image"]["sop_instance_uid"] == misfiled[0] and stored["patient_id"] == "child-A"


def test_webhook_bodies_are_signed_with_the_shared_secret(
    make_app: Callable[..., TestClient], receiver: Receiver
) -> None:
    client = make_app(alert_webhook=receiver.url, alert_webhook_secret="s3cret-of-the-ward")
    enrol(client, "child-A", "child-a-1.jpeg")
    enrol(client, "child-A", "child-b-1.jpeg")
    receiver.wait_for(1)
    headers, raw = receiver.raw[0]
    timestamp = headers["X-CXR-Reid-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 600
    assert headers["X-CXR-Reid-Signature"] == signature("s3cret-of-the-ward", timestamp, raw)
    assert headers["X-CXR-Reid-Signature"] != signature("another secret", timestamp, raw)  # forgeries fail
    assert json.loads(raw)["event"] == "raised"


def test_webhook_warns_on_plain_http_and_unsigned_bodies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.service.webhook")
    AlertWebhook("http://pacs.example.org/hook", secret="s").close(0.1)
    assert "plain http" in caplog.text and "unsigned" not in caplog.text
    caplog.clear()
    AlertWebhook("https://pacs.example.org/hook").close(0.1)
    assert "unsigned" in caplog.text and "plain http" not in caplog.text
    caplog.clear()
    AlertWebhook("http://127.0.0.1:9/hook", secret="s").close(0.1)  # loopback: nothing leaves the host
    assert caplog.text == ""

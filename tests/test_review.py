"""The review page (issue 13, part 4): GET /review on a real uvicorn server with API keys, signed in
through its login form, rendered in headless Chromium (two thumbnails per alert, drawn), an alert
relabelled in Chromium by signing in and pressing the page's own button (tests/browser.py drives it
with Playwright) and the gallery checked through the API; login, scopes, CSRF and
escaping."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from browser import Browser, needs_chromium, render, screenshot
from PIL import Image

from app.api.routers.review import SESSION_SECONDS, ReviewSessions
from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command
from app.service.keys import KeyStore

pytestmark = pytest.mark.server
EXAMPLES = ROOT / "examples" / "radiographs"
HOSTILE = '<script>alert("x")</script>&<i onmouseover=x>'


class Forms(HTMLParser):
    """The <form>s of a page: action, method and the fields a browser would send (the clicked
    button's name/value added by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"action": a.get("action"), "method": a.get("method"), "fields": {}, "buttons": []}
            )
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif tag == "button" and self.forms and a.get("name"):
            self.forms[-1]["buttons"].append((a["name"], a.get("value") or ""))


def forms_of(html: str) -> list[dict]:
    parser = Forms()
    parser.feed(html)
    return parser.forms


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    data = tmp_path_factory.mktemp("review") / "data"
    data.mkdir()
    store = KeyStore(data / "keys.json")
    tokens = {scope: store.add(scope)[1] for scope in ("read", "write")}
    port = free_port()
    server = Server(uvicorn_command(port), server_env(data), port, data.parent / "server.log")
    write = {"X-API-Key": tokens["write"]}

    def enrol(patient: str, name: str, collection: str = "default") -> dict:
        files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))]
        answer = httpx.post(
            f"{server.url}/images",
            files=files,
            data={"patient_id": patient, "collection": collection, "view": "PA", "study_date": "20240502"},
            headers=write,
            timeout=60,
        )
        assert answer.status_code == 201, answer.text
        return answer.json()["images"][0]

    try:
        enrol("child-B", "child-b-1.jpeg")
        enrol("child-B", "child-b-2.jpeg")
        misfile = enrol("child-A", "child-b-3.jpeg")  # B's radiograph filed under child A
        assert misfile["alert"]["kind"] == "matches_other_patient"
        # a hostile patient id, in a collection of its own
        enrol(HOSTILE, "child-c-1.jpeg", collection="hostile")
        assert enrol("child-D", "child-c-2.jpeg", collection="hostile")["alert"] is not None
        yield (
            server,
            {**tokens, "alert": str(misfile["alert"]["alert_id"]), "image": str(misfile["image_id"])},
        )
    finally:
        server.stop()


def login(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    page = client.get("/review")
    assert page.status_code == 401 and 'name="api_key"' in page.text  # the login form
    [form] = forms_of(page.text)
    signed = client.post(form["action"], data={"api_key": token})
    assert signed.status_code == 303 and signed.headers["location"] == "/review"
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    return client


def resolve_form(html: str, alert_id: str) -> dict:
    [form] = [f for f in forms_of(html) if f["action"] == f"/review/alerts/{alert_id}"]
    return form


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_review_page_in_chromium_relabels_an_alert(server: tuple[Server, dict], tmp_path: Path) -> None:
    srv, ids = server
    client = login(srv.url, ids["write"])
    before = client.get("/review", params={"collection": "default"})
    assert before.status_code == 200 and before.headers["cache-control"] == "no-store"
    page = tmp_path / "review.html"
    page.write_text(before.text, encoding="utf-8")
    dom = render(page)
    assert f'id="alert-{ids["alert"]}"' in dom
    alert_html = dom.split(f'id="alert-{ids["alert"]}"', 1)[1].split("</article>", 1)[0]
    assert alert_html.count("<img") == 2 and "child-A" in alert_html and "child-B" in alert_html
    assert "20240502" in alert_html and "PA" in alert_html
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images >= 2 and re.search(r'data-images-loaded="(\d+)"', dom).group(1) == str(images)
    shot = screenshot(page, tmp_path / "review.png", size="1100,900")
    if os.environ.get("CXR_REID_REVIEW_SCREENSHOT"):  # scripts/review-screenshot.sh
        Image.open(shot).convert("RGB").quantize(colors=128).save(
            os.environ["CXR_REID_REVIEW_SCREENSHOT"], optimize=True
        )

    # a person at the page in Chromium: signs in with the key, types a note, presses Relabel
    form = resolve_form(before.text, ids["alert"])
    assert form["method"] == "post" and form["fields"]["patient_id"] == "child-B" and form["fields"]["csrf"]
    assert ("action", "relabel") in form["buttons"] and ("action", "dismiss") in form["buttons"]
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Browser(profile)
    try:
        browser.open(f"{srv.url}/review?collection=default")
        browser.wait_for("document.querySelector('input[name=api_key]')")
        browser.evaluate(
            f"document.querySelector('input[name=api_key]').value = {json.dumps(ids['write'])};"
            "document.querySelector('form.login button').click()"
        )
        card = f"#alert-{ids['alert']}"
        browser.wait_for(f"document.querySelector('{card}')")
        browser.evaluate(
            f"document.querySelector('{card} input[name=note]').value = 'seen in the PACS';"
            f"document.querySelector('{card} button[value=relabel]').click()"
        )
        browser.wait_for(f"document.body.innerText.includes('alert {ids['alert']} relabelled')")
        assert browser.evaluate(f"document.querySelector('{card}') === null")  # gone from the open list
    finally:
        browser.close()
    # the gallery changed, recorded with who
    read = {"X-API-Key": ids["read"]}
    assert httpx.get(f"{srv.url}/images/{ids['image']}", headers=read).json()["patient_id"] == "child-B"
    alert = httpx.get(f"{srv.url}/alerts/{ids['alert']}", headers=read).json()
    assert alert["state"] == "relabelled" and alert["note"] == "seen in the PACS" and alert["resolved_by"]
    # resolving again (the form as it was): the page says why, nothing changes
    again = client.post(form["action"], data={**form["fields"], "action": "dismiss"})
    assert again.status_code == 409 and "already relabelled" in again.text


def test_login_scopes_and_csrf(server: tuple[Server, dict]) -> None:
    srv, ids = server
    url = f"{srv.url}/review/alerts/{ids['alert']}"
    assert httpx.get(f"{srv.url}/review").status_code == 401
    assert httpx.post(url, data={"action": "dismiss"}).status_code == 401
    wrong = httpx.post(f"{srv.url}/review/login", data={"api_key": "not-a-key"})
    assert wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    assert httpx.get(f"{srv.url}/review", cookies={"cxr_reid_review": "not-a-key"}).status_code == 401
    # the header works as for the API
    assert httpx.get(f"{srv.url}/review", headers={"X-API-Key": ids["read"]}).status_code == 200
    # a read key may look, not resolve
    reader = login(srv.url, ids["read"])
    page = reader.get("/review", params={"collection": "*"})
    assert page.status_code == 200
    [form] = [f for f in forms_of(page.text) if f["action"].startswith("/review/alerts/")][:1]
    refused = reader.post(form["action"], data={**form["fields"], "action": "dismiss"})
    assert refused.status_code == 403
    # a write key without the anti-CSRF token, or with another session's
    writer = login(srv.url, ids["write"])
    fields = resolve_form(
        writer.get("/review", params={"collection": "*"}).text, form["action"].rsplit("/", 1)[1]
    )
    del fields["fields"]["csrf"]
    assert writer.post(form["action"], data={**fields["fields"], "action": "dismiss"}).status_code == 403
    other = {**form["fields"], "action": "dismiss"}  # the read session's token
    assert writer.post(form["action"], data=other).status_code == 403
    alert_id = form["action"].rsplit("/", 1)[1]
    assert (
        httpx.get(f"{srv.url}/alerts/{alert_id}", headers={"X-API-Key": ids["read"]}).json()["state"]
        == "open"
    )
    # the cookie holds a session id, not the key; signing out ends the session on the server too
    session = writer.cookies["cxr_reid_review"]
    assert session and ids["write"] not in session
    out = writer.post("/review/logout")
    assert out.status_code == 303 and writer.get("/review").status_code == 401
    replayed = httpx.get(f"{srv.url}/review", cookies={"cxr_reid_review": session})
    assert replayed.status_code == 401  # a copied cookie is worth nothing after sign-out


def test_pages_carry_a_content_security_policy(server: tuple[Server, dict]) -> None:
    srv, ids = server
    for page in (
        httpx.get(f"{srv.url}/review"),  # the login form
        httpx.get(f"{srv.url}/review", headers={"X-API-Key": ids["read"]}, params={"collection": "*"}),
    ):
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        nonce = policy.split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">' in page.text  # the page's own script, and only it, may run
        assert page.text.count("<script") == 1


def test_review_sessions_end_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    sessions = ReviewSessions(clock=lambda: now[0])
    first = sessions.open("key-1")
    assert sessions.key_of(first) == "key-1" and sessions.key_of("forged") is None
    now[0] = SESSION_SECONDS + 1
    assert sessions.key_of(first) is None  # expired
    monkeypatch.setattr("app.api.routers.review.MAX_SESSIONS", 2)
    a, b, c = (sessions.open(f"k{i}") for i in range(3))
    assert sessions.key_of(a) is None and sessions.key_of(b) == "k1" and sessions.key_of(c) == "k2"
    sessions.close(b)
    assert sessions.key_of(b) is None


def test_hostile_patient_id_is_escaped(server: tuple[Server, dict]) -> None:
    srv, ids = server
    html = httpx.get(
        f"{srv.url}/review", params={"collection": "hostile"}, headers={"X-API-Key": ids["read"]}
    ).text
    assert "<script>alert(" not in html and "<i onmouseover" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;&lt;i onmouseover=x&gt;" in html
    assert "child-D" in html


def test_review_routes_stay_out_of_openapi(server: tuple[Server, dict]) -> None:
    srv, ids = server
    paths = httpx.get(f"{srv.url}/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/review")]


def test_open_without_keys(tmp_path: Path) -> None:
    """No keys configured (loopback): the page needs no login, and its forms still need the token."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from models.net.embedder import Embedder

    embedder = Embedder.from_checkpoint(None, runtime="torch")
    with TestClient(create_app(Settings(data_dir=tmp_path / "data"), embedder=embedder)) as client:
        for patient, name in (("child-B", "child-b-1.jpeg"), ("child-A", "child-b-2.jpeg")):
            files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))]
            assert client.post("/images", files=files, data={"patient_id": patient}).status_code == 201
        page = client.get("/review")
        assert page.status_code == 200 and "Sign out" not in page.text and page.text.count("<img") >= 2
        [form] = [f for f in forms_of(page.text) if f["action"].startswith("/review/alerts/")]
        assert client.post(form["action"], data={"action": "dismiss"}).status_code == 403  # no token
        done = client.post(
            form["action"], data={**form["fields"], "action": "dismiss"}, follow_redirects=False
        )
        assert done.status_code == 303
        alert = client.get("/alerts/" + form["action"].rsplit("/", 1)[1]).json()
        assert alert["state"] == "dismissed" and alert["resolved_by"] == "anonymous"


def test_review_shows_the_decision_and_far_then_the_probability_and_its_prior(
    server: tuple[Server, dict],
) -> None:
    srv, ids = server
    write, read = {"X-API-Key": ids["write"]}, {"X-API-Key": ids["read"]}

    def enrol(patient: str, name: str) -> dict:
        files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))]
        data = {"patient_id": patient, "collection": "odds"}
        answer = httpx.post(f"{srv.url}/images", files=files, data=data, headers=write, timeout=60)
        assert answer.status_code == 201, answer.text
        return answer.json()["images"][0]

    enrol("P-B", "child-b-1.jpeg")
    misfile = enrol("P-A", "child-b-3.jpeg")["alert"]  # B's radiograph filed under A
    enrol("P-C", "child-c-1.jpeg")
    stranger = enrol("P-C", "child-a-1.jpeg")["alert"]  # A's radiograph filed under C: like none of C's
    assert misfile["kind"] == "matches_other_patient" and stranger["kind"] == "no_match_with_own_images"

    def card(html: str, alert: dict) -> str:
        return html.split(f'id="alert-{alert["alert_id"]}"', 1)[1].split("</article>", 1)[0]

    def percent(html: str) -> float:
        return float(re.search(r'class="probability">([\d.]+)%', html).group(1))

    page = httpx.get(f"{srv.url}/review", params={"collection": "odds"}, headers=read, timeout=60)
    assert page.status_code == 200
    same, other = card(page.text, misfile), card(page.text, stranger)
    for html in (same, other):
        where = [html.index(f'class="{name}"') for name in ("decision", "far", "score", "probability")]
        assert where == sorted(where)  # the decision and its FAR first, the probability after them
        assert "FAR 0.001 · threshold" in html
        assert "at prior" in html and "the prior at which this threshold is the Bayes decision" in html
    assert "same patient as P-B" in same and 50.0 <= percent(same) < 100.0
    assert "not patient P-C" in other and percent(other) < 50.0
    assert "100.0%" not in page.text and 'name="prior"' in page.text  # the prior can be set on the page

    mine = httpx.get(
        f"{srv.url}/review", params={"collection": "odds", "prior": "0.02"}, headers=read, timeout=60
    )
    assert mine.status_code == 200 and "at prior 2.0%, as asked" in card(mine.text, misfile)
    empty = httpx.get(f"{srv.url}/review", params={"collection": "odds", "prior": ""}, headers=read)
    assert empty.status_code == 200 and "Bayes decision" in empty.text  # the form's empty field
    bad = httpx.get(f"{srv.url}/review", params={"collection": "odds", "prior": "1.5"}, headers=read)
    assert bad.status_code == 422 and "prior must be a probability in (0, 1)" in bad.text

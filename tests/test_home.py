"""GET /: the bare address points to /docs and /review (a page for browsers, JSON for scripts),
answers without a key, and stays out of the API schema like the other pages for people."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import Browser, needs_chromium
from fastapi.testclient import TestClient

from app.main import create_app
from app.server_process import Server, free_port, uvicorn_command
from app.settings import Settings


def test_root_points_to_docs_and_review(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys="secret-key"))
    client = TestClient(app)  # no lifespan: GET / needs neither the model nor the gallery
    answer = client.get("/")
    assert answer.status_code == 200
    links = answer.json()["links"]
    assert links["docs"] == "/docs" and links["review"] == "/review"
    for path in links.values():  # every link leads somewhere (the pages may then ask for a key)
        assert client.get(path).status_code != 404, path

    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<a href="/docs">' in page.text and '<a href="/review">' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    assert "/" not in app.openapi()["paths"]


@pytest.mark.browser
@pytest.mark.server
@pytest.mark.slow
@needs_chromium
def test_a_browser_at_the_bare_address_follows_the_link_to_the_docs(
    server_env: dict[str, str], servers: list[Server], tmp_path: Path
) -> None:
    port = free_port()
    server = Server(uvicorn_command(port), server_env, port, tmp_path / "server.log")
    servers.append(server)
    with Browser(tmp_path / "chromium-profile") as browser:
        browser.open(f"{server.url}/")
        browser.wait_for("document.querySelector('a[href=\"/review\"]') !== null")
        assert "cxr-reid" in str(browser.evaluate("document.title"))
        browser.evaluate("document.querySelector('a[href=\"/docs\"]').click()")
        browser.wait_for("document.querySelectorAll('.opblock-summary-path').length > 0")
        assert str(browser.evaluate("location.pathname")) == "/docs"
        assert not browser.refused, browser.refused

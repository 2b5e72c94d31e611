"""GET /: the bare address points to /docs and /review (a page for browsers, JSON for scripts),
answers without a key, and stays out of the API schema like the other pages for people."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
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

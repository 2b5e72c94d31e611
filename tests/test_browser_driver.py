"""The browser driver the page tests stand on (tests/browser.py, Playwright on Debian's chromium):
scripts run, a report that reaches for the network fails its render, screenshots have the size asked
for, and a window on a local server types, clicks, follows a form post and never leaves loopback."""

from __future__ import annotations

import base64
import functools
import importlib
import io
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser import Browser, needs_chromium, render, screenshot
from PIL import Image

pytestmark = [pytest.mark.browser, needs_chromium]


def _png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_render_runs_scripts_and_counts_decoded_images(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(
        f'<html><body><img src="{_png_data_uri()}"><img src="data:image/png;base64,broken">'
        "<script>document.body.setAttribute('data-made-by', 'script')</script></body></html>",
        encoding="utf-8",
    )
    dom = render(page)
    assert 'data-made-by="script"' in dom
    assert 'data-images="2"' in dom and 'data-images-loaded="1"' in dom
    assert not list(tmp_path.glob(".probe-*"))  # the probed copy is gone, the report unchanged
    assert "data-images" not in page.read_text(encoding="utf-8")


def test_render_fails_a_report_that_asks_the_network(tmp_path: Path) -> None:
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="https://cdn.example.org/logo.png"></body></html>', "utf-8")
    with pytest.raises(AssertionError, match=r"cdn\.example\.org/logo\.png"):
        render(page)


def test_screenshot_has_the_window_size(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html><body style='background:#c00'>red</body></html>", encoding="utf-8")
    shot = screenshot(page, tmp_path / "page.png", size="640,360")
    with Image.open(shot) as image:
        assert image.size == (640, 360)
        assert image.convert("RGB").getpixel((600, 300)) == (204, 0, 0)


class _FormHandler(SimpleHTTPRequestHandler):
    """Serves the folder; a POST answers with what was posted (as a form post's next page)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        page = f"<html><body><p id='posted'>{body}</p></body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text(
        "<html><body><form method='post' action='/done'><input name='note'><button>Send</button></form>"
        "<script>fetch('https://tracker.example.net/beacon').catch(function () {"
        " document.body.setAttribute('data-fetch', 'failed'); });</script></body></html>",
        encoding="utf-8",
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FormHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_browser_types_clicks_and_follows_a_form_post_on_loopback_only(site: str, tmp_path: Path) -> None:
    with Browser(tmp_path / "profile") as browser:
        browser.open(f"{site}/index.html")
        browser.wait_for("document.body.getAttribute('data-fetch') === 'failed'")
        assert browser.refused == ["https://tracker.example.net/beacon"]
        browser.evaluate(
            "document.querySelector('input[name=note]').value = 'seen';"
            "document.querySelector('button').click()"
        )
        browser.wait_for("document.querySelector('#posted')")
        assert browser.evaluate("document.querySelector('#posted').textContent") == "note=seen"
        with pytest.raises(AssertionError, match="nothing"):
            browser.evaluate("nothing.here")
        with pytest.raises(AssertionError, match="timed out"):
            browser.wait_for("false", seconds=0.5)
        page = tmp_path / "meanwhile.html"  # a report rendered while the window is open
        page.write_text("<html><body><p>meanwhile</p></body></html>", encoding="utf-8")
        assert "<p>meanwhile</p>" in render(page)
    assert browser.context is None  # closed on leaving the block


def test_one_driver_whichever_name_a_test_imports_it_by() -> None:
    """Tests import ``browser`` and ``tests.browser``: a second Playwright driver in the same thread
    is refused, so both names must be one module."""
    assert importlib.import_module("browser") is importlib.import_module("tests.browser")

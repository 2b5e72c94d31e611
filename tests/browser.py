"""Headless Chromium for the HTML reports: what a person opening the file would see.

``render(path)`` loads a local file with the network cut off (a self-contained report must need
nothing else), runs its scripts and returns the resulting DOM; ``screenshot`` keeps a PNG of it.
Tests skip when Debian's ``chromium`` is missing (scripts/test.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

OFFLINE = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=10000",
]

#: For a live local server: the loopback address only (a proxy that does not exist for the rest).
LOOPBACK_ONLY = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/test.sh installs it)"
)

# Appended to a copy of the page: records, in the DOM, how many <img> elements decoded to a real
# picture, so a test can tell a broken data URI from a rendered thumbnail.
_PROBE = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", images.length);
  document.body.setAttribute("data-images-loaded", loaded);
});
</script>
"""


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["chromium", *OFFLINE, *args], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def render(page: Path) -> str:
    """The DOM of ``page`` after its scripts ran, with ``data-images`` / ``data-images-loaded`` on
    <body> (a probe is added to a copy; the report itself is not changed)."""
    probed = page.with_name(f".probe-{page.name}")
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8"
    )
    try:
        return _run(["--dump-dom", probed.resolve().as_uri()]).stdout
    finally:
        probed.unlink(missing_ok=True)


def screenshot(page: Path, png: Path, size: str = "1280,2000") -> Path:
    """A PNG of ``page`` as Chromium draws it."""
    _run([f"--screenshot={png.resolve()}", f"--window-size={size}", page.resolve().as_uri()])
    assert png.is_file() and png.stat().st_size > 0
    return png


class Browser:
    """A headless Chromium driven over the DevTools protocol (a websocket; no framework): what a
    person does on a page (load it, type into fields, press buttons) and what they then see.

    Its own profile in ``profile_dir``; cookies live as long as the instance, like a browser window.
    """

    def __init__(self, profile_dir: Path) -> None:
        import itertools
        import json
        import time

        from websockets.sync.client import connect

        self._json, self._time, self._ids = json, time, itertools.count(1)
        self.process = subprocess.Popen(
            ["chromium", *LOOPBACK_ONLY, "--remote-debugging-port=0", f"--user-data-dir={profile_dir}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def _call(self, method: str, **params: object) -> dict:
        number = next(self._ids)
        self.socket.send(self._json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = self._json.loads(self.socket.recv(timeout=60))
            if message.get("id") == number:
                assert "error" not in message, message
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (as the DevTools console would show)."""
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60) -> None:
        """Until ``expression`` is true in the loaded page (after a navigation or a form post)."""
        deadline = self._time.monotonic() + seconds
        while True:
            try:
                if self.evaluate(f"document.readyState === 'complete' && Boolean({expression})"):
                    return
            except AssertionError:  # the page is being replaced
                pass
            assert self._time.monotonic() < deadline, f"timed out waiting for {expression}"
            self._time.sleep(0.1)

    def open(self, url: str) -> None:
        self._call("Page.navigate", url=url)

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

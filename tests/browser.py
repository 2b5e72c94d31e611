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

"""Headless Chromium for the HTML reports and pages: what a person opening them would see.

Playwright drives Debian's ``chromium`` through its executable path (no browser download; the
``playwright`` package is in the test extras). ``render(path)`` loads a local file with the network
cut off (a self-contained report must need nothing else: a request that would leave the machine
fails the render), runs its scripts and returns the resulting DOM; ``screenshot`` keeps a PNG of it;
``Browser`` is a window on a live local server. Tests skip when Debian's ``chromium`` is missing
(scripts/test.sh installs it).
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser as PlaywrightBrowser
    from playwright.sync_api import BrowserContext, Page, Playwright, Route

#: Debian's Chromium, which Playwright launches instead of a browser of its own.
CHROMIUM = shutil.which("chromium")

#: Flags for every launch (as root in a container: no sandbox; /dev/shm may be small). Requests are
#: also sent to a proxy that does not exist and no host name resolves, so even a request Playwright's
#: routing does not see (a service worker's, a prefetch) cannot leave the machine.
OFFLINE = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

#: For a live local server: the loopback address only.
LOOPBACK_ONLY = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

_LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (scripts/test.sh installs it)"
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


def _over_network(url: str) -> bool:
    return urlsplit(url).scheme not in ("file", "data", "blob", "about")


_driver: Playwright | None = None
_users = 0  # render/screenshot calls and open Browser windows using _driver

# Tests import this module as ``browser`` (tests/ is on sys.path) and as ``tests.browser``: one module
# under both names, so that there is one driver per process whichever name a test used.
sys.modules.setdefault("browser", sys.modules[__name__])
sys.modules.setdefault("tests.browser", sys.modules[__name__])
with contextlib.suppress(ImportError):  # and `import tests.browser` finds it as the package's attribute
    importlib.import_module("tests").browser = sys.modules[__name__]


def _start() -> Playwright:
    """Playwright's driver, one per process (a second one in the same thread is refused), shared by
    whoever uses it at the moment (``render`` and ``screenshot`` work while a ``Browser`` is open) and
    stopped by the last user's ``_release``: a running driver makes the thread look like it runs an
    asyncio loop, which would break a later ``asyncio.run`` in the same test process."""
    global _driver, _users
    if CHROMIUM is None:
        raise RuntimeError("needs Debian's chromium (scripts/test.sh installs it)")
    if _driver is None:
        from playwright.sync_api import sync_playwright

        _driver = sync_playwright().start()
    _users += 1
    return _driver


def _release() -> None:
    """One user of the driver is done; the last one stops it."""
    global _driver, _users
    _users = max(0, _users - 1)
    if _users == 0 and _driver is not None:
        _driver.stop()
        _driver = None


def _offline_page(browser: PlaywrightBrowser, viewport: dict[str, int] | None) -> tuple[Page, list[str]]:
    """A page whose every network request is refused and recorded."""
    page = browser.new_page(viewport=viewport)
    refused: list[str] = []

    def refuse(route: Route) -> None:
        if _over_network(route.request.url):
            refused.append(route.request.url)
            route.abort("internetdisconnected")
        else:  # the file itself, data: URIs
            route.continue_()

    page.route("**/*", refuse)
    return page, refused


def _load_offline(page: Path, viewport: dict[str, int] | None = None, png: Path | None = None) -> str:
    """The DOM of ``page`` (a local file) once loaded, and its screenshot into ``png``."""
    try:
        browser = _start().chromium.launch(executable_path=CHROMIUM, args=OFFLINE)
        try:
            tab, refused = _offline_page(browser, viewport)
            tab.goto(page.resolve().as_uri(), wait_until="load", timeout=120_000)
            if png is not None:
                tab.screenshot(path=png)
            dom = tab.content()
        finally:
            browser.close()
    finally:
        _release()
    assert not refused, f"{page.name} asked for {refused}: a report must need nothing but itself"
    return dom


def render(page: Path) -> str:
    """The DOM of ``page`` after its scripts ran, with ``data-images`` / ``data-images-loaded`` on
    <body> (a probe is added to a copy; the report itself is not changed)."""
    probed = page.with_name(f".probe-{page.name}")
    probed.write_text(
        page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8"
    )
    try:
        return _load_offline(probed)
    finally:
        probed.unlink(missing_ok=True)


def screenshot(page: Path, png: Path, size: str = "1280,2000") -> Path:
    """A PNG of ``page`` as Chromium draws it in a window of ``size`` ("width,height" pixels)."""
    width, height = (int(n) for n in size.split(","))
    _load_offline(page, {"width": width, "height": height}, png)
    assert png.is_file() and png.stat().st_size > 0
    return png


class Browser:
    """A headless Chromium window on a local server: what a person does on a page (load it, type
    into fields, press buttons) and what they then see. Requests to anything but the loopback
    address are refused (and listed in ``refused``).

    Its own profile in ``profile_dir``; cookies live as long as the instance, like a browser window.
    Usable as a context manager, or closed with ``close()``.
    """

    def __init__(self, profile_dir: Path) -> None:
        driver = _start()
        try:
            self.context: BrowserContext | None = driver.chromium.launch_persistent_context(
                str(profile_dir), executable_path=CHROMIUM, args=LOOPBACK_ONLY
            )
        except BaseException:
            _release()
            raise
        self.refused: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()

    def _route(self, route: Route) -> None:
        url = route.request.url
        if not _over_network(url) or urlsplit(url).hostname in _LOOPBACK:
            route.continue_()
        else:
            self.refused.append(url)
            route.abort("internetdisconnected")

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (as the DevTools console would show);
        an exception in the page is an ``AssertionError`` naming it."""
        from playwright.sync_api import Error

        try:
            return self.page.evaluate(expression)
        except Error as exc:
            raise AssertionError(f"{expression}: {exc.message}") from exc

    def wait_for(self, expression: str, seconds: float = 60) -> None:
        """Until ``expression`` is true in the loaded page (after a navigation or a form post)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.evaluate(f"document.readyState === 'complete' && Boolean({expression})"):
                    return
            except AssertionError:  # the page is being replaced
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            self.page.wait_for_timeout(100)

    def open(self, url: str) -> None:
        """Go to ``url`` (returns once it has loaded)."""
        self.page.goto(url, wait_until="load", timeout=120_000)

    def close(self) -> None:
        if self.context is not None:
            try:
                self.context.close()
            finally:
                self.context = None
                _release()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""`cxr-reid sync --dicomweb` against a hostile or broken PACS (hardening issue, item 6).

No Orthanc: :class:`HostilePacs` is a DICOMweb server on 127.0.0.1 in the test process that can page
forever, drip its answers a byte at a time, send a huge QIDO answer or a huge WADO part, and fail a
study. Small caps (:class:`SyncLimits`) keep the tests fast. Checked: each request has a whole-answer
deadline and the QIDO pages and studies of a run are bounded; answers are refused past their caps
(and the PACS gets to send little more than the cap); SIGTERM ends a `cxr-reid sync` process within
seconds with the cursor saved, exit 143 and a log line; and the ``--since last`` cursor never passes
a failed study, which the next run retries (also when it has no StudyDate).

Tests that would hang on code without these limits run the sync in a daemon thread or a subprocess
with their own timeout (:func:`bounded`), so such code fails them instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from app.server_process import ROOT
from index import Gallery
from models.net.embedder import Embedder

PAGE = 100  # app.pacs.sync.PAGE_SIZE: the endless PACS answers full pages of it
MIB = 1024 * 1024
STUDY_UID, STUDY_DATE, SERIES_UID, SOP_UID, MODALITY = (
    "0020000D",
    "00080020",
    "0020000E",
    "00080018",
    "00080060",
)


def study_json(uid: str, date: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {STUDY_UID: {"vr": "UI", "Value": [uid]}}
    if date:
        item[STUDY_DATE] = {"vr": "DA", "Value": [date]}
    return item


class HostilePacs:
    """A DICOMweb root at ``self.url`` whose answers the test sets:

    * ``endless``: every /studies page is full of studies never seen before (dated 20240101, UIDs in order);
    * ``short_listing``: with ``endless``, the listing ends after this many studies;
    * ``drip_studies``: /studies answers one byte every ``drip`` seconds, for ever;
    * ``huge_studies``: /studies streams a JSON list of this many bytes (no Content-Length);
    * ``studies``: otherwise, these (uid, StudyDate), honouring StudyDate=X- and StudyInstanceUID;
    * ``series[study]``: a list of DICOM JSON series, an HTTP status, or ``"drip"`` (default: none);
    * ``instances[series]``: the QIDO instances of a series; ``wado[series]``: the bytes of the one
      part of its WADO-RS answer, or an int: a part of that many bytes, streamed.

    ``asked`` keeps every request's path and query; ``sent`` the bytes of body written.
    """

    def __init__(self) -> None:
        self.endless = False
        self.short_listing: int | None = None
        self.drip_studies = False
        self.drip = 0.5
        self.huge_studies = 0
        self.studies: list[tuple[str, str | None]] = []
        self.series: dict[str, Any] = {}
        self.instances: dict[str, list[dict[str, Any]]] = {}
        self.wado: dict[str, bytes | int] = {}
        self.asked: list[str] = []
        self.sent = 0
        self.dripping = threading.Event()
        self.closing = threading.Event()
        pacs = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with contextlib.suppress(OSError):  # the sync let go (BrokenPipeError and the like)
                    pacs.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    # -- answers

    def write(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(data)
        handler.wfile.flush()
        self.sent += len(data)

    def head(
        self, handler: BaseHTTPRequestHandler, status: int = 200, kind: str = "application/dicom+json"
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.end_headers()  # HTTP/1.0, no Content-Length: the body ends when the connection does

    def json(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        self.head(handler)
        self.write(handler, json.dumps(body).encode())

    def drip_forever(self, handler: BaseHTTPRequestHandler) -> None:
        self.head(handler)
        self.dripping.set()
        self.write(handler, b"[")
        while not self.closing.wait(self.drip):
            self.write(handler, b" ")

    def stream(self, handler: BaseHTTPRequestHandler, size: int, piece: bytes) -> None:
        block = piece * (64 * 1024 // len(piece))
        left = size
        while left > 0 and not self.closing.is_set():
            self.write(handler, block[:left])
            left -= len(block)

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        self.asked.append(handler.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        parts = split.path.removeprefix("/dicom-web/").split("/")
        if parts == ["studies"]:
            self.answer_studies(handler, query)
        elif len(parts) == 3 and parts[2] == "series":
            got = self.series.get(parts[1], [])
            if got == "drip":
                self.drip_forever(handler)
            elif isinstance(got, int):
                self.head(handler, got)
            else:
                self.json(handler, got)
        elif len(parts) == 5 and parts[4] == "instances":
            self.json(handler, self.instances.get(parts[3], []))
        elif len(parts) in (4, 6):  # WADO-RS: a series, or one instance of it
            self.answer_wado(handler, self.wado[parts[3]])
        else:
            self.head(handler, 404)

    def answer_studies(self, handler: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        if self.drip_studies:
            return self.drip_forever(handler)
        if self.huge_studies:
            self.head(handler)
            self.write(handler, b"[")
            self.stream(handler, self.huge_studies, b"{},")
            return self.write(handler, b"{}]")
        offset, limit = int(query.get("offset", 0)), int(query.get("limit", 1000))
        if self.endless:
            end = offset + limit if self.short_listing is None else min(offset + limit, self.short_listing)
            return self.json(
                handler, [study_json(f"2.25.{1_000_001 + n}", "20240101") for n in range(offset, end)]
            )
        found = self.studies
        if "StudyDate" in query:
            start = query["StudyDate"].rstrip("-")
            found = [(u, d) for u, d in found if d and d >= start]
        if "StudyInstanceUID" in query:
            found = [(u, d) for u, d in found if u == query["StudyInstanceUID"]]
        self.json(handler, [study_json(u, d) for u, d in found[offset : offset + limit]])

    def answer_wado(self, handler: BaseHTTPRequestHandler, body: bytes | int) -> None:
        self.head(handler, kind='multipart/related; type="application/dicom"; boundary=hostile')
        self.write(handler, b"--hostile\r\nContent-Type: application/dicom\r\n\r\n")
        if isinstance(body, int):
            self.stream(handler, body, b"\0")
        else:
            self.write(handler, body)
        self.write(handler, b"\r\n--hostile--\r\n")


@pytest.fixture
def pacs() -> Iterator[HostilePacs]:
    server = HostilePacs()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def service(embedder: Embedder, tmp_path: Path) -> Iterator[Any]:
    from app.service.reid import ReidService

    with Gallery(tmp_path / "data", dim=embedder.dim, model_id=embedder.model_id) as gallery:
        yield ReidService(embedder, gallery)


def bounded(seconds: float, run: Callable[[], Any]) -> tuple[Any, float]:
    """``run()`` in a daemon thread: its result (or its exception raised here) and the seconds it took;
    fails the test when it is still running after ``seconds`` (the thread is left behind)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = run()
        except BaseException as exc:  # noqa: BLE001 (raised again in the test's thread)
            result["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    took = time.monotonic() - start
    if thread.is_alive():
        pytest.fail(f"still running after {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value"), took


def state_of(data_dir: Path) -> dict[str, Any]:
    [cursor] = json.loads((data_dir / "sync-state.json").read_text())["sources"].values()
    return cursor


def sync_in_process(service: Any, url: str, data_dir: Path, **options: Any) -> Any:
    from app.pacs.sync import SyncState, sync_dicomweb

    extra = {}
    if "limits" in options:  # (imported only then: the cursor tests run on code without limits too)
        from app.pacs.bounded import SyncLimits

        extra["limits"] = SyncLimits(**options.pop("limits"))
    return sync_dicomweb(service, url, state=SyncState(data_dir), progress=False, **extra, **options)


# ------------------------------------------------------------------------------------------------
# deadlines and bounds


def test_endless_paging_stops_at_max_pages_and_max_studies(
    pacs: HostilePacs, service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pacs.endless = True
    limits = {"max_pages": 4, "max_studies": 3}
    summary, took = bounded(20, lambda: sync_in_process(service, pacs.url, tmp_path / "data", limits=limits))
    pages = [a for a in pacs.asked if a.startswith("/dicom-web/studies?")]
    assert len(pages) == 4 and took < 10
    assert (summary.studies, summary.left, summary.failed) == (3, 4 * PAGE - 3, [])
    assert "stopped after 4 pages (--max-pages)" in caplog.text
    assert "397 stud(ies) left for the next run (--max-studies)" in summary.line()
    cursor = state_of(tmp_path / "data")
    assert sorted(cursor["done_studies"]) == ["2.25.1000001", "2.25.1000002", "2.25.1000003"]
    # the listing was cut short and had no start: --since last does not skip what was never listed
    assert "newest_study_date" not in cursor


def test_slow_loris_answer_ends_at_the_request_deadline(
    pacs: HostilePacs, service: Any, tmp_path: Path
) -> None:
    from app.pacs.sync import SyncUnavailableError

    # the first query drips: the run cannot start, and says why within the deadline
    pacs.drip_studies, pacs.drip = True, 0.2
    limits = {"request_seconds": 1.5, "read_seconds": 20}
    with pytest.raises(SyncUnavailableError, match="no whole answer within 1.5 s"):
        bounded(15, lambda: sync_in_process(service, pacs.url, tmp_path / "data", limits=limits))

    # a study's series query drips: that study fails (to be retried), the next one is done
    pacs.drip_studies = False
    pacs.studies = [("2.25.1", "20240101"), ("2.25.2", "20240102")]
    pacs.series["2.25.1"] = "drip"
    summary, took = bounded(15, lambda: sync_in_process(service, pacs.url, tmp_path / "data", limits=limits))
    assert 1.5 <= took < 6
    assert [name for name, _ in summary.failed] == ["study 2.25.1"]
    assert "no whole answer within 1.5 s" in summary.failed[0][1]
    assert (summary.studies, summary.to_retry) == (2, 1)
    cursor = state_of(tmp_path / "data")
    assert list(cursor["done_studies"]) == ["2.25.2"] and list(cursor["retry_studies"]) == ["2.25.1"]
    assert cursor["newest_study_date"] == "20240101"  # held at the failed study


def test_huge_qido_answer_is_refused_at_its_cap(pacs: HostilePacs, service: Any, tmp_path: Path) -> None:
    from app.pacs.sync import SyncUnavailableError

    pacs.huge_studies = 300 * MIB
    limits = {"max_query_bytes": 1 * MIB}
    with pytest.raises(SyncUnavailableError, match="over the cap of 1,048,576 bytes"):
        bounded(20, lambda: sync_in_process(service, pacs.url, tmp_path / "data", limits=limits))
    time.sleep(0.5)
    assert pacs.sent < 32 * MIB  # the cap, and what the sockets' buffers took before the sync let go


def test_huge_wado_part_is_refused_and_the_run_goes_on(
    pacs: HostilePacs, service: Any, tmp_path: Path
) -> None:
    pacs.studies = [("2.25.1", "20240101")]
    pacs.series["2.25.1"] = [
        {SERIES_UID: {"vr": "UI", "Value": ["2.25.1.1"]}, MODALITY: {"vr": "CS", "Value": ["CR"]}}
    ]
    pacs.instances["2.25.1.1"] = [{SOP_UID: {"vr": "UI", "Value": ["2.25.1.1.1"]}}]
    pacs.wado["2.25.1.1"] = 400 * MIB
    limits = {"max_instance_bytes": 1 * MIB}
    summary, took = bounded(20, lambda: sync_in_process(service, pacs.url, tmp_path / "data", limits=limits))
    assert [name for name, _ in summary.failed] == ["2.25.1.1.1"]
    assert "over the cap of 1,048,576" in summary.failed[0][1]
    assert summary.to_retry == 1 and took < 10
    time.sleep(0.5)
    assert pacs.sent < 32 * MIB


def test_multipart_parts_split_anywhere() -> None:
    """The streamed multipart reader: parts come out whole however the chunks fall, one over the cap
    is refused, a stream cut short is an error."""
    from app.pacs.bounded import AnswerTooLargeError, PacsAnswerError, multipart_parts

    body = (
        b"preamble\r\n--b0\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--b0 \r\n"
        b"\r\nsecond part, \r\n--b not the end\r\n--b0\r\nX: y\r\n\r\n\r\n--b0--\r\n"
    )
    for size in (1, 2, 3, 7, 64, len(body)):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert list(multipart_parts(chunks, b"b0", 100)) == [
            b"first",
            b"second part, \r\n--b not the end",
            b"",
        ]
    with pytest.raises(AnswerTooLargeError):
        list(multipart_parts([body], b"b0", 10))
    with pytest.raises(PacsAnswerError, match="ended inside"):
        list(multipart_parts([body[:60]], b"b0", 100))


# ------------------------------------------------------------------------------------------------
# the cursor


def test_since_last_never_passes_a_failed_study(
    pacs: HostilePacs, service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """StudyDate 20240102 fails (and a study without StudyDate): the cursor stays at 20240102, the next
    run asks from there, asks for the dateless one by its UID, and retries both; the summary says so."""
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    pacs.studies = [("2.25.1", "20240101"), ("2.25.2", "20240102"), ("2.25.3", "20240103"), ("2.25.9", None)]
    pacs.series["2.25.2"] = pacs.series["2.25.9"] = 500
    first, _ = bounded(60, lambda: sync_in_process(service, pacs.url, data))
    assert sorted(name for name, _ in first.failed) == ["study 2.25.2", "study 2.25.9"]
    cursor = state_of(data)
    assert cursor["newest_study_date"] == "20240102"
    assert sorted(cursor["done_studies"]) == ["2.25.1", "2.25.3"]
    assert "2 failed stud(ies) to be retried next run" in caplog.text

    pacs.series.clear()  # the PACS is well again
    pacs.asked.clear()
    second, _ = bounded(60, lambda: sync_in_process(service, pacs.url, data, since="last"))
    assert any("StudyDate=20240102-" in a for a in pacs.asked), pacs.asked
    assert any("StudyInstanceUID=2.25.9" in a for a in pacs.asked), pacs.asked
    assert (second.retried, second.studies, second.studies_done_before, second.failed) == (2, 2, 1, [])
    assert "retried 2 stud(ies) that failed before" in second.line()
    cursor = state_of(data)
    assert sorted(cursor["done_studies"]) == ["2.25.1", "2.25.2", "2.25.3", "2.25.9"]
    assert cursor["newest_study_date"] == "20240103" and cursor["retry_studies"] == {}


def test_a_study_failing_run_after_run_stops_holding_the_cursor(
    pacs: HostilePacs, service: Any, tmp_path: Path
) -> None:
    pacs.studies = [("2.25.1", "20240101"), ("2.25.2", "20240102")]
    pacs.series["2.25.1"] = 500
    limits = {"max_study_attempts": 2}
    first = sync_in_process(service, pacs.url, tmp_path / "data", since="last", limits=limits)
    assert first.to_retry == 1 and state_of(tmp_path / "data")["newest_study_date"] == "20240101"
    second = sync_in_process(service, pacs.url, tmp_path / "data", since="last", limits=limits)
    assert (second.given_up, second.to_retry) == (1, 0)
    assert "gave up on 1 stud(ies)" in second.line()
    assert state_of(tmp_path / "data")["newest_study_date"] == "20240102"


# ------------------------------------------------------------------------------------------------
# SIGTERM of a `cxr-reid sync` process


def run_sync_process(url: str, data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CXR_REID_RUNTIME": "torch", "PYTHONUNBUFFERED": "1"}
    for name in ("CXR_REID_DATA_DIR", "CXR_REID_MODEL_PATH"):
        env.pop(name, None)
    command = [sys.executable, "-m", "app.cli", "sync", "--dicomweb", url, "--data-dir", str(data_dir)]
    return subprocess.Popen(
        [*command, "--no-progress", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition: Callable[[], bool], seconds: float, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the sync never got there (exit {process.poll()}): {process.communicate()[0][-3000:]}"
            )
        time.sleep(0.05)


def terminate(process: subprocess.Popen[str], within: float) -> tuple[int, str, float]:
    """SIGTERM: the exit status, the output and the seconds to exit; fails (after SIGKILL) past ``within``."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(
            f"SIGTERM ignored: still running {within:g} s after it (SIGKILL needed):\n{output[-3000:]}"
        )
    return process.returncode, output, time.monotonic() - start


@pytest.mark.server
def test_sigterm_ends_a_sync_that_pages_for_ever(pacs: HostilePacs, tmp_path: Path) -> None:
    pacs.endless = True
    process = run_sync_process(pacs.url, tmp_path / "data")
    wait_for(lambda: len(pacs.asked) >= 5, 180, process)
    status, output, took = terminate(process, 10)
    assert status == 128 + signal.SIGTERM, output
    assert took < 5, took
    assert "stopped while listing the studies" in output
    assert "sync stopped by signal 15; the cursor is saved in" in output
    assert (tmp_path / "data" / "sync-state.json").is_file()


@pytest.mark.server
def test_sigterm_ends_a_sync_waiting_on_a_dripping_answer(pacs: HostilePacs, tmp_path: Path) -> None:
    """Five studies done, the sixth's series query drips: SIGTERM ends the process at once, the cursor
    keeps the five and stays at the sixth's StudyDate."""
    pacs.studies = [(f"2.25.{n}", f"2024010{n}") for n in range(1, 9)]
    pacs.series["2.25.6"] = "drip"
    process = run_sync_process(pacs.url, tmp_path / "data", "--since", "2024-01-01")
    wait_for(pacs.dripping.is_set, 180, process)
    time.sleep(0.5)
    status, output, took = terminate(process, 10)
    assert status == 128 + signal.SIGTERM, output
    assert took < 5, took
    assert "stopped after 6 of 8 stud(ies) to look at; the cursor is saved in" in output
    cursor = state_of(tmp_path / "data")
    assert sorted(cursor["done_studies"]) == [f"2.25.{n}" for n in range(1, 6)]
    assert cursor["newest_study_date"] == "20240106"

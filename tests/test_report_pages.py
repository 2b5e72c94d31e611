"""The audit and risk reports and the review page's conflicts as a person sees them in headless
Chromium: chart labels inside their charts, a y axis, the pair count the set really holds,
"confidence" explained, each file under one finding, the risk text and its orange-border legend,
and duplicate conflicts grouped per collection with buttons that work.

With ``CXR_REID_SCREENSHOTS=docs/img`` the tests also write the screenshots the README shows
(``bash scripts/report-screenshots.sh``), so the pictures always come from the code as it is (the risk
report's from the random-weight test model, which links some patients wrongly: its layout is what
the picture shows, not a model's figures).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import Browser, needs_chromium, render, screenshot
from PIL import Image

from app.cli import main
from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command
from app.service.keys import KeyStore

EXAMPLES = ROOT / "examples" / "radiographs"
SHOTS = os.environ.get("CXR_REID_SCREENSHOTS")

#: Every <text> of every chart drawn (partly) outside its chart, as the page shows it (rotated labels
#: included): those are cut off.
CLIPPED_LABELS = """
Array.from(document.querySelectorAll('svg.chart')).flatMap(function (svg) {
  var frame = svg.getBoundingClientRect();
  return Array.from(svg.querySelectorAll('text')).filter(function (t) {
    var box = t.getBoundingClientRect();
    return box.left < frame.left - 0.5 || box.right > frame.right + 0.5
      || box.top < frame.top - 0.5 || box.bottom > frame.bottom + 0.5;
  }).map(function (t) { return t.textContent; });
})
"""


def keep_screenshot(page: Path, name: str, tmp_path: Path, size: str) -> None:
    """The page as Chromium draws it; into $CXR_REID_SCREENSHOTS/NAME when that is set."""
    shot = screenshot(page, tmp_path / name, size=size)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        Image.open(shot).convert("RGB").quantize(colors=128).save(Path(SHOTS) / name, optimize=True)


def window(tmp_path: Path) -> Browser:
    """A Chromium window with a profile of its own (one at a time: render and screenshot start their
    own, so they are called before or after it, never while it is open)."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return Browser(profile)


@pytest.mark.browser
@needs_chromium
def test_audit_report_reads_right_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "audit"
    monkeypatch.chdir(ROOT)  # the report names its source as given: a relative path, as a user types it
    example = "examples/radiographs/audit-example.csv"
    assert main(["audit", example, "--out", str(out), "--no-progress"]) == 1
    report = json.loads((out / "findings.json").read_text())
    # each file under one finding: child-c-1 (C in train, D in test) is leakage, not also a duplicate
    flagged = [(i["path"], i["patient_id"]) for f in report["findings"] for i in f["images"] if i["flagged"]]
    assert len(flagged) == len(set(flagged)) and report["counts"]["exact_duplicate"] == 0
    (copied,) = [f for f in report["findings"] if "D" in f["patient_ids"]]
    assert copied["type"] == "leakage" and "also identical files" in copied["summary"]

    page = out / "report.html"
    with window(tmp_path) as browser:
        browser.open(page.resolve().as_uri())
        browser.wait_for("document.querySelector('svg.chart')")
        clipped = browser.evaluate(CLIPPED_LABELS)
        y_axes = browser.evaluate("document.querySelectorAll('svg.chart .y-axis').length")
        y_ticks = browser.evaluate("document.querySelectorAll('svg.chart .y-tick').length")
        legend = browser.evaluate("document.querySelector('svg.chart').textContent")
        note = browser.evaluate("document.getElementById('confidence-note').innerText")
    assert clipped == []
    assert y_axes == 2
    assert y_ticks == 6
    # 8 images: A 2, B 3, C 2, D 1 (a copy of a C image): 28 pairs, 5 of them within one patient
    assert "every pair of images of different patients (23)" in legend and "20,000" not in legend
    assert "same-patient threshold" in legend
    assert "not a probability" in note and "ranks the findings" in note
    assert "Confidence" in note  # the column it explains
    keep_screenshot(page, "audit-report.png", tmp_path, "1280,1500")


def _split_for_risk(manifest: Path) -> tuple[Path, Path]:
    """The first study of each phantom patient is released, the second is what an attacker holds."""
    rows = list(csv.DictReader(manifest.open()))
    seen: set[str] = set()
    sides: dict[str, list[dict]] = {"release": [], "reference": []}
    for row in rows:
        sides["reference" if row["patient_id"] in seen else "release"].append(row)
        seen.add(row["patient_id"])
    paths = []
    for name, chosen in sides.items():
        path = manifest.with_name(f"{name}.csv")
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "patient_id"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(chosen)
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.browser
@needs_chromium
def test_risk_report_reads_right_in_chromium(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.imaging.phantom import write_phantom_set

    # 40 patients: enough for the report to bound the share (and draw its curve); the random-weight
    # test model links some of them to the wrong patient, which the orange border marks
    release, reference = _split_for_risk(write_phantom_set(tmp_path / "set", 40, 2, size=64, seed=2))
    out = tmp_path / "risk"
    model = ["--model", str(tiny_checkpoint)]
    monkeypatch.chdir(release.parent)  # the report names its inputs as given
    argv = ["risk", release.name, "--reference", reference.name, "--out", str(out), "--defences", "blur-1"]
    assert main([*argv, "--no-progress", *model]) == 0
    risk = json.loads((out / "risk.json").read_text())

    page = out / "report.html"
    with window(tmp_path) as browser:
        browser.open(page.resolve().as_uri())
        browser.wait_for("document.querySelector('svg.chart')")
        clipped = browser.evaluate(CLIPPED_LABELS)
        ticks = browser.evaluate(
            "Array.from(document.querySelectorAll('svg.chart .x-tick')).map(t => t.textContent)"
        )
        text = browser.evaluate("document.body.innerText")
        wrong = browser.evaluate("document.querySelectorAll('#pairs figure.flag').length")
        legend = browser.evaluate("document.getElementById('flag-legend').innerText")
        border = browser.evaluate(
            "getComputedStyle(document.querySelector('#pairs figure.flag img')).borderTopColor"
        )
        swatch = browser.evaluate("getComputedStyle(document.querySelector('.flag-swatch')).borderTopColor")
    assert clipped == []
    assert "1e-3" in ticks and not any("e-0" in t or "e+" in t for t in ticks)  # 1e-3, not 1e-03
    assert "at 1e-4. An attacker" in text  # the sentence ends before the next begins
    assert wrong > 0, "the test model links nobody wrongly: no orange border to explain"
    assert "orange border marks a wrong link" in legend
    assert border == swatch  # the legend shows the colour the border has
    assert risk["linkability"]["measured"][risk["headline_far"]]["too_small"] is False
    keep_screenshot(page, "risk-report.png", tmp_path, "1280,1700")


# ------------------------------------------------------------------------------------ the review page
@pytest.fixture
def conflicts_server(tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """A real server with one duplicate conflict in each of two collections (child B's radiographs
    filed under two ids in each) and a write key."""
    data = tmp_path / "data"
    data.mkdir()
    token = KeyStore(data / "keys.json").add("write")[1]
    port = free_port()
    server = Server(uvicorn_command(port), server_env(data), port, tmp_path / "server.log")
    headers = {"X-API-Key": token}
    ids: dict[str, str] = {"token": token}
    try:
        for collection, first, second in (("ward-1", "P-1", "P-2"), ("ward-2", "Q-1", "Q-2")):
            for patient, name in ((first, "child-b-1.jpeg"), (second, "child-b-2.jpeg")):
                answer = httpx.post(
                    f"{server.url}/images",
                    files=[("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))],
                    data={"patient_id": patient, "collection": collection},
                    headers=headers,
                    timeout=60,
                )
                assert answer.status_code == 201, answer.text
                ids[patient] = str(answer.json()["images"][0]["image_id"])
        yield server, ids
    finally:
        server.stop()


@pytest.mark.server
@pytest.mark.browser
@needs_chromium
def test_review_conflicts_are_grouped_per_collection_and_resolved_by_their_buttons(
    conflicts_server: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    server, ids = conflicts_server
    headers = {"X-API-Key": ids["token"]}
    page = httpx.get(f"{server.url}/review", headers=headers, timeout=60)
    assert page.status_code == 200
    saved = tmp_path / "review.html"
    saved.write_text(page.text, encoding="utf-8")
    dom = render(saved)
    groups = dom.split('<section class="conflict-group"')[1:]
    # one section per collection; the same radiograph in both wards is listed last, apart, without
    # buttons: patient ids of two collections are not compared
    names = [g.split('data-collection="')[1].split('"')[0] for g in groups]
    assert names == ["ward-1", "ward-2", ""] and "Across collections" in groups[2]
    for name, group in zip(names, groups, strict=True):
        articles = group.split('<article class="conflict"')[1:]
        assert articles
        if name:  # its own collection's pairs only, each with its three buttons
            assert all(f'data-collection="{name}"' in a.split(">")[0] for a in articles)
            assert all(a.count('name="action"') == 3 for a in articles)
        else:
            assert all('name="action"' not in a for a in articles)
    keep_screenshot(saved, "review-conflicts.png", tmp_path, "1100,1900")

    # a person signs in and presses the buttons
    with window(tmp_path) as browser:
        browser.open(f"{server.url}/review")
        browser.wait_for("document.querySelector('input[name=api_key]')")
        browser.evaluate(
            f"document.querySelector('input[name=api_key]').value = {json.dumps(ids['token'])};"
            "document.querySelector('form.login button').click()"
        )
        ward1 = "article.conflict[data-collection='ward-1']"
        browser.wait_for(f'document.querySelector("{ward1}")')
        browser.evaluate(f'document.querySelector("{ward1} button[value=dismiss]").click()')
        browser.wait_for("document.body.innerText.includes('dismissed')")
        assert browser.evaluate(f'document.querySelector("{ward1}") === null')  # not shown again
        assert browser.evaluate("document.querySelectorAll('section.conflict-group').length") == 2

        ward2 = "article.conflict[data-collection='ward-2']"
        a, b = browser.evaluate(
            f'[document.querySelector("{ward2}").dataset.a, document.querySelector("{ward2}").dataset.b]'
        )
        browser.evaluate(f'document.querySelector("{ward2} button[value=relabel_b]").click()')
        browser.wait_for("document.body.innerText.includes('relabelled')")
        assert browser.evaluate(f'document.querySelector("{ward2}") === null')
        assert browser.evaluate("document.querySelectorAll('section.conflict-group').length") == 1
    kept = httpx.get(f"{server.url}/images/{a}", headers=headers, timeout=30).json()
    moved = httpx.get(f"{server.url}/images/{b}", headers=headers, timeout=30).json()
    assert moved["patient_id"] == kept["patient_id"] and moved["collection"] == "ward-2"  # b under a's
    assert {kept["patient_id"]} < {"Q-1", "Q-2"}
    # both decisions are alerts resolved with who made them
    done = httpx.get(
        f"{server.url}/alerts", params={"state": "dismissed"}, headers=headers, timeout=30
    ).json()
    assert any(
        {alert["image_id"], alert["other_image_id"]} == {int(ids["P-1"]), int(ids["P-2"])}
        and alert["resolved_by"]
        for alert in done["items"]
    )


@pytest.mark.server
def test_a_refused_modality_is_explained_in_http_terms(
    conflicts_server: tuple[Server, dict[str, str]],
) -> None:
    """An HTTP client cannot pass Python keyword arguments: the 422 names the DICOM attribute."""
    import io

    import numpy as np
    from conftest import dicom_dataset

    server, ids = conflicts_server
    ds = dicom_dataset(np.arange(32 * 32, dtype="<u2").reshape(32, 32), Modality="CT", PatientID="P")
    body = io.BytesIO()
    ds.save_as(body, enforce_file_format=True)
    answer = httpx.post(
        f"{server.url}/images",
        files=[("files", ("ct.dcm", body.getvalue(), "application/dicom"))],
        data={"patient_id": "P", "collection": "ward-1"},
        headers={"X-API-Key": ids["token"]},
        timeout=60,
    )
    assert answer.status_code == 422, answer.text
    detail = json.dumps(answer.json())
    assert "Modality CT" in detail and "Modality attribute (0008,0060)" in detail
    assert "check_modality" not in detail and "=False" not in detail

"""/verify's probability over real HTTP (uvicorn, the example radiographs): with the shipped checkpoint
and with a site calibration that decides on AS-norm scores, every answer names its prior, at the
default prior its probability agrees with ``same_patient`` at every operating point asked for, a
caller's ``prior`` rescales the odds, and a prior outside (0, 1) is a 422 naming the field."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import synthetic_site

from app.server_process import ROOT, Server, free_port, server_env, uvicorn_command
from models.net.checkpoint import with_calibration
from models.net.embedder import DEFAULT_CHECKPOINT
from models.training.site import fit_site_calibration

pytestmark = pytest.mark.server
EXAMPLES = ROOT / "examples" / "radiographs"
NAMES = ("child-a-1.jpeg", "child-a-2.jpeg", "child-b-1.jpeg", "child-b-2.jpeg", "child-c-1.jpeg")


@pytest.fixture(scope="module", params=["shipped", "site"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"probability-{request.param}")
    (root / "data").mkdir()
    model = None
    if request.param == "site":  # a site calibration with an AS-norm cohort, carried by a checkpoint copy
        vectors, ids = synthetic_site(150, 3, noise=0.9, dim=512, shared=1.0)
        calibration = fit_site_calibration(vectors, ids, fars=("1e-2", "1e-3"), bootstrap=0, score_norm=True)
        model = root / "site.pt"
        with_calibration(DEFAULT_CHECKPOINT, model, calibration.to_dict())
    port = free_port()
    server = Server(uvicorn_command(port), server_env(root / "data", model), port, root / "server.log")
    try:
        yield server
    finally:
        server.stop()


def verify(server: Server, a: str, b: str, **fields: str) -> httpx.Response:
    files = {"file_a": (a, (EXAMPLES / a).read_bytes()), "file_b": (b, (EXAMPLES / b).read_bytes())}
    return httpx.post(f"{server.url}/verify", files=files, data=fields, timeout=60)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_every_answer_names_its_prior_and_agrees_with_its_decision(server: Server) -> None:
    detail = httpx.get(f"{server.url}/calibration", timeout=30).json()
    scale = detail["calibration"]["score_norm"]
    image_ids = []  # filed once, then compared by id: no image is embedded twice
    for i, name in enumerate(NAMES):
        files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))]
        data = {"patient_id": f"grid-{i}", "collection": "grid"}
        enrolled = httpx.post(f"{server.url}/images", files=files, data=data, timeout=60)
        assert enrolled.status_code == 201, enrolled.text
        image_ids.append(enrolled.json()["images"][0]["image_id"])
    decisions = set()
    for (a, b), far in itertools.product(itertools.combinations(image_ids, 2), (None, "1e-2")):
        fields = {"image_id_a": str(a), "image_id_b": str(b), **({"far": far} if far else {})}
        answer = httpx.post(f"{server.url}/verify", data=fields, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["prior_source"] == "operating_point" and 0 < body["prior"] < 1
        if far is None:
            assert body["prior"] == pytest.approx(detail["default_prior"])
        p = body["probability"]
        assert 0 < p < 1
        assert (p >= 0.5) if body["same_patient"] else (p <= 0.5), (a, b, far, body)
        decisions.add(body["same_patient"])
    assert decisions == {True, False}  # both sides of the threshold were asked about
    assert (scale is None) == (detail["calibration"]["source"] == "shipped")


def test_a_callers_prior_rescales_the_odds(server: Server) -> None:
    default = verify(server, "child-a-1.jpeg", "child-b-1.jpeg").json()
    mine = verify(server, "child-a-1.jpeg", "child-b-1.jpeg", prior="0.3").json()
    assert mine["prior"] == 0.3 and mine["prior_source"] == "request"
    assert mine["same_patient"] == default["same_patient"] and mine["score"] == default["score"]
    assert logit(mine["probability"]) - logit(default["probability"]) == pytest.approx(
        logit(0.3) - logit(default["prior"]), abs=1e-6
    )


def test_a_prior_outside_zero_one_is_refused(server: Server) -> None:
    for bad in ("0", "1", "-0.1", "1.5", "nan", "often"):
        answer = verify(server, "child-a-1.jpeg", "child-a-2.jpeg", prior=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert "prior" in answer.text


def test_patient_mode_names_its_prior(server: Server) -> None:
    enrolled = httpx.post(
        f"{server.url}/images",
        files=[("files", ("child-b-1.jpeg", (EXAMPLES / "child-b-1.jpeg").read_bytes(), "image/jpeg"))],
        data={"patient_id": "child-B"},
        timeout=60,
    )
    assert enrolled.status_code == 201, enrolled.text
    files = {"file": ("child-b-2.jpeg", (EXAMPLES / "child-b-2.jpeg").read_bytes())}
    body = httpx.post(
        f"{server.url}/verify", files=files, data={"patient_id": "child-B", "prior": "0.01"}, timeout=60
    ).json()
    assert body["mode"] == "patient" and body["prior"] == 0.01 and body["prior_source"] == "request"
    assert 0 < body["probability"] < 1
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["components"]["schemas"]
    for name in ("PairVerification", "PatientVerification"):
        assert {"prior", "prior_source", "probability"} <= set(schema[name]["properties"])
        assert "Bayes decision" in schema[name]["properties"]["prior"]["description"]


def test_review_gives_no_probability_for_an_alert_scored_under_another_calibration(tmp_path: Path) -> None:
    """An alert keeps the score it was raised with; once a site calibration (AS-norm, another scale) is
    in force, a probability of that score would be a number on the wrong scale: the page says n/a."""
    from index import Gallery, NewImage
    from models.net.checkpoint import load_checkpoint

    data = tmp_path / "data"
    shipped = load_checkpoint(DEFAULT_CHECKPOINT)
    dim = int(shipped["backbone"]["embedding_dim"])
    vectors, ids = synthetic_site(80, 2, noise=0.9, dim=dim, shared=1.0)  # labelled site images
    with Gallery(data, dim=dim, model_id=shipped["model_id"]) as gallery:
        gallery.add(vectors, [NewImage(patient_id=p) for p in ids])
    port = free_port()
    server = Server(uvicorn_command(port), server_env(data), port, tmp_path / "server.log")
    try:

        def enrol(patient: str, name: str) -> dict:
            files = [("files", (name, (EXAMPLES / name).read_bytes(), "image/jpeg"))]
            answer = httpx.post(f"{server.url}/images", files=files, data={"patient_id": patient}, timeout=60)
            assert answer.status_code == 201, answer.text
            return answer.json()["images"][0]

        enrol("child-B", "child-b-1.jpeg")
        alert = enrol("child-A", "child-b-3.jpeg")["alert"]
        assert alert["kind"] == "matches_other_patient"

        def card() -> str:
            page = httpx.get(f"{server.url}/review", timeout=60).text
            return page.split(f'id="alert-{alert["alert_id"]}"', 1)[1].split("</article>", 1)[0]

        assert re.search(r'class="probability">[\d.]+% ', card())  # the calibration it was raised under
        fitted = httpx.post(
            f"{server.url}/calibration", data={"far": "1e-2,1e-3", "bootstrap": "0"}, timeout=120
        )
        assert fitted.status_code == 200, fitted.text
        assert fitted.json()["calibration"]["score_norm"].startswith("as-norm")
        assert 0 < fitted.json()["default_prior"] < 1
        after = card()
        assert "n/a" in after and "scored under a calibration no longer in force" in after
        assert "same patient as child-B" in after and "FAR 0.001" in after  # the decision as it was taken
    finally:
        server.stop()

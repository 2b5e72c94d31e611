"""/verify's probability over real HTTP (uvicorn, the example radiographs): with the shipped checkpoint
and with a site calibration that decides on AS-norm scores, every answer names its prior, at the
default prior its probability agrees with ``same_patient`` at every operating point asked for, a
caller's ``prior`` rescales the odds, and a prior outside (0, 1) is a 422 naming the field."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

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
    decisions = set()
    for (a, b), far in itertools.product(itertools.combinations(NAMES, 2), (None, "1e-2")):
        answer = verify(server, a, b, **({"far": far} if far else {}))
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

"""Schemathesis against the app's own OpenAPI, over real HTTP to a real uvicorn (issue 10): for
generated requests to every operation, no 5xx, every status code documented, every body matching
its schema. Short here (CI); `CXR_REID_FUZZ_EXAMPLES=500 python -m pytest tests/test_api_contract.py`
is the long run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings
from tests.serving import ROOT, Server, free_port, server_env, uvicorn_command

EXAMPLES = int(os.environ.get("CXR_REID_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("contract")
    env = server_env(tmp / "data", tiny_checkpoint, CXR_REID_TORCH_THREADS="1")
    port = free_port()
    server = Server(uvicorn_command(port), env, port, tmp / "server.log")
    try:
        yield server.url
    finally:
        server.kill()
        log = (tmp / "server.log").read_text()
        assert "Traceback" not in log, log[-3000:]


# the spec is the app's own (no lifespan needed to build it); requests go to the real server
schema = schemathesis.openapi.from_dict(create_app(Settings(data_dir=ROOT / "unused")).openapi())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 12,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_every_operation_keeps_its_contract(case: schemathesis.Case, server_url: str) -> None:
    case.call_and_validate(
        base_url=server_url,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        timeout=60,
    )

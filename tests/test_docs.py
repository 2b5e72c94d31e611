"""The API documents itself: every schema, field and parameter described, one error body for every
4xx/5xx (as sent), and /docs and /redoc rendering from the app's own files with the network off."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, needs_chromium
from fastapi.testclient import TestClient

from app.api.schemas import ErrorResponse
from app.main import create_app
from app.server_process import Server, free_port, uvicorn_command
from app.settings import Settings


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data"))).openapi()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_every_schema_field_and_parameter_has_a_description(spec: dict[str, Any]) -> None:
    missing = []
    for name, schema in spec["components"]["schemas"].items():
        if not schema.get("description"):
            missing.append(f"schema {name}")
        missing += [
            f"field {name}.{field}"
            for field, prop in schema.get("properties", {}).items()
            if not prop.get("description")
        ]
    for method, path, op in _operations(spec):
        missing += [
            f"parameter {method} {path} {p['name']}"
            for p in op.get("parameters", [])
            if not p.get("description")
        ]
    assert not missing, missing


def test_every_error_response_is_documented_as_error_response(spec: dict[str, Any]) -> None:
    wrong = []
    for method, path, op in _operations(spec):
        for code, response in op["responses"].items():
            if int(code) >= 400 and set(response.get("content", {})) != {"application/dicom+json"}:
                # (a STOW-RS 409 is the DICOM response dataset, as PS3.18 says; every other error is ours)
                ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if ref != "#/components/schemas/ErrorResponse":
                    wrong.append(f"{method} {path} {code}: {ref}")
        if path not in ("/healthz", "/readyz", "/metrics"):
            assert {"401", "422", "500", "503"} <= set(op["responses"]), (method, path)
    assert not wrong, wrong
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def _assert_error_body(response: Any, status: int) -> ErrorResponse:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) <= set(ErrorResponse.model_fields), body
    return ErrorResponse.model_validate(body)


def test_error_bodies_sent_match_the_documented_schema(make_client: Any) -> None:
    client: TestClient = make_client(api_keys="k1")
    headers = {"X-API-Key": "k1"}
    invalid = _assert_error_body(client.get("/images?limit=0&offset=-1", headers=headers), 422)
    assert [error.field for error in invalid.errors or []] == ["query.offset", "query.limit"]
    assert invalid.detail.startswith("invalid request: query.offset: ")
    invalid = _assert_error_body(client.post("/search", data={"k": "many"}, headers=headers), 422)
    assert invalid.errors and invalid.errors[0].field == "body.k" and "integer" in invalid.errors[0].message
    assert "many" not in invalid.detail  # rejected values are not echoed (they may be patient ids)
    _assert_error_body(client.get("/images"), 401)
    _assert_error_body(client.get("/images/999", headers=headers), 404)
    _assert_error_body(client.get("/no-such-route"), 404)
    _assert_error_body(
        client.post("/embed", files={"file": ("x.png", b"not an image")}, headers=headers), 422
    )


@pytest.mark.browser
@pytest.mark.server
@pytest.mark.slow
@needs_chromium
def test_docs_render_offline_in_headless_chromium(
    server_env: dict[str, str], servers: list[Server], tmp_path: Path, spec: dict[str, Any]
) -> None:
    port = free_port()
    server = Server(uvicorn_command(port), server_env, port, tmp_path / "server.log")
    servers.append(server)
    operations = _operations(spec)
    paths = sorted(path for _, path, _ in operations)
    summaries = json.dumps([op["summary"] for _, _, op in operations])

    with Browser(tmp_path / "chromium-profile") as browser:  # anything but loopback is refused
        browser.open(f"{server.url}/docs")
        browser.wait_for(f"document.querySelectorAll('.opblock-summary-path').length >= {len(paths)}")
        swagger = str(browser.evaluate("document.documentElement.outerHTML"))
        browser.open(f"{server.url}/redoc")
        browser.wait_for(f"{summaries}.every(s => document.body.innerText.includes(s))")
        assert not browser.refused, browser.refused  # the pages need no CDN
    rendered = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', swagger)
    assert sorted(rendered) == paths


def test_bench_uses_the_installed_package_not_the_tests() -> None:
    """bench/ scripts run from a clean checkout with the package installed: no sys.path edits, no
    imports from tests/ (the server harness lives in app.server_process)."""
    root = Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.name}:{n}"
        for path in sorted((root / "bench").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "sys.path" in line or line.lstrip().startswith(("from tests", "import tests"))
    ]
    assert offenders == []


def test_every_setting_is_documented() -> None:
    """Each CXR_REID_* variable of app/settings.py has a row in the operations guide or the
    scale-out guide, so a new setting cannot ship undocumented."""
    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "operations.md").read_text() + (root / "docs" / "scale-out.md").read_text()
    missing = [
        f"CXR_REID_{name.upper()}"
        for name in Settings.model_fields
        if f"`CXR_REID_{name.upper()}`" not in docs
    ]
    assert missing == []

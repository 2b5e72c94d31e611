"""Access (issue 10, item 5): scoped keys stored hashed, a limit on rejected keys per address, and
no open API beyond loopback without an explicit --insecure."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.server_process import ROOT
from app.service.keys import FailedAuthLimiter, KeyStore


def test_keys_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, token = store.add("write", note="PACS bridge")
    text = store.path.read_text()
    assert token.split("_", 2)[2] not in text and key.digest in text  # only the salted hash is kept
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert (
        store.verify(token) == key and key.allows("read") and key.allows("write") and not key.allows("admin")
    )
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify("cxr_nope_secret") is None and store.verify("plain") is None
    assert store.revoke(key.key_id) and store.verify(token) is None and not store.revoke(key.key_id)


def test_scopes_per_route(make_client, tmp_path: Path, phantom_images: list[Path]) -> None:  # noqa: ANN001
    data_dir = tmp_path / "data"
    store = KeyStore(data_dir / "keys.json")
    tokens = {scope: store.add(scope)[1] for scope in ("read", "write", "admin")}
    client: TestClient = make_client(data_dir)
    image = {"file": ("a.png", phantom_images[0].read_bytes())}

    def status(method: str, path: str, scope: str | None, **kwargs: object) -> int:
        headers = {"X-API-Key": tokens[scope]} if scope else {}
        return client.request(method, path, headers=headers, **kwargs).status_code

    assert status("POST", "/embed", None, files=image) == 401
    assert status("POST", "/embed", "read", files=image) == 200
    assert status("POST", "/images", "read", files=image, data={"patient_id": "p1"}) == 403
    assert status("POST", "/images", "write", files=image, data={"patient_id": "p1"}) == 201
    assert status("GET", "/images", "read") == 200
    assert status("DELETE", "/patients/p1", "read") == 403
    assert status("POST", "/calibration", "write") == 403
    assert status("GET", "/calibration", "read") == 200
    assert status("DELETE", "/calibration", "admin") == 200
    assert status("DELETE", "/patients/p1", "write") == 200
    # a key added while the service runs works at once; a revoked one stops at once
    late_key, late = store.add("read")
    assert client.get("/images", headers={"X-API-Key": late}).status_code == 200
    store.revoke(late_key.key_id)
    assert client.get("/images", headers={"X-API-Key": late}).status_code == 401


def test_rejected_keys_are_limited_per_address_and_summarised(
    make_client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    client: TestClient = make_client(api_keys="right-key", auth_failures_per_minute=5)
    now = [1000.0]
    client.app.state.auth_limiter = FailedAuthLimiter(limit=5, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="app"):
        answers = [client.get("/images", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(12)]
    assert answers == [401] * 5 + [429] * 7
    limited = client.get("/images", headers={"X-API-Key": "guess-13"})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) == 60
    assert client.get("/images", headers={"X-API-Key": "right-key"}).status_code == 200  # never refused
    rejected = [r for r in caplog.records if "rejected API key" in r.getMessage()]
    assert len(rejected) == 1  # one line per address and window, not one per attempt
    now[0] += 60.0
    assert client.get("/images", headers={"X-API-Key": "guess-14"}).status_code == 401  # a new window


def test_a_valid_key_is_never_refused_because_others_failed(make_client) -> None:  # noqa: ANN001
    """Hardening issue, item 8: 23 wrong keys to the review login from one address (behind a proxy:
    from everybody) do not lock the admin out; the wrong ones are still limited."""
    client: TestClient = make_client(api_keys="admin-key")
    now = [5000.0]
    client.app.state.auth_limiter = FailedAuthLimiter(limit=20, window=60.0, clock=lambda: now[0])
    wrong = [
        client.post("/review/login", data={"api_key": f"guess-{i}"}, follow_redirects=False).status_code
        for i in range(23)
    ]
    assert wrong == [401] * 20 + [429] * 3  # 401: the login page again, saying the key is not valid
    login = client.post("/review/login", data={"api_key": "admin-key"}, follow_redirects=False)
    assert login.status_code == 303 and "cxr_reid_review=" in login.headers["set-cookie"]
    assert client.get("/images", headers={"X-API-Key": "admin-key"}).status_code == 200
    still = client.get("/images", headers={"X-API-Key": "guess-x"})
    assert still.status_code == 429 and still.headers["Retry-After"] == "60"
    now[0] += 30.0
    assert client.get("/images", headers={"X-API-Key": "guess-y"}).headers["Retry-After"] == "30"
    now[0] += 30.0
    assert client.get("/images", headers={"X-API-Key": "guess-z"}).status_code == 401


def _serve_and_capture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Path, *flags: str) -> dict:
    """``cxr-reid serve`` up to ``uvicorn.run``: the app and the options it would run with."""
    import uvicorn

    from app.cli import main

    captured: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: captured.update(app=app, **options))
    monkeypatch.setenv("CXR_REID_API_KEYS", "right-key")
    monkeypatch.delenv("CXR_REID_TRUSTED_PROXIES", raising=False)
    argv = ["serve", "--model", str(model), "--data-dir", str(tmp_path / "data"), *flags]
    assert main(argv) == 0
    return captured


def _statuses_through_uvicorn(captured: dict, peer: str, forwarded: list[str]) -> list[int]:
    """Wrong keys with the given X-Forwarded-For values, from ``peer``, through the ASGI app uvicorn
    would serve with the captured options (its proxy-headers middleware included)."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(
        captured["app"],
        proxy_headers=captured.get("proxy_headers", True),  # uvicorn's defaults where serve set none
        forwarded_allow_ips=captured.get("forwarded_allow_ips"),
        log_config=None,
    )
    config.load()

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=config.loaded_app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return [
                (
                    await http.get("/metrics", headers={"X-API-Key": f"guess-{i}", "X-Forwarded-For": value})
                ).status_code
                for i, value in enumerate(forwarded)
            ]

    return asyncio.run(run())


def test_forwarded_headers_are_trusted_only_from_configured_proxies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Hardening issue, item 8: uvicorn believes X-Forwarded-For from 127.0.0.1 by default, so a
    local client naming a new address each time was never limited. ``serve`` now trusts the
    headers from ``--trusted-proxy`` (CXR_REID_TRUSTED_PROXIES) peers only."""
    rotating = [f"203.0.113.{i}" for i in range(25)]
    plain = _serve_and_capture(monkeypatch, tmp_path, tiny_checkpoint)
    assert _statuses_through_uvicorn(plain, "127.0.0.1", rotating) == [401] * 20 + [429] * 5
    assert plain["proxy_headers"] is False

    proxied = _serve_and_capture(monkeypatch, tmp_path, tiny_checkpoint, "--trusted-proxy", "127.0.0.1")
    assert proxied["proxy_headers"] is True and proxied["forwarded_allow_ips"] == "127.0.0.1"
    # behind the configured proxy each client is counted on its own ...
    assert _statuses_through_uvicorn(proxied, "127.0.0.1", rotating) == [401] * 25
    # ... and any other peer's forwarded header is ignored
    assert _statuses_through_uvicorn(proxied, "198.51.100.7", rotating) == [401] * 20 + [429] * 5


def test_trusted_proxies_setting_is_checked() -> None:
    from app.settings import Settings

    assert Settings(trusted_proxies=" 10.0.0.5, 172.16.0.0/12 ").trusted_proxy_list == [
        "10.0.0.5",
        "172.16.0.0/12",
    ]
    assert Settings().trusted_proxy_list == []
    with pytest.raises(ValueError, match="not an IP address or network"):
        Settings(trusted_proxies="proxy.example")


def test_limiter_window_closes_with_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]  # a fake clock the test moves by hand: no sleeping, no timing flakes
    limiter = FailedAuthLimiter(limit=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="app.service.keys"):
        for _ in range(4):
            limiter.failed("10.0.0.9", "sha256:abc")
        assert limiter.retry_after("10.0.0.9") == 60
        now[0] += 45.0
        assert limiter.retry_after("10.0.0.9") == 15  # the rest of the window, rounded
        assert limiter.retry_after("10.0.0.8") is None  # per address
        now[0] += 14.75
        assert limiter.retry_after("10.0.0.9") == 1  # never 0 while limited
        assert "rejected API keys from" not in caplog.text
        now[0] += 0.25  # the window is over
        assert limiter.retry_after("10.0.0.9") is None
        assert "4 rejected API keys from 10.0.0.9 in 60 s" in caplog.text
        # a new window counts from zero: one more failure is under the limit again
        limiter.failed("10.0.0.9", "sha256:abc")
        assert limiter.retry_after("10.0.0.9") is None


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.server
@pytest.mark.slow
def test_keys_cli_and_no_open_api_beyond_loopback(tmp_path: Path, server_env: dict[str, str]) -> None:
    env = {**server_env, "CXR_REID_DATA_DIR": str(tmp_path / "data")}
    refused = _cli("serve", "--host", "0.0.0.0", "--port", "1", env=env)
    assert refused.returncode == 2 and "--insecure" in refused.stderr and "keys add" in refused.stderr
    added = _cli("keys", "add", "--scope", "admin", "--note", "ops", env=env)
    assert added.returncode == 0 and added.stdout.startswith("cxr_")
    listed = json.loads(_cli("keys", "list", env=env).stdout)
    assert [(k["scope"], k["note"]) for k in listed] == [("admin", "ops")]
    assert added.stdout.strip() not in (tmp_path / "data" / "keys.json").read_text()
    assert _cli("keys", "revoke", listed[0]["key_id"], env=env).returncode == 0
    assert _cli("keys", "revoke", "nope", env=env).returncode == 1


def test_a_key_limited_to_collections_sees_and_touches_only_those(
    make_client, tmp_path: Path, phantom_images: list[Path]
) -> None:  # noqa: ANN001
    data_dir = tmp_path / "data"
    store = KeyStore(data_dir / "keys.json")
    admin = store.add("admin")[1]
    ward = store.add("write", collections=["ward-a"])[1]
    client: TestClient = make_client(data_dir)
    as_admin, as_ward = {"X-API-Key": admin}, {"X-API-Key": ward}

    def enrol(collection: str, headers: dict[str, str], i: int = 0) -> httpx.Response:
        files = {"file": ("a.png", phantom_images[i].read_bytes())}
        return client.post(
            "/images", files=files, data={"patient_id": "p1", "collection": collection}, headers=headers
        )

    other = enrol("ward-b", as_admin, 0).json()["images"][0]["image_id"]
    mine = enrol("ward-a", as_ward, 1).json()["images"][0]["image_id"]
    assert enrol("ward-b", as_ward, 2).status_code == 403
    assert client.get(f"/images/{mine}", headers=as_ward).status_code == 200
    assert client.get(f"/images/{other}", headers=as_ward).status_code == 404  # not even its existence
    assert client.delete(f"/images/{other}", headers=as_ward).status_code == 404
    assert client.get("/images", headers=as_ward).status_code == 403  # every collection: name one
    assert client.get("/images", params={"collection": "ward-a"}, headers=as_ward).json()["total"] == 1
    assert client.post("/search", data={"image_id": other}, headers=as_ward).status_code == 404
    assert (
        client.post("/search", data={"image_id": mine, "collection": "*"}, headers=as_ward).status_code == 403
    )
    assert client.post("/search", data={"image_id": mine}, headers=as_ward).status_code == 200
    pair = {"image_id_a": mine, "image_id_b": other}
    assert client.post("/verify", data=pair, headers=as_ward).status_code == 404
    assert client.get("/duplicates", params={"collection": "ward-b"}, headers=as_ward).status_code == 403
    # the totals of other collections stay theirs: /readyz counts the key's own, /metrics is refused
    assert client.get("/readyz", headers=as_ward).json()["gallery_images"] == 1
    assert client.get("/readyz", headers=as_admin).json()["gallery_images"] == 2
    refused = client.get("/metrics", headers=as_ward)
    assert refused.status_code == 403 and "every collection" in refused.json()["detail"]
    assert client.get("/metrics", headers=as_admin).status_code == 200
    assert (
        client.delete("/patients/p1", params={"collection": "ward-a"}, headers=as_ward).json()["deleted"] == 1
    )
    assert client.get("/images", params={"collection": "*"}, headers=as_admin).json()["total"] == 1

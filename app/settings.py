"""Service settings: one typed object, filled from ``CXR_REID_*`` environment variables.

``cxr-reid serve`` turns its command-line flags into these variables before uvicorn starts, so a
worker process (``--workers N``) reads the same configuration as the parent.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.milvus_index import parse_vector_url
from models.scoring.decide import parse_fars

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the service can be told; every field has a default that runs as shipped."""

    # hide_input_in_errors: a refused database or vector URL, or an API key, is not echoed into logs
    model_config = SettingsConfigDict(
        env_prefix="CXR_REID_", extra="ignore", protected_namespaces=(), hide_input_in_errors=True
    )

    model_path: Path | None = Field(
        default=None, description="checkpoint to serve; None = the shipped models/weights/default.pt"
    )
    next_model_path: Path | None = Field(
        default=None,
        description="the checkpoint a coming `cxr-reid reindex` switches the gallery to, kept loaded (twice "
        "the model's memory): when the switch is committed the service swaps to it without a restart and "
        "without mixing the two networks' vectors in any answer; None = a switch leaves the service "
        "refusing searches until restarted with the new model",
    )
    data_dir: Path = Field(
        default=Path("./cxr-reid-data"), description="gallery folder (SQLite, FAISS, blobs)"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    far: str = Field(default="1e-3", description="default operating point: false-accept rate")
    threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="fixed cosine threshold; overrides `far` when set"
    )
    api_keys: SecretStr | None = Field(
        default=None, description="comma-separated plain API keys with every right (the older way)"
    )
    keys_file: Path | None = Field(
        default=None,
        description="scoped, hashed API keys (`cxr-reid keys add`); None = keys.json in the data dir",
    )
    insecure: bool = Field(
        default=False, description="allow binding beyond loopback with no API key configured"
    )
    auth_failures_per_minute: int = Field(
        default=20, ge=1, description="rejected API keys per client address per minute before 429s"
    )
    trusted_proxies: str | None = Field(
        default=None,
        description=(
            "comma-separated addresses or networks (e.g. 10.0.0.5,172.16.0.0/12) of reverse proxies "
            "whose X-Forwarded-For / X-Forwarded-Proto headers name the client; unset: none are "
            "trusted and the peer address is the client (what the failed-key limit counts by)"
        ),
    )
    max_upload_bytes: int = Field(
        default=50 * MIB, gt=0, description="largest request body (all files of one request together)"
    )
    max_pixels: int = Field(default=50_000_000, gt=0, description="largest image, in pixels, decoded")
    max_decode_mb: int = Field(
        default=1024,
        gt=0,
        description="MiB of decoded pixels all requests may hold at once (12 bytes per pixel the headers "
        "declare); sized for a 2 GB container. Requests beyond it wait, then get 503 with Retry-After",
    )
    decode_wait_seconds: float = Field(
        default=30.0, ge=0, description="how long a request waits for decode budget before its 503"
    )
    max_files: int = Field(default=64, ge=1, description="most files in one multipart request")
    index_factory: str = Field(
        default="auto",
        description="FAISS index factory string, or auto: exact Flat while the gallery is small, IVF-Flat "
        "(rebuilt in the background) above index.faiss_index.AUTO_FLAT_MAX images",
    )
    nprobe: int | None = Field(
        default=None,
        ge=1,
        description="IVF lists searched; None = 16, or with index_factory auto max(64, lists / 32)",
    )
    ef_search: int = Field(default=64, ge=1)
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:5432/db: the gallery's truth in PostgreSQL, shared by "
        "any number of replicas and jobs (each keeps its own data dir for its lock and index cache); unset: "
        "SQLite in the data dir, one process",
    )
    blob_dir: Path | None = Field(
        default=None,
        description="the stored originals' folder; with database_url, one every replica mounts (shared "
        "storage); None = images/ in the data dir",
    )
    follow_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="with database_url: the longest a replica waits between looks at the change log when "
        "no notification comes (notifications make it immediate)",
    )
    vector_url: SecretStr | None = Field(
        default=None,
        description="milvus://[user:password@]host:19530[/db]: search the vectors in Milvus instead of an "
        "in-process FAISS index (SQL stays the truth and feeds it); a path ending in .db is Milvus Lite, "
        "one process only. Needs the milvus extra (pip install 'cxr-reid[milvus]'); unset: FAISS",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where the model runs; auto = the GPU when torch sees one, else the CPU"
    )
    runtime: Literal["auto", "torch", "onednn", "onnxruntime"] = Field(
        default="auto",
        description="what runs the model on the CPU; auto = ONNX Runtime, else oneDNN fusion, else "
        "PyTorch (models/net/runtime.py has the figures)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads; None = number of CPU cores (max 8)"
    )
    log_level: str = "info"
    init: bool = Field(
        default=False,
        description="allow a new, empty gallery in a data dir that holds stored data but no database "
        "(otherwise refused: a mis-mounted volume must not look like an empty gallery)",
    )
    lock_retry_seconds: float = Field(
        default=5.0, gt=0, description="how often a server whose gallery is locked tries to open it again"
    )
    alert_webhook: str | None = Field(
        default=None,
        description="http(s) URL that every stored wrong-patient alert and its resolution is POSTed to "
        "as JSON (app/service/webhook.py: background thread, bounded queue, retried with back-off)",
    )
    alert_webhook_secret: SecretStr | None = Field(
        default=None,
        description="shared secret that signs every webhook body (HMAC-SHA256 of '<timestamp>.<body>' in "
        "X-CXR-Reid-Signature, the time in X-CXR-Reid-Timestamp; app/service/webhook.py)",
    )
    alert_webhook_attempts: int = Field(default=5, ge=1, le=20, description="deliveries tried per event")
    alert_webhook_backoff_seconds: float = Field(
        default=1.0, ge=0, description="wait before the first retry; doubled each time, at most 60 s"
    )
    dicom_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="port of the DICOM C-STORE / C-ECHO receiver beside the HTTP service "
        "(app/pacs/dimse.py); None = none",
    )
    dicom_host: str | None = Field(
        default=None, description="address the DICOM receiver binds; None = the HTTP service's host"
    )
    ae_title: str = Field(default="CXRREID", description="the DICOM receiver's own AE title")
    allowed_aes: str | None = Field(
        default=None,
        description="comma-separated calling AE titles whose associations the DICOM receiver accepts; "
        "unset: any (then serve it on a network only trusted modalities and PACS reach)",
    )
    dicom_collection: str = Field(
        default="default", description="gallery collection that instances received over DICOM go to"
    )
    dicom_max_associations: int = Field(
        default=4,
        ge=1,
        description="DICOM associations served at once; each may hold one instance of up to "
        "max_upload_bytes in memory while it arrives",
    )
    dicom_max_pdu: int = Field(
        default=65536,
        ge=4096,
        le=1 << 24,
        description="largest PDU, in bytes, the DICOM receiver asks its peers to send; a connection whose "
        "PDU declares more (or more than app.pacs.dimse.MIN_PDU_LIMIT) is closed before it is read",
    )

    @field_validator("far")
    @classmethod
    def _far_is_number(cls, value: str) -> str:
        fars = parse_fars(value)
        if len(fars) != 1:
            raise ValueError("far: give one false-accept rate, e.g. 1e-3")
        return fars[0]

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        proxies = [item.strip() for item in value.split(",") if item.strip()]
        for item in proxies:
            if item == "*":
                continue  # every peer: only where nothing but the proxy can reach the service
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {item!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/8)"
                ) from None
        return ",".join(proxies) or None

    @field_validator("alert_webhook")
    @classmethod
    def _webhook_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.lower().startswith(("http://", "https://")):
            raise ValueError("alert_webhook must be an http:// or https:// URL")
        return value

    @field_validator("vector_url")
    @classmethod
    def _vector_url_is_milvus(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        raw = value.get_secret_value()
        try:
            parse_vector_url(raw)
        except ValueError as exc:  # says what a good one looks like; the URL may hold a password
            raise ValueError(str(exc).replace(repr(raw), "the vector URL")) from None
        return value

    @field_validator("ae_title")
    @classmethod
    def _ae_title_is_valid(cls, value: str) -> str:
        return _ae_title(value, "ae_title")

    @field_validator("allowed_aes")
    @classmethod
    def _allowed_aes_are_valid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        titles = [_ae_title(item, "allowed_aes") for item in value.split(",") if item.strip()]
        return ",".join(titles) or None

    def far_for(self, calibration: Any) -> str:
        """The service's default FAR with ``calibration``: CXR_REID_FAR where it was set (a model that
        cannot serve it is then refused at start, with the reason); else 1e-3 where the calibration
        reaches it, else the calibration's own default (an adapted model whose held-back patients
        resolve FAR 1e-2 only)."""
        if "far" in self.model_fields_set:
            return self.far
        try:
            calibration.threshold_for(self.far)
        except ValueError:
            log.warning(
                "the model's calibration does not reach FAR %s: its own default FAR %s is the operating "
                "point (set CXR_REID_FAR to choose another it reaches)",
                self.far,
                calibration.default_far,
            )
            return str(calibration.default_far)
        return self.far

    @property
    def api_key_list(self) -> list[str]:
        """The configured keys; an empty list means the API is open."""
        if self.api_keys is None:
            return []
        return [key.strip() for key in self.api_keys.get_secret_value().split(",") if key.strip()]

    @property
    def trusted_proxy_list(self) -> list[str]:
        """The proxies whose forwarded headers are believed; empty: none (the peer is the client)."""
        return self.trusted_proxies.split(",") if self.trusted_proxies else []

    @property
    def allowed_ae_list(self) -> list[str]:
        """The calling AE titles the DICOM receiver accepts; empty: any."""
        return self.allowed_aes.split(",") if self.allowed_aes else []

    @property
    def keys_path(self) -> Path:
        return self.keys_file or self.data_dir / "keys.json"

    @property
    def request_body_limit(self) -> int:
        """Bytes a request body may hold: the upload limit plus room for multipart headers and fields."""
        return self.max_upload_bytes + 64 * 1024


def _ae_title(value: str, name: str) -> str:
    """An AE title as DICOM allows it (PS3.5 table 6.2-1: 1 to 16 characters of printable ASCII but
    backslash, not only spaces), stripped of its padding."""
    title = value.strip()
    if not title or len(title) > 16 or "\\" in title or not all(" " <= c <= "~" for c in title):
        raise ValueError(
            f"{name}: {value!r} is not a DICOM AE title (1 to 16 printable ASCII characters, no backslash)"
        )
    return title


def key_fingerprint(key: str) -> str:
    """A short, non-reversible name for an API key, safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]

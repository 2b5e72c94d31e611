"""FastAPI dependencies: the loaded service, the settings, API-key checks, and upload reading."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, UploadFile
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator, BeforeValidator

from app.api.middleware import route_template
from app.service.decoding import Upload
from app.service.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from app.service.keys import SCOPES, ApiKey, KeyFileError, KeyStore
from app.service.reid import ReidService
from app.settings import Settings, key_fingerprint

# clean_label: the label rule is the gallery's own (index.records), one rule for a patient id from a
# form field, a DICOM PatientID, a manifest or PACS sync; re-exported for the API's parameters
from index import MAX_LABEL_CHARS as MAX_LABEL_CHARS
from index import AlertRecord, ImageRecord
from index import clean_label as clean_label

if TYPE_CHECKING:  # schemas import this module (clean_label)
    from app.api.schemas import AlertResolution

log = logging.getLogger(__name__)

#: Image ids are SQLite integers; a larger number can only be a client error (422, not a crash).
MAX_IMAGE_ID = 2**63 - 1

_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="an API key (`cxr-reid keys add`, or one of CXR_REID_API_KEYS), when keys are configured",
)
#: Keys given in CXR_REID_API_KEYS: plain, from the environment, with every right.
LEGACY_KEY = ApiKey(key_id="env", scope="admin", salt="", digest="", created_at="", note="CXR_REID_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> Iterator[ReidService]:
    """The model and gallery loaded at start-up (lifespan), held on one network for the whole
    request (``ReidService.one_model``: a model switch waits for it)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status_code=503, detail="the service is starting or stopping")
    with service.one_model():
        yield service


def _client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def authorise(request: Request, api_key: str | None, scope: str) -> None:
    """401 unless a key with at least ``scope`` is presented; 403 for a key of a lower scope; 429
    instead of 401 for a wrong key from an address with too many rejected keys. The key is checked
    first and only failures are limited, so a valid key is never refused because others failed
    from the same address (behind a proxy: every client). No keys configured at all: the API is
    open (and ``cxr-reid serve`` then binds loopback only)."""
    state = request.app.state
    legacy: list[str] = state.settings.api_key_list
    store: KeyStore = state.key_store
    try:
        stored = store.keys()
    except KeyFileError as exc:
        log.error("%s", exc)
        raise HTTPException(
            status_code=503, detail="the API keys file cannot be read; see the server log"
        ) from None
    if not legacy and not stored:
        return
    if not api_key:
        raise HTTPException(
            status_code=401, detail="missing X-API-Key header", headers={"WWW-Authenticate": "ApiKey"}
        )
    key = store.verify(api_key)
    if key is None and any(hmac.compare_digest(api_key.encode(), k.encode()) for k in legacy):
        key = LEGACY_KEY
    if key is None:
        address = _client_address(request)
        wait = state.auth_limiter.retry_after(address)
        if wait is not None:
            raise HTTPException(
                status_code=429,
                detail=f"too many rejected API keys from this address; try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        what = f"sha256:{key_fingerprint(api_key)} for {request.method} {route_template(request.scope)}"
        state.auth_limiter.failed(address, what)
        raise HTTPException(status_code=401, detail="invalid API key", headers={"WWW-Authenticate": "ApiKey"})
    if not key.allows(scope):
        raise HTTPException(
            status_code=403, detail=f"this API key's scope is '{key.scope}'; this needs '{scope}' or higher"
        )
    request.state.api_key = key


def require_scope(scope: str) -> Callable[..., None]:
    """A dependency that lets a request through with a key of at least ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(request: Request, api_key: Annotated[str | None, Depends(_api_key_header)] = None) -> None:
        authorise(request, api_key, scope)

    return dependency


def has_scope(request: Request, scope: str) -> bool:
    """Whether the request may see what needs ``scope`` (open API, or a good enough key), without
    refusing it: for routes that answer everyone but say more to key holders."""
    try:
        authorise(request, request.headers.get("X-API-Key"), scope)
    except HTTPException:
        return False
    return True


class Access:
    """The collections the request's API key may touch (every one without keys or for an
    unrestricted key); routers pass every collection and gallery image they use through it."""

    def __init__(self, key: ApiKey | None) -> None:
        self.key = key

    def collection(self, collection: str | None) -> str | None:
        """``collection`` (None: every one) if the key may use it, else 403."""
        if self.key is not None and not self.key.allows_collection(collection):
            allowed = ", ".join(self.key.collections or [])
            raise HTTPException(
                status_code=403,
                detail=f"this API key may only use the collection(s) {allowed}: name one with `collection`",
            )
        return collection

    def record(self, record: ImageRecord) -> ImageRecord:
        """A gallery image the key may see; others are reported as not found (their ids stay private)."""
        if self.key is not None and not self.key.allows_collection(record.collection):
            raise NotFoundError(f"image {record.image_id} not found")
        return record


def get_access(request: Request) -> Access:
    return Access(getattr(request.state, "api_key", None))


AccessDep = Annotated[Access, Depends(get_access)]
ServiceDep = Annotated[ReidService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _digits_only(value: object) -> object:
    """Path ids are plain digits: `/images/ 1` or `/images/+1` is not image 1."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a positive whole number written in digits")
    return value


# parameters several routes share, declared once
Label = AfterValidator(clean_label)
ImageIdPath = Annotated[
    int, Path(ge=1, le=MAX_IMAGE_ID, description="a gallery image id"), BeforeValidator(_digits_only)
]
PageOffset = Annotated[
    int, Query(ge=0, le=MAX_IMAGE_ID, description="items to skip before the page (pagination)")
]
PageLimit = Annotated[int, Query(ge=1, le=1000, description="most items in the page (1-1000)")]


def read_uploads(files: list[UploadFile], settings: Settings) -> list[Upload]:
    """Read uploaded files, refusing (413) any over the upload limit and (422) too many or empty ones.

    The request body as a whole was already limited while it streamed in (BodyLimitMiddleware).
    """
    if len(files) > settings.max_files:
        raise InvalidInputError(
            f"{len(files)} files in one request; at most {settings.max_files} are accepted"
        )
    uploads = []
    for index, upload in enumerate(files):
        name = upload.filename or f"file #{index + 1}"
        data = upload.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLargeError(
                f"'{name}' is larger than the upload limit of {settings.max_upload_bytes:,} bytes "
                "(CXR_REID_MAX_UPLOAD_BYTES)"
            )
        if not data:
            raise InvalidInputError(f"'{name}': the file is empty")
        uploads.append(Upload(name, data))
    return uploads


def collect_files(*groups: UploadFile | list[UploadFile] | None) -> list[UploadFile]:
    """Flatten the `file` and `files` form fields into one list (either may be absent)."""
    out: list[UploadFile] = []
    for group in groups:
        if group is None:
            continue
        out.extend(group if isinstance(group, list) else [group])
    return out


def upload_or_id(
    file: UploadFile | None, image_id: int | None, settings: Settings, file_field: str, id_field: str
) -> Upload | int:
    """An image given either as an upload or as a gallery id, as the service takes it: the upload's
    bytes, or the id; 422 when both or neither are given."""
    if file is not None and image_id is not None:
        raise InvalidInputError(f"give either '{file_field}' or '{id_field}', not both")
    if file is None and image_id is None:
        raise InvalidInputError(f"missing '{file_field}' (an image) or '{id_field}' (a gallery image id)")
    return read_uploads([file], settings)[0] if file is not None else int(image_id)


AlertIdPath = Annotated[int, Path(ge=1, le=MAX_IMAGE_ID, description="a stored alert's id")]


def visible_alert(access: Access, alert: AlertRecord) -> AlertRecord:
    """An alert of a collection the key may not use is "not found" (like its image)."""
    if access.key is not None and not access.key.allows_collection(alert.collection):
        raise NotFoundError(f"alert {alert.alert_id} not found")
    return alert


def resolve_as(service: ReidService, access: Access, alert_id: int, body: AlertResolution) -> AlertRecord:
    """Resolve an alert the key may see, recorded with the key's id (``anonymous`` without keys): the
    one path of ``POST /alerts/{id}`` and the review page's forms."""
    visible_alert(access, service.alert(alert_id))
    return service.resolve_alert(
        alert_id,
        action=body.action,
        resolved_by=access.key.key_id if access.key is not None else "anonymous",
        patient_id=body.patient_id,
        note=body.note,
    )

"""A DICOM C-STORE receiver (with C-ECHO) beside the HTTP service, for modalities and PACS that
speak DIMSE only: ``cxr-reid serve --dicom-port 11112 --ae-title CXRREID``.

:class:`DicomReceiver` is a pynetdicom storage SCP that runs in the serving process, in its own
threads, on the same :class:`ReidService` as the HTTP routes. Each C-STORE goes through
:func:`app.service.ingest.ingest_instance`, the check-and-enrol path of STOW-RS: the same refusals,
the same wrong-patient check and alerts (stored, counted, sent to the webhook), filed under the
instance's PatientID, StudyInstanceUID, SOPInstanceUID and ViewPosition, into
``CXR_REID_DICOM_COLLECTION``. The response's Status is the failure code of
:func:`app.service.ingest.refusal`, the table STOW-RS's FailureReason comes from:

=========  =====================================================================================
0x0000     enrolled, or already in the collection under the same PatientID (a PACS may re-send)
0xA700     out of resources: over ``CXR_REID_MAX_UPLOAD_BYTES``, the decode budget taken, the
           gallery full or not open yet (locked by another process): send it again later
0xC000     cannot understand: no readable header or SOP UIDs, unusable pixels, a bad PatientID
0x0122     not a projection radiograph (Modality not CR / DX / DR / RG)
0x0111     its SOPInstanceUID is stored under another PatientID (PS3.7 annex C, duplicate SOP
           instance): not enrolled again; check which patient it belongs to
0x0110     processing failure (the error is in the server log)
=========  =====================================================================================

A refusal's reason goes in ErrorComment (at most 64 characters, DICOM's limit for it) and, whole,
in the server log with the calling AE title. A wrong-patient alert does not fail the store (the
image is stored, as over STOW-RS); it is logged by kind and image id, never by patient.

Bounds: at most ``CXR_REID_DICOM_MAX_ASSOCIATIONS`` associations at once (more are rejected,
transient); PDUs of at most ``CXR_REID_DICOM_MAX_PDU`` bytes asked for, and a connection whose PDU
declares more (or more than :data:`MIN_PDU_LIMIT`) closed at its header, before pynetdicom would
read it whole (:class:`_PduLimitedSocket`); an instance whose data passes
``CXR_REID_MAX_UPLOAD_BYTES`` while it arrives aborts its association there (the whole instance is
never held). :meth:`DicomReceiver.stop` lets the instances being stored finish, then aborts the
associations still open. Associations must call this receiver's AE title; with
``CXR_REID_ALLOWED_AES`` set, only those calling AE titles are accepted (others are rejected with
"calling AE title not recognised"). DIMSE has no API keys: without an allow-list, bind the receiver
(``CXR_REID_DICOM_HOST``) where only trusted modalities and PACS reach it.

Storage presentation contexts: CR, DX (for presentation and for processing) and Secondary Capture
images (a secondary capture is enrolled only with one of those Modalities, as over STOW-RS), each
in the transfer syntaxes the decoder reads (:func:`transfer_syntaxes`: implicit and explicit VR
little endian, deflated, and each compressed syntax whose pydicom decoder is installed: JPEG
baseline / extended / lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import socketserver
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.service.errors import ServiceError, UnavailableError
from app.service.ingest import Failure, IngestStatus, InstanceRules, ingest_instance, refusal
from app.service.reid import ReidService
from app.settings import Settings
from index import clean_label

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

#: The storage SOP classes accepted: the projection radiographs, and secondary captures of them.
STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: Most characters of ErrorComment (VR LO, PS3.5 table 6.2-1).
ERROR_COMMENT_CHARS = 64
#: Seconds a stopping receiver lets the instances being stored finish before it aborts associations.
STOP_GRACE_SECONDS = 10.0
SUCCESS = 0x0000
#: Addresses only this machine reaches: an open receiver there is not warned about.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
#: Smallest limit on the length a received PDU may declare, whatever CXR_REID_DICOM_MAX_PDU says: an
#: A-ASSOCIATE-RQ proposing 128 presentation contexts of several transfer syntaxes each fits in it.
MIN_PDU_LIMIT = 256 * 1024
#: Message control header bits of a presentation data value (PS3.8 annex E.2).
_COMMAND_FRAGMENT, _LAST_FRAGMENT = 0x01, 0x02


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes accepted: those :mod:`models.imaging.dicom` reads natively (little endian,
    implicit or explicit, and deflated) and each compressed one whose pydicom decoder is installed, so
    an instance the SCU can send in a syntax the decoder lacks is sent in another, not refused."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        AllTransferSyntaxes,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    for uid in AllTransferSyntaxes:
        if not uid.is_encapsulated:
            continue
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(uid)
        except NotImplementedError:  # video, audio, JPIP: no pixel decoder at all
            continue
    return [str(uid) for uid in syntaxes]


#: ErrorComments of the refusals whose reason says what matters too late to survive the cut.
SHORT_COMMENTS = {
    Failure.DUPLICATE_SOP_INSTANCE: "SOPInstanceUID stored under another PatientID: not enrolled",
}


def error_comment(reason: str, sop_instance_uid: str | None, code: Failure | None = None) -> str:
    """A refusal's reason as an ErrorComment: without the "instance <uid>" the response names
    already, ASCII, cut to :data:`ERROR_COMMENT_CHARS` (the reason whole is in the server log)."""
    if code in SHORT_COMMENTS:
        return SHORT_COMMENTS[code]
    if sop_instance_uid:
        for named in (f"'instance {sop_instance_uid}'", f"instance {sop_instance_uid}"):
            reason = reason.replace(named, "")
        reason = reason.lstrip(":; ")
    comment = reason.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    if len(comment) > ERROR_COMMENT_CHARS:
        comment = comment[: ERROR_COMMENT_CHARS - 3].rstrip() + "..."
    return comment


def listen_problem(settings: Settings) -> str | None:
    """Why the DICOM receiver of ``settings`` could not listen (its port taken, its address not this
    machine's), or None: ``cxr-reid serve`` asks before the model loads, to say it in one line."""
    host = settings.dicom_host or settings.host
    if settings.dicom_port is None:
        return None
    try:
        infos = socket.getaddrinfo(host, settings.dicom_port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the receiver binds
            probe.bind(address)
    except OSError as exc:
        return _listen_error(host, settings.dicom_port, exc)
    return None


def _listen_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        hint = "choose another --dicom-port (CXR_REID_DICOM_PORT), or stop what uses it"
    else:
        hint = "give --dicom-host (CXR_REID_DICOM_HOST) an address of this machine"
    return f"the DICOM receiver cannot listen on {host}:{port} ({exc.strerror or exc}): {hint}"


class _PduLimitedSocket:
    """A client socket whose reads end (as if the peer had closed it) when a PDU declares a length over
    ``limit``: pynetdicom reads a whole PDU into memory before anything looks at it, so a peer, even
    one that never gets an association, could otherwise make it hold gigabytes. The PDUs are followed
    through the byte stream (6-byte headers, PS3.8 9.3), however the reads split it."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._header = bytearray()
        self._left = 0  # bytes of the current PDU's body not read yet
        self._closed = False

    def recv(self, bufsize: int, *flags: int) -> bytes:
        if self._closed:
            return b""
        data = self._sock.recv(bufsize, *flags)
        at = 0
        while at < len(data):
            if self._left:
                step = min(self._left, len(data) - at)
                self._left -= step
                at += step
                continue
            part = data[at : at + 6 - len(self._header)]
            self._header += part
            at += len(part)
            if len(self._header) == 6:
                length = int.from_bytes(self._header[2:6], "big")
                self._header.clear()
                if length > self._limit:
                    self._closed = True
                    log.warning(
                        "DICOM connection from %s closed: a PDU declared %d bytes, over %d "
                        "(CXR_REID_DICOM_MAX_PDU)",
                        _peer(self._sock),
                        length,
                        self._limit,
                    )
                    return b""
                self._left = length
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # send, fileno (select), shutdown, close, ...


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _limited_handler_class() -> type:
    """pynetdicom's request handler with each client socket wrapped in :class:`_PduLimitedSocket`
    (imported late: pynetdicom loads only where a receiver starts)."""
    from pynetdicom.transport import RequestHandler

    class LimitedRequestHandler(RequestHandler):
        def __init__(self, request: Any, client_address: Any, server: Any, *, pdu_limit: int) -> None:
            self.pdu_limit = pdu_limit
            super().__init__(request, client_address, server)

        def setup(self) -> None:
            super().setup()
            self.request = _PduLimitedSocket(self.request, self.pdu_limit)

    return LimitedRequestHandler


class DicomReceiver:
    """The C-STORE / C-ECHO SCP of one serving process: :meth:`start` binds it (OSError when the port
    is taken), :meth:`stop` stops it; in between each association runs in its own thread."""

    def __init__(
        self,
        service: ReidService,
        settings: Settings,
        *,
        on_answered: Callable[[int], None] | None = None,
    ) -> None:
        """``on_answered`` is told each C-STORE's status (the service's metrics count them)."""
        if settings.dicom_port is None:
            raise ValueError("no DICOM port is configured (CXR_REID_DICOM_PORT, or serve --dicom-port)")
        try:
            collection = clean_label(settings.dicom_collection)
        except ValueError as exc:
            raise ValueError(f"CXR_REID_DICOM_COLLECTION {exc}") from None
        if collection is None or collection == "*":
            raise ValueError("CXR_REID_DICOM_COLLECTION must be a non-empty name other than '*'")
        self.service = service
        self.settings = settings
        self.collection = collection
        self.host = settings.dicom_host or settings.host
        self.port = settings.dicom_port
        self.max_instance_bytes = settings.max_upload_bytes
        self._on_answered = on_answered
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        #: dataset bytes received so far of the message each association is receiving
        self._receiving: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._aborted: weakref.WeakSet[Any] = weakref.WeakSet()  # associations aborted for size
        self._idle = threading.Condition()  # guards the two below
        self._storing = 0  # C-STOREs being handled
        self._stopping = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on ``host:port``, in background threads."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.transport import ThreadedAssociationServer

        if logging.getLogger("pynetdicom").level == logging.NOTSET:
            # pynetdicom logs every association and message at INFO; ours log one line per instance
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.maximum_pdu_size = self.settings.dicom_max_pdu
        ae.require_called_aet = True
        ae.require_calling_aet = self.settings.allowed_ae_list
        syntaxes = transfer_syntaxes()
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        limit = max(self.settings.dicom_max_pdu, MIN_PDU_LIMIT)
        try:
            self._server = ae.make_server(
                (self.host, self.port),
                evt_handlers=handlers,
                server_class=ThreadedAssociationServer,
                request_handler=functools.partial(_limited_handler_class(), pdu_limit=limit),
            )
        except OSError as exc:
            raise OSError(exc.errno, _listen_error(self.host, self.port, exc)) from exc
        if not self.settings.allowed_ae_list and self.host not in LOOPBACK_HOSTS:
            log.warning(
                "the DICOM receiver on %s accepts associations from any calling AE title: set "
                "--allowed-ae (CXR_REID_ALLOWED_AES) to the modalities and PACS that may store here",
                self.host,
            )
        self.port = self._server.server_address[1]  # the port bound when 0 was asked for
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"dicom-receiver-{self.port}", daemon=True
        )
        self._thread.start()
        allowed = ", ".join(self.settings.allowed_ae_list) or "any (no CXR_REID_ALLOWED_AES)"
        log.info(
            "DICOM receiver %s on %s:%d (C-STORE into collection %r, C-ECHO; calling AE titles: %s)",
            self.settings.ae_title,
            self.host,
            self.port,
            self.collection,
            allowed,
        )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Accept no more associations, let the instances being stored finish for up to ``grace``
        seconds (a C-STORE arriving meanwhile gets 0xA700: send it again later), then abort the
        associations still open."""
        server, self._server = self._server, None
        if server is None:
            return
        # no new associations; the listening socket is closed (socketserver's own shutdown: the server
        # was made with make_server, so the AE does not list it for its own shutdown)
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        with self._idle:
            self._stopping = True
            if not self._idle.wait_for(lambda: self._storing == 0, timeout=grace):
                log.warning("DICOM receiver stopping: %d instance(s) still being stored", self._storing)
        for assoc in server.active_associations:
            assoc.abort()
        log.info("DICOM receiver %s stopped", self.settings.ae_title)

    # ------------------------------------------------------------------ handlers (pynetdicom threads)
    def _on_echo(self, event: Event) -> int:
        return SUCCESS

    def _on_rejected(self, event: Event) -> None:
        """Say in the log why an association was turned away (pynetdicom says it at DEBUG only)."""
        requestor = event.assoc.requestor
        primitive = getattr(requestor, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        allowed = self.settings.allowed_ae_list
        if allowed and requestor.ae_title not in allowed:
            why = f"its calling AE title is not among CXR_REID_ALLOWED_AES ({', '.join(allowed)})"
        elif called and called != self.settings.ae_title:
            why = f"it called AE title {called!r}; this receiver is {self.settings.ae_title!r}"
        else:
            why = (
                f"over {self.settings.dicom_max_associations} associations at once "
                "(CXR_REID_DICOM_MAX_ASSOCIATIONS), or no usable presentation context"
            )
        log.warning(
            "DICOM association from %s at %s rejected: %s", requestor.ae_title, requestor.address, why
        )

    def _on_pdu(self, event: Event) -> None:
        """Count the data set bytes of the message arriving; past the upload limit, abort the
        association there, so no instance larger than that is ever held."""
        from pynetdicom.pdu import P_DATA_TF

        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF):
            return
        assoc = event.assoc
        with self._lock:
            received = self._receiving.get(assoc, 0)
            for item in pdu.presentation_data_value_items:
                value = item.presentation_data_value or b"\x00"
                if value[0] & _COMMAND_FRAGMENT:
                    received = 0  # a new message begins
                else:
                    received += len(value) - 1
            self._receiving[assoc] = received
            if received <= self.max_instance_bytes or assoc in self._aborted:
                return
            self._aborted.add(assoc)
        log.warning(
            "DICOM association from %s aborted: an instance passed %d bytes (CXR_REID_MAX_UPLOAD_BYTES)",
            assoc.requestor.ae_title,
            self.max_instance_bytes,
        )
        assoc.abort(block=False)

    def _on_store(self, event: Event) -> Dataset:
        """One C-STORE: ingest the instance as sent (header read, pixels decoded, never re-encoded)
        and answer its status (see the module docstring)."""
        from pydicom.dataset import Dataset

        calling = event.assoc.requestor.ae_title
        sop = str(event.request.AffectedSOPInstanceUID or "") or None
        with self._idle:
            stopping = self._stopping
            self._storing += 0 if stopping else 1
        if stopping:
            status, reason = self._refused(
                calling, Failure.OUT_OF_RESOURCES, "cxr-reid is shutting down: send it again later"
            )
        else:
            try:
                status, reason = self._store(event.encoded_dataset(include_meta=True), sop, calling)
            finally:
                with self._idle:
                    self._storing -= 1
                    self._idle.notify_all()
        if self._on_answered is not None:
            self._on_answered(status)
        answer = Dataset()
        answer.Status = status
        if reason is not None:
            answer.ErrorComment = error_comment(reason, sop, Failure(status))
        return answer

    def _store(self, data: bytes, sop: str | None, calling: str) -> tuple[int, str | None]:
        """(status, reason) of one instance; the reason None on success."""
        name = f"instance {sop or '(no SOPInstanceUID)'}"
        if len(data) > self.max_instance_bytes:
            return self._refused(
                calling,
                Failure.OUT_OF_RESOURCES,
                f"{name} is {len(data):,} bytes; at most {self.max_instance_bytes:,} are taken "
                "(CXR_REID_MAX_UPLOAD_BYTES)",
            )
        with self.service.one_model():  # as an HTTP request (app.api.dependencies.get_service)
            return self._ingest(data, sop, calling, name)

    def _ingest(self, data: bytes, sop: str | None, calling: str, name: str) -> tuple[int, str | None]:
        try:
            point = self.service.operating_point()
            done = ingest_instance(
                self.service,
                data,
                collection=self.collection,
                point=point,
                rules=InstanceRules(strict_uids=True),
            )
            refused = refusal(done, name)
        except UnavailableError as exc:  # no gallery open yet (locked by another process), busy
            return self._refused(calling, Failure.OUT_OF_RESOURCES, exc.detail)
        except ServiceError as exc:
            return self._refused(calling, Failure.PROCESSING, exc.detail)
        except Exception:
            log.exception("DICOM C-STORE from %s: %s could not be stored", calling, name)
            return self._refused(
                calling, Failure.PROCESSING, f"{name} could not be stored; see the server log"
            )
        if refused is not None:
            if refused.code is Failure.PROCESSING:
                log.error("DICOM C-STORE from %s: %s could not be stored: %s", calling, name, done.error)
            return self._refused(calling, refused.code, refused.reason)
        result = done.result
        if done.status is IngestStatus.ALREADY_STORED or result is None:
            log.info("DICOM C-STORE from %s: %s already stored", calling, name)
        elif result.alert is not None:
            # the kind and ids only: the alert's message names patients, which stay out of logs
            log.warning(
                "DICOM C-STORE from %s: %s enrolled as image %d with wrong-patient alert %s",
                calling,
                name,
                result.record.image_id,
                result.alert.kind,
            )
        else:
            log.info("DICOM C-STORE from %s: %s enrolled as image %d", calling, name, result.record.image_id)
        return SUCCESS, None

    @staticmethod
    def _refused(calling: str, code: Failure, reason: str) -> tuple[int, str]:
        log.warning("DICOM C-STORE from %s refused with 0x%04X (%s): %s", calling, code, code.name, reason)
        return int(code), reason

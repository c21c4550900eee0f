"""The DICOM front door: pynetdicom's AE as a C-STORE / C-ECHO SCP writing to the spool and the audit DB.

pynetdicom does the DICOM upper layer and the association negotiation; pynetdicom's chunked receive
writes each data set to ``<spool>/.incoming`` as it arrives, behind pynetdicom's File Meta
Information, without decoding pixel data. The C-STORE handler here then checks the command against
the data set and the accepted context, moves the file into the spool durably
(:meth:`~lpm_node.intake.spool.Spool.adopt`), waits until its audit row is committed, and only then
answers success. Around pynetdicom (:mod:`lpm_node.intake.guard` and :class:`FrontDoorServer`): a cap on
open connections (checked before any thread is started), TLS handshakes off the accepting thread,
PDU and PDV bounds and total deadlines. Every refusal and abort is recorded in the audit database.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import utcnow
from lpm_node.core.config import Settings
from lpm_node.core.states import AssociationOutcome
from lpm_node.intake.guard import GuardedSocket
from lpm_node.intake.header import CannotUnderstand, Header, is_valid_uid, read_header
from lpm_node.intake.recorder import (
    AssocEnded,
    AssocOpened,
    AuditRecorder,
    ConnectionRefused,
    InstanceRefused,
    InstanceStored,
)
from lpm_node.intake.spool import Spool, SpoolFull

LOG = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
MAX_PDU_BYTES = 1024 * 1024
TLS_HANDSHAKE_S = 10.0
AUDIT_WAIT_S = 30.0  # a C-STORE waits this long at most for its audit row

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900  # data set does not match SOP class (or the command's UIDs)
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


@dataclass
class _AssocInfo:
    """What the listener keeps about one connection."""

    key: int
    address: str
    port: int
    tls: bool = False
    calling_ae: str = ""
    called_ae: str = ""
    opened: bool = False  # an audit row was opened for it
    refused: str = ""  # why the association request was refused
    stored: int = 0
    bytes_stored: int = 0
    handler_s: float = 0.0  # time in the C-STORE handler (checks, header, making durable, audit commit)
    sync_s: float = 0.0  # of which syncing
    audit_s: float = 0.0  # of which waiting for the audit row's commit


class FrontDoorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a connection cap checked before a thread starts, and TLS
    handshakes done in the connection's own thread (never in the accepting one)."""

    listener: Listener
    request_queue_size = 128  # listen backlog: a burst of connections is accepted (or refused) at once

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.listener.connection_slots.acquire(blocking=False):
            return True
        self.listener.record_closed(str(client_address[0]), int(client_address[1]),
                                    f"connection limit reached (max_connections={self.listener.max_connections})")
        return False

    def service_actions(self) -> None:
        """pynetdicom runs a full garbage collection here every 60 polls; threads end cleanly without it."""



class SharedPortFrontDoorServer(FrontDoorServer):
    """The same, bound with SO_REUSEPORT: several receiver processes on one machine share the port (the kernel
    spreads the connections over them)."""

    def server_bind(self) -> None:
        """pynetdicom's bind (SO_REUSEADDR, timeouts) with SO_REUSEPORT set first: its ``server_bind`` replaces
        socketserver's, which is where ``allow_reuse_port`` would have been applied."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class FrontDoorAssociation(Association):
    """pynetdicom's acceptor association that tells the listener when its thread ends, however it ends."""

    listener: Listener
    info: _AssocInfo

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.listener.connection_ended(self)


class FrontDoorHandler(RequestHandler):
    """Wraps the connection (TLS when configured) and hands pynetdicom a :class:`GuardedSocket`."""

    server: FrontDoorServer

    def handle(self) -> None:
        listener = self.server.listener
        address, port = str(self.client_address[0]), int(self.client_address[1])
        started = False
        try:
            if listener.tls_context is not None:
                try:
                    self.request.settimeout(TLS_HANDSHAKE_S)
                    self.request = listener.tls_context.wrap_socket(self.request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    listener.record_closed(address, port, f"TLS handshake failed: {exc}", tls=True)
                    try:
                        self.request.close()
                    except OSError:
                        pass
                    return
            assoc = self._create_association()
            assoc.listener = listener
            assoc.info = _AssocInfo(key=listener.next_key(), address=address, port=port,
                                    tls=listener.tls_context is not None)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            started = True
        finally:
            if not started:
                listener.connection_slots.release()

    def _create_association(self) -> FrontDoorAssociation:
        assoc = FrontDoorAssociation(self.ae, "acceptor")
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        node = self.server.listener.settings.node
        sock = GuardedSocket(assoc, self.request, max_pdu=MAX_PDU_BYTES,
                             associate_timeout_s=float(node.associate_timeout_s),
                             idle_timeout_s=float(node.idle_timeout_s))
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)  # type: ignore[misc]
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:  # type: ignore[union-attr]
                    assoc.bind(event, handler[0], handler[1])  # type: ignore[index]
        return assoc


def tls_server_context(certificate: str, private_key: str, ca_certificates: str = "",
                       require_client_certificate: bool = False) -> ssl.SSLContext:
    """The node's TLS context (TLS 1.2 or later); client certificates checked against ``ca_certificates``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates:
        context.load_verify_locations(ca_certificates)
    if require_client_certificate:
        if not ca_certificates:
            raise ValueError("tls_require_client_certificate needs tls_ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    elif ca_certificates:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class Listener:
    """The node's storage SCP: accepts CT, writes the spool, records the audit."""

    def __init__(self, settings: Settings, sessions: sessionmaker, spool: Spool | None = None) -> None:
        self.settings = settings
        node = settings.node
        self.spool = spool or Spool(settings.spool_path, quota_mb=node.spool_quota_mb,
                                    min_free_disk_mb=node.min_free_disk_mb)
        self.recorder = AuditRecorder(sessions)
        self.allowed_ae_titles = {t.strip() for t in node.allowed_ae_titles if t.strip()}
        self.allowed_hosts = {h.strip() for h in node.allowed_hosts if h.strip()}
        self.max_associations = max(1, int(node.max_associations))
        self.max_connections = max(self.max_associations, int(node.max_connections))
        self.connection_slots = threading.BoundedSemaphore(self.max_connections)
        self._associated = 0
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._server: FrontDoorServer | None = None
        self.tls_context: ssl.SSLContext | None = None
        if node.tls_certificate or node.tls_private_key:
            self.tls_context = tls_server_context(node.tls_certificate, node.tls_private_key,
                                                  node.tls_ca_certificates, node.tls_require_client_certificate)
        self.database_folder = _sqlite_folder(settings.db_url)
        self.on_instance: Callable[[Header], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def make_ae(self) -> AE:
        """pynetdicom's AE with the node's contexts, limits and timeouts."""
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = self.max_connections  # the node's own limit counts associations (below)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = float(node.associate_timeout_s)
        ae.network_timeout = float(node.idle_timeout_s)
        ae.dimse_timeout = float(node.idle_timeout_s)
        ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> tuple[str, int]:
        """Start accepting associations in background threads; returns the bound (host, port)."""
        self.spool.remove_stale_temporaries()
        logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, LOG.getEffectiveLevel()))
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom writes a data set as it arrives to a NamedTemporaryFile: put those in the spool's file system
        dimse_messages.NamedTemporaryFile = partial(_incoming_file, self.spool.incoming)  # type: ignore[attr-defined]
        self.recorder.start()
        node = self.settings.node
        ae = self.make_ae()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda _event: STATUS_SUCCESS),
        ]
        server_class = SharedPortFrontDoorServer if node.reuse_port else FrontDoorServer
        server = ae.make_server((node.host, int(node.port)), evt_handlers=handlers,  # type: ignore[arg-type]
                                server_class=server_class, request_handler=FrontDoorHandler)
        server.listener = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="front-door", daemon=True)
        thread.start()
        ae._servers.append(server)
        self._ae = ae
        self._server = server  # type: ignore[assignment]
        host, port = server.server_address[:2]
        LOG.info("listening on %s:%d as AE title %s%s", host, port, node.ae_title,
                 " (DICOM TLS)" if self.tls_context else "")
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, end open associations, and write the remaining audit rows."""
        if self._server is not None:
            for assoc in self._server.active_associations:
                assoc.abort()
            self._server.shutdown()
            self._server = None
        self.recorder.stop()

    # -- connections and associations ------------------------------------------------------------
    def next_key(self) -> int:
        return next(self._keys)

    def record_closed(self, address: str, port: int, reason: str, *, tls: bool = False) -> None:
        """Audit a connection closed before it associated."""
        LOG.warning("connection from %s:%d closed: %s", address, port, reason)
        self.recorder.put(ConnectionRefused(AssociationOutcome.ABORTED, "", "", address, port, reason, utcnow(), tls))

    def _refusal(self, assoc: Association, info: _AssocInfo) -> tuple[str, tuple[int, int, int]] | None:
        if self.allowed_ae_titles and info.calling_ae not in self.allowed_ae_titles:
            return f"calling AE title {info.calling_ae!r} is not in allowed_ae_titles", (1, 1, 3)
        if self.allowed_hosts and info.address not in self.allowed_hosts:
            return f"peer address {info.address} is not in allowed_hosts", (1, 1, 3)
        if self.tls_context is not None and self.settings.node.tls_require_client_certificate:
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            if not isinstance(sock, ssl.SSLSocket) or not sock.getpeercert():
                return "no trusted client certificate", (1, 1, 3)
        with self._lock:
            if self._associated >= self.max_associations:
                return (f"local limit exceeded: {self._associated} association(s) open "
                        f"(max_associations={self.max_associations})"), (2, 3, 2)
            self._associated += 1
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        info: _AssocInfo = assoc.info
        primitive = assoc.requestor.primitive
        info.calling_ae = str(primitive.calling_ae_title or "").strip() if primitive else ""
        info.called_ae = str(primitive.called_ae_title or "").strip() if primitive else ""
        refusal = self._refusal(assoc, info)
        if refusal is None:
            info.opened = True
            return
        info.refused, (result, source, diagnostic) = refusal
        LOG.warning("association from %s (%s) rejected: %s", info.calling_ae, info.address, info.refused)
        self.recorder.put(ConnectionRefused(AssociationOutcome.REJECTED, info.calling_ae, info.called_ae,
                                            info.address, info.port, info.refused, utcnow(), info.tls))
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        info: _AssocInfo = event.assoc.info
        self.recorder.put(AssocOpened(info.key, info.calling_ae, info.called_ae, info.address, info.port, utcnow(),
                                      info.tls))
        LOG.info("association %d from %s (%s) established", info.key, info.calling_ae, info.address)

    def connection_ended(self, assoc: FrontDoorAssociation) -> None:
        """Release the connection's slot and audit how it ended (its thread is ending)."""
        self.connection_slots.release()
        info = assoc.info
        sock = assoc.dul.socket
        problem = getattr(sock, "problem", "") if sock is not None else ""
        if info.opened:
            with self._lock:
                self._associated -= 1
            if assoc.is_released:
                outcome, reason = AssociationOutcome.RELEASED, ""
            else:
                outcome = AssociationOutcome.ABORTED
                idle = assoc.dul.idle_timer_expired()
                reason = problem or (f"idle for {self.settings.node.idle_timeout_s:g} s" if idle else
                                     "aborted" if assoc.is_aborted else "connection closed without release")
            self.recorder.put(AssocEnded(info.key, outcome, reason, utcnow()))
            LOG.info("association %d %s after %d instance(s), %.1f MB (syncing %.3f s; C-STORE handler %.3f s, of "
                     "which audit commits %.3f s)%s", info.key, outcome, info.stored, info.bytes_stored / 2**20,
                     info.sync_s, info.handler_s, info.audit_s, f": {reason}" if reason else "")
        elif not info.refused:
            reason = problem or "closed before an association was requested"
            self.record_closed(info.address, info.port, reason, tls=info.tls)

    # -- C-STORE ----------------------------------------------------------------------------------
    def _refuse(self, info: _AssocInfo, status: int, reason: str, sop_uid: str = "") -> int:
        LOG.warning("C-STORE %s refused with 0x%04X: %s", sop_uid or "(unparsed)", status, reason)
        self.recorder.put(InstanceRefused(info.key, status, reason, sop_uid, utcnow()))
        return status

    def check_folders(self) -> None:
        """Raise OSError when the spool or the database folder is gone or not writable."""
        self.spool.check_writable()
        if self.database_folder is not None and not os.access(self.database_folder, os.W_OK | os.X_OK):
            raise OSError(f"database folder {self.database_folder} is missing or not writable")

    def _on_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        try:
            return self._store(event)
        except Exception as exc:  # noqa: BLE001 - never pynetdicom's unaudited 0xC211: 0x0110, audited, logged
            sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            LOG.exception("C-STORE %s from %s (%s): unexpected error in the handler", sop_uid or "(unparsed)",
                          event.assoc.info.calling_ae, event.assoc.info.address)
            return self._refuse(event.assoc.info, STATUS_PROCESSING_FAILURE,
                                f"processing failure: {type(exc).__name__}: {exc}", sop_uid)
        finally:
            event.assoc.info.handler_s += time.perf_counter() - started

    def _store(self, event: evt.Event) -> int:
        info: _AssocInfo = event.assoc.info
        request = event.request
        command_sop = str(request.AffectedSOPInstanceUID or "")
        command_class = str(request.AffectedSOPClassUID or "")
        context = event.context
        if not is_valid_uid(command_sop):
            return self._refuse(info, STATUS_CANNOT_UNDERSTAND, "missing or invalid Affected SOP Instance UID")
        if command_class != str(context.abstract_syntax):
            return self._refuse(info, STATUS_MISMATCH, f"command SOP class {command_class!r} is not the "
                                f"context's {context.abstract_syntax}", command_sop)
        incoming = getattr(request, "_dataset_file", None)
        if isinstance(incoming, IncomingFile) and incoming.error is not None:
            LOG.error("refusing C-STORE %s: the data set could not be written while it arrived: %s", command_sop,
                      incoming.error)
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, "out of resources: the data set could not be "
                                f"written while it arrived ({incoming.error.strerror or incoming.error})",
                                command_sop)
        try:
            self.check_folders()
        except OSError as exc:
            LOG.error("refusing C-STORE: %s", exc)
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"data folder unusable: {exc}", command_sop)
        received = Path(event.dataset_path)
        try:
            header = read_header(received)
        except CannotUnderstand as exc:
            return self._refuse(info, STATUS_CANNOT_UNDERSTAND, f"cannot understand: {exc}", command_sop)
        except OSError as exc:
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"received data set unreadable: {exc}", command_sop)
        if header.sop_instance_uid != command_sop:
            return self._refuse(info, STATUS_MISMATCH, "data set SOP Instance UID differs from the command's",
                                command_sop)
        if header.sop_class_uid != command_class:
            return self._refuse(info, STATUS_MISMATCH, f"data set SOP class {header.sop_class_uid} differs from "
                                f"the command's {command_class}", command_sop)
        try:
            stored = self.spool.adopt(received, header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid)
        except SpoolFull as exc:
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"out of resources: {exc}", command_sop)
        except OSError as exc:
            LOG.error("spool write failed: %s", exc)
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}",
                                command_sop)
        record = InstanceStored(info.key, header, str(stored.path), stored.size_bytes, stored.checksum,
                                info.calling_ae, info.address, utcnow())
        waited = time.perf_counter()
        self.recorder.put(record)
        committed = record.ticket.wait(AUDIT_WAIT_S)
        info.audit_s += time.perf_counter() - waited
        if not committed:
            return self._refuse(info, STATUS_OUT_OF_RESOURCES,
                                f"audit database not writable: {record.ticket.error or 'timed out'}", command_sop)
        info.stored += 1
        if not stored.duplicate:
            info.bytes_stored += stored.size_bytes
            info.sync_s += stored.sync_s
            if self.on_instance is not None:
                self.on_instance(header)
        return STATUS_SUCCESS


class IncomingFile:
    """The file pynetdicom writes an arriving data set to. A failed write (the disk filled up, an I/O error) is
    kept in :attr:`error` instead of raised: raised, it would end the association inside pynetdicom's state
    machine (an abort, nothing audited); kept, the transfer runs to its end, the file is emptied to give the
    space back, and the C-STORE handler answers 0xA700 with the reason."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    @property
    def name(self) -> str:
        return self._file.name

    @property
    def file(self) -> IncomingFile:  # pynetdicom flushes ``.file`` after each fragment
        return self

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            LOG.error("writing an arriving data set to %s failed: %s", self._file.name, exc)
        try:
            self._file.truncate(0)
        except (OSError, ValueError):
            pass

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            self._failed(exc)
            try:
                self._file.close()
            except OSError:
                pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _incoming_file(folder: Path, **kwargs: Any) -> IncomingFile:
    """A temporary file for a data set being received, in ``folder``; when the spool is gone (the C-STORE is then
    refused), in the system's temporary folder, from which pynetdicom removes it after the refusal."""
    try:
        return IncomingFile(NamedTemporaryFile(dir=folder, **kwargs))
    except FileNotFoundError:
        return IncomingFile(NamedTemporaryFile(**kwargs))
    except OSError as exc:  # e.g. no room for even the file's entry: the data set is discarded, then refused
        incoming = IncomingFile(NamedTemporaryFile(**kwargs))
        incoming._failed(exc)
        return incoming


def _sqlite_folder(url: str) -> Path | None:
    """The folder of a SQLite database file (None for other databases)."""
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        return Path(url.removeprefix("sqlite:///")).parent
    return None

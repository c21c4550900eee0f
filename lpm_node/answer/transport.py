"""DICOM transport to a destination: C-STORE of result files over one association, C-ECHO, DICOM TLS, and why an
attempt failed, told from pynetdicom's association state and events (no log text is read)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from lpm_node.core.config import Settings
from lpm_node.core.destinations import Destination

MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd context ids 1..255)


@dataclass
class Outcome:
    """How one attempt to store one object ended."""

    ok: bool
    status: str  # DIMSE status "0x0000" or error class
    error: str = ""


class Outgoing(Protocol):
    """A file to store: its path, and the SOP class and transfer syntax read from it (:func:`read_header`)."""

    path: Path
    sop_class: str
    transfer_syntax: str


def tls_client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for DICOM TLS to destinations (``[output] tls``): the node's certificate as the client's, the
    destination checked against ``[node] tls_ca_certificates``; None when TLS is off."""
    if not settings.output.tls:
        return None
    node = settings.node
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=node.tls_ca_certificates or None)
    context.check_hostname = False  # destinations are configured by address; the CA decides whom to trust
    if node.tls_certificate:
        context.load_cert_chain(node.tls_certificate, node.tls_private_key or None)
    return context


def read_header(path: Path, sop_uid: str) -> tuple[str, str]:
    """SOP class and transfer syntax of the file at ``path``; a ValueError when it holds another SOP instance
    (OSError, InvalidDicomError or AttributeError when it cannot be read)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID)
    if str(ds.get("SOPInstanceUID", sop_uid)) != sop_uid:
        raise ValueError(f"file holds SOPInstanceUID {ds.SOPInstanceUID}, expected {sop_uid}")
    return sop_class, str(ds.file_meta.TransferSyntaxUID)


@dataclass
class _Watch:
    """What pynetdicom's events told about one association attempt."""

    connected: bool = False  # the TCP connection opened
    answered: bool = False  # an A-ASSOCIATE response (AC or RJ) arrived
    peer_aborted: bool = False  # the peer aborted, or the connection was lost (not an abort of ours on a timeout)
    ending: bool = False  # the node sent an A-RELEASE or A-ABORT (its own abort follows a timeout)

    def handlers(self) -> list[tuple[Any, Any]]:
        def on_open(_event: Any) -> None:
            self.connected = True

        def on_acse(event: Any) -> None:
            if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
                self.answered = True
            elif isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
                self.peer_aborted = True

        def on_pdu(event: Any) -> None:
            if isinstance(event.pdu, A_ABORT_RQ):
                self.peer_aborted = True

        def on_sent(event: Any) -> None:
            if isinstance(event.primitive, (A_ABORT, A_RELEASE)):
                self.ending = True

        def on_close(_event: Any) -> None:
            if not self.ending:  # the link was lost before the node released or aborted it
                self.peer_aborted = True

        return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse), (evt.EVT_PDU_RECV, on_pdu),
                (evt.EVT_ACSE_SENT, on_sent), (evt.EVT_CONN_CLOSE, on_close)]


def _connection_error(host: str, port: int, timeout_s: float) -> Outcome:
    """Why a TCP connection to the destination fails, from the exception a direct connection raises."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError as exc:
        return Outcome(False, "ConnectionRefused", f"{host}:{port}: {exc.strerror or exc}")
    except TimeoutError:
        return Outcome(False, "ConnectionTimeout", f"{host}:{port}: no connection within {timeout_s:g} s")
    except OSError as exc:
        return Outcome(False, "ConnectionError", f"{host}:{port}: {exc.strerror or exc}")
    return Outcome(False, "ConnectionError", f"{host}:{port}: the connection closed while associating")


def _association_failure(assoc: Association, watch: _Watch, dest: Destination, timeout_s: float) -> Outcome:
    """Why an association was not established, from pynetdicom's association state and events."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            text = f"{rsp.result_str}; source: {rsp.source_str}; reason: {rsp.reason_str}"
        else:
            text = "rejected"
        return Outcome(False, "AssociationRejected", text)
    if not watch.connected:
        return _connection_error(dest.host, dest.port, timeout_s)
    if not watch.answered:
        if watch.peer_aborted:
            return Outcome(False, "AssociationAborted", "the peer aborted the association request")
        return Outcome(False, "Timeout", f"no answer to the association request within {timeout_s:g} s")
    if not assoc.accepted_contexts:
        proposed = sorted({cx.abstract_syntax.name for cx in assoc.requestor.requested_contexts if cx.abstract_syntax})
        return Outcome(False, "NoAcceptedContexts", "the peer accepted none of: " + ", ".join(proposed))
    if assoc.is_aborted:
        return Outcome(False, "AssociationAborted", "the association was aborted while it was set up")
    return Outcome(False, "AssociationFailed", "the association was not established")


def store_outcome(rsp: Dataset, peer_aborted: bool, timeout_s: float) -> Outcome:
    """Outcome of one C-STORE from its response (empty when none came: the peer's abort or a lost link, else a
    DIMSE timeout, after which pynetdicom aborts the association itself)."""
    if "Status" not in rsp:
        if peer_aborted:
            return Outcome(False, "AssociationAborted",
                           "the association ended before the C-STORE response (peer abort or lost link)")
        return Outcome(False, "Timeout", f"no C-STORE response within {timeout_s:g} s")
    code = int(rsp.Status)
    category = code_to_category(code)
    comment = str(rsp.get("ErrorComment", "") or "")
    text = f"{category}" + (f": {comment}" if comment else "")
    status = f"0x{code:04X}"
    if category in ("Success", "Warning"):
        return Outcome(True, status, "" if category == "Success" else text)
    return Outcome(False, status, text)


def _store_one(assoc: Association, path: Path, watch: _Watch, timeout_s: float) -> Outcome:
    if not assoc.is_established:
        return Outcome(False, "AssociationAborted", "the association ended before this object was sent")
    try:
        rsp = assoc.send_c_store(path)
    except ValueError as exc:
        return Outcome(False, "NoPresentationContext", str(exc))
    except (OSError, RuntimeError, AttributeError) as exc:
        return Outcome(False, type(exc).__name__, str(exc))
    return store_outcome(rsp, watch.peer_aborted, timeout_s)


def _application_entity(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    for attr in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attr, timeout_s)
    return ae


T = TypeVar("T", bound="Outgoing")


def store_files(
    dest: Destination,
    files: Sequence[T],
    report: Callable[[T, Outcome], None],
    *,
    calling_ae: str,
    timeout_s: float,
    tls_context: ssl.SSLContext | None = None,
) -> int:
    """C-STORE ``files`` to ``dest`` over one association; ``report`` is told each file's outcome as it comes.

    Files beyond ``MAX_CONTEXTS`` distinct (SOP class, transfer syntax) pairs are left unreported (for a next
    association). Returns how many were stored."""
    contexts: list[tuple[str, str]] = []
    batch: list[T] = []
    for item in files:
        pair = (item.sop_class, item.transfer_syntax)
        if pair not in contexts:
            if len(contexts) >= MAX_CONTEXTS:
                continue
            contexts.append(pair)
        batch.append(item)
    if not batch:
        return 0
    ae = _application_entity(calling_ae, timeout_s)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    watch = _Watch()
    tls = (tls_context, dest.host) if tls_context is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=watch.handlers(),
                             tls_args=tls)
    except (ValueError, TypeError, OSError) as exc:  # e.g. an AE title pynetdicom refuses to send
        for item in batch:
            report(item, Outcome(False, "BadDestination", str(exc)))
        return 0
    if not assoc.is_established:
        outcome = _association_failure(assoc, watch, dest, timeout_s)
        for item in batch:
            report(item, outcome)
        ae.shutdown()
        return 0
    sent = 0
    try:
        for item in batch:
            outcome = _store_one(assoc, item.path, watch, timeout_s)
            report(item, outcome)
            sent += int(outcome.ok)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return sent


def echo(destination: Destination, calling_ae: str, timeout_s: float = 10.0) -> str | None:
    """C-ECHO ``destination``; None when it answered success, else what went wrong."""
    ae = _application_entity(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "association rejected or no answer" if assoc.is_rejected or assoc.is_aborted else "no connection"
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return None if code == 0x0000 else f"C-ECHO status {code if code is not None else 'none (timeout)'}"
    finally:
        assoc.release()

"""Delivery of results: a persistent outbox in the audit database and a C-STORE sender with retries.

``enqueue_results`` puts each result object once per destination into the ``deliveries`` table;
``Sender.run_once`` sends every due pending delivery (one association per destination, several objects per
association), records each attempt in ``delivery_attempts`` and reschedules failures with exponential backoff
(capped at ``backoff_max_s``) for ``retry_hours`` since it was queued (and at most ``max_attempts`` tries when
that is set), after which a delivery is dead-lettered ("dead") for ``lpm-node outbox retry``, which sends dead
letters to the destinations configured now. Each delivered object is also noted in a small ledger file per
series beside the database (``delivered/``), so that re-indexing the spool never sends a delivered result again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import socket
import ssl
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE
from pynetdicom.status import code_to_category
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Delivery, DeliveryAttempt, Series, as_utc, utcnow
from lpm_node.core.config import Destination, OutputSettings, Settings
from lpm_node.core.files import atomic_write
from lpm_node.core.states import DeliveryStatus

LOG = logging.getLogger(__name__)

KINDS = ("SEG", "SR", "KEY", "KOS")
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd context ids 1..255)


# -- outbox -------------------------------------------------------------------------------------------------


def _file_is_newer(path: Path, than: dt.datetime | None) -> bool:
    reference = as_utc(than)
    if reference is None:
        return True
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC) > reference
    except OSError:
        return False


def _requeue(row: Delivery, now: dt.datetime) -> None:
    row.status = DeliveryStatus.PENDING
    row.attempts = 0
    row.next_attempt_at = now
    row.queued_at = now
    row.sent_at = None


def enqueue_results(
    session: Session,
    *,
    job_id: int | None,
    series_instance_uid: str,
    objects: Sequence[tuple[str, Path, str]],
    destinations: Sequence[Destination],
) -> list[Delivery]:
    """Queue each ``(kind, path, SOPInstanceUID)`` for each destination (status "pending"); the caller commits.

    Idempotent: one row per (SOPInstanceUID, destination). A row that is still pending keeps its schedule
    (its path and job are updated). A sent or dead row is queued again, attempts reset, only when the object
    was written anew (another path, or a file newer than the row's last outcome), as when a series is
    re-processed with the same deterministic UIDs.
    """
    now = utcnow()
    rows: list[Delivery] = []
    for kind, path, sop_uid in objects:
        if kind not in KINDS:
            raise ValueError(f"unknown result kind {kind!r} (known: {', '.join(KINDS)})")
        file_path = Path(path).resolve()
        for destination in destinations:
            target = str(destination)
            row = session.scalars(
                select(Delivery)
                .where(Delivery.sop_instance_uid == sop_uid, Delivery.destination == target)
                .order_by(Delivery.id)
            ).first()
            if row is None:
                row = Delivery(
                    job_id=job_id,
                    series_instance_uid=series_instance_uid,
                    destination=target,
                    object_kind=kind,
                    sop_instance_uid=sop_uid,
                    path=str(file_path),
                    status=DeliveryStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    last_error="",
                    created_at=now,
                    queued_at=now,
                )
                session.add(row)
            else:
                if row.status != DeliveryStatus.PENDING:
                    reference = row.sent_at if row.status == DeliveryStatus.SENT else _last_attempt_at(session, row)
                    if row.path != str(file_path) or _file_is_newer(file_path, reference):
                        _requeue(row, now)
                        row.last_error = ""
                if row.status == DeliveryStatus.PENDING:
                    row.path = str(file_path)
                    row.object_kind = kind
                    row.series_instance_uid = series_instance_uid
                    if job_id is not None:
                        row.job_id = job_id
            rows.append(row)
    session.flush()
    return rows


def _last_attempt_at(session: Session, row: Delivery) -> dt.datetime:
    last = session.scalars(
        select(DeliveryAttempt.at).where(DeliveryAttempt.delivery_id == row.id).order_by(DeliveryAttempt.id.desc())
    ).first()
    return last or row.created_at


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


def result_destinations(settings: Settings, *, calling_ae: str = "", calling_address: str = "") -> list[Destination]:
    """The configured destinations, plus the sender of the CT (at ``reply_port``) when ``reply_to_sender``."""
    found = list(settings.destinations)
    if settings.output.reply_to_sender and calling_ae and calling_address:
        found.append(Destination(calling_ae.strip(), calling_address, settings.output.reply_port))
    unique: dict[str, Destination] = {}
    for dest in found:
        unique.setdefault(str(dest), dest)
    return list(unique.values())


def series_delivery_status(session: Session, series_instance_uid: str) -> dict[str, int]:
    """Number of deliveries of a series per status (``{"sent": 3}``; empty when nothing was queued)."""
    counts: dict[str, int] = defaultdict(int)
    for status in session.scalars(select(Delivery.status).where(Delivery.series_instance_uid == series_instance_uid)):
        counts[status] += 1
    return dict(counts)


def backoff_delay(failures: int, initial_s: float, max_s: float, jitter: float | None = None) -> float:
    """Seconds before the next try after ``failures`` failed ones: initial * 2**(failures-1), capped, minus up to 10 %.

    ``jitter`` in [0, 1) picks where in that 10 % (random when None).
    """
    exponent = min(max(failures - 1, 0), 60)
    base = min(max(max_s, 0.0), max(initial_s, 0.0) * (2.0**exponent))
    return base * (1.0 - 0.1 * (random.random() if jitter is None else jitter))


# -- sender -------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """A due delivery, detached from the session while the network is used."""

    id: int
    destination: str
    kind: str
    sop_uid: str
    path: Path
    sop_class: str = ""
    transfer_syntax: str = ""


@dataclass
class _Outcome:
    ok: bool
    status: str  # DIMSE status "0x0000" or error class
    error: str = ""


@dataclass
class _Watch:
    """What pynetdicom's events told about one association attempt (no log text is read)."""

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


def _connection_error(host: str, port: int, timeout_s: float) -> _Outcome:
    """Why a TCP connection to the destination fails, from the exception a direct connection raises."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError as exc:
        return _Outcome(False, "ConnectionRefused", f"{host}:{port}: {exc.strerror or exc}")
    except TimeoutError:
        return _Outcome(False, "ConnectionTimeout", f"{host}:{port}: no connection within {timeout_s:g} s")
    except OSError as exc:
        return _Outcome(False, "ConnectionError", f"{host}:{port}: {exc.strerror or exc}")
    return _Outcome(False, "ConnectionError", f"{host}:{port}: the connection closed while associating")


def _association_failure(assoc: Association, watch: _Watch, dest: Destination, timeout_s: float) -> _Outcome:
    """Why an association was not established, from pynetdicom's association state and events."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            text = f"{rsp.result_str}; source: {rsp.source_str}; reason: {rsp.reason_str}"
        else:
            text = "rejected"
        return _Outcome(False, "AssociationRejected", text)
    if not watch.connected:
        return _connection_error(dest.host, dest.port, timeout_s)
    if not watch.answered:
        if watch.peer_aborted:
            return _Outcome(False, "AssociationAborted", "the peer aborted the association request")
        return _Outcome(False, "Timeout", f"no answer to the association request within {timeout_s:g} s")
    if not assoc.accepted_contexts:
        proposed = sorted({cx.abstract_syntax.name for cx in assoc.requestor.requested_contexts if cx.abstract_syntax})
        return _Outcome(False, "NoAcceptedContexts", "the peer accepted none of: " + ", ".join(proposed))
    if assoc.is_aborted:
        return _Outcome(False, "AssociationAborted", "the association was aborted while it was set up")
    return _Outcome(False, "AssociationFailed", "the association was not established")


def _store_outcome(rsp: Dataset, peer_aborted: bool, timeout_s: float) -> _Outcome:
    """Outcome of one C-STORE from its response (empty when none came: the peer's abort or a lost link, else a
    DIMSE timeout, after which pynetdicom aborts the association itself)."""
    if "Status" not in rsp:
        if peer_aborted:
            return _Outcome(False, "AssociationAborted",
                            "the association ended before the C-STORE response (peer abort or lost link)")
        return _Outcome(False, "Timeout", f"no C-STORE response within {timeout_s:g} s")
    code = int(rsp.Status)
    category = code_to_category(code)
    comment = str(rsp.get("ErrorComment", "") or "")
    text = f"{category}" + (f": {comment}" if comment else "")
    status = f"0x{code:04X}"
    if category in ("Success", "Warning"):
        return _Outcome(True, status, "" if category == "Success" else text)
    return _Outcome(False, status, text)


class Sender:
    """Sends due outbox rows by C-STORE and records every attempt."""

    def __init__(
        self,
        sessions: sessionmaker,
        settings: OutputSettings,
        calling_ae: str,
        *,
        timeout_s: float = 30.0,
        rng: random.Random | None = None,
        tls_context: ssl.SSLContext | None = None,
        ledger_dir: Path | None = None,
    ) -> None:
        AE(ae_title=calling_ae)  # a calling AE title pynetdicom cannot send fails here, not at every run
        self.sessions = sessions
        self.settings = settings
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.ledger_dir = ledger_dir
        self._rng = rng or random.Random()
        self.tls_context = tls_context  # DICOM TLS to every destination when set
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one run at a time per sender: a delivery is never sent twice at once

    # public -------------------------------------------------------------------------------------------------

    def run_once(self, now: dt.datetime | None = None, destination: str | None = None) -> int:
        """Send every pending delivery due at ``now`` (default: the current time), to ``destination`` only when
        given; return how many were sent."""
        now = as_utc(now) or utcnow()
        with self._lock:
            by_destination: dict[str, list[_Item]] = defaultdict(list)
            for item in self._due(now, destination):
                by_destination[item.destination].append(item)
            sent = 0
            for destination, items in by_destination.items():
                try:
                    sent += self._send_to(destination, items, now)
                except Exception:  # noqa: BLE001 - one destination's trouble must not hold back the others
                    LOG.exception("sender: sending to %s failed", destination)
            return sent

    def wake(self) -> None:
        """Make the sending loop look at the outbox now (e.g. after new results were queued)."""
        self._wake.set()

    def wait_for_work(self, timeout_s: float) -> None:
        """Pause the sending loop until :meth:`wake` or ``timeout_s``."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    # internals ---------------------------------------------------------------------------------------------

    def _due(self, now: dt.datetime, destination: str | None = None) -> list[_Item]:
        with self.sessions() as session:
            query = select(Delivery).where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now)
            if destination is not None:
                query = query.where(Delivery.destination == destination)
            rows = session.scalars(query.order_by(Delivery.id)).all()
            return [_Item(r.id, r.destination, r.object_kind, r.sop_instance_uid, Path(r.path)) for r in rows]

    def _record(self, item: _Item, outcome: _Outcome, now: dt.datetime, jitter: float | None = None) -> None:
        """Store one attempt and its effect on the delivery (sent, rescheduled or dead).

        Deliveries that failed together share ``jitter``, so they stay due together: one association per retry.
        """
        delivered: dict[str, Any] | None = None
        with self.sessions() as session, session.begin():
            row = session.get(Delivery, item.id)
            if row is None:
                return
            session.add(
                DeliveryAttempt(delivery_id=item.id, at=now, ok=outcome.ok, status=outcome.status, error=outcome.error)
            )
            row.attempts += 1
            if outcome.ok:
                row.status = DeliveryStatus.SENT
                row.sent_at = now
                row.last_error = outcome.error  # empty, or the warning text
                LOG.info("sent %s %s to %s", item.kind, item.sop_uid, item.destination)
                delivered = {"series_instance_uid": row.series_instance_uid, "sop_instance_uid": row.sop_instance_uid,
                             "kind": row.object_kind, "destination": row.destination, "job_id": row.job_id,
                             "sent_at": now.isoformat()}
            else:
                self._reschedule(row, item, outcome, now, jitter)
        if delivered is not None and self.ledger_dir is not None:
            note_delivered(self.ledger_dir, delivered)

    def _reschedule(self, row: Delivery, item: _Item, outcome: _Outcome, now: dt.datetime,
                    jitter: float | None) -> None:
        """After a failed try: schedule the next one, or dead-letter the delivery past the retry horizon."""
        row.last_error = f"{outcome.status}: {outcome.error}" if outcome.error else outcome.status
        since = as_utc(row.queued_at) or as_utc(row.created_at) or now
        out_of_time = (now - since).total_seconds() >= self.settings.retry_hours * 3600
        out_of_tries = self.settings.max_attempts > 0 and row.attempts >= self.settings.max_attempts
        if out_of_time or out_of_tries:
            row.status = DeliveryStatus.DEAD.value
            LOG.error(
                "delivery %d (%s %s to %s) is dead after %d attempts over %.1f h: %s",
                item.id, item.kind, item.sop_uid, item.destination, row.attempts,
                (now - since).total_seconds() / 3600, row.last_error,
            )
        else:
            delay = backoff_delay(
                row.attempts, self.settings.backoff_initial_s, self.settings.backoff_max_s,
                self._rng.random() if jitter is None else jitter,
            )
            row.next_attempt_at = now + dt.timedelta(seconds=delay)
            LOG.warning(
                "delivery %d (%s %s to %s) failed (attempt %d): %s; next try in %.1f s",
                item.id, item.kind, item.sop_uid, item.destination, row.attempts, row.last_error, delay,
            )

    def _read_headers(self, items: list[_Item], now: dt.datetime) -> list[_Item]:
        """Fill SOP class and transfer syntax from each file; a file that cannot be read is a failed attempt."""
        readable = []
        for item in items:
            try:
                ds = pydicom.dcmread(
                    item.path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
                )
                item.sop_class = str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID)
                item.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
                if str(ds.get("SOPInstanceUID", item.sop_uid)) != item.sop_uid:
                    raise ValueError(f"file holds SOPInstanceUID {ds.SOPInstanceUID}, expected {item.sop_uid}")
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                self._record(item, _Outcome(False, "FileError", f"{item.path}: {exc}"), now)
                continue
            readable.append(item)
        return readable

    def _send_to(self, destination: str, items: list[_Item], now: dt.datetime) -> int:
        """One association to ``destination`` for ``items``; returns how many were stored."""
        try:
            dest = Destination.parse(destination)
        except ValueError as exc:
            for item in items:
                self._record(item, _Outcome(False, "BadDestination", str(exc)), now)
            return 0
        jitter = self._rng.random()  # one draw per destination and run
        items = self._read_headers(items, now)
        contexts: list[tuple[str, str]] = []
        batch: list[_Item] = []
        for item in items:
            pair = (item.sop_class, item.transfer_syntax)
            if pair not in contexts:
                if len(contexts) >= MAX_CONTEXTS:
                    continue  # left pending for the next run
                contexts.append(pair)
            batch.append(item)
        if not batch:
            return 0
        ae = AE(ae_title=self.calling_ae)
        for attr in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, attr, self.timeout_s)
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, [syntax])
        watch = _Watch()
        tls = (self.tls_context, dest.host) if self.tls_context is not None else None
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=watch.handlers(),
                                 tls_args=tls)
        except (ValueError, TypeError, OSError) as exc:  # e.g. an AE title pynetdicom refuses to send
            for item in batch:
                self._record(item, _Outcome(False, "BadDestination", str(exc)), now, jitter)
            return 0
        if not assoc.is_established:
            outcome = _association_failure(assoc, watch, dest, self.timeout_s)
            for item in batch:
                self._record(item, outcome, now, jitter)
            ae.shutdown()
            return 0
        sent = 0
        try:
            for item in batch:
                outcome = self._store_one(assoc, item, watch)
                self._record(item, outcome, now, jitter)
                sent += int(outcome.ok)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        return sent

    def _store_one(self, assoc: Association, item: _Item, watch: _Watch) -> _Outcome:
        if not assoc.is_established:
            return _Outcome(False, "AssociationAborted", "the association ended before this object was sent")
        try:
            rsp = assoc.send_c_store(item.path)
        except ValueError as exc:
            return _Outcome(False, "NoPresentationContext", str(exc))
        except (OSError, RuntimeError, AttributeError) as exc:
            return _Outcome(False, type(exc).__name__, str(exc))
        return _store_outcome(rsp, watch.peer_aborted, self.timeout_s)


# -- command line -------------------------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    utc = as_utc(value)
    return utc.isoformat() if utc is not None else None


def delivery_dict(row: Delivery) -> dict[str, Any]:
    """One outbox row as plain JSON-ready values."""
    return {
        "id": row.id,
        "job_id": row.job_id,
        "series_instance_uid": row.series_instance_uid,
        "destination": row.destination,
        "kind": row.object_kind,
        "sop_instance_uid": row.sop_instance_uid,
        "path": row.path,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at) if row.status == DeliveryStatus.PENDING else None,
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
    }


def _ledger_file(ledger_dir: Path, series_instance_uid: str) -> Path:
    return Path(ledger_dir) / f"{series_instance_uid}.json"


def note_delivered(ledger_dir: Path, entry: dict[str, Any]) -> None:
    """Add one delivered object to its series' ledger file (outside the database, written atomically)."""
    path = _ledger_file(ledger_dir, entry["series_instance_uid"])
    found = delivered_results(ledger_dir, entry["series_instance_uid"])
    key = f"{entry['sop_instance_uid']}|{entry['destination']}"
    found[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(found, indent=1, sort_keys=True).encode())


def delivered_results(ledger_dir: Path, series_instance_uid: str) -> dict[str, dict[str, Any]]:
    """Objects of a series noted as delivered (``"SOP|destination" -> entry``); empty when none."""
    path = _ledger_file(ledger_dir, series_instance_uid)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class RetryResult:
    """What ``outbox retry`` did: rows queued again where they were, and dead letters sent to new destinations."""

    requeued: list[int]
    redirected: dict[int, list[str]]  # old delivery id -> the destinations it now goes to


def retry_deliveries(
    session: Session,
    ids: Sequence[int] | None = None,
    now: dt.datetime | None = None,
    *,
    settings: Settings | None = None,
    destinations: Sequence[Destination] | None = None,
) -> RetryResult:
    """Send dead deliveries (or the given ones, whatever their status) again, attempts reset.

    Each goes to ``destinations`` when given, else to the destinations configured now in ``settings`` (with the
    CT's sender when ``reply_to_sender``). A row whose destination is among them is queued again; any other is
    marked ``redirected`` and its object queued for each current destination (one already delivered there is not
    sent again). When no destination is configured (or neither is given), a row is queued again where it was."""
    now = as_utc(now) or utcnow()
    query = select(Delivery).order_by(Delivery.id)
    query = query.where(Delivery.id.in_(list(ids))) if ids else query.where(Delivery.status == DeliveryStatus.DEAD)
    result = RetryResult([], {})
    for row in session.scalars(query).all():
        if destinations is not None:
            targets = list(destinations)
        elif settings is not None:
            series = session.scalars(
                select(Series).where(Series.series_instance_uid == row.series_instance_uid)
            ).first()
            targets = result_destinations(settings, calling_ae=series.calling_ae if series else "",
                                          calling_address=series.calling_address if series else "")
        else:
            targets = [Destination.parse(row.destination)]
        if not targets:  # nothing configured now: where it was meant to go
            targets = [Destination.parse(row.destination)]
        if row.destination in {str(t) for t in targets}:
            _requeue(row, now)
            result.requeued.append(row.id)
            others = [t for t in targets if str(t) != row.destination]
            if not others:
                continue
        else:
            others = targets
            row.status = DeliveryStatus.REDIRECTED.value
            row.last_error = f"{row.last_error}; redirected to {', '.join(map(str, others))}".lstrip("; ")
        new_rows = enqueue_results(session, job_id=row.job_id, series_instance_uid=row.series_instance_uid,
                                   objects=[(row.object_kind, Path(row.path), row.sop_instance_uid)],
                                   destinations=others)
        for new in new_rows:
            if new.status == DeliveryStatus.DEAD:
                _requeue(new, now)
        if row.status == DeliveryStatus.REDIRECTED:
            result.redirected[row.id] = [str(t) for t in others]
    session.flush()
    return result

"""Delivery of results: a persistent outbox in the audit database and a C-STORE sender with retries.

``enqueue_results`` puts each result object once per destination into the ``deliveries`` table;
``Sender.run_once`` sends every due pending delivery (one association per destination, several objects per
association), records each attempt in ``delivery_attempts`` and reschedules failures with exponential backoff
until ``max_attempts``, after which a delivery is dead-lettered ("dead") for ``lpm-node outbox retry``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Delivery, DeliveryAttempt, as_utc, utcnow
from lpm_node.core.config import Destination, OutputSettings, Settings

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
    row.status = "pending"
    row.attempts = 0
    row.next_attempt_at = now
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
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    last_error="",
                    created_at=now,
                )
                session.add(row)
            else:
                if row.status != "pending":
                    reference = row.sent_at if row.status == "sent" else _last_attempt_at(session, row)
                    if row.path != str(file_path) or _file_is_newer(file_path, reference):
                        _requeue(row, now)
                        row.last_error = ""
                if row.status == "pending":
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


class _LogCapture(logging.Handler):
    """Collects pynetdicom's warnings and errors per thread: it logs, rather than raises, why a connection failed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._lock = threading.Lock()
        self._by_thread: dict[int | None, list[str]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self._by_thread[record.thread].append(record.getMessage())

    def messages(self, *threads: int | None) -> list[str]:
        with self._lock:
            return [m for t in threads if t is not None for m in self._by_thread.get(t, [])]


@contextmanager
def _capture_pynetdicom_errors() -> Iterator[_LogCapture]:
    handler = _LogCapture()
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _association_failure(assoc: Association, messages: list[str], timeout_s: float) -> _Outcome:
    """Why an association was not established, as (error class, message)."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            text = f"{rsp.result_str}; source: {rsp.source_str}; reason: {rsp.reason_str}"
        else:
            text = "rejected"
        return _Outcome(False, "AssociationRejected", text)
    for message in messages:
        if "TCP Initialisation Error" in message:
            lowered = message.lower()
            if "refused" in lowered:
                kind = "ConnectionRefused"
            elif "timed out" in lowered:
                kind = "ConnectionTimeout"
            else:
                kind = "ConnectionError"
            return _Outcome(False, kind, message.replace("TCP Initialisation Error: ", ""))
    if any("ACSE timeout" in m for m in messages):
        return _Outcome(False, "Timeout", f"no answer to the association request within {timeout_s:g} s")
    if any("No accepted presentation contexts" in m for m in messages):
        proposed = sorted({cx.abstract_syntax.name for cx in assoc.requestor.requested_contexts if cx.abstract_syntax})
        return _Outcome(False, "NoAcceptedContexts", "the peer accepted none of: " + ", ".join(proposed))
    detail = "; ".join(messages[-3:]) or "no detail"
    if assoc.is_aborted:
        return _Outcome(False, "AssociationAborted", detail)
    return _Outcome(False, "AssociationFailed", detail)


def _store_outcome(rsp: Dataset, messages: list[str], timeout_s: float) -> _Outcome:
    """Outcome of one C-STORE from its response (empty when none came: a DIMSE timeout, else an abort)."""
    if "Status" not in rsp:
        if any("DIMSE timeout" in m for m in messages):
            return _Outcome(False, "Timeout", f"no C-STORE response within {timeout_s:g} s")
        return _Outcome(
            False, "AssociationAborted", "the association ended before the C-STORE response (peer abort or lost link)"
        )
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
    ) -> None:
        AE(ae_title=calling_ae)  # a calling AE title pynetdicom cannot send fails here, not at every run
        self.sessions = sessions
        self.settings = settings
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one run at a time per sender: a delivery is never sent twice at once

    # public -------------------------------------------------------------------------------------------------

    def run_once(self, now: dt.datetime | None = None) -> int:
        """Send every pending delivery due at ``now`` (default: the current time); return how many were sent."""
        now = as_utc(now) or utcnow()
        with self._lock:
            by_destination: dict[str, list[_Item]] = defaultdict(list)
            for item in self._due(now):
                by_destination[item.destination].append(item)
            sent = 0
            for destination, items in by_destination.items():
                try:
                    sent += self._send_to(destination, items, now)
                except Exception:  # noqa: BLE001 - one destination's trouble must not hold back the others
                    LOG.exception("sender: sending to %s failed", destination)
            return sent

    def run_forever(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Call ``run_once`` every ``poll_s`` seconds (or on ``wake()``) until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the sender must outlive a bad row or a database hiccup
                LOG.exception("sender: run failed; retrying in %.1f s", poll_s)
            self._wake.wait(poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Make ``run_forever`` look at the outbox now (e.g. after new results were queued)."""
        self._wake.set()

    # internals ---------------------------------------------------------------------------------------------

    def _due(self, now: dt.datetime) -> list[_Item]:
        with self.sessions() as session:
            rows = session.scalars(
                select(Delivery)
                .where(Delivery.status == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
            ).all()
            return [_Item(r.id, r.destination, r.object_kind, r.sop_instance_uid, Path(r.path)) for r in rows]

    def _record(self, item: _Item, outcome: _Outcome, now: dt.datetime, jitter: float | None = None) -> None:
        """Store one attempt and its effect on the delivery (sent, rescheduled or dead).

        Deliveries that failed together share ``jitter``, so they stay due together: one association per retry.
        """
        with self.sessions() as session, session.begin():
            row = session.get(Delivery, item.id)
            if row is None:
                return
            session.add(
                DeliveryAttempt(delivery_id=item.id, at=now, ok=outcome.ok, status=outcome.status, error=outcome.error)
            )
            row.attempts += 1
            if outcome.ok:
                row.status = "sent"
                row.sent_at = now
                row.last_error = outcome.error  # empty, or the warning text
                LOG.info("sent %s %s to %s", item.kind, item.sop_uid, item.destination)
                return
            row.last_error = f"{outcome.status}: {outcome.error}" if outcome.error else outcome.status
            if row.attempts >= max(1, self.settings.max_attempts):
                row.status = "dead"
                LOG.error(
                    "delivery %d (%s %s to %s) is dead after %d attempts: %s",
                    item.id, item.kind, item.sop_uid, item.destination, row.attempts, row.last_error,
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
        with _capture_pynetdicom_errors() as capture:
            try:
                assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
            except (ValueError, TypeError, OSError) as exc:  # e.g. an AE title pynetdicom refuses to send
                for item in batch:
                    self._record(item, _Outcome(False, "BadDestination", str(exc)), now, jitter)
                return 0
            threads = (threading.get_ident(), assoc.ident, assoc.dul.ident)
            if not assoc.is_established:
                outcome = _association_failure(assoc, capture.messages(*threads), self.timeout_s)
                for item in batch:
                    self._record(item, outcome, now, jitter)
                ae.shutdown()
                return 0
            sent = 0
            try:
                for item in batch:
                    outcome = self._store_one(assoc, item, capture, threads)
                    self._record(item, outcome, now, jitter)
                    sent += int(outcome.ok)
            finally:
                if assoc.is_established:
                    assoc.release()
                ae.shutdown()
            return sent

    def _store_one(
        self, assoc: Association, item: _Item, capture: _LogCapture, threads: tuple[int | None, ...]
    ) -> _Outcome:
        if not assoc.is_established:
            return _Outcome(False, "AssociationAborted", "the association ended before this object was sent")
        try:
            rsp = assoc.send_c_store(item.path)
        except ValueError as exc:
            return _Outcome(False, "NoPresentationContext", str(exc))
        except (OSError, RuntimeError, AttributeError) as exc:
            return _Outcome(False, type(exc).__name__, str(exc))
        return _store_outcome(rsp, capture.messages(*threads), self.timeout_s)


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
        "next_attempt_at": _iso(row.next_attempt_at) if row.status == "pending" else None,
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("outbox is empty")
        return
    header = f"{'id':>5}  {'status':<8} {'kind':<4} {'att':>3}  {'destination':<32} {'next attempt':<25} last error"
    print(header)
    for r in rows:
        print(
            f"{r['id']:>5}  {r['status']:<8} {r['kind']:<4} {r['attempts']:>3}  {r['destination']:<32} "
            f"{(r['next_attempt_at'] or '-'):<25} {r['last_error'] or '-'}"
        )


def retry_deliveries(session: Session, ids: Sequence[int] | None = None, now: dt.datetime | None = None) -> list[int]:
    """Put dead deliveries (or the given ones, whatever their status) back to pending with attempts reset."""
    query = select(Delivery).order_by(Delivery.id)
    query = query.where(Delivery.id.in_(list(ids))) if ids else query.where(Delivery.status == "dead")
    rows = session.scalars(query).all()
    for row in rows:
        _requeue(row, as_utc(now) or utcnow())
    session.flush()
    return [row.id for row in rows]

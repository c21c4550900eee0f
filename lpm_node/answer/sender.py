"""The sender: works the outbox off by C-STORE, with retries.

``Sender.run_once`` sends every due pending delivery (one association per destination, several objects per
association), records each attempt in ``delivery_attempts`` and reschedules failures with exponential backoff
(capped at ``backoff_max_s``) for ``retry_hours`` since it was queued (and at most ``max_attempts`` tries when
that is set), after which a delivery is dead-lettered ("dead") for ``lpm-node outbox retry``.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.answer.outbox import note_delivered
from lpm_node.answer.transport import Outcome, read_header, store_files, tls_client_context
from lpm_node.core.audit import Delivery, DeliveryAttempt, as_utc, utcnow
from lpm_node.core.config import OutputSettings, Settings
from lpm_node.core.destinations import Destination
from lpm_node.core.states import DeliveryStatus

LOG = logging.getLogger(__name__)


def backoff_delay(failures: int, initial_s: float, max_s: float, jitter: float | None = None) -> float:
    """Seconds before the next try after ``failures`` failed ones: initial * 2**(failures-1), capped, minus up to 10 %.

    ``jitter`` in [0, 1) picks where in that 10 % (random when None).
    """
    exponent = min(max(failures - 1, 0), 60)
    base = min(max(max_s, 0.0), max(initial_s, 0.0) * (2.0**exponent))
    return base * (1.0 - 0.1 * (random.random() if jitter is None else jitter))


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
        schedules_retries: bool = True,
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
        # False where a job engine schedules the next try (and says when): a failed try is then logged without one
        self.schedules_retries = schedules_retries

    @classmethod
    def for_node(cls, sessions: sessionmaker, settings: Settings, *, schedules_retries: bool = True) -> Sender:
        """The node's sender: its AE title, DICOM TLS as ``[output] tls`` says, the ledger in the data folder."""
        return cls(sessions, settings.output, settings.node.ae_title, tls_context=tls_client_context(settings),
                   ledger_dir=settings.delivered_path, schedules_retries=schedules_retries)

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

    def _record(self, item: _Item, outcome: Outcome, now: dt.datetime, jitter: float | None = None) -> None:
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

    def _reschedule(self, row: Delivery, item: _Item, outcome: Outcome, now: dt.datetime,
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
            next_try = f"; next try in {delay:.1f} s" if self.schedules_retries else ""
            LOG.warning("delivery %d (%s %s to %s) failed (attempt %d): %s%s", item.id, item.kind, item.sop_uid,
                        item.destination, row.attempts, row.last_error, next_try)

    def _read_headers(self, items: list[_Item], now: dt.datetime) -> list[_Item]:
        """Fill SOP class and transfer syntax from each file; a file that cannot be read is a failed attempt."""
        readable = []
        for item in items:
            try:
                item.sop_class, item.transfer_syntax = read_header(item.path, item.sop_uid)
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                self._record(item, Outcome(False, "FileError", f"{item.path}: {exc}"), now)
                continue
            readable.append(item)
        return readable

    def _send_to(self, destination: str, items: list[_Item], now: dt.datetime) -> int:
        """One association to ``destination`` (as the outbox stores it) for ``items``; returns how many were
        stored."""
        try:
            dest = Destination.parse(destination)
        except ValueError as exc:
            for item in items:
                self._record(item, Outcome(False, "BadDestination", str(exc)), now)
            return 0
        jitter = self._rng.random()  # one draw per destination and run
        items = self._read_headers(items, now)
        return store_files(dest, items, lambda item, outcome: self._record(item, outcome, now, jitter),
                           calling_ae=self.calling_ae, timeout_s=self.timeout_s, tls_context=self.tls_context)

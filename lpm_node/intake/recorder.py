"""The listener's audit writer: one thread, a real queue, group commits, nothing dropped.

Events are put on a :class:`queue.Queue`; the writer takes what is waiting (a group commit across
all associations) and commits it. A stored instance carries a :class:`Ticket` that the C-STORE
handler waits on: the instance is acknowledged only once its row is committed. When the database
cannot be written, the waiting tickets fail at once (the handler answers 0xA700), the error is logged,
and the same events are tried again, with a growing pause, until they are written.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Association, Instance, Series
from lpm_node.core.processes import this_process
from lpm_node.core.states import AssociationOutcome, SeriesStatus
from lpm_node.intake.header import Header
from lpm_node.intake.series import note_instance_on_series

LOG = logging.getLogger(__name__)

MAX_BATCH = 2000
RETRY_MAX_S = 5.0


@dataclass
class Ticket:
    """Set once the event that carries it is committed (``ok``) or failed to be (``error``)."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    error: str = ""

    def resolve(self, ok: bool, error: str = "") -> None:
        if not self.done.is_set():
            self.ok, self.error = ok, error
            self.done.set()

    def wait(self, timeout: float) -> bool:
        """True when committed within ``timeout``."""
        return self.done.wait(timeout) and self.ok


@dataclass
class AssocOpened:
    key: int
    calling_ae: str
    called_ae: str
    address: str
    port: int
    at: dt.datetime
    tls: bool = False


@dataclass
class AssocEnded:
    key: int
    outcome: str
    reason: str
    at: dt.datetime


@dataclass
class ConnectionRefused:
    """An association rejected, or a connection closed before it associated."""

    outcome: str
    calling_ae: str
    called_ae: str
    address: str
    port: int
    reason: str
    at: dt.datetime
    tls: bool = False


@dataclass
class InstanceStored:
    assoc_key: int
    header: Header
    path: str
    size_bytes: int
    checksum: str
    calling_ae: str
    address: str
    at: dt.datetime
    ticket: Ticket = field(default_factory=Ticket)


@dataclass
class InstanceRefused:
    assoc_key: int
    status: int
    reason: str
    sop_instance_uid: str
    at: dt.datetime


@dataclass
class _Flush:
    ticket: Ticket = field(default_factory=Ticket)


_STOP = object()
Event = AssocOpened | AssocEnded | ConnectionRefused | InstanceStored | InstanceRefused


class AuditRecorder:
    """Writes listener events to the audit database from one thread (see the module docstring)."""

    def __init__(self, sessions: sessionmaker) -> None:
        self._sessions = sessions
        self._queue: queue.Queue[object] = queue.Queue()
        self._assoc_ids: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="audit-recorder", daemon=True)
        self.healthy = True
        self.last_error = ""
        self.process = this_process()  # noted on each association this process handles

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued (trying for up to ``timeout``), then stop."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed; False when it is not within ``timeout``."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.ticket.wait(timeout)

    def _run(self) -> None:
        pending: list[object] = []  # a batch that failed: tried again before anything newer is committed
        failures = 0
        stopping = False
        while True:
            items: list[object] = []
            try:
                items.append(self._queue.get(timeout=min(RETRY_MAX_S, 0.1 * 2**failures) if pending else None))
            except queue.Empty:
                pass
            while len(items) < MAX_BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = stopping or any(i is _STOP for i in items)
            batch = pending + [i for i in items if i is not _STOP]
            if not batch:
                if stopping:
                    return
                continue
            error = self._write([e for e in batch if not isinstance(e, _Flush)])
            if error is None:
                for item in batch:
                    ticket = getattr(item, "ticket", None)
                    if ticket is not None:
                        ticket.resolve(True)
                if not self.healthy:
                    LOG.warning("the audit database can be written again (%d event(s) written)", len(batch))
                self.healthy, self.last_error, pending, failures = True, "", [], 0
                continue
            if self.healthy or failures % 20 == 0:
                LOG.error("the audit database cannot be written (%s); C-STORE is answered 0xA700 until it can; "
                          "%d event(s) kept to be written", error, len(batch))
            self.healthy, self.last_error = False, error
            failures += 1
            for item in batch:
                if isinstance(item, InstanceStored):
                    item.ticket.resolve(False, error)
            pending = batch
            if stopping and failures >= 3:
                LOG.error("%d audit event(s) not written at stop; the spool is indexed again at the next start",
                          len(batch))
                return

    def _write(self, events: list[object]) -> str | None:
        """Commit ``events``; None on success, else the error in words. A unique violation (another process
        sharing the database recorded one of these instances meanwhile, e.g. an operator's re-index) is written
        again at once: the instances already recorded are then skipped."""
        for attempt in (1, 2):
            new_ids: dict[int, int] = {}
            try:
                with self._sessions() as session:
                    if events:
                        self._apply(session, events, new_ids)
                        session.commit()
            except IntegrityError as exc:
                if attempt == 1:
                    LOG.info("another process recorded some of these instances meanwhile (%s); writing again",
                             str(exc.orig).splitlines()[0] if exc.orig else exc)
                    continue
                return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            except Exception as exc:  # keep the events; they are written when the database allows it
                return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            break
        self._assoc_ids.update(new_ids)
        for e in events:
            if isinstance(e, AssocEnded):
                self._assoc_ids.pop(e.key, None)
        return None

    def _apply(self, session: Session, events: list[object], new_ids: dict[int, int]) -> None:
        """Add ``events`` to ``session``. The rows a batch touches are read in one query per table and the new ones
        are inserted together at the commit (no flush per event: a batch is a handful of round trips)."""
        stored = [e for e in events if isinstance(e, InstanceStored)]
        known = self._recorded(session, [e.header.sop_instance_uid for e in stored])
        series_uids = {e.header.series_instance_uid for e in stored}
        # locked, in one order: receivers sharing the database count on the same series row, and each increment
        # must see the others' (a plain read would let one overwrite another's count)
        series_cache: dict[str, Series] = {row.series_instance_uid: row for row in session.scalars(
            select(Series).where(Series.series_instance_uid.in_(series_uids))
            .order_by(Series.series_instance_uid).with_for_update())} if series_uids else {}
        keys = {e.key for e in events if isinstance(e, AssocEnded)}
        keys |= {e.assoc_key for e in events if isinstance(e, InstanceStored | InstanceRefused)}
        row_ids = {self._assoc_ids[k] for k in keys if k in self._assoc_ids}  # only the ones this batch touches
        associations = {row.id: row for row in session.scalars(
            select(Association).where(Association.id.in_(row_ids)))} if row_ids else {}

        def assoc_row(key: int) -> Association | None:
            row_id = new_ids.get(key, self._assoc_ids.get(key))
            return associations.get(row_id) if row_id is not None else None

        with session.no_autoflush:
            for e in events:
                if isinstance(e, AssocOpened):
                    row = Association(calling_ae=e.calling_ae, called_ae=e.called_ae, peer_address=e.address,
                                      peer_port=e.port, started_at=e.at, outcome=AssociationOutcome.OPEN, tls=e.tls,
                                      receiver=self.process)
                    session.add(row)
                    session.flush()
                    new_ids[e.key] = row.id
                    associations[row.id] = row
                elif isinstance(e, AssocEnded):
                    row = assoc_row(e.key)
                    if row is not None:
                        row.ended_at = e.at
                        if row.outcome == AssociationOutcome.OPEN:
                            row.outcome = e.outcome
                        if e.reason:
                            row.reason = f"{row.reason}; {e.reason}" if row.reason else e.reason
                elif isinstance(e, ConnectionRefused):
                    session.add(Association(calling_ae=e.calling_ae, called_ae=e.called_ae, peer_address=e.address,
                                            peer_port=e.port, started_at=e.at, ended_at=e.at, outcome=e.outcome,
                                            reason=e.reason, tls=e.tls, receiver=self.process))
                elif isinstance(e, InstanceRefused):
                    row = assoc_row(e.assoc_key)
                    if row is not None:
                        row.instances_refused = (row.instances_refused or 0) + 1
                        uid = f" (last: {e.sop_instance_uid})" if e.sop_instance_uid else ""
                        row.reason = (f"{row.instances_refused} instance(s) refused with 0x{e.status:04X}: "
                                      f"{e.reason}{uid}")
                elif isinstance(e, InstanceStored):
                    row = assoc_row(e.assoc_key)
                    if row is not None:
                        row.instances_received += 1
                    if e.header.sop_instance_uid in known:
                        continue
                    known.add(e.header.sop_instance_uid)
                    session.add(Instance(sop_instance_uid=e.header.sop_instance_uid,
                                         series_instance_uid=e.header.series_instance_uid,
                                         sop_class_uid=e.header.sop_class_uid,
                                         transfer_syntax_uid=e.header.transfer_syntax_uid, path=e.path,
                                         size_bytes=e.size_bytes, checksum=e.checksum, received_at=e.at,
                                         association_id=row.id if row is not None else None))
                    self._count_on_series(session, series_cache, e)

    @staticmethod
    def _recorded(session: Session, sop_uids: list[str]) -> set[str]:
        """Those of ``sop_uids`` already in the audit."""
        known: set[str] = set()
        for start in range(0, len(sop_uids), 500):
            chunk = sop_uids[start : start + 500]
            known.update(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))))
        return known

    @staticmethod
    def _count_on_series(session: Session, cache: dict[str, Series], e: InstanceStored) -> None:
        uid = e.header.series_instance_uid
        row = cache.get(uid)
        if row is None:
            row = Series(series_instance_uid=uid, study_instance_uid=e.header.study_instance_uid,
                         modality=e.header.modality, series_description=e.header.series_description,
                         calling_ae=e.calling_ae, calling_address=e.address, first_received_at=e.at,
                         last_received_at=e.at, instance_count=0, status=SeriesStatus.RECEIVING)
            session.add(row)
        cache[uid] = row
        note_instance_on_series(session, row, e.at)

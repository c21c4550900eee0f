"""The node as roles: which processes run, where, and whether they see the same data folder.

``lpm-node serve --role receiver|worker|sender|all`` (``all``, the default, is one process doing everything).
Every process notes itself in the ``role_heartbeats`` table and refreshes ``last_seen_at`` every
``heartbeat_seconds`` (:class:`Heartbeat`); :func:`live_processes` is the one reader (``doctor``, the console,
:func:`other_receivers`, :func:`close_orphaned_associations`).
The data folder that all machines mount carries a marker written on the first start (:func:`data_marker`): a
process whose marker differs from the others' sees another folder, and ``doctor`` says so.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Association, RoleHeartbeat, as_utc, utcnow
from lpm_node.core.processes import process_gone, this_process
from lpm_node.core.states import AssociationOutcome

ROLES = ("all", "receiver", "worker", "sender")
RECEIVING_ROLES = ("all", "receiver")
MEASURING_ROLES = ("all", "worker")
MARKER_FILE = ".lpm-node-data"  # in the data folder: one random id, the same for every process that shares it


SERIES_STEP_LOCK = 7_264_512  # PostgreSQL advisory lock: one receiver at a time completes series and applies rules


@contextmanager
def one_at_a_time(engine: Engine, key: int) -> Iterator[bool]:
    """Across processes sharing a PostgreSQL database: yields True to the one holding ``key`` now, False to the
    others (they skip this round). On SQLite (one process) always True."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as connection:
        held = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()


def does(role: str, part: str) -> bool:
    """Whether a process of ``role`` runs ``part`` (receiver, worker or sender)."""
    return role in ("all", part)


def read_data_marker(data_path: Path) -> str:
    """The data folder's marker ('' when none was written yet)."""
    try:
        return (data_path / MARKER_FILE).read_text().strip()
    except OSError:
        return ""


def data_marker(data_path: Path) -> str:
    """The data folder's marker, written on the first start (by whichever process comes first)."""
    found = read_data_marker(data_path)
    if found:
        return found
    data_path.mkdir(parents=True, exist_ok=True)
    try:
        with open(data_path / MARKER_FILE, "x") as fh:  # exclusive: two first starts keep one marker
            fh.write(uuid.uuid4().hex + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except FileExistsError:
        pass
    return read_data_marker(data_path)


class Heartbeat:
    """This process's row in ``role_heartbeats``: written at the first :meth:`beat`, refreshed by each later one,
    closed by :meth:`stop`. A database that cannot be written now only delays the row (the next beat tries again)."""

    def __init__(self, sessions: sessionmaker, role: str, marker: str, detail: str = "") -> None:
        self.sessions = sessions
        self.role, self.marker, self.detail = role, marker, detail
        self.started_at = utcnow()
        self.id: int | None = None

    def beat(self) -> None:
        with self.sessions() as session:
            row = session.get(RoleHeartbeat, self.id) if self.id is not None else None
            if row is None:
                row = RoleHeartbeat(role=self.role, host=socket.gethostname(), pid=os.getpid(),
                                    started_at=self.started_at, data_marker=self.marker, detail=self.detail)
                session.add(row)
            row.last_seen_at = utcnow()
            session.commit()
            self.id = row.id

    def stop(self) -> None:
        if self.id is None:
            return
        with self.sessions() as session:
            row = session.get(RoleHeartbeat, self.id)
            if row is not None:
                row.stopped_at = row.last_seen_at = utcnow()
                session.commit()


@dataclass
class Process:
    role: str
    host: str
    pid: int
    started_at: dt.datetime
    last_seen_at: dt.datetime
    data_marker: str
    detail: str


def live_processes(session: Session, within_s: float, now: dt.datetime | None = None) -> list[Process]:
    """The processes heard from within ``within_s`` seconds and not stopped, oldest first."""
    since = (now or utcnow()) - dt.timedelta(seconds=within_s)
    rows = session.scalars(select(RoleHeartbeat).where(RoleHeartbeat.stopped_at.is_(None),
                                                       RoleHeartbeat.last_seen_at >= since)
                           .order_by(RoleHeartbeat.id))
    return [Process(r.role, r.host, r.pid, as_utc(r.started_at), as_utc(r.last_seen_at), r.data_marker, r.detail)
            for r in rows]


def other_receivers(session: Session, within_s: float) -> list[Process]:
    """The receiving processes other than this one heard from within ``within_s`` (this machine's ended ones left
    out): while there are any, fresh files in the shared spool may be theirs, being recorded now."""
    return [p for p in live_processes(session, within_s) if p.role in RECEIVING_ROLES
            and f"{p.host}:{p.pid}" != this_process() and not process_gone(p.host, p.pid)]


def close_orphaned_associations(session: Session, within_s: float, now: dt.datetime | None = None) -> int:
    """Close in the audit the open associations of receiver processes that ended without closing them (killed):
    those not heard from within ``within_s`` and those of this machine that run no more. ``ended_at`` is when the
    process was last heard from (or now), the outcome ``aborted``, the reason names the process. Returns how many
    (the caller commits)."""
    now = now or utcnow()
    rows = session.scalars(select(Association).where(Association.ended_at.is_(None), Association.receiver != "",
                                                     Association.receiver != this_process())).all()
    if not rows:
        return 0
    live = {f"{p.host}:{p.pid}" for p in live_processes(session, within_s, now)}
    closed = 0
    for row in rows:
        host, _, pid = row.receiver.rpartition(":")
        gone = pid.isdigit() and process_gone(host, int(pid))
        started = as_utc(row.started_at) or now
        if not gone and (row.receiver in live or now - started < dt.timedelta(seconds=within_s)):
            continue  # running, or too new to say (a receiver notes itself once it listens)
        last = session.scalars(select(RoleHeartbeat.last_seen_at).where(
            RoleHeartbeat.host == host, RoleHeartbeat.pid == (int(pid) if pid.isdigit() else -1))
            .order_by(RoleHeartbeat.id.desc()).limit(1)).first()
        last = as_utc(last)
        row.ended_at = max(started, last) if last is not None else now
        row.outcome = AssociationOutcome.ABORTED
        heard = f", last heard from at {last:%Y-%m-%d %H:%M:%S} UTC" if last is not None else ""
        note = f"receiver process {row.receiver} stopped{heard}"
        row.reason = f"{row.reason}; {note}" if row.reason else note
        closed += 1
    return closed


def local_workers(session: Session, within_s: float) -> int:
    """The measuring processes alive on this machine, this one included (at least 1)."""
    host = socket.gethostname()
    others = {p.pid for p in live_processes(session, within_s) if p.role in MEASURING_ROLES and p.host == host
              and p.pid != os.getpid() and not process_gone(p.host, p.pid)}
    return len(others) + 1

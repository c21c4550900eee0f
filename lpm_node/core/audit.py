"""Audit database: what the node saw and did (SQLAlchemy; SQLite file with WAL by default, PostgreSQL through
psycopg 3 (``postgresql+psycopg://``) when several processes or machines share it).

Tables: associations, instances, series, jobs (the measurement queue and its results),
deliveries (the outbox), delivery_attempts, operator_actions and role_heartbeats (the running processes).
Rows carry UIDs, never patient names.
Status columns hold the words of lpm_node.core.states, enforced by CHECK constraints. The schema is
versioned by the Alembic revisions in lpm_node.core.migrations: opening a database upgrades it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
from enum import StrEnum
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from lpm_node.core.migrations import upgrade_database
from lpm_node.core.states import AssociationOutcome, DeliveryStatus, JobStatus, SeriesStatus, values

# Constraint names are fixed so that later migrations can find them (SQLite keeps no other name).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Current time in UTC (timezone-aware)."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as an aware UTC datetime (SQLite returns naive datetimes, which are UTC here)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def one_of(column: str, enum: type[StrEnum]) -> CheckConstraint:
    """CHECK that ``column`` holds one of the words of a state enum (constraint named after the column)."""
    words = ", ".join(f"'{word}'" for word in values(enum))
    return CheckConstraint(f"{column} IN ({words})", name=column)


class Association(Base):
    __tablename__ = "associations"
    __table_args__ = (one_of("outcome", AssociationOutcome),)
    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(64), default="")
    called_ae: Mapped[str] = mapped_column(String(64), default="")
    peer_address: Mapped[str] = mapped_column(String(128), default="")
    peer_port: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(32), default=AssociationOutcome.OPEN)
    reason: Mapped[str] = mapped_column(Text, default="")
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)  # C-STORE answered with a failure
    tls: Mapped[bool] = mapped_column(default=False)  # the connection used DICOM TLS
    receiver: Mapped[str] = mapped_column(String(300), default="")  # the receiver process that handled it, host:pid


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    checksum: Mapped[str] = mapped_column(String(64), default="")  # SHA-256 of the spooled file at receipt
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), nullable=True)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (one_of("status", SeriesStatus),)
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(Text, default="")
    calling_ae: Mapped[str] = mapped_column(String(64), default="")
    calling_address: Mapped[str] = mapped_column(String(128), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32), default=SeriesStatus.RECEIVING, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    facts: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # header facts the rules used


class SeriesDecision(Base):
    """History of the decisions taken on a series (the series row holds the latest)."""

    __tablename__ = "series_decisions"
    __table_args__ = (one_of("status", SeriesStatus),)
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    """One measurement of one series: the queue the worker takes from, and its results."""

    __tablename__ = "jobs"
    __table_args__ = (one_of("status", JobStatus),)
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.QUEUED, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    stopped_starts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # cut short by a stop
    error: Mapped[str] = mapped_column(Text, default="")
    device: Mapped[str] = mapped_column(String(32), default="")
    model: Mapped[str] = mapped_column(Text, default="")
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(Text, default="")
    model_weights_sha256: Mapped[str] = mapped_column(String(64), default="")
    model_test: Mapped[bool] = mapped_column(Boolean, default=False)  # the bundled test model: not for clinical use
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # stage -> seconds
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # Measurement.to_dict()
    dl_parenchymal_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    dl_volumetric_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    category: Mapped[str] = mapped_column(String(64), default="")
    qc_flags: Mapped[list | None] = mapped_column(JSON, nullable=True)
    engine_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the job engine's id (PostgreSQL)


class Delivery(Base):
    """One result object for one destination: the persistent outbox.

    One row per (SOPInstanceUID, destination), enforced by a unique constraint: the UIDs are deterministic,
    so a later job that writes the same object again re-queues that row (and takes it over) instead of adding one.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        one_of("status", DeliveryStatus),
        UniqueConstraint("sop_instance_uid", "destination"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(256))  # AET@HOST:PORT
    object_kind: Mapped[str] = mapped_column(String(16))  # SEG | SR | KEY | KOS
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # last (re)queue
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ok: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(64), default="")  # DIMSE status or error class
    error: Mapped[str] = mapped_column(Text, default="")


class RoleHeartbeat(Base):
    """One running node process (a role on a machine) and when it was last seen alive: written every few seconds
    by the process itself, read by ``lpm-node doctor`` and the console."""

    __tablename__ = "role_heartbeats"
    id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # receiver | worker | sender | all
    host: Mapped[str] = mapped_column(String(256), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    data_marker: Mapped[str] = mapped_column(String(64), default="")  # the data folder's marker it sees
    detail: Mapped[str] = mapped_column(Text, default="")  # e.g. where it listens, its job engine


class OperatorAction(Base):
    """What an operator asked the node to do (rerun, outbox retry, measuring, reindex): who, what, when, the effect."""

    __tablename__ = "operator_actions"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[str] = mapped_column(String(128), default="")  # login name @ host
    command: Mapped[str] = mapped_column(Text, default="")  # the command line as given
    target: Mapped[str] = mapped_column(Text, default="")  # series UID, delivery ids, ...
    outcome: Mapped[str] = mapped_column(Text, default="")


def operator_name() -> str:
    """Who runs this command: login name @ host (recorded with each operator action)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def record_operator_action(session, command: str, target: str, outcome: str,  # noqa: ANN001
                           user: str | None = None) -> OperatorAction:
    """Add one operator action (who, what, when, effect) to ``session``; the caller commits.

    ``user``: the operator's name when it is not the login running this process (the console's signed-in user)."""
    row = OperatorAction(at=utcnow(), user=user or operator_name(), command=command, target=target, outcome=outcome)
    session.add(row)
    return row


class SeriesLookup(Base):
    """The console's search index of a series: its identifying header values, read from one spooled instance.

    The only table that holds patient data (the rest of the audit carries UIDs); ``public_id`` is the opaque
    id by which pages, the API and logs name a series."""

    __tablename__ = "series_lookup"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_id: Mapped[str] = mapped_column(String(128), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(256), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # YYYYMMDD as in the header
    study_description: Mapped[str] = mapped_column(Text, default="")
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NodeControl(Base):
    """A switch an operator sets on the running node (``measuring_suspended``): name, value, who and when."""

    __tablename__ = "node_controls"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
    set_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    set_by: Mapped[str] = mapped_column(String(128), default="")


MEASURING_SUSPENDED = "measuring_suspended"


class MeasuringSuspended(RuntimeError):
    """A job was to start while an operator has suspended measuring: it waits in its queue until resumed."""


def measuring_suspended(session) -> bool:  # noqa: ANN001
    """True while an operator has suspended measuring (queued jobs wait; receiving and sending go on)."""
    row = session.get(NodeControl, MEASURING_SUSPENDED)
    return row is not None and row.value == "yes"


def set_measuring_suspended(session, suspended: bool, user: str) -> None:  # noqa: ANN001
    """Suspend or resume measuring; the caller audits the action and commits."""
    row = session.get(NodeControl, MEASURING_SUSPENDED)
    if row is None:
        row = NodeControl(name=MEASURING_SUSPENDED)
        session.add(row)
    row.value = "yes" if suspended else "no"
    row.set_at = utcnow()
    row.set_by = user


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_engine(url: str) -> Engine:
    """Create the engine for ``url``: the SQLite folder and the tables are created, an older schema upgraded.

    Raises lpm_node.core.migrations.SchemaTooNew for a database written by a newer lpm-node.
    """
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # pre-ping: a connection PostgreSQL closed meanwhile (restart, fail-over) is replaced, not handed out
    engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    upgrade_database(engine, Base.metadata)
    return engine


def session_factory(url: str) -> sessionmaker:
    """A session maker bound to the audit database at ``url``."""
    return sessionmaker(bind=open_engine(url), expire_on_commit=False, future=True)

"""Audit database: what the node saw and did (SQLAlchemy; SQLite file with WAL by default).

Tables: associations, instances, series, jobs (the measurement queue and its results),
deliveries (the outbox) and delivery_attempts. Rows carry UIDs, never patient names.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    """Current time in UTC (timezone-aware)."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as an aware UTC datetime (SQLite returns naive datetimes, which are UTC here)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Association(Base):
    __tablename__ = "associations"
    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(64), default="")
    called_ae: Mapped[str] = mapped_column(String(64), default="")
    peer_address: Mapped[str] = mapped_column(String(128), default="")
    peer_port: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32), default="open")  # open|released|aborted|rejected
    reason: Mapped[str] = mapped_column(Text, default="")
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)  # C-STORE answered with a failure


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), nullable=True)


class Series(Base):
    __tablename__ = "series"
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
    # receiving | rejected | eligible | not_selected | queued | processing | done | failed
    status: Mapped[str] = mapped_column(String(32), default="receiving", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    facts: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # header facts the rules used


class SeriesDecision(Base):
    """History of the decisions taken on a series (the series row holds the latest)."""

    __tablename__ = "series_decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    """One measurement of one series: the queue the worker takes from, and its results."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(32), default="queued", index=True)  # queued|running|done|failed
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    device: Mapped[str] = mapped_column(String(32), default="")
    model: Mapped[str] = mapped_column(Text, default="")
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # stage -> seconds
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # Measurement.to_dict()
    dl_parenchymal_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    dl_volumetric_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    category: Mapped[str] = mapped_column(String(64), default="")
    qc_flags: Mapped[list | None] = mapped_column(JSON, nullable=True)


class Delivery(Base):
    """One result object for one destination: the persistent outbox."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    destination: Mapped[str] = mapped_column(String(256))  # AET@HOST:PORT
    object_kind: Mapped[str] = mapped_column(String(16))  # SEG | SR | KEY | KOS
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|sent|dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ok: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(64), default="")  # DIMSE status or error class
    error: Mapped[str] = mapped_column(Text, default="")


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_engine(url: str) -> Engine:
    """Create the engine for ``url`` (creating the SQLite folder and the tables if needed)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return engine


def session_factory(url: str) -> sessionmaker:
    """A session maker bound to the audit database at ``url``."""
    return sessionmaker(bind=open_engine(url), expire_on_commit=False, future=True)

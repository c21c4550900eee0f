"""The health of what exists: this process, the disk of the data folder, the database, the model, the
destinations' last C-ECHO, and (the place for them) each role's heartbeat."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from lpm_node import __version__
from lpm_node.answer.transport import echo
from lpm_node.core.audit import Job, RoleHeartbeat, as_utc, utcnow
from lpm_node.core.config import Settings
from lpm_node.core.states import JobStatus

STARTED = time.monotonic()


@dataclass
class EchoResult:
    destination: str
    ok: bool | None = None  # None: not checked yet
    detail: str = "not checked yet"
    at: str | None = None


@dataclass
class EchoWatch:
    """C-ECHOes every configured destination every ``interval_s`` in a daemon thread; keeps the last answers."""

    settings: Settings
    results: dict[str, EchoResult] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        for dest in self.settings.destinations:
            self.results[str(dest)] = EchoResult(str(dest))

    def check_once(self) -> None:
        for dest in self.settings.destinations:
            try:
                problem = echo(dest, self.settings.node.ae_title, timeout_s=5.0)
            except Exception as exc:  # noqa: BLE001 - a failing check is the result
                problem = f"{type(exc).__name__}: {exc}"
            self.results[str(dest)] = EchoResult(str(dest), problem is None, problem or "C-ECHO OK",
                                                 utcnow().isoformat(timespec="seconds"))

    def start(self) -> None:
        if not self.settings.destinations:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self.check_once()
                self._stop.wait(self.settings.console.echo_interval_s)

        threading.Thread(target=loop, name="console-echo", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def disk(settings: Settings) -> dict[str, Any]:
    """Free space where the spool lives, against the node's minimum."""
    probe = settings.data_path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / 2**20
    need = settings.node.min_free_disk_mb
    return {"path": str(settings.data_path), "free_mb": round(free_mb), "total_mb": round(usage.total / 2**20),
            "min_free_mb": need, "ok": free_mb >= need}


def database(sessions: sessionmaker) -> dict[str, Any]:
    """Does the audit database answer (one SELECT)?"""
    started = time.monotonic()
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
            dialect = session.get_bind().dialect.name
    except Exception as exc:  # noqa: BLE001 - the failure is the report
        return {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    took_ms = 1000 * (time.monotonic() - started)
    return {"ok": True, "dialect": dialect, "detail": f"{dialect}, answered in {took_ms:.0f} ms"}


def model(settings: Settings, session: Session) -> dict[str, Any]:
    """The configured model and device, and the identity and device of the model that measured last."""
    last = session.scalars(select(Job).where(Job.status == JobStatus.DONE).order_by(Job.id.desc()).limit(1)).first()
    found: dict[str, Any] = {"folder": settings.model.folder or "(none configured)", "device": settings.model.device}
    if last is not None:
        found["last"] = {"name": last.model_name, "version": last.model_version,
                         "weights_sha256": last.model_weights_sha256, "test_model": bool(last.model_test),
                         "device": last.device, "at": (as_utc(last.finished_at) or utcnow()).isoformat(
                             timespec="seconds")}
    return found


def roles(session: Session, now: dt.datetime, late_after_s: float = 30.0) -> list[dict[str, Any]]:
    """Each node process heard from in the last hour and not stopped (receivers, workers, senders, all-in-one),
    late when silent for ``late_after_s``; then this console process (alive, since it answers)."""
    since = now - dt.timedelta(hours=1)
    found = []
    for row in session.scalars(select(RoleHeartbeat).where(RoleHeartbeat.stopped_at.is_(None),
                                                           RoleHeartbeat.last_seen_at >= since)
                               .order_by(RoleHeartbeat.role, RoleHeartbeat.id)):
        seen = as_utc(row.last_seen_at)
        where = f"{row.host} pid {row.pid}" + (f", {row.detail}" if row.detail else "")
        found.append({"role": row.role, "where": where,
                      "last_seen": seen.isoformat(timespec="seconds"),
                      "ok": (now - seen).total_seconds() <= late_after_s})
    found.append({"role": "console", "where": f"pid {os.getpid()}", "last_seen": now.isoformat(timespec="seconds"),
                  "ok": True})
    return found


def health(settings: Settings, sessions: sessionmaker, watch: EchoWatch | None) -> dict[str, Any]:
    """Everything the health page and ``GET /api/health`` show."""
    db = database(sessions)
    found: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - STARTED),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "disk": disk(settings),
        "database": db,
        "destinations": [r.__dict__ for r in (watch.results.values() if watch else [])],
    }
    if db["ok"]:
        with sessions() as session:
            found["roles"] = roles(session, utcnow())
            found["model"] = model(settings, session)
    return found


def ready(settings: Settings, sessions: sessionmaker) -> tuple[bool, dict[str, Any]]:
    """Ready to serve: the database answers and the data folder's disk is above the minimum."""
    db, space = database(sessions), disk(settings)
    return db["ok"] and space["ok"], {"database": db["ok"], "disk": space["ok"]}

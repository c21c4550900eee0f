"""``lpm-node serve``: the listener plus background loops, until SIGINT/SIGTERM.

:class:`Node` owns the shared pieces (settings, audit DB sessions, spool, listener) and a list
of :class:`Loop` objects, each a function called repeatedly in its own thread: series completion
and rules, the measurement worker (one warm model, jobs in order), the sender (the outbox) and the
heartbeat. ``[node] role`` picks the parts one process runs (``all``: every part).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import sessionmaker

from lpm_node.answer.sender import Sender
from lpm_node.core.audit import session_factory, utcnow
from lpm_node.core.config import Settings
from lpm_node.intake.listener import Listener
from lpm_node.intake.rules import RuleEngine
from lpm_node.intake.series import SeriesAssembler, reconcile_spool
from lpm_node.intake.spool import Spool
from lpm_node.node.engine import (
    JobEngine,
    defer_measurement,
    deliver_due,
    due_destinations,
    ensure_engine_schema,
    uses_job_engine,
)
from lpm_node.node.preflight import preflight
from lpm_node.node.roles import (
    SERIES_STEP_LOCK,
    Heartbeat,
    close_orphaned_associations,
    data_marker,
    does,
    one_at_a_time,
    other_receivers,
)
from lpm_node.node.worker import Worker

LOG = logging.getLogger(__name__)


MIN_PAUSE_S = 0.01  # the shortest pause of a loop whose work is due (a deadline just past is not polled hot)


@dataclass
class Loop:
    """A background task: ``step()`` is called every ``interval_s`` seconds until the node stops.

    ``step`` returns True when it did work (it is then called again at once) and False when idle. An idle loop
    pauses ``interval_s``, or less when ``due_in`` says its next work is due sooner, or until :meth:`wake`.
    Exceptions are logged and the loop goes on: one bad item never stops the node.
    """

    name: str
    step: Callable[[], bool | None]
    interval_s: float = 0.5
    wait: Callable[[float], object] | None = None  # pause when idle (default: interval_s, due_in or a wake)
    due_in: Callable[[], float | None] | None = None  # seconds until the step has work, when known
    thread: threading.Thread | None = field(default=None, repr=False)
    _woken: threading.Event = field(default_factory=threading.Event, repr=False)

    def wake(self) -> None:
        """Call the step now: work was handed to this loop, or the node stops."""
        self._woken.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = bool(self.step())
            except Exception:
                LOG.exception("loop %s failed; continuing", self.name)
                busy = False
            if not busy and not stop.is_set():
                self._pause()

    def _pause(self) -> None:
        if self.wait is not None:
            self.wait(self.interval_s)
            return
        timeout = self.interval_s
        due = self.due_in() if self.due_in is not None else None
        if due is not None:
            timeout = min(timeout, max(due, MIN_PAUSE_S))
        self._woken.wait(timeout)
        self._woken.clear()


def remove_retired_journal(settings: Settings) -> None:
    """Remove the write-ahead journal folder of earlier versions (they emptied it into the spool at a clean stop)."""
    folder = settings.retired_journal_path
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        LOG.warning("removed %s, the journal of an earlier version: instances are now synced to the spool directly",
                    folder)


class Node:
    """The running node, or one role of it: listener, series completion and rules (receiver), measurement
    (worker), the outbox (sender); ``all`` runs every part in one process.

    On SQLite the worker and the sender are loops over the ``jobs`` and ``deliveries`` tables; on PostgreSQL
    they run on the job engine (:mod:`lpm_node.node.engine`), which defers each measurement inside the rules'
    transaction."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: sessionmaker = session_factory(settings.db_url)
        node = settings.node
        self.role = node.role
        remove_retired_journal(settings)
        self.spool = Spool(settings.spool_path, quota_mb=node.spool_quota_mb, min_free_disk_mb=node.min_free_disk_mb)
        self.loops: list[Loop] = []
        self._stop = threading.Event()
        self.job_left_running = False  # set by stop(): a job's thread was still at work (its job is re-queued)
        self.address: tuple[str, int] | None = None
        self.heartbeat: Heartbeat | None = None
        self.engine: JobEngine | None = None
        self._spool_pass_at: float | None = None  # when to index the spooled files left fresh at the start
        self._orphans_checked_at = 0.0
        shared = uses_job_engine(settings.db_url)
        if shared:
            ensure_engine_schema(self.sessions.kw["bind"])
        self.listener: Listener | None = None
        if does(self.role, "receiver"):
            self.listener = Listener(settings, self.sessions, self.spool)
            series = settings.series
            grace = series.release_grace_seconds if series.release_grace_seconds >= 0 else None
            self.assembler = SeriesAssembler(self.sessions, series.stable_seconds, grace)
            self.rules = RuleEngine(self.sessions, self.spool, settings.rules,
                                    on_queued=defer_measurement if shared else None,
                                    known_facts=self.assembler.facts_for)
            poll = min(0.5, max(0.05, settings.series.stable_seconds / 4))
            self.add_loop(Loop("series", self.series_step, poll, due_in=lambda: self.assembler.due_in))
        self.sender: Sender | None = None
        if does(self.role, "sender"):
            # with the job engine its backoff decides the next try, and its own line says when
            self.sender = Sender.for_node(self.sessions, settings, schedules_retries=not shared)
        self.worker: Worker | None = None
        if node.measure and does(self.role, "worker"):
            wake = self.sender.wake if self.sender is not None else None
            self.worker = Worker(settings, self.sessions, self.spool, on_results=wake)
        if shared:
            self.engine = JobEngine(
                settings.db_url, measure=self.worker.run_job if self.worker is not None else None,
                deliver=self.deliver_due if self.sender is not None else None,
                delivery_backoff_max_s=settings.output.backoff_max_s, heartbeat_s=node.heartbeat_seconds,
                stalled_after_s=node.stalled_after_seconds,
                name=f"{self.role}@{socket.gethostname()}:{os.getpid()}",
            )
            if self.worker is not None:
                self.worker.on_results = self.outbox_tick
            if does(self.role, "sender"):
                self.add_loop(Loop("outbox", self.outbox_tick, 2.0))
        else:
            if self.worker is not None:
                self.add_loop(Loop("worker", self.worker.step, 0.5))  # woken when the rules queue a job here
            if self.sender is not None:
                self.add_loop(Loop("sender", self.sender_step, 0.5, wait=self.sender.wait_for_work))
        self.add_loop(Loop("heartbeat", self.heartbeat_step, node.heartbeat_seconds))

    def add_loop(self, loop: Loop) -> None:
        """Register a background loop (before :meth:`start`)."""
        self.loops.append(loop)

    def series_step(self) -> bool:
        """Complete quiet series, decide on complete ones, queue one per study."""
        assert self.listener is not None
        if self._spool_pass_at is not None and time.monotonic() >= self._spool_pass_at:
            self._spool_pass_at = None
            self.index_spool(fresh_left=False)
        if time.monotonic() - self._orphans_checked_at >= self.settings.node.heartbeat_seconds:
            self._orphans_checked_at = time.monotonic()
            self.close_orphaned_associations()
        with one_at_a_time(self.sessions.kw["bind"], SERIES_STEP_LOCK) as mine:
            if not mine:  # another receiver is deciding now
                return False
            self.assembler.complete_stable(settle=self.listener.recorder.flush)
            queued = self.rules.run_once()
        if queued:
            self.wake("worker")
        return bool(queued)

    def wake(self, name: str) -> None:
        """Wake this process's loop ``name`` (if it runs one): work was handed to it."""
        for loop in self.loops:
            if loop.name == name:
                loop.wake()

    def index_spool(self, *, fresh_left: bool) -> int:
        """Index the spooled instances the audit lacks (written before a crash). ``fresh_left``: while other
        receivers run, files written within ``stalled_after_seconds`` may be theirs, about to be recorded by them:
        they are left, and indexed by a second pass once no longer fresh (:meth:`series_step`)."""
        window = self.settings.node.stalled_after_seconds
        written_before = None
        if fresh_left:
            with self.sessions() as session:
                others = other_receivers(session, window)
            if others:
                written_before = utcnow() - dt.timedelta(seconds=window)
                self._spool_pass_at = time.monotonic() + window
                LOG.info("%d other receiver(s) share the spool: its files of the last %.0f s are left to them, "
                         "indexed then if still unrecorded", len(others), window)
        return reconcile_spool(self.sessions, self.spool, written_before=written_before)

    def close_orphaned_associations(self) -> int:
        """Close in the audit the open associations of receiver processes that ended without closing them (one
        receiver at a time: the one holding the series step's lock)."""
        with one_at_a_time(self.sessions.kw["bind"], SERIES_STEP_LOCK) as mine, self.sessions() as session:
            if not mine:
                return 0
            closed = close_orphaned_associations(session, self.settings.node.stalled_after_seconds)
            session.commit()
        if closed:
            LOG.warning("closed %d association(s) left open by receiver processes that stopped", closed)
        return closed

    def sender_step(self) -> bool:
        """Send what is due in the outbox."""
        assert self.sender is not None
        return bool(self.sender.run_once())

    def outbox_tick(self) -> bool:
        """Job engine: ask for a delivery run for each destination that something in the outbox is due for."""
        assert self.engine is not None
        self.engine.defer_delivery(due_destinations(self.sessions))
        return False

    def deliver_due(self, destination: str | None, wait_s: float, retrying: bool) -> dt.datetime | None:
        """Job engine: one run of a destination's delivery job (:func:`~lpm_node.node.engine.deliver_due`)."""
        assert self.sender is not None
        return deliver_due(self.sessions, self.sender, destination, wait_s, retrying)

    def heartbeat_step(self) -> bool:
        """Note that this process is alive (``role_heartbeats``)."""
        if self.heartbeat is not None:
            self.heartbeat.beat()
        return False

    def start(self) -> tuple[str, int] | None:
        """Recover state, start listening (receivers), start the loops; returns the bound address (receivers)."""
        if self.worker is not None:
            self.worker.check_model()
            if self.engine is None:
                self.worker.recover()  # on the job engine, a stalled job is taken over when its heartbeat lapses
            self.worker.segmenter  # noqa: B018 - loaded before listening: importing it would slow the first transfers
        if self.listener is not None:
            self.index_spool(fresh_left=True)
            self.close_orphaned_associations()
            self.assembler.started_at = utcnow()  # downtime is not quiet time: every series' clock starts again now
            self.address = self.listener.start()
        marker = data_marker(self.settings.data_path)
        where = f"listening on {self.address[0]}:{self.address[1]}" if self.address else ""
        engine = f"job engine: {', '.join(self.engine.queues) or 'deferring only'}" if self.engine else ""
        self.heartbeat = Heartbeat(self.sessions, self.role, marker, "; ".join(x for x in (where, engine) if x))
        try:
            self.heartbeat.beat()
        except Exception as exc:  # noqa: BLE001 - the database may be unwritable for now: C-STOREs say so (0xA700)
            LOG.warning("the heartbeat could not be written yet (%s); trying again", exc)
        if self.engine is not None:
            self.engine.start()
        for loop in self.loops:
            loop.thread = threading.Thread(target=loop.run, args=(self._stop,), name=f"loop-{loop.name}", daemon=True)
            loop.thread.start()
        return self.address

    def stop(self) -> None:
        """Stop accepting, stop the loops, write the remaining audit rows.

        A job still running after ``[node] stop_grace_seconds`` goes back to the queue, not counted as a crash,
        and runs again at the next start (on the job engine: by another worker at once)."""
        self._stop.set()
        for loop in self.loops:
            loop.wake()
        if self.listener is not None:
            self.listener.stop()
        grace = self.settings.node.stop_grace_seconds
        if self.engine is not None and not self.engine.stop(timeout=grace if self.worker is not None else 30):
            if self.worker is not None:
                self.engine.hand_back(self.worker.running, self.worker.release_running)
            self.job_left_running = True
        for loop in self.loops:
            if loop.thread is not None:
                wait = grace if loop.name == "worker" else 30
                loop.thread.join(timeout=wait)
                if loop.name == "worker" and loop.thread.is_alive() and self.worker is not None:
                    self.worker.release_running()
                    self.job_left_running = True
        if self.heartbeat is not None:
            try:
                self.heartbeat.stop()
            except Exception:  # noqa: BLE001 - the stop goes on; the row then just ages out
                LOG.warning("the heartbeat's stop could not be written")
        self.spool.close()
        self.sessions.kw["bind"].dispose()
        LOG.info("node stopped")

    def wait(self) -> None:
        """Block until :meth:`request_stop` (or a signal) is called."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self, *_args: Any) -> None:
        self._stop.set()


def serve(settings: Settings) -> int:
    """Run the node until SIGINT or SIGTERM; returns the process exit status."""
    preflight(settings)
    node = Node(settings)
    if not settings.node.measure:
        LOG.warning("measurement is off (--no-measure): series are received, decided and queued only")
    previous = {sig: signal.signal(sig, node.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        address = node.start()
        if address is not None:
            LOG.info("lpm-node ready (role %s): AE title %s on %s:%d, data in %s", node.role, settings.node.ae_title,
                     address[0], address[1], settings.data_path)
        else:
            LOG.info("lpm-node ready (role %s), data in %s", node.role, settings.data_path)
        node.wait()
        LOG.info("stopping")
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if node.job_left_running:
        # the model's threads are mid-computation: ending the interpreter around them can crash it, so the
        # process ends here, its state already saved (the job is queued again)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0

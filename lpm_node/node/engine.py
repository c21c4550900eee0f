"""The job engine when the audit database is PostgreSQL: procrastinate runs measurement jobs and deliveries.

SQLite stays the embedded default (one process: the worker takes ``queued`` rows of the ``jobs`` table and the
sender polls the outbox). On PostgreSQL, several processes on several machines share the work, so a maintained
engine runs it (procrastinate: PostgreSQL only, jobs in the same database):

- a measurement job is deferred *inside the transaction* that queues its ``jobs`` row (the rules' commit), with a
  lock per series UID (one job per series runs at a time) and a queueing lock per job row; its task runs the very
  same :meth:`~lpm_node.node.worker.Worker.run_job` as the embedded worker, so the ``jobs`` rows and their states
  in the audit are the same both ways;
- a measurement that raises past the worker (the database gone for a moment) is retried with exponential backoff;
- each worker process sends a heartbeat (procrastinate's ``procrastinate_workers``); the job of a worker whose
  heartbeat lapsed (``stalled_after_seconds``) is taken over by another worker. Such starts count as crashes in
  the ``jobs`` row: the third is the last (the job fails with its reason);
- an orderly stop with a measurement still running after ``stop_grace_seconds`` gives its job back
  (:meth:`JobEngine.hand_back`): the ``jobs`` row and the procrastinate job are queued again at once, so another
  worker starts it now, not once this process's heartbeat lapsed; the run left behind never reports;
- deliveries: one ``deliver`` task at a time in the whole system (lock ``outbox``) sends what is due in the outbox
  (the same :class:`~lpm_node.answer.sender.Sender` with its backoff); it is deferred when results are queued and
  every few seconds by the sender processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection, Sequence

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.schema import SchemaManager
from procrastinate.worker import Worker as EngineWorker
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import OperationalError as DatabaseGone
from sqlalchemy.orm import Session

from lpm_node.core.audit import Job, utcnow

LOG = logging.getLogger(__name__)

MEASURE_TASK = "lpm_node.measure"
DELIVER_TASK = "lpm_node.deliver"
MEASURE_QUEUE = "measurements"
DELIVERY_QUEUE = "deliveries"
SCHEMA_LOCK = 7_264_511  # a PostgreSQL advisory lock: one process applies procrastinate's schema
RETRY = procrastinate.RetryStrategy(max_attempts=5, exponential_wait=2, retry_exceptions={DatabaseGone})


def uses_job_engine(database_url: str) -> bool:
    """True when the audit database is PostgreSQL (jobs then run on procrastinate)."""
    return database_url.startswith(("postgresql", "postgres:"))


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL as psycopg's connection string."""
    scheme, rest = database_url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else database_url


def ensure_engine_schema(engine: Engine) -> None:
    """Create procrastinate's tables in the audit database when they are not there yet (once, whoever starts)."""
    if inspect(engine).has_table("procrastinate_jobs"):
        return
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
        if not inspect(connection).has_table("procrastinate_jobs"):
            # psycopg itself, without parameters: the schema's text has % signs that are not placeholders
            connection.connection.driver_connection.execute(SchemaManager.get_schema())
            LOG.info("created the job engine's tables (procrastinate) in the audit database")


def defer_measurement(session: Session, job: Job) -> int:
    """Defer the procrastinate job that runs ``job`` inside ``session``'s transaction; returns its id.

    It becomes visible to workers when the caller commits (and vanishes if it rolls back)."""
    connection = session.connection().connection.driver_connection
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector())
    engine_id = app.configure_task(
        MEASURE_TASK, queue=MEASURE_QUEUE, lock=f"series:{job.series_instance_uid}", queueing_lock=f"job:{job.id}",
        connection=connection,
    ).defer(job_id=job.id)
    job.engine_job_id = engine_id
    return engine_id


class JobEngine:
    """procrastinate for one process: defers deliveries, and runs the queues of its role in a thread of its own."""

    def __init__(
        self,
        database_url: str,
        *,
        measure: Callable[[int], object] | None = None,
        deliver: Callable[[], object] | None = None,
        heartbeat_s: float = 5.0,
        stalled_after_s: float = 30.0,
        name: str = "lpm-node",
    ) -> None:
        self.conninfo = libpq_url(database_url)
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.conninfo))
        self.measure = measure
        self.deliver = deliver
        self.heartbeat_s = heartbeat_s
        self.stalled_after_s = stalled_after_s
        self.name = name
        self._deferrer = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=self.conninfo))
        self._deferrer_lock = threading.Lock()
        self._deferrer_open = False
        self._handed_back: set[int] = set()  # ``jobs`` ids given back at an orderly stop: their runs never report
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: EngineWorker | None = None
        self._stopping: asyncio.Event | None = None
        self.thread: threading.Thread | None = None
        self._register_tasks()

    @property
    def queues(self) -> list[str]:
        return ([MEASURE_QUEUE] if self.measure else []) + ([DELIVERY_QUEUE] if self.deliver else [])

    def _register_tasks(self) -> None:
        @self.app.task(name=MEASURE_TASK, queue=MEASURE_QUEUE, retry=RETRY)
        def measure(job_id: int) -> None:
            assert self.measure is not None
            self.measure(job_id)
            if job_id in self._handed_back:  # queued again by an orderly stop: reporting "succeeded" now would
                threading.Event().wait()  # end the job another worker runs; the process ends around this thread

        @self.app.task(name=DELIVER_TASK, queue=DELIVERY_QUEUE, retry=RETRY)
        def deliver() -> None:
            assert self.deliver is not None
            self.deliver()

    # -- deferring from any thread ---------------------------------------------------------------------------------
    def defer_delivery(self) -> bool:
        """Ask for a delivery run (one waits at most: a second request while one waits is dropped)."""
        with self._deferrer_lock:
            self._open_deferrer()
            try:
                self._deferrer.configure_task(DELIVER_TASK, queue=DELIVERY_QUEUE, lock="outbox",
                                              queueing_lock="outbox").defer()
            except AlreadyEnqueued:
                return False
        return True

    def hand_back(self, running: Collection[int], release: Callable[[], Sequence[Job]]) -> int:
        """An orderly stop with measurements ``running`` past the grace: ``release`` queues their ``jobs`` rows
        again (returning them), then their procrastinate jobs are queued again now, so that another worker starts
        them at once. Their runs here never report (they are marked first). Returns how many were given back."""
        self._handed_back.update(running)
        given = 0
        for job in release():
            if job.engine_job_id is None:
                continue
            try:
                with self._deferrer_lock:
                    self._open_deferrer()
                    self._deferrer.job_manager.retry_job_by_id(job.engine_job_id, retry_at=utcnow())
                given += 1
                LOG.info("job %d given back to the job engine's queue (engine job %d)", job.id, job.engine_job_id)
            except Exception:  # noqa: BLE001 - then it is taken over once this process's heartbeat lapsed
                LOG.exception("job %d could not be given back to the job engine; another worker takes it over once "
                              "this one's heartbeat lapsed", job.id)
        return given

    def _open_deferrer(self) -> None:
        if not self._deferrer_open:
            self._deferrer.open()
            self._deferrer_open = True

    # -- running ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run this process's queues (if any) in a thread: procrastinate's worker and the stalled-job recovery."""
        if not self.queues:
            return
        ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="job-engine", daemon=True)
        self.thread.start()
        ready.wait(30)

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with self.app.open_async():
            self._worker = EngineWorker(
                self.app, queues=self.queues, name=self.name, concurrency=1, wait=True,
                install_signal_handlers=False, update_heartbeat_interval=self.heartbeat_s,
                stalled_worker_timeout=self.stalled_after_s, fetch_job_polling_interval=1.0, listen_notify=True,
            )
            ready.set()
            recovery = asyncio.create_task(self._recover_stalled())
            try:
                await self._worker.run()
            finally:
                recovery.cancel()

    async def _recover_stalled(self) -> None:
        """Put the jobs of workers whose heartbeat lapsed back in their queue (they start again elsewhere)."""
        while True:
            try:
                for job in await self.app.job_manager.get_stalled_jobs(seconds_since_heartbeat=self.stalled_after_s):
                    if job.queue in self.queues:
                        LOG.warning("job engine: %s %s of a worker whose heartbeat lapsed is taken over", job.task_name,
                                    job.task_kwargs)
                        await self.app.job_manager.retry_job(job)
                await self.app.job_manager.prune_stalled_workers(self.stalled_after_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database gone for a moment: try again later
                LOG.exception("job engine: stalled-job recovery failed; trying again")
            await asyncio.sleep(max(1.0, self.heartbeat_s))

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking jobs and wait for the running one up to ``timeout``; True when the thread ended."""
        if self._loop is not None and self._worker is not None:
            self._loop.call_soon_threadsafe(self._worker.stop)
        if self.thread is not None:
            self.thread.join(timeout)
        with self._deferrer_lock:
            if self._deferrer_open:
                self._deferrer.close()
                self._deferrer_open = False
        return self.thread is None or not self.thread.is_alive()

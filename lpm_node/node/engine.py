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
- while an operator has suspended measuring (``lpm-node measuring suspend``, the console's queues page), a measurement
  job that a worker takes does not start: it is put back in the engine, in the queue ``measurements-suspended`` that
  no worker reads (its ``jobs`` row stays ``queued``); once measuring is resumed, the measuring processes move those
  jobs back to ``measurements`` and they run, each once;
- deliveries: one ``deliver`` job per destination at a time in the whole system (lock ``outbox:<destination>``)
  sends what is due for that destination with the same :class:`~lpm_node.answer.sending.Sender` (the same rows,
  attempts and states in the audit). When some stay pending (the PACS is down), the job raises
  :class:`DeliveryPending` and procrastinate retries it on :class:`DeliveryRetry`, its exponential backoff capped at
  ``[output] backoff_max_s``; the pending rows' ``next_attempt_at`` is that schedule. The outbox's own limits
  (``retry_hours``, ``max_attempts``) still dead-letter a delivery. A job is deferred when results are queued and
  every few seconds by the sender processes for destinations with something due.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Sequence

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import Job as EngineJob
from procrastinate.retry import RetryDecision
from procrastinate.schema import SchemaManager
from procrastinate.worker import Worker as EngineWorker
from sqlalchemy import Engine, inspect, select, text, update
from sqlalchemy.exc import OperationalError as DatabaseGone
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.answer.sending import Sender
from lpm_node.core.audit import MEASURING_SUSPENDED, Delivery, Job, MeasuringSuspended, utcnow
from lpm_node.core.states import DeliveryStatus

LOG = logging.getLogger(__name__)

MEASURE_TASK = "lpm_node.measure"
DELIVER_TASK = "lpm_node.deliver"
MEASURE_QUEUE = "measurements"
SUSPENDED_QUEUE = "measurements-suspended"  # measurement jobs put back while measuring is suspended: no worker reads it
DELIVERY_QUEUE = "deliveries"
SCHEMA_LOCK = 7_264_511  # a PostgreSQL advisory lock: one process applies procrastinate's schema
RETRY = procrastinate.RetryStrategy(max_attempts=5, exponential_wait=2, retry_exceptions={DatabaseGone})
RESUME_SUSPENDED = f"""
    UPDATE procrastinate_jobs SET queue_name = %(queue)s
     WHERE queue_name = %(suspended_queue)s AND status = 'todo'
       AND NOT EXISTS (SELECT 1 FROM node_controls WHERE name = '{MEASURING_SUSPENDED}' AND value = 'yes')
    RETURNING id"""


class MeasureRetry(procrastinate.BaseRetryStrategy):
    """The measurement task's retries: a job taken while measuring is suspended goes back into the engine, in the
    queue no worker reads (moved back once resumed); other failures as :data:`RETRY`."""

    def get_retry_decision(self, *, exception: BaseException, job: EngineJob) -> procrastinate.RetryDecision | None:
        if isinstance(exception, MeasuringSuspended):
            return procrastinate.RetryDecision(retry_at=utcnow(), queue=SUSPENDED_QUEUE)
        return RETRY.get_retry_decision(exception=exception, job=job)


CLOCK_SLACK = dt.timedelta(seconds=5)  # a delivery due this soon is sent by the job now (clocks of machines differ)


class DeliveryPending(Exception):
    """Deliveries to a destination are still pending after a run: procrastinate runs the job again at ``retry_at``."""

    def __init__(self, destination: str | None, retry_at: dt.datetime) -> None:
        super().__init__(f"deliveries to {destination or 'every destination'} still pending; next try at "
                         f"{retry_at:%H:%M:%S} UTC")
        self.retry_at = retry_at


class DeliveryRetry(procrastinate.RetryStrategy):
    """procrastinate's exponential backoff (``exponential_wait ** (attempts + 1)`` s) capped at ``max_wait_s``:
    :meth:`wait_s` schedules the deliveries a run tried in vain, and the job runs again when the first pending one is
    due (:class:`DeliveryPending`). No limit of tries here: the outbox dead-letters a delivery by its own limits."""

    def __init__(self, *, max_wait_s: float, exponential_wait: int = 2) -> None:
        super().__init__(exponential_wait=exponential_wait, retry_exceptions={DeliveryPending, DatabaseGone})
        self.max_wait_s = max_wait_s

    def wait_s(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` runs of the job (0 for its first run)."""
        return float(min(self.max_wait_s, self.wait + self.linear_wait * attempts
                         + self.exponential_wait ** min(attempts + 1, 64)))

    def get_retry_decision(self, *, exception: BaseException, job: EngineJob) -> RetryDecision | None:
        if super().get_retry_decision(exception=exception, job=job) is None:
            return None
        if isinstance(exception, DeliveryPending):
            return RetryDecision(retry_at=exception.retry_at)
        return RetryDecision(retry_in={"seconds": self.wait_s(job.attempts)})


def delivery_lock(destination: str | None) -> str:
    """The lock (and queueing lock) of a destination's delivery jobs: one runs at a time, one waits at most."""
    return f"outbox:{destination}" if destination is not None else "outbox"


def due_destinations(sessions: sessionmaker) -> list[str]:
    """The destinations that something pending in the outbox is due for now."""
    with sessions() as session:
        return list(session.scalars(select(Delivery.destination).distinct().where(
            Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= utcnow())))


def deliver_due(sessions: sessionmaker, sender: Sender, destination: str | None, wait_s: float) -> dt.datetime | None:
    """One run of a destination's delivery job: send what is due, schedule the deliveries tried in vain ``wait_s``
    from now (the job engine's backoff). Returns when the first one still pending is due, None when none is, or
    when another job for this destination waits already (it takes over)."""
    now = utcnow()
    mine = Delivery.status == DeliveryStatus.PENDING
    if destination is not None:
        mine = mine & (Delivery.destination == destination)
    with sessions() as session:
        due = list(session.scalars(select(Delivery.id).where(mine, Delivery.next_attempt_at <= now + CLOCK_SLACK)))
        session.execute(update(Delivery).where(Delivery.id.in_(due), Delivery.next_attempt_at > now)
                        .values(next_attempt_at=now))
        session.commit()
    sender.run_once(now, destination)
    retry_at = utcnow() + dt.timedelta(seconds=wait_s)
    with sessions() as session:
        session.execute(update(Delivery).where(mine, Delivery.id.in_(due)).values(next_attempt_at=retry_at))
        first = session.scalars(select(Delivery.next_attempt_at).where(mine).order_by(Delivery.next_attempt_at)
                                .limit(1)).first()
        waiting = session.execute(text("SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = :lock AND "
                                       "status = 'todo'"), {"lock": delivery_lock(destination)}).first()
        session.commit()
    if first is None or waiting is not None:
        return None
    if due:
        LOG.warning("deliveries to %s not sent; next try at %s UTC (the job engine's backoff: %.0f s)",
                    destination, f"{retry_at:%H:%M:%S}", wait_s)
    return first


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
        deliver: Callable[[str | None, float], dt.datetime | None] | None = None,
        delivery_backoff_max_s: float = 600.0,
        heartbeat_s: float = 5.0,
        stalled_after_s: float = 30.0,
        name: str = "lpm-node",
    ) -> None:
        self.conninfo = libpq_url(database_url)
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.conninfo))
        self.measure = measure
        self.deliver = deliver  # (destination, seconds to wait after a vain try) -> when to run again, or None
        self.delivery_retry = DeliveryRetry(max_wait_s=delivery_backoff_max_s)
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
        @self.app.task(name=MEASURE_TASK, queue=MEASURE_QUEUE, retry=MeasureRetry())
        def measure(job_id: int) -> None:
            assert self.measure is not None
            try:
                self.measure(job_id)
            except MeasuringSuspended:
                LOG.info("job %d waits in the job engine: measuring is suspended", job_id)
                raise
            if job_id in self._handed_back:  # queued again by an orderly stop: reporting "succeeded" now would
                threading.Event().wait()  # end the job another worker runs; the process ends around this thread

        @self.app.task(name=DELIVER_TASK, queue=DELIVERY_QUEUE, retry=self.delivery_retry, pass_context=True)
        def deliver(context: procrastinate.JobContext, destination: str | None = None) -> None:
            assert self.deliver is not None
            retry_at = self.deliver(destination, self.delivery_retry.wait_s(context.job.attempts))
            if retry_at is not None:
                raise DeliveryPending(destination, retry_at)

    # -- deferring from any thread ---------------------------------------------------------------------------------
    def defer_delivery(self, destinations: Iterable[str]) -> int:
        """Ask for a delivery run per destination (one waits at most per destination: a second request while one
        waits, or waits for its next try, is dropped). Returns how many were deferred."""
        deferred = 0
        with self._deferrer_lock:
            self._open_deferrer()
            for destination in destinations:
                lock = delivery_lock(destination)
                try:
                    self._deferrer.configure_task(DELIVER_TASK, queue=DELIVERY_QUEUE, lock=lock,
                                                  queueing_lock=lock).defer(destination=destination)
                    deferred += 1
                except AlreadyEnqueued:
                    pass
        return deferred

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
        """Put the jobs of workers whose heartbeat lapsed back in their queue (they start again elsewhere), and the
        measurements put aside while measuring was suspended once it is resumed."""
        while True:
            try:
                if MEASURE_QUEUE in self.queues:
                    await self._resume_suspended()
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

    async def _resume_suspended(self) -> None:
        """Once measuring is resumed, move the jobs put aside meanwhile back to the measurement queue."""
        rows = await self.app.connector.execute_query_all_async(RESUME_SUSPENDED, queue=MEASURE_QUEUE,
                                                                 suspended_queue=SUSPENDED_QUEUE)
        if rows:
            LOG.info("measuring resumed: %d job(s) back in the job engine's measurement queue (engine jobs %s)",
                     len(rows), ", ".join(str(row["id"]) for row in rows))

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

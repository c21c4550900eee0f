"""The measurement worker: takes queued jobs in order, runs the pipeline, writes the answer into the outbox.

One segmenter (model) is loaded once and kept warm; jobs run one at a time. A job's state lives in the audit DB,
so a node killed mid-job finds it again as ``running`` at the next start and runs it again (its output UIDs are
deterministic, so the PACS gets the same objects, never duplicates). Only such crashes count toward
``MAX_JOB_STARTS``: an orderly stop (SIGTERM) during a job puts it back in the queue uncounted
(:meth:`Worker.release_running`). A job that fails is recorded with its reason and the worker goes on with the
next one. A series that reopened while its job ran is not decided by that job: its results stay unsent and a
new job measures the series again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.answer.outbox import enqueue_results
from lpm_node.core.audit import Delivery, Job, MeasuringSuspended, Series, measuring_suspended, utcnow
from lpm_node.core.config import Settings
from lpm_node.core.destinations import result_destinations
from lpm_node.core.states import JobStatus, SeriesStatus
from lpm_node.imaging.segmentation import Segmenter, load_segmenter
from lpm_node.intake.integrity import recorded_checksums
from lpm_node.intake.series import record_decision
from lpm_node.intake.spool import Spool
from lpm_node.node.pipeline import analyse_series, warm_writers, write_answer
from lpm_node.node.roles import local_workers

LOG = logging.getLogger(__name__)

MAX_JOB_STARTS = 3  # a job whose run was cut short by a crash this often is failed, not retried forever
MEASURING_PROCESS = f"{socket.gethostname()}:{os.getpid()}"  # named in the audit at each start of a job



def release_freed_memory() -> None:
    """Hand the memory a finished job freed back to the system (glibc), so an idle node stays small.

    malloc_trim(3) is glibc's documented call; Python has no binding for it, hence ctypes. Measured with glibc
    2.36, Python 3.11, the bundled model on a 120 x 512 x 512 phantom: RSS after two jobs 1280 MB, after the trim
    1155 MB (the freed heap glibc keeps otherwise). Elsewhere (musl, macOS) it is skipped.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps it, nothing is lost
        pass


class Worker:
    """Runs measurement jobs from the ``jobs`` table, oldest first."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        spool: Spool,
        *,
        on_results: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self.on_results = on_results
        self.outbox_path = settings.data_path / "outbox"
        self._segmenter: Segmenter | None = None
        self._running: set[int] = set()  # jobs this process runs now (only these are released at a stop)

    @property
    def segmenter(self) -> Segmenter:
        """The model, loaded at first use and kept; the answer's writers are warmed at the same time."""
        if self._segmenter is None:
            self._segmenter = load_segmenter(self.settings.model)
            warm_writers()
        return self._segmenter

    def share_cores(self) -> int:
        """On the CPU with ``[model] threads = 0``: size the model's thread pool to this worker's share of the
        machine's cores (cores / worker processes alive here, from the role heartbeats), so that several workers on
        one machine do not each start a thread per core and fight over them. Returns the threads in use (0: not
        on the CPU, or set in the configuration)."""
        if self.settings.model.threads > 0 or getattr(self.segmenter, "device", "cpu") != "cpu":
            return 0
        import torch

        with self.sessions() as session:
            here = local_workers(session, self.settings.node.stalled_after_seconds)
        threads = max(1, (os.cpu_count() or 1) // max(1, here))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            LOG.info("%d worker process(es) on this machine: the model uses %d of its %d cores", here, threads,
                     os.cpu_count() or 1)
        return threads

    def check_model(self) -> None:
        """Fail early, with the reason, when the configured model folder is not a usable model."""
        from lpm_node.imaging.segmentation import NO_MODEL_MESSAGE, SegmentationError, verify_model_folder

        model = self.settings.model
        if not model.folder:
            raise SegmentationError(NO_MODEL_MESSAGE)
        verify_model_folder(model.folder, model.profile or None,
                            folds=list(model.folds) or None, checkpoint=model.checkpoint, load_weights=False)

    def recover(self) -> int:
        """Put jobs left ``running`` by a crashed node back in the queue (the start counts); returns how many."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)))
            for job in jobs:
                job.status = JobStatus.QUEUED.value
                job.error = (f"interrupted: the node ended without an orderly stop during start {job.attempts}; "
                             "queued again")
                LOG.warning("job %d (series %s) was interrupted by a crash; queued again", job.id,
                            job.series_instance_uid)
            session.commit()
        return len(jobs)

    @property
    def running(self) -> list[int]:
        """The ids of the jobs this process runs now."""
        return sorted(self._running)

    def release_running(self, why: str = "the node was stopped during the job") -> list[Job]:
        """Put the jobs this process runs back in the queue after an orderly stop; such starts do not count as
        crashes. Returns the jobs put back."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING,
                                                          Job.id.in_(sorted(self._running)))))
            for job in jobs:
                job.status = JobStatus.QUEUED.value
                job.stopped_starts = (job.stopped_starts or 0) + 1
                job.error = f"{why} (start {job.attempts}, not counted as a crash); queued again"
                series = self._series(session, job)
                if series is not None and series.status == SeriesStatus.PROCESSING:
                    record_decision(session, series, SeriesStatus.QUEUED, f"job {job.id}: {why}; queued again")
                LOG.warning("job %d (series %s): %s; queued again", job.id, job.series_instance_uid, why)
            session.commit()
        return jobs

    @staticmethod
    def crashed_starts(job: Job) -> int:
        """Earlier starts of ``job`` that ended in a crash (not finished, not stopped in order)."""
        return max(0, job.attempts - 1 - (job.stopped_starts or 0))

    def _claim(self, job_id: int | None = None) -> Job | None:
        """Mark the oldest queued job (or job ``job_id``, handed over by the job engine) running; None when there is
        none to run. A job engine's job whose row is still ``running`` was cut short elsewhere: that start counts;
        while measuring is suspended, a job engine's job raises :class:`MeasuringSuspended` (it waits in its queue)."""
        with self.sessions() as session:
            if job_id is None:
                if measuring_suspended(session):  # an operator suspended measuring: queued jobs wait
                    return None
                job = session.scalars(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id)
                                      .limit(1)).first()
            else:
                if measuring_suspended(session):  # the job engine keeps the job in its queue until resumed
                    raise MeasuringSuspended(f"job {job_id}: measuring is suspended")
                job = session.get(Job, job_id, with_for_update=True)
                if job is not None and job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                    LOG.info("job %d is %s: nothing to run", job.id, job.status)
                    job = None
            if job is None:
                return None
            job.status = JobStatus.RUNNING.value
            job.started_at = utcnow()
            job.attempts += 1
            series = self._series(session, job)
            if series is not None:
                record_decision(session, series, SeriesStatus.PROCESSING,
                                f"measuring (job {job.id}, start {job.attempts}) in {MEASURING_PROCESS}")
            session.commit()
            return job

    @staticmethod
    def _series(session, job: Job) -> Series | None:  # noqa: ANN001
        return session.scalars(select(Series).where(Series.series_instance_uid == job.series_instance_uid)).first()

    def step(self) -> bool:
        """Run the next queued job, if any; returns True when a job was taken.

        The model is loaded at the first call, so it is warm when the first series completes."""
        self.segmenter  # noqa: B018 - load once, keep warm
        job = self._claim()
        if job is None:
            return False
        self._execute(job)
        return True

    def run_job(self, job_id: int) -> bool:
        """Run job ``job_id`` (the job engine's task); False when it was not to run (done, cancelled, failed).

        Raises :class:`MeasuringSuspended` while an operator has suspended measuring (the job is not started)."""
        job = self._claim(job_id)
        if job is None:
            return False
        self._execute(job)
        return True

    def _execute(self, job: Job) -> None:
        """Run a claimed job: the pipeline, then its results into the outbox; a failure is recorded with its reason."""
        self._running.add(job.id)
        try:
            self._execute_claimed(job)
        finally:
            self._running.discard(job.id)

    def _execute_claimed(self, job: Job) -> None:
        if self.crashed_starts(job) >= MAX_JOB_STARTS:
            self._fail(job, f"gave up: the node crashed {self.crashed_starts(job)} times during this job "
                            "(`lpm-node rerun` queues it again)")
            return
        try:
            self._run(job)
        except Exception as exc:  # one bad series never stops the node
            LOG.exception("job %d (series %s) failed", job.id, job.series_instance_uid)
            self._fail(job, f"{type(exc).__name__}: {exc}")
        finally:
            release_freed_memory()

    def _run(self, job: Job) -> None:
        paths = self.spool.series_files(job.study_instance_uid, job.series_instance_uid)
        if not paths:
            raise FileNotFoundError(f"no spooled files for series {job.series_instance_uid}")
        recorded = recorded_checksums(self.sessions, paths)
        self.share_cores()
        result = analyse_series(paths, self.settings, self.segmenter, recorded)
        folder = self.outbox_path / job.series_instance_uid
        predecessor = self._previous_sr(job.series_instance_uid, folder)
        if folder.exists():  # an earlier run: its files are replaced by this one
            shutil.rmtree(folder)
        objects = write_answer(result, self.settings, folder, predecessor)
        m = result.measurement
        with self.sessions() as session:
            row = session.get(Job, job.id)
            if row.status != JobStatus.RUNNING:  # put back in the queue by a stop meanwhile: it runs again
                return
            series = self._series(session, row)
            row.status = JobStatus.DONE
            row.finished_at = utcnow()
            row.error = ""
            row.device = result.device
            row.model = result.model
            identity = result.model_identity
            row.model_name = identity.name
            row.model_version = identity.version
            row.model_weights_sha256 = identity.weights_sha256
            row.model_test = identity.test_model
            row.timings = {k: round(v, 3) for k, v in result.timings.items()}
            row.result = {**m.to_dict(), "warnings": list(result.source.warnings)}
            row.dl_parenchymal_hu = m.dl_parenchymal_hu
            row.dl_volumetric_hu = m.dl_volumetric_hu
            row.category = m.category
            row.qc_flags = list(m.qc_flags)
            value = "n/a" if m.dl_parenchymal_hu is None else f"{m.dl_parenchymal_hu:.1f} HU"
            if series is not None and series.status != SeriesStatus.PROCESSING:  # reopened while measuring
                row.error = (f"superseded: series {series.status} after more instances arrived during the job; "
                             "results not sent")
                session.commit()
                LOG.info("job %d: series %s reopened during the job; its results are not sent", job.id,
                         job.series_instance_uid)
                return
            destinations = result_destinations(
                self.settings,
                calling_ae=series.calling_ae if series else "",
                calling_address=series.calling_address if series else "",
            )
            enqueue_results(
                session,
                job_id=row.id,
                series_instance_uid=row.series_instance_uid,
                objects=[(o.kind, o.path, o.sop_instance_uid) for o in objects],
                destinations=destinations,
            )
            where = ", ".join(str(d) for d in destinations) or "no destination configured"
            if series is not None:
                record_decision(session, series, SeriesStatus.DONE, f"measured: DL-parenchymal {value}, {m.category}; "
                                f"results to {where}")
            session.commit()
        LOG.info("job %d series %s: DL-parenchymal %s, %s, %s in %.1f s", job.id, job.series_instance_uid, value,
                 m.category, result.device, sum(result.timings.values()))
        if not destinations:
            LOG.warning("no destination configured: results of series %s stay in %s", job.series_instance_uid,
                        Path(folder))
        if self.on_results is not None:
            self.on_results()

    def _previous_sr(self, series_instance_uid: str, folder: Path) -> Dataset | None:
        """The SR last written for this series (from the audit DB's outbox rows, else the outbox folder), read
        without its content tree's bulk data; None when there was none or its file is gone."""
        with self.sessions() as session:
            paths = list(session.scalars(
                select(Delivery.path).where(Delivery.series_instance_uid == series_instance_uid,
                                            Delivery.object_kind == "SR").order_by(Delivery.id.desc())
            ))
        paths += [str(p) for p in sorted(folder.glob("SR_*.dcm"))] if folder.exists() else []
        for path in paths:
            if Path(path).is_file():
                return pydicom.dcmread(path, stop_before_pixels=True)
        return None

    def _fail(self, job: Job, error: str) -> None:
        with self.sessions() as session:
            row = session.get(Job, job.id)
            if row.status != JobStatus.RUNNING:  # put back in the queue by a stop meanwhile: it runs again
                return
            row.status = JobStatus.FAILED
            row.finished_at = utcnow()
            row.error = error
            series = self._series(session, row)
            if series is not None and series.status == SeriesStatus.PROCESSING:
                record_decision(session, series, SeriesStatus.FAILED, f"job {row.id} failed: {error}")
            session.commit()

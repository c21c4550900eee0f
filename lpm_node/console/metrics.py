"""Prometheus metrics, read from the audit database at each scrape (so several node processes add up)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import Association, Delivery, Job, Series, measuring_suspended
from lpm_node.core.states import DeliveryStatus, JobStatus, SeriesStatus, values

STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class AuditCollector:
    """Counts and histograms from the audit tables."""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            received, refused = session.execute(select(
                func.coalesce(func.sum(Association.instances_received), 0),
                func.coalesce(func.sum(Association.instances_refused), 0))).one()
            instances = CounterMetricFamily("lpm_instances", "C-STORE instances, by outcome", labels=["outcome"])
            instances.add_metric(["received"], float(received))
            instances.add_metric(["refused"], float(refused))
            yield instances

            series = GaugeMetricFamily("lpm_series", "Series by status", labels=["status"])
            counts = dict(session.execute(select(Series.status, func.count(Series.id)).group_by(Series.status)).all())
            for status in values(SeriesStatus):
                series.add_metric([status], float(counts.get(status, 0)))
            yield series

            jobs = GaugeMetricFamily("lpm_jobs", "Measurement jobs by status", labels=["status"])
            counts = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
            for status in values(JobStatus):
                jobs.add_metric([status], float(counts.get(status, 0)))
            yield jobs

            deliveries = GaugeMetricFamily("lpm_deliveries", "Result deliveries by status", labels=["status"])
            counts = dict(session.execute(select(Delivery.status, func.count(Delivery.id))
                                          .group_by(Delivery.status)).all())
            for status in values(DeliveryStatus):
                deliveries.add_metric([status], float(counts.get(status, 0)))
            yield deliveries

            depth = GaugeMetricFamily("lpm_queue_depth", "What waits, by queue", labels=["queue"])
            depth.add_metric(["series_receiving"], float(session.scalar(
                select(func.count(Series.id)).where(Series.status == SeriesStatus.RECEIVING)) or 0))
            depth.add_metric(["jobs_queued"], float(session.scalar(
                select(func.count(Job.id)).where(Job.status == JobStatus.QUEUED)) or 0))
            depth.add_metric(["deliveries_pending"], float(session.scalar(
                select(func.count(Delivery.id)).where(Delivery.status == DeliveryStatus.PENDING)) or 0))
            depth.add_metric(["deliveries_dead"], float(session.scalar(
                select(func.count(Delivery.id)).where(Delivery.status == DeliveryStatus.DEAD)) or 0))
            yield depth

            suspended = GaugeMetricFamily("lpm_measuring_suspended", "1 while an operator has suspended measuring")
            suspended.add_metric([], 1.0 if measuring_suspended(session) else 0.0)
            yield suspended

            yield self._stage_histogram(session)

    @staticmethod
    def _stage_histogram(session) -> HistogramMetricFamily:  # noqa: ANN001
        per_stage: dict[str, list[float]] = {}
        for timings in session.scalars(select(Job.timings).where(Job.status == JobStatus.DONE)):
            for stage, seconds in (timings or {}).items():
                per_stage.setdefault(stage, []).append(float(seconds))
        histogram = HistogramMetricFamily("lpm_job_stage_duration_seconds", "Time per stage of finished jobs",
                                          labels=["stage"])
        for stage, samples in sorted(per_stage.items()):
            samples.sort()
            buckets = [(str(b), float(bisect.bisect_right(samples, b))) for b in STAGE_BUCKETS]
            buckets.append(("+Inf", float(len(samples))))
            histogram.add_metric([stage], buckets, sum_value=sum(samples))
        return histogram


def render_metrics(sessions: sessionmaker) -> bytes:
    """The Prometheus text exposition of the audit metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(sessions))
    return generate_latest(registry)

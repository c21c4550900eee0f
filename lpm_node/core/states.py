"""Every state a row of the audit database can be in, in one place.

StrEnum members compare equal to their string values, so rows and JSON keep the plain words.
"""

from __future__ import annotations

from enum import StrEnum


class AssociationOutcome(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class SeriesStatus(StrEnum):
    RECEIVING = "receiving"  # instances arriving
    COMPLETE = "complete"  # assembled, waiting for the eligibility rules
    REJECTED = "rejected"  # refused by the rules, with the reason
    ELIGIBLE = "eligible"
    NOT_SELECTED = "not_selected"  # eligible, but another series of the study is measured
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # the series reopened or another series was selected before it ran


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # out of attempts: `lpm-node outbox retry` sends it again
    REDIRECTED = "redirected"  # a dead letter whose destination is no longer configured, re-queued to the new ones


# Series decisions after which new instances reopen the series (assembled and evaluated again).
REOPENABLE_SERIES_STATUSES = frozenset(
    {
        SeriesStatus.COMPLETE, SeriesStatus.REJECTED, SeriesStatus.ELIGIBLE, SeriesStatus.NOT_SELECTED,
        SeriesStatus.QUEUED, SeriesStatus.PROCESSING, SeriesStatus.DONE, SeriesStatus.FAILED,
    }
)


def values(enum: type[StrEnum]) -> list[str]:
    """The string values of a state enum (for CHECK constraints and help texts)."""
    return [member.value for member in enum]

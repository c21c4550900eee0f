"""Series assembly: a series is complete when nothing has arrived for it for ``stable_seconds``.

All state is in the audit DB (series rows: status ``receiving``, ``last_received_at``) and the
spool, so a restart resumes: :func:`reconcile_spool` indexes spooled files whose audit rows a
crash lost, and the completion pass then completes every quiet series, old or new.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import Instance, Series, SeriesDecision, as_utc, utcnow
from lpm_node.core.states import SeriesStatus
from lpm_node.intake.header import CannotUnderstand, Header, read_header
from lpm_node.intake.recorder import note_instance_on_series
from lpm_node.intake.spool import Spool, file_checksum

LOG = logging.getLogger(__name__)

def record_decision(session, row: Series, status: str, reason: str, at: dt.datetime | None = None) -> None:  # noqa: ANN001
    """Set a series' status and reason, and keep the decision in its history."""
    at = at or utcnow()
    row.status = status
    row.reason = reason
    row.decided_at = at
    session.add(SeriesDecision(series_instance_uid=row.series_instance_uid, at=at, status=status, reason=reason))


def _read_header(path: Path) -> Header | None:
    try:
        return read_header(path)
    except (CannotUnderstand, OSError):  # a damaged file or bad UIDs: leave it to the rules/loader to report
        return None


def reconcile_spool(sessions: sessionmaker, spool: Spool) -> int:
    """Index spooled instances that have no audit row (written just before a crash); returns how many.

    Their series get ``last_received_at`` = the file's modification time and status ``receiving``
    (or keep theirs), so they complete and are evaluated like any other.
    """
    added = 0
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
        series_rows: dict[str, Series] = {}
        for study_uid, series_uid, path in spool.iter_instances():
            if str(path) in known:
                continue
            header = _read_header(path)
            if header is None or header.series_instance_uid != series_uid or header.study_instance_uid != study_uid:
                LOG.warning("spooled file %s is unreadable or misplaced; not indexed", path.name)
                continue
            if session.scalars(select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid)).first():
                continue
            at = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
            session.add(
                Instance(
                    sop_instance_uid=header.sop_instance_uid,
                    series_instance_uid=series_uid,
                    sop_class_uid=header.sop_class_uid,
                    transfer_syntax_uid=header.transfer_syntax_uid,
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    checksum=file_checksum(path),
                    received_at=at,
                )
            )
            row = series_rows.get(series_uid) or session.scalars(
                select(Series).where(Series.series_instance_uid == series_uid)
            ).first()
            if row is None:
                row = Series(
                    series_instance_uid=series_uid,
                    study_instance_uid=study_uid,
                    modality=header.modality,
                    series_description=header.series_description,
                    first_received_at=at,
                    last_received_at=at,
                    instance_count=0,
                    status=SeriesStatus.RECEIVING,
                    reason="recovered from the spool after a restart",
                )
                session.add(row)
            series_rows[series_uid] = row
            note_instance_on_series(session, row, at)
            added += 1
        session.commit()
    if added:
        LOG.info("indexed %d spooled instance(s) missing from the audit database", added)
    return added


class SeriesAssembler:
    """Marks quiet series complete; the rules then take them from status ``complete``."""

    def __init__(self, sessions: sessionmaker, stable_seconds: float) -> None:
        self.sessions = sessions
        self.stable_seconds = float(stable_seconds)

    def complete_stable(self, now: dt.datetime | None = None, settle: Callable[[], object] | None = None) -> list[str]:
        """Mark every ``receiving`` series quiet for ``stable_seconds`` as ``complete``; returns their UIDs.

        ``settle`` (the listener's audit flush) is called first when a series looks quiet, so that
        instances received but not yet recorded count before anything is completed.
        """
        if settle is not None and now is None:
            deadline = self.next_deadline()
            if deadline is None or deadline > 0:
                return []
            settle()
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=self.stable_seconds)
        done: list[str] = []
        with self.sessions() as session:
            for row in session.scalars(select(Series).where(Series.status == SeriesStatus.RECEIVING)):
                last = as_utc(row.last_received_at)
                if last is not None and last <= cutoff:
                    quiet = (now - last).total_seconds()
                    record_decision(
                        session, row, SeriesStatus.COMPLETE,
                        f"{row.instance_count} instance(s), nothing new for {quiet:.1f} s",
                        now,
                    )
                    done.append(row.series_instance_uid)
            session.commit()
        for uid in done:
            LOG.info("series %s complete", uid)
        return done

    def next_deadline(self, now: dt.datetime | None = None) -> float | None:
        """Seconds until the earliest receiving series becomes complete (None when there is none)."""
        now = now or utcnow()
        with self.sessions() as session:
            query = select(Series.last_received_at).where(Series.status == SeriesStatus.RECEIVING)
            lasts = [v for v in (as_utc(x) for x in session.scalars(query)) if v is not None]
        if not lasts:
            return None
        return max(0.0, (min(lasts) + dt.timedelta(seconds=self.stable_seconds) - now).total_seconds())

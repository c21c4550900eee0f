"""Series assembly: when a series is complete, and reopening a series that gets new instances.

A series is complete when nothing has arrived for it for ``stable_seconds`` (downtime does not count: the clock
starts again when the node starts), or ``release_grace_seconds`` after every association that carried it was
released, when its slices are contiguous (:mod:`lpm_node.intake.geometry`). It is never completed while an
acknowledged instance of it is missing from the spool. New instances reopen a decided series
(:func:`note_instance_on_series`), so it is evaluated again and a new job supersedes the previous one.

All state is in the audit DB (series rows: status ``receiving``, ``last_received_at``) and the
spool, so a restart resumes: :func:`reconcile_spool` indexes spooled files whose audit rows a
crash lost, and the completion pass then completes every quiet series, old or new.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Association, Instance, Job, Series, SeriesDecision, as_utc, utcnow
from lpm_node.core.files import file_checksum
from lpm_node.core.states import REOPENABLE_SERIES_STATUSES, AssociationOutcome, JobStatus, SeriesStatus
from lpm_node.intake.geometry import contiguity
from lpm_node.intake.header import CannotUnderstand, Header, read_header
from lpm_node.intake.headers import SeriesFacts, SeriesHeaders, read_series_headers
from lpm_node.intake.spool import Spool

LOG = logging.getLogger(__name__)

COMPLETE = SeriesStatus.COMPLETE.value  # assembled, waiting for the eligibility rules
RECEIVING = SeriesStatus.RECEIVING.value


def note_instance_on_series(session: Session, row: Series, at: dt.datetime) -> None:
    """Count one new instance on a series row; reopen a decided series so that it is evaluated again.

    Every decision reopens: a queued job is cancelled; a running one finishes but no longer decides the
    series; measured or failed series keep their jobs in the audit, and a new job is made once the series
    is complete again."""
    row.instance_count = (row.instance_count or 0) + 1
    last = as_utc(row.last_received_at)
    if last is None or at > last:
        row.last_received_at = at
    if row.status not in REOPENABLE_SERIES_STATUSES:
        return
    previous = f"{row.status}: {row.reason}" if row.reason else row.status
    if row.status == SeriesStatus.QUEUED:
        for job in session.scalars(
            select(Job).where(Job.series_instance_uid == row.series_instance_uid, Job.status == JobStatus.QUEUED)
        ):
            job.status = JobStatus.CANCELLED.value
            job.error = "more instances arrived; the series is evaluated again"
    row.status = RECEIVING
    row.reason = f"more instances arrived after the decision ({previous})"
    row.decided_at = None
    session.add(SeriesDecision(series_instance_uid=row.series_instance_uid, at=at, status=RECEIVING,
                               reason=row.reason))


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


def reconcile_spool(sessions: sessionmaker, spool: Spool, tries: int = 5,
                    written_before: dt.datetime | None = None) -> int:
    """Index spooled instances that have no audit row (written just before a crash); returns how many.

    ``written_before``: only files written before then. Receivers sharing the data folder record their own fresh
    instances themselves (a file is renamed into the spool a moment before its row is committed): indexing those
    here would make that receiver's commit fail, refusing the C-STORE. Should a receiver record one meanwhile
    anyway, this pass is rolled back and made again (up to ``tries`` times).
    """
    for _ in range(tries - 1):
        try:
            return _reconcile_once(sessions, spool, written_before)
        except (IntegrityError, OperationalError) as exc:  # a duplicate, or a deadlock with that receiver
            LOG.info("another receiver indexed spooled instances meanwhile (%s); indexing the spool again",
                     type(getattr(exc, "orig", exc)).__name__)
    return _reconcile_once(sessions, spool, written_before)


def _reconcile_once(sessions: sessionmaker, spool: Spool, written_before: dt.datetime | None = None) -> int:
    """One pass of :func:`reconcile_spool`: the series of the instances it indexes get ``last_received_at`` =
    the file's modification time and status ``receiving`` (or keep theirs), so they complete and are
    evaluated like any other."""
    added = 0
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)))
        series_rows: dict[str, Series] = {}
        for study_uid, series_uid, path in spool.iter_instances():
            if str(path) in known:
                continue
            try:
                at = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
            except OSError:  # removed meanwhile
                continue
            if written_before is not None and at >= written_before:
                continue  # fresh: its receiver records it (or a later pass indexes it, once it is no longer fresh)
            header = _read_header(path)
            if header is None or header.series_instance_uid != series_uid or header.study_instance_uid != study_uid:
                LOG.warning("spooled file %s is unreadable or misplaced; not indexed", path.name)
                continue
            if session.scalars(select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid)).first():
                continue
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


@dataclass
class _HeaderPass:
    """One read of a series' headers: whether its slices are contiguous, and the facts the rules judge."""

    instance_count: int
    paths: frozenset[str]
    headers: SeriesHeaders
    ok: bool
    why: str


class SeriesAssembler:
    """Marks series complete; the rules then take them from status ``complete``.

    ``started_at`` (default: now) is when the node started: a series' quiet time is counted from its last
    instance or from the start, whichever is later, so downtime is never taken for quiet time."""

    def __init__(self, sessions: sessionmaker, stable_seconds: float, release_grace_seconds: float | None = None,
                 *, started_at: dt.datetime | None = None) -> None:
        self.sessions = sessions
        self.stable_seconds = float(stable_seconds)
        self.release_grace_seconds = None if release_grace_seconds is None else float(release_grace_seconds)
        self.started_at = as_utc(started_at) or utcnow()
        self._headers: dict[str, _HeaderPass] = {}  # receiving series whose headers were read, by UID
        self._completed: dict[str, _HeaderPass] = {}  # completed here, their facts not yet taken by the rules
        self._missing_logged: dict[str, int] = {}
        self.due_in: float | None = None  # seconds until a series may complete, as of the last pass

    def _quiet_since(self, row: Series) -> dt.datetime:
        last = as_utc(row.last_received_at) or self.started_at
        return max(last, self.started_at)

    def complete_stable(self, now: dt.datetime | None = None, settle: Callable[[], object] | None = None) -> list[str]:
        """Mark every ``receiving`` series that is complete as ``complete``; returns their UIDs.

        ``settle`` (the listener's audit flush) is called first when a series looks complete, so that
        instances received but not yet recorded count before anything is completed.
        """
        self._completed.clear()  # facts the rules did not take right after the last pass are not trusted later
        if settle is not None and now is None:
            with self.sessions() as session:
                deadline, receiving, unread = self._deadline(session, utcnow())
                self.due_in = deadline
                if deadline is None or deadline > 0:
                    self._read_released_headers(session, receiving, unread)
                    return []
            settle()
        now = now or utcnow()
        done: list[str] = []
        with self.sessions() as session:
            for row in session.scalars(select(Series).where(Series.status == RECEIVING)):
                reason = self._completion(session, row, now)
                if reason is None or not self._all_spooled(session, row):
                    continue
                record_decision(session, row, COMPLETE, f"{row.instance_count} instance(s), {reason}", now)
                read = self._headers.pop(row.series_instance_uid, None)
                if read is not None and read.instance_count == row.instance_count:
                    self._completed[row.series_instance_uid] = read
                done.append(row.series_instance_uid)
            session.commit()
        for uid in done:
            LOG.info("series %s complete", uid)
        if settle is not None:
            # a series still due after the pass waits for a change (a spool file, an instance): polled, not hurried
            after = self.next_deadline()
            self.due_in = after if after is not None and after > 0 else None
        return done

    def _completion(self, session: Session, row: Series, now: dt.datetime) -> str | None:
        """Why the series is complete at ``now``, or None when it is not yet."""
        quiet = (now - self._quiet_since(row)).total_seconds()
        if quiet >= self.stable_seconds:
            restarted = " (counted from the node's start)" if self._quiet_since(row) == self.started_at else ""
            return f"nothing new for {quiet:.1f} s{restarted}"
        if self.release_grace_seconds is None or quiet < self.release_grace_seconds:
            return None
        released_at = self._released_at(session, row.series_instance_uid)
        if released_at is None:
            return None
        if (now - max(released_at, self.started_at)).total_seconds() < self.release_grace_seconds:
            return None
        check = self._contiguous(session, row)
        if check is None or not check.ok:
            return None
        return f"every association that carried it was released, {check.why}"

    def _released_at(self, session: Session, series_uid: str) -> dt.datetime | None:
        """When the last association that carried the series ended, if every one of them was released."""
        ids = set(session.scalars(select(Instance.association_id).where(Instance.series_instance_uid == series_uid)))
        if not ids or None in ids:  # instances of unknown origin (re-indexed from the spool): wait for quiet
            return None
        rows = session.scalars(select(Association).where(Association.id.in_(ids))).all()
        if len(rows) != len(ids) or any(r.outcome != AssociationOutcome.RELEASED or r.ended_at is None for r in rows):
            return None
        return max(as_utc(r.ended_at) for r in rows)

    def _contiguous(self, session: Session, row: Series) -> _HeaderPass | None:
        """The series' header pass at its present instance count (read now if not yet); None while some of its
        instances are not in the spool yet."""
        uid = row.series_instance_uid
        cached = self._headers.get(uid)
        if cached is not None and cached.instance_count == row.instance_count:
            return cached
        paths = [Path(p) for p in session.scalars(select(Instance.path).where(Instance.series_instance_uid == uid))]
        if not all(p.exists() for p in paths):  # not all in the spool yet: look again later
            return None
        headers = read_series_headers(paths)
        slices = headers.slices
        ok, why = contiguity(*slices) if slices is not None else (False, "headers not readable")
        result = _HeaderPass(row.instance_count, frozenset(str(p) for p in paths), headers, ok, why)
        self._headers[uid] = result
        if not ok:
            LOG.info("series %s: associations released but not geometrically complete (%s); waiting %.0f s",
                     uid, why, self.stable_seconds)
        return result

    def _read_released_headers(self, session: Session, receiving: Sequence[Series], released: Sequence[Series]) -> None:
        """Read the headers of the ``released`` series (every association that carried them was released, their
        headers not read at their present count) while they wait out their grace, so that their completion and the
        rules then read nothing; forget the reads of series no longer ``receiving`` (decided elsewhere)."""
        uids = {row.series_instance_uid for row in receiving}
        for uid in [uid for uid in self._headers if uid not in uids]:
            del self._headers[uid]
        for row in released:
            self._contiguous(session, row)

    def facts_for(self, series_uid: str, paths: Sequence[Path]) -> SeriesFacts | None:
        """The facts read for a series this assembler completed, if they were read from exactly ``paths`` (taken
        once); None otherwise (the rules then read the headers)."""
        read = self._completed.pop(series_uid, None)
        if read is None or read.paths != frozenset(str(p) for p in paths):
            return None
        return read.headers.facts

    def _all_spooled(self, session: Session, row: Series) -> bool:
        """Whether every acknowledged instance of the series has its spool file (else it is not evaluated)."""
        paths = session.scalars(select(Instance.path).where(Instance.series_instance_uid == row.series_instance_uid))
        missing = sum(1 for p in paths if not Path(p).exists())
        if missing and self._missing_logged.get(row.series_instance_uid) != missing:
            self._missing_logged[row.series_instance_uid] = missing
            LOG.warning("series %s: %d acknowledged instance(s) not in the spool yet; not evaluated until they are",
                        row.series_instance_uid, missing)
        return missing == 0

    def next_deadline(self, now: dt.datetime | None = None) -> float | None:
        """Seconds until the earliest receiving series may become complete (None when there is none)."""
        with self.sessions() as session:
            return self._deadline(session, now or utcnow())[0]

    def _deadline(self, session: Session, now: dt.datetime) -> tuple[float | None, list[Series], list[Series]]:
        """:meth:`next_deadline`, the receiving series, and those of them whose associations were all released
        and whose headers are not read at their present instance count."""
        rows = list(session.scalars(select(Series).where(Series.status == RECEIVING)))
        if not rows:
            return None, rows, []
        waits = []
        unread: list[Series] = []
        for row in rows:
            quiet_since = self._quiet_since(row)
            due = quiet_since + dt.timedelta(seconds=self.stable_seconds)
            known = self._headers.get(row.series_instance_uid)
            read = known is not None and known.instance_count == row.instance_count
            if read and not known.ok:
                pass  # released but not whole: stable_seconds applies
            elif self.release_grace_seconds is not None:
                released = self._released_at(session, row.series_instance_uid)
                if released is not None:  # the grace counts from the release too (as in _completion)
                    grace = dt.timedelta(seconds=self.release_grace_seconds)
                    due = min(due, max(quiet_since, released) + grace)
                    if not read:
                        unread.append(row)
            waits.append((due - now).total_seconds())
        return max(0.0, min(waits)), rows, unread

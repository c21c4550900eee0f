"""The outbox: the ``deliveries`` table of the audit database, and a ledger of what was delivered.

``enqueue_results`` puts each result object once per destination into the outbox; ``retry_deliveries`` sends
dead letters (``lpm-node outbox retry``) to the destinations configured now. Each delivered object is also noted
in a small ledger file per series beside the database (``delivered/``), so that re-indexing the spool never sends
a delivered result again. The :class:`~lpm_node.answer.sender.Sender` works the outbox off.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lpm_node.core.audit import Delivery, DeliveryAttempt, Series, as_utc, utcnow
from lpm_node.core.config import Settings
from lpm_node.core.destinations import Destination, result_destinations
from lpm_node.core.files import atomic_write
from lpm_node.core.states import DeliveryStatus

KINDS = ("SEG", "SR", "KEY", "KOS")


def _file_is_newer(path: Path, than: dt.datetime | None) -> bool:
    reference = as_utc(than)
    if reference is None:
        return True
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC) > reference
    except OSError:
        return False


def _requeue(row: Delivery, now: dt.datetime) -> None:
    row.status = DeliveryStatus.PENDING
    row.attempts = 0
    row.next_attempt_at = now
    row.queued_at = now
    row.sent_at = None


def enqueue_results(
    session: Session,
    *,
    job_id: int | None,
    series_instance_uid: str,
    objects: Sequence[tuple[str, Path, str]],
    destinations: Sequence[Destination],
) -> list[Delivery]:
    """Queue each ``(kind, path, SOPInstanceUID)`` for each destination (status "pending"); the caller commits.

    Idempotent: one row per (SOPInstanceUID, destination). A row that is still pending keeps its schedule
    (its path and job are updated). A sent or dead row is queued again, attempts reset, only when the object
    was written anew (another path, or a file newer than the row's last outcome), as when a series is
    re-processed with the same deterministic UIDs.
    """
    now = utcnow()
    rows: list[Delivery] = []
    for kind, path, sop_uid in objects:
        if kind not in KINDS:
            raise ValueError(f"unknown result kind {kind!r} (known: {', '.join(KINDS)})")
        file_path = Path(path).resolve()
        for destination in destinations:
            target = str(destination)
            row = session.scalars(
                select(Delivery)
                .where(Delivery.sop_instance_uid == sop_uid, Delivery.destination == target)
                .order_by(Delivery.id)
            ).first()
            if row is None:
                row = Delivery(
                    job_id=job_id,
                    series_instance_uid=series_instance_uid,
                    destination=target,
                    object_kind=kind,
                    sop_instance_uid=sop_uid,
                    path=str(file_path),
                    status=DeliveryStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    last_error="",
                    created_at=now,
                    queued_at=now,
                )
                session.add(row)
            else:
                if row.status != DeliveryStatus.PENDING:
                    reference = row.sent_at if row.status == DeliveryStatus.SENT else _last_attempt_at(session, row)
                    if row.path != str(file_path) or _file_is_newer(file_path, reference):
                        _requeue(row, now)
                        row.last_error = ""
                if row.status == DeliveryStatus.PENDING:
                    row.path = str(file_path)
                    row.object_kind = kind
                    row.series_instance_uid = series_instance_uid
                    if job_id is not None:
                        row.job_id = job_id
            rows.append(row)
    session.flush()
    return rows


def _last_attempt_at(session: Session, row: Delivery) -> dt.datetime:
    last = session.scalars(
        select(DeliveryAttempt.at).where(DeliveryAttempt.delivery_id == row.id).order_by(DeliveryAttempt.id.desc())
    ).first()
    return last or row.created_at


def series_delivery_status(session: Session, series_instance_uid: str) -> dict[str, int]:
    """Number of deliveries of a series per status (``{"sent": 3}``; empty when nothing was queued)."""
    counts: dict[str, int] = defaultdict(int)
    for status in session.scalars(select(Delivery.status).where(Delivery.series_instance_uid == series_instance_uid)):
        counts[status] += 1
    return dict(counts)


def _iso(value: dt.datetime | None) -> str | None:
    utc = as_utc(value)
    return utc.isoformat() if utc is not None else None


def delivery_dict(row: Delivery) -> dict[str, Any]:
    """One outbox row as plain JSON-ready values."""
    return {
        "id": row.id,
        "job_id": row.job_id,
        "series_instance_uid": row.series_instance_uid,
        "destination": row.destination,
        "kind": row.object_kind,
        "sop_instance_uid": row.sop_instance_uid,
        "path": row.path,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at) if row.status == DeliveryStatus.PENDING else None,
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
    }


# -- ledger -------------------------------------------------------------------------------------------------


def _ledger_file(ledger_dir: Path, series_instance_uid: str) -> Path:
    return Path(ledger_dir) / f"{series_instance_uid}.json"


def note_delivered(ledger_dir: Path, entry: dict[str, Any]) -> None:
    """Add one delivered object to its series' ledger file (outside the database, written atomically)."""
    path = _ledger_file(ledger_dir, entry["series_instance_uid"])
    found = delivered_results(ledger_dir, entry["series_instance_uid"])
    key = f"{entry['sop_instance_uid']}|{entry['destination']}"
    found[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(found, indent=1, sort_keys=True).encode())


def delivered_results(ledger_dir: Path, series_instance_uid: str) -> dict[str, dict[str, Any]]:
    """Objects of a series noted as delivered (``"SOP|destination" -> entry``); empty when none."""
    path = _ledger_file(ledger_dir, series_instance_uid)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- retry --------------------------------------------------------------------------------------------------


@dataclass
class RetryResult:
    """What ``outbox retry`` did: rows queued again where they were, and dead letters sent to new destinations."""

    requeued: list[int]
    redirected: dict[int, list[str]]  # old delivery id -> the destinations it now goes to


def _retry_targets(session: Session, row: Delivery, settings: Settings | None,
                   destinations: Sequence[Destination] | None) -> list[Destination]:
    """Where a retried row goes: ``destinations``, else those configured now, else where it was meant to go."""
    if destinations is not None:
        targets = list(destinations)
    elif settings is not None:
        series = session.scalars(select(Series).where(Series.series_instance_uid == row.series_instance_uid)).first()
        targets = result_destinations(settings, calling_ae=series.calling_ae if series else "",
                                      calling_address=series.calling_address if series else "")
    else:
        targets = []
    return targets or [Destination.parse(row.destination)]


def retry_deliveries(
    session: Session,
    ids: Sequence[int] | None = None,
    now: dt.datetime | None = None,
    *,
    settings: Settings | None = None,
    destinations: Sequence[Destination] | None = None,
) -> RetryResult:
    """Send dead deliveries (or the given ones, whatever their status) again, attempts reset.

    Each goes to ``destinations`` when given, else to the destinations configured now in ``settings`` (with the
    CT's sender when ``reply_to_sender``). A row whose destination is among them is queued again; any other is
    marked ``redirected`` and its object queued for each current destination (one already delivered there is not
    sent again). When no destination is configured (or neither is given), a row is queued again where it was."""
    now = as_utc(now) or utcnow()
    query = select(Delivery).order_by(Delivery.id)
    query = query.where(Delivery.id.in_(list(ids))) if ids else query.where(Delivery.status == DeliveryStatus.DEAD)
    result = RetryResult([], {})
    for row in session.scalars(query).all():
        targets = _retry_targets(session, row, settings, destinations)
        if row.destination in {str(t) for t in targets}:
            _requeue(row, now)
            result.requeued.append(row.id)
            others = [t for t in targets if str(t) != row.destination]
            if not others:
                continue
        else:
            others = targets
            row.status = DeliveryStatus.REDIRECTED.value
            row.last_error = f"{row.last_error}; redirected to {', '.join(map(str, others))}".lstrip("; ")
        new_rows = enqueue_results(session, job_id=row.job_id, series_instance_uid=row.series_instance_uid,
                                   objects=[(row.object_kind, Path(row.path), row.sop_instance_uid)],
                                   destinations=others)
        for new in new_rows:
            if new.status == DeliveryStatus.DEAD:
                _requeue(new, now)
        if row.status == DeliveryStatus.REDIRECTED:
            result.redirected[row.id] = [str(t) for t in others]
    session.flush()
    return result

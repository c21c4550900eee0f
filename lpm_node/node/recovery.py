"""What an operator does to put things right: re-run series, suspend or resume measuring, and rebuild the audit
index from the spool.

A re-run puts a series back to ``complete``: the node's rules evaluate it again and queue a new job (the earlier
jobs stay in the audit). Re-indexing adds the spooled instances the database does not know; a series whose
results the delivery ledger records as delivered is marked done, not measured nor sent again.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from lpm_node.answer.sending import delivered_results
from lpm_node.core.audit import (
    Delivery,
    Series,
    operator_name,
    record_operator_action,
    session_factory,
    set_measuring_suspended,
)
from lpm_node.core.config import Settings
from lpm_node.core.states import DeliveryStatus, SeriesStatus
from lpm_node.intake.series import reconcile_spool, record_decision
from lpm_node.intake.spool import Spool

LOG = logging.getLogger(__name__)

NOT_RERUNNABLE = {
    SeriesStatus.RECEIVING: "still receiving: it is evaluated once complete",
    SeriesStatus.COMPLETE: "already waiting for the rules",
    SeriesStatus.QUEUED: "already queued",
    SeriesStatus.PROCESSING: "being measured now",
}


def rerun_series(session: Session, series_uid: str, command: str, user: str | None = None) -> tuple[bool, str]:
    """Put one series back to ``complete`` so that it is evaluated and measured again; audited (as ``user`` when
    given, else the login running this). (done, why)."""
    row = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
    if row is None:
        outcome = (False, "no such series")
    elif row.status in NOT_RERUNNABLE:
        outcome = (False, f"not re-run: {NOT_RERUNNABLE[SeriesStatus(row.status)]}")
    else:
        was = row.status
        who = f" {user}" if user else ""
        record_decision(session, row, SeriesStatus.COMPLETE, f"re-run requested by the operator{who} (was {was}: "
                        f"{row.reason})")
        outcome = (True, f"re-queued (was {was})")
    record_operator_action(session, command, series_uid, outcome[1], user=user)
    return outcome


def suspend_measuring(session: Session, suspended: bool, command: str, user: str | None = None) -> str:
    """Suspend or resume measuring on every process of the node (queued jobs wait, in the embedded queue or in the
    job engine's; receiving and sending go on); audited as ``user`` when given, else the login running this.
    Returns what happened; the caller commits."""
    set_measuring_suspended(session, suspended, user or operator_name())
    message = "measuring suspended: queued jobs wait" if suspended else "measuring resumed"
    record_operator_action(session, command, "measuring", message, user=user)
    return message


def failed_series(session: Session) -> list[str]:
    """UIDs of the series whose last job failed."""
    return list(session.scalars(select(Series.series_instance_uid).where(Series.status == SeriesStatus.FAILED)
                                .order_by(Series.id)))


@dataclass
class ReindexResult:
    instances: int = 0
    delivered_series: list[str] = field(default_factory=list)  # marked done from the ledger, not measured again


def reindex(settings: Settings, command: str) -> ReindexResult:
    """Index every spooled instance the audit database lacks; series already delivered stay done. Audited."""
    sessions = session_factory(settings.db_url)
    spool = Spool(settings.spool_path)
    result = ReindexResult()
    try:
        with sessions() as session:
            before = set(session.scalars(select(Series.series_instance_uid)))
        result.instances = reconcile_spool(sessions, spool)
        with sessions() as session:
            for row in session.scalars(select(Series).where(Series.series_instance_uid.not_in(before))):
                ledger = delivered_results(settings.delivered_path, row.series_instance_uid)
                if not ledger:
                    continue
                _restore_deliveries(session, ledger)
                where = sorted({e["destination"] for e in ledger.values()})
                record_decision(session, row, SeriesStatus.DONE,
                                f"re-indexed from the spool: {len(ledger)} result object(s) were delivered before "
                                f"(to {', '.join(where)}); not measured nor sent again "
                                f"(`lpm-node rerun --series {row.series_instance_uid}` measures it again)")
                result.delivered_series.append(row.series_instance_uid)
            record_operator_action(session, command, str(settings.spool_path),
                                   f"{result.instances} instance(s) indexed; {len(result.delivered_series)} series "
                                   "already delivered kept done")
            session.commit()
    finally:
        spool.close()
        sessions.kw["bind"].dispose()
    return result


def _restore_deliveries(session: Session, ledger: dict[str, dict]) -> None:
    """Put the delivered objects back in the outbox as sent, so that nothing queues them again."""
    for entry in ledger.values():
        exists = session.scalars(select(Delivery.id).where(Delivery.sop_instance_uid == entry["sop_instance_uid"],
                                                           Delivery.destination == entry["destination"])).first()
        if exists:
            continue
        sent_at = dt.datetime.fromisoformat(entry["sent_at"])
        session.add(Delivery(series_instance_uid=entry["series_instance_uid"], destination=entry["destination"],
                             object_kind=entry["kind"], sop_instance_uid=entry["sop_instance_uid"], path="",
                             status=DeliveryStatus.SENT.value, attempts=1, created_at=sent_at, sent_at=sent_at,
                             last_error="restored from the delivery ledger by a re-index"))

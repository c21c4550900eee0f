"""What an admin does from the console, through the same functions as ``lpm-node rerun`` and ``outbox retry``.

Each action is audited as an operator action with the signed-in operator's name."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from lpm_node.answer.outbox import retry_deliveries
from lpm_node.core.audit import record_operator_action, set_measuring_suspended
from lpm_node.core.config import Settings
from lpm_node.core.destinations import Destination
from lpm_node.node.recovery import rerun_series


@dataclass
class Outcome:
    ok: bool
    message: str


def measure_again(session: Session, series_uid: str, user: str) -> Outcome:
    """Evaluate and measure a series again (``lpm-node rerun --series``); audited."""
    done, why = rerun_series(session, series_uid, "console: measure again", user=user)
    session.commit()
    return Outcome(done, why)


def retry_dead_letters(session: Session, settings: Settings, user: str, ids: list[int] | None = None,
                       destination: str = "") -> Outcome:
    """Send dead letters again (``lpm-node outbox retry [--id N] [--destination D]``): the given ones or all of
    them, to ``destination`` or the destinations configured now; audited."""
    explicit = [Destination.parse(destination)] if destination else None
    result = retry_deliveries(session, ids or None, settings=settings, destinations=explicit)
    touched = set(result.requeued) | set(result.redirected)
    missing = sorted(set(ids or []) - touched)
    lines = [f"requeued {len(result.requeued)} deliveries"
             + (f": {', '.join(map(str, result.requeued))}" if result.requeued else "")]
    lines += [f"delivery {old} redirected to {', '.join(to)}" for old, to in result.redirected.items()]
    if missing:
        lines.append(f"unknown delivery ids: {', '.join(map(str, missing))}")
    command = "console: retry " + (f"deliveries {', '.join(map(str, ids))}" if ids else "all dead letters")
    if destination:
        command += f" to {destination}"
    record_operator_action(session, command, ", ".join(map(str, ids or [])) or "dead letters", "; ".join(lines),
                           user=user)
    session.commit()
    return Outcome(bool(touched) and not missing, "; ".join(lines))


def suspend_measuring(session: Session, suspended: bool, user: str) -> Outcome:
    """Suspend or resume measuring (queued jobs wait meanwhile; receiving and sending go on); audited."""
    set_measuring_suspended(session, suspended, user)
    message = "measuring suspended: queued jobs wait" if suspended else "measuring resumed"
    record_operator_action(session, "console: " + ("suspend" if suspended else "resume") + " measuring",
                           "measuring", message, user=user)
    session.commit()
    return Outcome(True, message)

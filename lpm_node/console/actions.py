"""What an admin does from the console, through the same functions as ``lpm-node rerun``, ``outbox retry`` and
``measuring suspend|resume``.

Each action is audited as an operator action with the signed-in operator's name."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from lpm_node.answer.sending import retry_deliveries
from lpm_node.core.audit import record_operator_action
from lpm_node.core.config import Destination, Settings
from lpm_node.node.recovery import rerun_series
from lpm_node.node.recovery import suspend_measuring as suspend_or_resume


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
    """Suspend or resume measuring (``lpm-node measuring suspend|resume``); audited."""
    message = suspend_or_resume(session, suspended, "console: " + ("suspend" if suspended else "resume")
                                + " measuring", user=user)
    session.commit()
    return Outcome(True, message)

"""``lpm-node outbox list|retry``: the deliveries, and dead letters sent again to the destinations configured now."""

from __future__ import annotations

import argparse
import json
from typing import Any

from sqlalchemy import select

from lpm_node.answer.outbox import delivery_dict, retry_deliveries
from lpm_node.cli.recovery import command_line
from lpm_node.core.audit import Delivery, record_operator_action, session_factory
from lpm_node.core.config import Settings
from lpm_node.core.destinations import Destination


def outbox_command(settings: Settings, args: argparse.Namespace) -> int:
    """``lpm-node outbox list|retry``: show the outbox, or requeue dead (or given) deliveries.

    A retry sends each dead letter to the destinations configured now (``--destination`` overrides them); a
    letter whose destination is no longer configured is marked ``redirected``. Every retry is audited."""
    sessions = session_factory(settings.db_url)
    ids = list(getattr(args, "id", None) or [])
    as_json = bool(getattr(args, "json", False))
    explicit = [Destination.parse(d) for d in getattr(args, "retry_to", None) or []] or None
    with sessions() as session, session.begin():
        if args.action == "list":
            query = select(Delivery).order_by(Delivery.id)
            if ids:
                query = query.where(Delivery.id.in_(ids))
            rows = [delivery_dict(r) for r in session.scalars(query).all()]
            if as_json:
                print(json.dumps(rows, indent=2))
            else:
                print_outbox_table(rows)
            return 0
        result = retry_deliveries(session, ids, settings=settings, destinations=explicit)
        touched = set(result.requeued) | set(result.redirected)
        missing = sorted(set(ids) - touched)
        summary = (f"requeued {len(result.requeued)} deliveries"
                   + (f": {', '.join(map(str, result.requeued))}" if result.requeued else ""))
        lines = [summary]
        lines += [f"delivery {old} redirected to {', '.join(to)}" for old, to in result.redirected.items()]
        if missing:
            lines.append(f"unknown delivery ids: {', '.join(map(str, missing))}")
        record_operator_action(session, command_line(), ", ".join(map(str, ids)) or "dead letters",
                               "; ".join(lines))
    if as_json:
        print(json.dumps({"requeued": result.requeued, "redirected": result.redirected,
                          "unknown_ids": missing}))
    else:
        print("\n".join(lines))
    return 1 if missing else 0


def print_outbox_table(rows: list[dict[str, Any]]) -> None:
    """The deliveries as a table: id, status, kind, attempts, destination, next attempt, last error."""
    if not rows:
        print("outbox is empty")
        return
    header = f"{'id':>5}  {'status':<8} {'kind':<4} {'att':>3}  {'destination':<32} {'next attempt':<25} last error"
    print(header)
    for r in rows:
        print(
            f"{r['id']:>5}  {r['status']:<8} {r['kind']:<4} {r['attempts']:>3}  {r['destination']:<32} "
            f"{(r['next_attempt_at'] or '-'):<25} {r['last_error'] or '-'}"
        )

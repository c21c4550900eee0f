"""``lpm-node outbox list|retry``: the deliveries, and dead letters sent again."""

from __future__ import annotations

import argparse
import json

from sqlalchemy import select

from lpm_node.answer.sending import _print_table, delivery_dict, retry_deliveries
from lpm_node.core.audit import Delivery, session_factory
from lpm_node.core.config import Settings


def outbox_command(settings: Settings, args: argparse.Namespace) -> int:
    """``lpm-node outbox list|retry``: show the outbox, or requeue dead (or given) deliveries."""
    sessions = session_factory(settings.db_url)
    ids = list(getattr(args, "id", None) or [])
    as_json = bool(getattr(args, "json", False))
    with sessions() as session, session.begin():
        if args.action == "list":
            query = select(Delivery).order_by(Delivery.id)
            if ids:
                query = query.where(Delivery.id.in_(ids))
            rows = [delivery_dict(r) for r in session.scalars(query).all()]
            if as_json:
                print(json.dumps(rows, indent=2))
            else:
                _print_table(rows)
            return 0
        requeued = retry_deliveries(session, ids)
        missing = sorted(set(ids) - set(requeued))
    if as_json:
        print(json.dumps({"requeued": requeued, "unknown_ids": missing}))
    else:
        print(f"requeued {len(requeued)} deliveries" + (f": {', '.join(map(str, requeued))}" if requeued else ""))
        if missing:
            print(f"unknown delivery ids: {', '.join(map(str, missing))}")
    return 1 if missing else 0

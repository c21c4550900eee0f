"""``lpm-node rerun``, ``measuring suspend|resume`` and ``reindex``: an operator puts things right; each action is
audited."""

from __future__ import annotations

import argparse
import shlex
import sys

from lpm_node.core.audit import session_factory
from lpm_node.core.config import Settings
from lpm_node.node.preflight import audit_instance_count
from lpm_node.node.recovery import failed_series, reindex, rerun_series, suspend_measuring


def command_line() -> str:
    """The command as the operator typed it (for the audit)."""
    return "lpm-node " + shlex.join(sys.argv[1:])


def rerun_command(settings: Settings, args: argparse.Namespace) -> int:
    """Re-queue ``--series UID`` (repeatable) and, with ``--failed``, every failed series."""
    if audit_instance_count(settings.db_url) is None:
        raise FileNotFoundError(f"no audit database at {settings.db_url} (check --data-dir)")
    sessions = session_factory(settings.db_url)
    problems = 0
    try:
        with sessions() as session:
            targets = list(args.series or [])
            if args.failed:
                targets += [uid for uid in failed_series(session) if uid not in targets]
            if not targets:
                print("nothing to re-run" + (" (no failed series)" if args.failed else ""))
            for uid in targets:
                done, why = rerun_series(session, uid, command_line())
                print(f"{uid}: {why}")
                problems += not done
            session.commit()
    finally:
        sessions.kw["bind"].dispose()
    return 1 if problems else 0


def measuring_command(settings: Settings, args: argparse.Namespace) -> int:
    """Suspend or resume measuring on the running node (the console's queues page does the same)."""
    if audit_instance_count(settings.db_url) is None:
        raise FileNotFoundError(f"no audit database at {settings.db_url} (check --data-dir)")
    sessions = session_factory(settings.db_url)
    try:
        with sessions() as session:
            print(suspend_measuring(session, args.action == "suspend", command_line()))
            session.commit()
    finally:
        sessions.kw["bind"].dispose()
    return 0


def reindex_command(settings: Settings, _args: argparse.Namespace) -> int:
    """Rebuild the audit index from the spool (the node must be stopped)."""
    result = reindex(settings, command_line())
    print(f"indexed {result.instances} spooled instance(s) missing from the audit database")
    for uid in result.delivered_series:
        print(f"{uid}: results were delivered before; kept done (not measured nor sent again)")
    return 0

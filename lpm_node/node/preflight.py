"""Checks before the node starts: room on the disk, and no silent reset of the audit beside a filled spool.

Each failure is a :class:`StartRefused` whose message is one line for the operator (``lpm-node serve`` prints it
and exits with status 2).
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, inspect, text

from lpm_node.core.config import Settings
from lpm_node.core.files import atomic_write


class StartRefused(Exception):
    """The node must not start; the message says why and what to do."""


START_NEEDS_MB = 16  # room for the audit database and its write-ahead log, and a first instance, at start


def check_disk(settings: Settings) -> None:
    """Refuse to start when the data folder cannot be written or its disk lacks the room start needs.

    Below ``min_free_disk_mb`` the node still starts (it answers C-STOREs "out of resources" until there is
    room); it does not when even its own start would run out of space."""
    data = settings.data_path
    try:
        data.mkdir(parents=True, exist_ok=True)
        atomic_write(data / ".write-check", b"ok\n")
        (data / ".write-check").unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StartRefused(f"the disk of the data folder {data} is full ({exc.strerror}); free space "
                               "and start again") from None
        raise StartRefused(f"the data folder {data} cannot be written: {exc.strerror or exc}") from None
    free_mb = shutil.disk_usage(data).free / 2**20
    need = START_NEEDS_MB
    if free_mb < need:
        raise StartRefused(f"the disk of the data folder {data} is full: {free_mb:.0f} MB free, the start needs "
                           f"{need:.0f} MB; free space and start again")


def _spool_has_files(spool: Path) -> bool:
    return spool.is_dir() and next(spool.rglob("*.dcm"), None) is not None


def audit_instance_count(url: str) -> int | None:
    """Instances recorded in the audit database at ``url``; None when it is missing, empty or has no tables.

    A database with the node's tables and no instance yet (made at a start, then a crash before the first rows
    were written) counts 0: it is the node's own, not a reset one.

    Reads without creating anything (a SQLite file is opened read-only)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file() or path.stat().st_size == 0:
            return None
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                return int(con.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
            finally:
                con.close()
        except sqlite3.DatabaseError:  # no such table, or not a database at all
            return None
    engine = create_engine(url, future=True)
    try:
        if not inspect(engine).has_table("instances"):
            return None
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM instances")).scalar_one())
    finally:
        engine.dispose()


def check_audit_beside_spool(settings: Settings) -> None:
    """Refuse to start when the audit database is missing or empty but the spool holds instances.

    Starting anyway would take every spooled series for new: measured and sent again, its history gone."""
    if audit_instance_count(settings.db_url) is not None:
        return
    if not _spool_has_files(settings.spool_path):
        return
    where = settings.db_url.removeprefix("sqlite:///")
    raise StartRefused(
        f"the audit database {where} is missing or empty but the spool {settings.spool_path} holds instances; "
        "refusing to start (restore the database, or run `lpm-node reindex` to rebuild it from the spool)"
    )


def preflight(settings: Settings) -> None:
    """Every check before ``serve`` opens anything; raises :class:`StartRefused`."""
    check_disk(settings)
    check_audit_beside_spool(settings)

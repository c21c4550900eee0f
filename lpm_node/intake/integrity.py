"""Checksums end to end: a spooled file is measured only when it is still what was received."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import Instance
from lpm_node.intake.spool import verify_checksum


def verify_series_files(sessions: sessionmaker, paths: Sequence[Path]) -> None:
    """Check each file against the SHA-256 recorded at receipt; raises ChecksumMismatch on the first mismatch."""
    with sessions() as session:
        recorded = {path: checksum for path, checksum in session.execute(
            select(Instance.path, Instance.checksum).where(Instance.path.in_([str(p) for p in paths])))}
    for path in paths:
        verify_checksum(path, recorded.get(str(path)))

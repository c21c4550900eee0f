"""Checksums end to end: a spooled file is measured only when it is still what was received."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import Instance
from lpm_node.core.files import file_checksum
from lpm_node.intake.spool import ChecksumMismatch


def verify_series_files(sessions: sessionmaker, paths: Sequence[Path]) -> dict[str, str]:
    """Check each file against the SHA-256 recorded at receipt (raises ChecksumMismatch on the first mismatch);
    returns each file's SHA-256 by path, for the answer's content identity."""
    with sessions() as session:
        recorded = {path: checksum for path, checksum in session.execute(
            select(Instance.path, Instance.checksum).where(Instance.path.in_([str(p) for p in paths])))}
    checksums: dict[str, str] = {}
    for path in paths:
        actual = file_checksum(path)
        expected = recorded.get(str(path))
        if expected and actual != expected:
            raise ChecksumMismatch(f"checksum mismatch in spooled file {Path(path).name}: recorded {expected[:12]}…, "
                                   f"now {actual[:12]}…")
        checksums[str(path)] = actual
    return checksums

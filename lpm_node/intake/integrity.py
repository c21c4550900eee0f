"""Checksums end to end: a spooled file is measured only when it is still what was received."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import Instance
from lpm_node.intake.spool import ChecksumMismatch


def recorded_checksums(sessions: sessionmaker, paths: Sequence[Path]) -> dict[str, str]:
    """The SHA-256 recorded at receipt of each of ``paths`` that the audit knows, by path."""
    with sessions() as session:
        return {path: checksum for path, checksum in session.execute(
            select(Instance.path, Instance.checksum).where(Instance.path.in_([str(p) for p in paths]))) if checksum}


def check_checksums(recorded: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Raise :class:`ChecksumMismatch` on the first file whose ``actual`` SHA-256 (by path, of the bytes that were
    read) differs from the one ``recorded`` at receipt."""
    for path, checksum in actual.items():
        expected = recorded.get(str(path))
        if expected and checksum != expected:
            raise ChecksumMismatch(f"checksum mismatch in spooled file {Path(path).name}: recorded {expected[:12]}…, "
                                   f"now {checksum[:12]}…")

"""The spool's write-ahead journal: crash recovery, torn records, checkpoints, fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lpm_node.intake.journal import Journal, JournalInUse
from lpm_node.intake.spool import Spool

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _payload(i: int, size: int = 200_000) -> bytes:
    return bytes([i % 251]) * 100 + os.urandom(size)


def _relpath(i: int) -> str:
    return f"{STUDY}/{SERIES}/1.2.3.4.{i}.dcm"


def _journal_in_child(folder: Path, payloads: dict[int, bytes]) -> None:
    """Append records in another process that then dies at once (no spool file is ever written)."""
    data = folder.parent / "payloads"
    data.mkdir(exist_ok=True)
    for i, p in payloads.items():
        (data / str(i)).write_bytes(p)
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from lpm_node.intake.journal import Journal
        j = Journal(Path({str(folder)!r}), segment_bytes=1 << 20, segments=4)
        j.recover()
        j.prepare(background=False)
        for i in {sorted(payloads)!r}:
            j.append("{STUDY}/{SERIES}/1.2.3.4." + str(i) + ".dcm", [Path({str(data)!r}, str(i)).read_bytes()])
        os._exit(9)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 9


def test_instances_journalled_before_a_crash_reach_the_spool_at_restart(tmp_path):
    payloads = {i: _payload(i) for i in range(5)}
    _journal_in_child(tmp_path / "journal", payloads)
    assert not (tmp_path / "spool").exists()
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    try:
        for i, p in payloads.items():
            assert (tmp_path / "spool" / _relpath(i)).read_bytes() == p
        assert spool.used_bytes == sum(len(p) for p in payloads.values())
    finally:
        spool.close()
    # written once: a second start finds nothing to replay
    again = Journal(tmp_path / "journal", segment_bytes=1 << 20, segments=4)
    try:
        assert again.recover() == []
    finally:
        again.close()


def test_a_torn_last_record_is_not_replayed(tmp_path):
    payloads = {i: _payload(i) for i in range(3)}
    _journal_in_child(tmp_path / "journal", payloads)
    segment = tmp_path / "journal" / "segment-0.wal"
    journal = Journal(tmp_path / "journal", segment_bytes=1 << 20, segments=4)
    last = journal.recover()[-1]
    journal.close()
    with open(segment, "r+b") as f:  # the last record's final page never reached the disk
        f.seek(last.offset + last.length - 4096)
        f.write(b"\0" * 4096)
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    try:
        assert (tmp_path / "spool" / _relpath(0)).read_bytes() == payloads[0]
        assert (tmp_path / "spool" / _relpath(1)).read_bytes() == payloads[1]
        assert not (tmp_path / "spool" / _relpath(2)).exists()
    finally:
        spool.close()


def test_written_instances_are_not_replayed_after_removal(tmp_path):
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    stored = [spool.store(STUDY, SERIES, f"1.2.3.4.{i}", [_payload(i)]) for i in range(4)]
    assert all(s.sync_s >= 0 and not s.duplicate for s in stored)
    assert spool.flush(timeout=30)
    assert all(s.path.exists() for s in stored)
    spool.close()
    stored[0].path.unlink()  # e.g. removed by the administrator after processing
    reopened = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    try:
        assert not stored[0].path.exists()
        assert all(s.path.exists() for s in stored[1:])
    finally:
        reopened.close()


def test_duplicates_while_journalled_and_series_files_wait_for_the_writer(tmp_path):
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    try:
        assert spool.journal is not None and spool.journal.wait_ready()
        first = spool.store(STUDY, SERIES, "1.2.3.4.1", [b"x" * 5000])
        again = spool.store(STUDY, SERIES, "1.2.3.4.1", [b"y" * 10])
        assert not first.duplicate and again.duplicate
        files = spool.series_files(STUDY, SERIES)  # waits until the journalled file is written
        assert files == [first.path] and first.path.read_bytes() == b"x" * 5000
    finally:
        spool.close()


def test_more_than_the_journal_holds_goes_through_in_order(tmp_path):
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=1)  # 4 x 256 kB
    try:
        assert spool.journal is not None and spool.journal.wait_ready()
        payloads = {i: _payload(i, 150_000) for i in range(30)}
        big = _payload(99, 600_000)  # larger than a segment: written directly
        for i, p in payloads.items():
            spool.store(STUDY, SERIES, f"1.2.3.4.{i}", [p])
        spool.store(STUDY, SERIES, "1.2.3.4.99", [big[:1000], big[1000:]])
        assert spool.flush(timeout=60)
        for i, p in payloads.items():
            assert (tmp_path / "spool" / _relpath(i)).read_bytes() == p
        assert (tmp_path / "spool" / _relpath(99)).read_bytes() == big
    finally:
        spool.close()


def test_a_removed_series_folder_is_made_again(tmp_path):
    import shutil

    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=4)
    try:
        spool.store(STUDY, SERIES, "1.2.3.4.1", [b"a" * 100])
        assert spool.flush(timeout=30)
        shutil.rmtree(tmp_path / "spool" / STUDY)
        spool.store(STUDY, SERIES, "1.2.3.4.2", [b"b" * 100])
        assert spool.flush(timeout=30)
        assert (tmp_path / "spool" / _relpath(2)).read_bytes() == b"b" * 100
    finally:
        spool.close()


def test_one_journal_one_process(tmp_path):
    first = Journal(tmp_path / "journal")
    try:
        with pytest.raises(JournalInUse, match="in use by another lpm-node process"):
            Journal(tmp_path / "journal")
    finally:
        first.close()
    Journal(tmp_path / "journal").close()  # free again once closed


def test_records_survive_a_change_of_journal_size(tmp_path):
    payloads = {i: _payload(i) for i in range(3)}
    _journal_in_child(tmp_path / "journal", payloads)  # 1 MB segments
    spool = Spool(tmp_path / "spool", journal_dir=tmp_path / "journal", journal_mb=16)  # now 4 MB segments
    try:
        for i, p in payloads.items():
            assert (tmp_path / "spool" / _relpath(i)).read_bytes() == p
        assert spool.journal is not None and spool.journal.wait_ready()
        assert all(p.stat().st_size == 4 << 20 for p in (tmp_path / "journal").glob("segment-*.wal"))
        spool.store(STUDY, SERIES, "1.2.3.4.7", [b"z" * 3000])
        assert spool.flush(timeout=30)
        assert (tmp_path / "spool" / _relpath(7)).read_bytes() == b"z" * 3000
    finally:
        spool.close()

"""Nothing acknowledged is lost or measured half: the audit row is part of durability, the data folder is watched,
and each spooled file is checked against the checksum recorded at receipt."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import event, select

from lpm_node.core.audit import Instance, session_factory
from lpm_node.core.config import Settings
from lpm_node.core.files import file_checksum
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.loading import load_series
from lpm_node.intake.integrity import check_checksums, recorded_checksums
from lpm_node.intake.listener import Listener
from lpm_node.intake.spool import STALE_TEMPORARY_SECONDS, ChecksumMismatch, Spool
from tests.support_net import REPO, NodeProcess, echoscu, free_port, have_dcmtk, storescu

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[Path]:
    return write_ct_series(make_phantom(n_slices=6, size=64, pixel_spacing=5.6), tmp_path_factory.mktemp("small"))


def test_unwritable_database_answers_out_of_resources_until_it_can_be_written(tmp_path, small):
    settings = Settings()
    settings.node.data_dir = str(tmp_path / "data")
    settings.node.port = free_port()
    settings.node.min_free_disk_mb = 0
    sessions = session_factory(settings.db_url)
    engine = sessions.kw["bind"]
    listener = Listener(settings, sessions)
    listener.start()
    try:
        assert storescu(settings.node.port, small[:2]).returncode == 0

        def read_only(dbapi_connection, _record) -> None:  # noqa: ANN001
            dbapi_connection.execute("PRAGMA query_only = 1")  # SQLite refuses every write from now on

        event.listen(engine, "connect", read_only)
        engine.dispose()
        refused = storescu(settings.node.port, small[2:4], extra=["-v", "--no-halt"])
        assert refused.stdout.count("Refused: OutOfResources") + refused.stderr.count("Refused: OutOfResources") == 2
        assert not listener.recorder.healthy and "readonly" in listener.recorder.last_error.lower()

        event.remove(engine, "connect", read_only)
        engine.dispose()
        assert storescu(settings.node.port, small[2:]).returncode == 0
        assert listener.recorder.flush(10)
        with sessions() as session:
            rows = set(session.scalars(select(Instance.sop_instance_uid)))
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small}
        assert rows == sent  # every instance has its row, the refused ones too once they came again
        spooled = {p.stem for p in (tmp_path / "data" / "spool").rglob("*.dcm")}
        assert spooled == sent
    finally:
        listener.stop()
        engine.dispose()


def test_doctor_reports_a_database_that_cannot_be_written(tmp_path):
    db = tmp_path / "audit.sqlite"
    session_factory(f"sqlite:///{db}").kw["bind"].dispose()
    config = tmp_path / "ro.toml"
    config.write_text(f'[node]\ndatabase_url = "sqlite:///file:{db}?mode=ro&uri=true"\n')
    out = subprocess.run([sys.executable, "-m", "lpm_node.cli", "doctor", "--config", str(config), "--data-dir",
                          str(tmp_path / "data")], cwd=REPO, capture_output=True, text=True, timeout=120)
    line = next(x for x in out.stdout.splitlines() if x.split()[1:2] == ["database"])
    assert "cannot be written" in line and "0xA700" in line, out.stdout


def test_deleted_spool_folder_refuses_instead_of_acknowledging(tmp_path, small):
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, small[:2]).returncode == 0
        shutil.rmtree(node.data_dir / "spool")
        refused = storescu(node.port, small[2:4], extra=["-v", "--no-halt"])
        assert (refused.stdout + refused.stderr).count("Refused: OutOfResources") == 2
        assert not (node.data_dir / "spool").exists()  # nothing acknowledged into a folder made up again
        assert echoscu(node.port).returncode == 0
        (node.data_dir / "spool").mkdir()  # the administrator puts it back
        time.sleep(0.2)
        assert storescu(node.port, small[2:4]).returncode == 0
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 2
    assert "spool folder" in node.log() and "ERROR" in node.log()


def test_checksum_is_recorded_at_receipt_and_a_flipped_byte_is_caught(tmp_path, small):
    with NodeProcess(tmp_path / "node") as node:
        assert storescu(node.port, small).returncode == 0
        rows = node.wait_rows("SELECT path, checksum FROM instances", until=lambda r: len(r) == len(small))
    assert all(len(r["checksum"]) == 64 for r in rows)
    sessions = session_factory(f"sqlite:///{node.db_path}")
    paths = sorted(Path(r["path"]) for r in rows)
    recorded = recorded_checksums(sessions, paths)
    assert recorded == {r["path"]: r["checksum"] for r in rows}
    loaded = load_series(paths, checksums=True)  # the loader hashes the very bytes it parses
    assert loaded.checksums == {str(p): file_checksum(p) for p in paths}
    check_checksums(recorded, loaded.checksums)  # untouched: passes
    victim = paths[len(paths) // 2]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01  # one bit of pixel data
    victim.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match=victim.name):
        check_checksums(recorded, load_series(paths, checksums=True).checksums)
    sessions.kw["bind"].dispose()


def test_a_flipped_byte_fails_the_job_with_that_reason(tmp_path):
    chest = write_ct_series(make_phantom(n_slices=64, size=96, pixel_spacing=3.8), tmp_path / "chest")
    series_uid = str(dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
    node = NodeProcess(tmp_path / "node", stable_seconds=1)
    with node:
        assert storescu(node.port, chest).returncode == 0
        node.wait_series_status(series_uid, ["queued"])
    victim = sorted((node.data_dir / "spool").rglob("*.dcm"))[10]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x80
    victim.write_bytes(bytes(data))
    node.measure = True
    with node:
        row = node.wait_series_status(series_uid, ["failed"], timeout=180)
        assert "checksum mismatch" in row["reason"] and victim.name in row["reason"]
        jobs = node.query("SELECT status, error FROM jobs")
        assert [j["status"] for j in jobs] == ["failed"] and "ChecksumMismatch" in jobs[0]["error"]


def test_retired_journal_setting_is_a_warning_not_a_crash(tmp_path):
    config = tmp_path / "old.toml"
    config.write_text("[node]\njournal_mb = 256\n")
    (tmp_path / "node" / "journal").mkdir(parents=True)
    with NodeProcess(tmp_path / "node", config=config) as node:
        assert echoscu(node.port).returncode == 0
    log = node.log()
    assert "node.journal_mb is no longer used" in log
    assert not (tmp_path / "node" / "journal").exists()


def test_spool_adopt_is_durable_and_keeps_duplicates(tmp_path):
    spool = Spool(tmp_path / "spool")
    received = spool.incoming / "tmp1.dcm"
    received.write_bytes(b"x" * 1000)
    stored = spool.adopt(received, "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert not stored.duplicate and stored.path.read_bytes() == b"x" * 1000 and not received.exists()
    again = spool.incoming / "tmp2.dcm"
    again.write_bytes(b"y" * 10)
    assert spool.adopt(again, "1.2.3", "1.2.3.4", "1.2.3.4.5").duplicate
    assert stored.path.read_bytes() == b"x" * 1000


def test_a_start_removes_only_temporaries_no_transfer_is_writing(tmp_path):
    """The data folder may be shared: a process starting (any role) must not delete the temporaries another
    receiver is writing now, only those left untouched by an interrupted write."""
    spool = Spool(tmp_path / "spool")
    other = spool.incoming.parent / "other-host-42"  # another machine's receiver, writing now
    other.mkdir()
    live = other / "tmp-live.dcm"
    live.write_bytes(b"x" * 100)
    left = spool.incoming / "tmp-left.dcm"
    left.write_bytes(b"y" * 100)
    old = time.time() - STALE_TEMPORARY_SECONDS - 5
    os.utime(left, (old, old))
    crashed = spool.incoming.parent / f"{socket.gethostname()}-99999999"  # a process of this machine, gone
    crashed.mkdir()
    (crashed / "tmp-cut.dcm").write_bytes(b"z" * 100)
    Spool(tmp_path / "spool")  # another process starts on the same folder
    assert live.exists() and not left.exists()
    assert not crashed.exists()  # its writer is gone: removed at once

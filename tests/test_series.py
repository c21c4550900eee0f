"""Series assembly: completion after stable_seconds, and recovery after a crash (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import delete, select

from lpm_node.core.audit import Association, Instance, Job, Series, SeriesDecision, as_utc, utcnow
from lpm_node.core.config import RuleSettings
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.intake import rules as rules_module
from lpm_node.intake import series as series_module
from lpm_node.intake.rules import RuleEngine
from lpm_node.intake.series import SeriesAssembler, reconcile_spool
from lpm_node.intake.spool import Spool
from tests.support_net import NodeProcess, have_dcmtk, storescu


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> list[Path]:
    return write_ct_series(make_phantom(n_slices=64), tmp_path_factory.mktemp("chest"))


def test_completion_waits_for_stable_seconds(audit_sessions):
    sessions = audit_sessions
    now = utcnow()
    with sessions() as s:
        s.add(Series(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3", status="receiving",
                     instance_count=5, last_received_at=now - dt.timedelta(seconds=10)))
        s.add(Series(series_instance_uid="1.2.3.2", study_instance_uid="1.2.3", status="receiving",
                     instance_count=5, last_received_at=now - dt.timedelta(seconds=1)))
        s.commit()
    assembler = SeriesAssembler(sessions, stable_seconds=5, started_at=now - dt.timedelta(hours=1))
    assert assembler.complete_stable(now) == ["1.2.3.1"]
    assert assembler.next_deadline(now) == pytest.approx(4.0, abs=0.01)
    assert assembler.complete_stable(now + dt.timedelta(seconds=4.5)) == ["1.2.3.2"]
    assert assembler.complete_stable(now + dt.timedelta(seconds=60)) == []
    with sessions() as s:
        assert set(s.scalars(select(Series.status))) == {"complete"}


def test_reconcile_indexes_spooled_files_missing_from_the_db(tmp_path, chest, audit_sessions):
    spool = Spool(tmp_path / "spool")
    sessions = audit_sessions
    for path in chest[:10]:
        ds = dcmread(path, stop_before_pixels=True)
        target = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (spool.root / "not-a-uid").mkdir()  # ignored
    assert reconcile_spool(sessions, spool) == 10
    assert reconcile_spool(sessions, spool) == 0  # idempotent
    with sessions() as s:
        row = s.scalars(select(Series)).one()
        assert row.instance_count == 10 and row.status == "receiving"
        s.execute(delete(Instance).where(Instance.sop_instance_uid.in_(
            list(s.scalars(select(Instance.sop_instance_uid)))[:3])))
        s.commit()
    assert reconcile_spool(sessions, spool) == 3


@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_sigkill_between_last_instance_and_completion_still_completes(tmp_path, chest):
    series_uid = str(dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
    node = NodeProcess(tmp_path / "node", stable_seconds=3).start()
    try:
        result = storescu(node.port, chest)
        assert result.returncode == 0, result.stderr
        node.kill()  # well within stable_seconds of the last instance: nothing decided yet
        assert node.series(series_uid)["status"] == "receiving"
        # every acknowledged instance is a spool file, with its audit row
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 64
        assert len(node.query("SELECT id FROM instances WHERE checksum != ''")) == 64

        time.sleep(0.5)
        node.start()
        row = node.wait_series_status(series_uid, ["queued"], timeout=30)
        assert row["instance_count"] == 64
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 64
        assert [tuple(j) for j in node.query("SELECT series_instance_uid, status FROM jobs")] == [
            (series_uid, "queued")]
        assert node.stop() == 0
    finally:
        node.kill()


def test_contiguity_finds_gaps_duplicates_and_mixed_orientations(chest):
    from lpm_node.intake.geometry import contiguity
    from lpm_node.intake.headers import read_series_headers

    assert contiguity(*read_series_headers(chest).slices)[0] is True
    assert contiguity(*read_series_headers(chest[:20] + chest[40:]).slices) == (
        False, "a gap of 52.50 mm where slices are 2.50 mm apart")
    positions, orientations = read_series_headers(chest).slices
    assert contiguity(positions[[0, 1, 1, 2]], orientations)[1] == "1 duplicate slice position(s)"
    assert contiguity(positions, orientations + [[0, 1, 0, 0, 0, -1]])[1] == "2 slice orientations"
    assert contiguity(positions[:1], orientations)[0] is False


def _decided(sessions, status: str, reason: str = "done before") -> None:
    with sessions() as s:
        s.add(Series(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3", status=status, reason=reason,
                     instance_count=5, last_received_at=utcnow()))
        s.add(Job(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3",
                  status="queued" if status == "queued" else "done"))
        s.commit()


@pytest.mark.parametrize("status", ["complete", "rejected", "eligible", "not_selected", "queued", "processing",
                                    "done", "failed"])
def test_every_decision_reopens_on_new_instances_and_keeps_the_jobs(audit_sessions, status):
    from lpm_node.intake.series import note_instance_on_series

    sessions = audit_sessions
    _decided(sessions, status)
    with sessions() as s:
        row = s.scalars(select(Series)).one()
        note_instance_on_series(s, row, utcnow())
        s.commit()
    with sessions() as s:
        row = s.scalars(select(Series)).one()
        assert row.status == "receiving" and row.instance_count == 6
        assert row.reason.startswith(f"more instances arrived after the decision ({status}")
        jobs = [j.status for j in s.scalars(select(Job))]
        assert jobs == (["cancelled"] if status == "queued" else ["done"])  # earlier results stay in the audit
        assert [d.status for d in s.scalars(select(SeriesDecision))] == ["receiving"]


def test_quiet_clock_starts_again_at_start_and_missing_spool_files_hold_the_series(tmp_path, audit_sessions):
    sessions = audit_sessions
    started = utcnow()
    present = tmp_path / "present.dcm"
    present.write_bytes(b"x")
    with sessions() as s:
        s.add(Series(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3", status="receiving",
                     instance_count=2, last_received_at=started - dt.timedelta(hours=2)))
        s.add(Instance(sop_instance_uid="1.2.3.1.1", series_instance_uid="1.2.3.1", path=str(present)))
        s.add(Instance(sop_instance_uid="1.2.3.1.2", series_instance_uid="1.2.3.1", path=str(tmp_path / "gone.dcm")))
        s.commit()
    assembler = SeriesAssembler(sessions, stable_seconds=5, started_at=started)
    assert assembler.complete_stable(started + dt.timedelta(seconds=4)) == []  # hours down, not quiet
    assert assembler.next_deadline(started) == pytest.approx(5.0, abs=0.01)
    assert assembler.complete_stable(started + dt.timedelta(seconds=6)) == []  # an acknowledged file is missing
    (tmp_path / "gone.dcm").write_bytes(b"x")
    assert assembler.complete_stable(started + dt.timedelta(seconds=7)) == ["1.2.3.1"]
    with sessions() as s:
        assert "counted from the node's start" in s.scalars(select(Series)).one().reason


def _released_series(sessions, spool: Spool, files: list[Path], released_ago: float, received_ago: float) -> str:
    """A receiving series spooled from ``files``, carried by one association released ``released_ago`` s ago."""
    now = utcnow()
    first = dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    with sessions() as s:
        assoc = Association(outcome="released", started_at=now - dt.timedelta(seconds=60),
                            ended_at=now - dt.timedelta(seconds=released_ago))
        s.add(assoc)
        s.flush()
        for path in files:
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            target = spool.instance_path(study, series, sop)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            s.add(Instance(sop_instance_uid=sop, series_instance_uid=series, path=str(target),
                           association_id=assoc.id))
        s.add(Series(series_instance_uid=series, study_instance_uid=study, status="receiving",
                     instance_count=len(files), last_received_at=now - dt.timedelta(seconds=received_ago)))
        s.commit()
    return series


def _age(sessions, seconds: float) -> None:
    """Move every receipt and release ``seconds`` into the past."""
    with sessions() as s:
        for row in s.scalars(select(Series)):
            row.last_received_at = as_utc(row.last_received_at) - dt.timedelta(seconds=seconds)
        for row in s.scalars(select(Association)):
            row.ended_at = as_utc(row.ended_at) - dt.timedelta(seconds=seconds)
        s.commit()


def test_headers_are_read_once_while_a_released_series_waits_out_its_grace(tmp_path, chest, audit_sessions,
                                                                             monkeypatch):
    sessions, spool = audit_sessions, Spool(tmp_path / "spool")
    uid = _released_series(sessions, spool, chest, released_ago=5, received_ago=15)
    assembler = SeriesAssembler(sessions, stable_seconds=300, release_grace_seconds=30,
                                started_at=utcnow() - dt.timedelta(hours=1))
    # the grace counts from the release (5 s ago), not from the last instance (15 s ago)
    assert assembler.next_deadline() == pytest.approx(25, abs=3)
    assert assembler.complete_stable(settle=lambda: None) == []  # within the grace: read the headers now
    assert assembler.due_in == pytest.approx(25, abs=3)

    reads: list[str] = []

    def counted(real):
        def read(paths):
            reads.append(real.__name__)
            return real(paths)
        return read

    monkeypatch.setattr(series_module, "read_series_headers", counted(series_module.read_series_headers))
    monkeypatch.setattr(rules_module, "read_series_facts", counted(rules_module.read_series_facts))
    _age(sessions, 30)
    assert assembler.complete_stable(settle=lambda: None) == [uid]
    rules = RuleEngine(sessions, spool, RuleSettings(min_slices=10, min_z_coverage_mm=40),
                       known_facts=assembler.facts_for)
    assert rules.run_once() == [uid]
    assert reads == []  # completion and rules used the pass made during the grace
    with sessions() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        assert row.facts["slices"] == 64 and row.facts["instances"] == 64
        assert "64 contiguous slices 2.50 mm apart" in s.scalars(
            select(SeriesDecision.reason).where(SeriesDecision.status == "complete")).one()


def test_rules_read_the_headers_again_when_the_spool_holds_other_files(tmp_path, chest, audit_sessions,
                                                                       monkeypatch):
    sessions, spool = audit_sessions, Spool(tmp_path / "spool")
    uid = _released_series(sessions, spool, chest[:40], released_ago=3, received_ago=3)
    assembler = SeriesAssembler(sessions, stable_seconds=300, release_grace_seconds=2,
                                started_at=utcnow() - dt.timedelta(hours=1))
    assert assembler.complete_stable(settle=lambda: None) == [uid]
    # a file in the series' folder that the completion did not read (not in the audit)
    extra = chest[40]
    first = dcmread(chest[0], stop_before_pixels=True)
    spool.instance_path(str(first.StudyInstanceUID), uid, str(dcmread(extra).SOPInstanceUID)).write_bytes(
        extra.read_bytes())
    reads: list[int] = []
    real = rules_module.read_series_facts
    monkeypatch.setattr(rules_module, "read_series_facts", lambda paths: reads.append(len(paths)) or real(paths))
    RuleEngine(sessions, spool, RuleSettings(min_slices=10, min_z_coverage_mm=40),
               known_facts=assembler.facts_for).run_once()
    assert reads == [41]
    with sessions() as s:
        assert s.scalars(select(Series.facts)).one()["instances"] == 41


def test_a_series_held_by_a_missing_spool_file_is_polled_not_hurried(tmp_path, chest, audit_sessions):
    sessions, spool = audit_sessions, Spool(tmp_path / "spool")
    _released_series(sessions, spool, chest[:10], released_ago=3, received_ago=3)
    with sessions() as s:
        Path(s.scalars(select(Instance.path)).first()).unlink()  # acknowledged, but gone from the spool
    assembler = SeriesAssembler(sessions, stable_seconds=300, release_grace_seconds=2,
                                started_at=utcnow() - dt.timedelta(hours=1))
    assert assembler.next_deadline() == 0.0
    assert assembler.complete_stable(settle=lambda: None) == []
    assert assembler.due_in is None  # the series loop then waits its interval, not the shortest pause

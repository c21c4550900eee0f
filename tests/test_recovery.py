"""Series completion by association release, and recovery, with real processes: storescu, lpm-node serve,
SIGKILL and SIGTERM, a tmpfs full disk, a lost database, the operator's rerun, reindex and outbox retry.
The completion, restart and rerun tests run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from lpm_node.answer.outbox import KINDS
from lpm_node.demo.orthanc import orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import REPO, NodeProcess, free_port, have_dcmtk, storescu

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")

STUDY = "1.2.826.0.1.3680043.8.498.77001"
ANSWER_OBJECTS = len(KINDS)  # SEG, SR, key image and KOS


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> list[Path]:
    """64 contiguous 2.5 mm slices (160 mm)."""
    return write_ct_series(make_phantom(30.0, n_slices=64, size=256, pixel_spacing=1.4, seed=21),
                           tmp_path_factory.mktemp("chest"), study_uid=STUDY)


@pytest.fixture(scope="module")
def second(tmp_path_factory) -> list[Path]:
    """Another series of the same study."""
    return write_ct_series(make_phantom(30.0, n_slices=48, size=128, pixel_spacing=2.8, seed=22),
                           tmp_path_factory.mktemp("second"), study_uid=STUDY, series_number=3,
                           series_description="CHEST WO 2.5mm SHARP")


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lpm_node.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _decisions(node: NodeProcess, uid: str) -> list[tuple[str, str]]:
    rows = node.query("SELECT status, reason FROM series_decisions WHERE series_instance_uid = ? ORDER BY id", (uid,))
    return [(r["status"], r["reason"]) for r in rows]


def _json(value: object) -> object:
    """A JSON column as read back: text from SQLite, already decoded from PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _sent(files: list[Path], node: NodeProcess) -> None:
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr


# -- completion when the association ends ------------------------------------------------------------------------


def test_released_contiguous_series_complete_long_before_stable_seconds(tmp_path, chest):
    with NodeProcess(tmp_path / "node", stable_seconds=300) as node:
        _sent(chest, node)  # one series per association
        row = node.wait_series_status(_uid(chest), ["queued", "eligible"], timeout=30)
        assert row["instance_count"] == 64
        complete = [r for s, r in _decisions(node, _uid(chest)) if s == "complete"]
        assert len(complete) == 1 and "every association that carried it was released" in complete[0]
        assert "64 contiguous slices 2.50 mm apart" in complete[0]

        more = write_ct_series(make_phantom(40.0, n_slices=40, size=128, pixel_spacing=2.8, seed=23),
                               tmp_path / "third", study_uid="1.2.826.0.1.3680043.8.498.77002", series_number=4)
        other = write_ct_series(make_phantom(40.0, n_slices=40, size=128, pixel_spacing=2.8, seed=24),
                                tmp_path / "fourth", study_uid="1.2.826.0.1.3680043.8.498.77002", series_number=5,
                                series_description="CHEST WO 1mm")
        _sent(more + other, node)  # one study, two series, one association
        for files in (more, other):
            node.wait_series_status(_uid(files), ["queued", "not_selected", "eligible", "rejected"], timeout=30)
            assert any("released" in r for s, r in _decisions(node, _uid(files)) if s == "complete")


def test_series_split_over_two_associations(tmp_path, chest, second, node_database_url):
    config = _config(tmp_path, "[rules]\nmin_slices = 10\nmin_z_coverage_mm = 40\n")
    with NodeProcess(tmp_path / "node", stable_seconds=300, config=config, database_url=node_database_url) as node:
        # not contiguous after the first association: it waits (stable_seconds), then the rest completes it
        _sent(chest[:20] + chest[40:], node)
        time.sleep(6)
        assert node.series(_uid(chest))["status"] == "receiving"
        assert "gap of 52.50 mm" in node.log()
        _sent(chest[20:40], node)
        node.wait_series_status(_uid(chest), ["queued"], timeout=30)
        assert [s for s, _ in _decisions(node, _uid(chest))] == ["complete", "eligible", "queued"]

        # contiguous after the first: complete and decided, then reopened by the second and decided again
        _sent(second[:24], node)
        node.wait_series_status(_uid(second), ["not_selected"], timeout=30)
        _sent(second[24:], node)
        row = node.wait_rows("SELECT * FROM series WHERE series_instance_uid = ? AND instance_count = 48 "
                             "AND status = 'not_selected'", (_uid(second),), timeout=30)[0]
        assert row["instance_count"] == 48
        statuses = [s for s, _ in _decisions(node, _uid(second))]
        assert statuses == ["complete", "eligible", "not_selected", "receiving", "complete", "eligible",
                            "not_selected"]
        assert "more instances arrived after the decision (not_selected" in _decisions(node, _uid(second))[3][1]


def test_measured_series_reopened_by_a_second_association_is_measured_again(tmp_path, chest, node_database_url):
    config = _config(tmp_path, "[rules]\nmin_slices = 10\nmin_z_coverage_mm = 40\n")
    with NodeProcess(tmp_path / "node", stable_seconds=300, config=config, measure=True,
                     database_url=node_database_url) as node:
        uid = _uid(chest)
        _sent(chest[:40], node)
        node.wait_series_status(uid, ["done", "failed"], timeout=300)
        _sent(chest[40:], node)
        node.wait_rows("SELECT id FROM jobs WHERE series_instance_uid = ? AND status IN ('done', 'failed')", (uid,),
                       until=lambda rows: len(rows) == 2, timeout=300)
        jobs = node.query("SELECT status, result FROM jobs WHERE series_instance_uid = ? ORDER BY id", (uid,))
        assert [j["status"] for j in jobs] == ["done", "done"]  # both results stay in the audit
        assert node.series(uid)["status"] == "done" and node.series(uid)["instance_count"] == 64
        facts = _json(node.series(uid)["facts"])
        assert facts["slices"] == 64


# -- restarts ------------------------------------------------------------------------------------------------------


def test_downtime_is_not_quiet_time(tmp_path, chest, node_database_url):
    """SIGKILL with half a series received, down longer than stable_seconds: evaluated once, on all of it."""
    config = _config(tmp_path, "[series]\nrelease_grace_seconds = -1\n")
    uid = _uid(chest)
    node = NodeProcess(tmp_path / "node", stable_seconds=3, config=config, database_url=node_database_url).start()
    try:
        _sent(chest[:32], node)
        node.kill()
        time.sleep(5)  # longer than stable_seconds
        node.start()
        _sent(chest[32:], node)
        row = node.wait_series_status(uid, ["queued"], timeout=30)
        assert row["instance_count"] == 64
        assert _json(row["facts"])["slices"] == 64
        assert [s for s, _ in _decisions(node, uid)].count("complete") == 1
        assert len(node.query("SELECT id FROM jobs")) == 1
        assert node.stop() == 0
    finally:
        node.kill()


def test_sigterm_during_a_job_is_not_a_crash(tmp_path, chest, node_database_url):
    config = _config(tmp_path, "[node]\nstop_grace_seconds = 0.2\n")
    uid = _uid(chest)
    node = NodeProcess(tmp_path / "node", stable_seconds=1, config=config, measure=True,
                       database_url=node_database_url).start()
    try:
        _sent(chest, node)
        node.wait_rows("SELECT id FROM jobs WHERE status = 'running'", timeout=60)
        assert node.stop() == 0
        job = node.query("SELECT * FROM jobs")[0]
        assert (job["status"], job["attempts"], job["stopped_starts"]) == ("queued", 1, 1)
        assert "not counted as a crash" in job["error"]
        node.start()
        node.wait_series_status(uid, ["done", "failed"], timeout=300)
        job = node.query("SELECT * FROM jobs")[0]
        assert (job["status"], job["attempts"], job["stopped_starts"]) == ("done", 2, 1)
        assert node.stop() == 0
    finally:
        node.kill()


def test_failed_series_is_rerun_by_the_operator(tmp_path, chest, node_database_url):
    uid = _uid(chest)
    config = _config(tmp_path, "[series]\nrelease_grace_seconds = -1\n")
    node = NodeProcess(tmp_path / "node", stable_seconds=3, config=config, measure=True,
                       database_url=node_database_url).start()
    try:
        _sent(chest, node)
        spool = tmp_path / "node" / "spool"
        deadline = time.monotonic() + 10
        while len(list(spool.rglob("*.dcm"))) < 64 and time.monotonic() < deadline:
            time.sleep(0.1)
        damaged = sorted(spool.rglob("*.dcm"))[10]
        original = damaged.read_bytes()
        damaged.write_bytes(original[: len(original) // 2])  # disk trouble: pixel data cut short
        row = node.wait_series_status(uid, ["done", "failed"], timeout=300)
        assert row["status"] == "failed", row["reason"]

        damaged.write_bytes(original)  # put right
        result = _cli("rerun", "--failed", *node.cli_database())
        assert result.returncode == 0, result.stderr
        assert f"{uid}: re-queued (was failed)" in result.stdout
        node.wait_rows("SELECT id FROM jobs WHERE status = 'done'", timeout=300)
        jobs = node.query("SELECT status FROM jobs ORDER BY id")
        assert [j["status"] for j in jobs] == ["failed", "done"]
        assert node.series(uid)["status"] == "done"
        again = _cli("rerun", "--series", uid, "--series", "1.2.3.4", *node.cli_database())
        assert again.returncode == 1 and "1.2.3.4: no such series" in again.stdout
        actions = json.loads(_cli("audit", "--actions", "--json", *node.cli_database()).stdout)
        assert [a["outcome"] for a in reversed(actions)] == ["re-queued (was failed)", "re-queued (was done)",
                                                             "no such series"]
        assert all(a["user"] and "lpm-node rerun" in a["command"] for a in actions)
        assert node.stop() == 0
    finally:
        node.kill()


# -- start-up refusals ---------------------------------------------------------------------------------------------


def test_full_disk_at_start_is_one_line_and_an_exit_code(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = _cli("serve", "--data-dir", str(mount / "data"), "--port", str(free_port()), timeout=60)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "is full: 4 MB free, the start needs 16 MB" in result.stderr
        with open(mount / "filler", "wb") as fh:  # fill the disk to the last byte
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        config = _config(tmp_path, "[node]\nmin_free_disk_mb = 0\n")
        result = _cli("serve", "--config", str(config), "--data-dir", str(mount / "data"), "--port", str(free_port()),
                      timeout=60)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "is full" in result.stderr, result.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- the audit database lost, re-indexing, and destinations -------------------------------------------------------


def _delivered(node: NodeProcess, uid: str, timeout: float = 300) -> list:
    return node.wait_rows("SELECT * FROM deliveries WHERE series_instance_uid = ?", (uid,),
                          until=lambda rows: len(rows) == ANSWER_OBJECTS and all(r["status"] == "sent" for r in rows),
                          timeout=timeout)


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_lost_database_is_refused_and_reindex_never_resends(tmp_path, orthanc, chest):
    uid = _uid(chest)
    data = tmp_path / "node"
    destination = ["--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]
    with NodeProcess(data, stable_seconds=1, measure=True, extra=destination) as node:
        _sent(chest, node)
        assert len(_delivered(node, uid)) == ANSWER_OBJECTS
    assert len(orthanc.instances()) == ANSWER_OBJECTS

    for leftover in data.glob("audit.sqlite*"):
        leftover.unlink()
    (data / "audit.sqlite").write_bytes(b"")  # zero-length
    refused = _cli("serve", "--data-dir", str(data), "--port", str(free_port()), timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "missing or empty but the spool" in refused.stderr and "lpm-node reindex" in refused.stderr
    (data / "audit.sqlite").unlink()  # missing
    assert _cli("serve", "--data-dir", str(data), "--port", str(free_port()), timeout=60).returncode == 2

    reindexed = _cli("reindex", "--data-dir", str(data))
    assert reindexed.returncode == 0, reindexed.stderr
    assert "indexed 64 spooled instance(s)" in reindexed.stdout and f"{uid}: results were delivered" in reindexed.stdout

    with NodeProcess(data, stable_seconds=1, measure=True, extra=destination) as node:
        time.sleep(6)  # several times stable_seconds: nothing is measured or sent again
        assert node.series(uid)["status"] == "done"
        assert node.query("SELECT id FROM jobs") == []
        assert [r["status"] for r in node.query("SELECT status FROM deliveries")] == ["sent"] * ANSWER_OBJECTS
    assert len(orthanc.instances()) == ANSWER_OBJECTS
    actions = json.loads(_cli("audit", "--actions", "--json", "--data-dir", str(data)).stdout)
    assert actions[0]["command"].startswith("lpm-node reindex") and "1 series already delivered" in \
        actions[0]["outcome"]


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_dead_letters_go_to_the_corrected_destination(tmp_path, orthanc, chest):
    uid = _uid(chest)
    data = tmp_path / "node"
    wrong = _config(tmp_path, "[output]\nretry_hours = 0.001\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\n"
                              f'destinations = ["{orthanc.aet}@127.0.0.1:{free_port()}"]\n')
    right = tmp_path / "right.toml"
    right.write_text(f'[output]\ndestinations = ["{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]\n')
    with NodeProcess(data, stable_seconds=1, measure=True, config=wrong) as node:
        _sent(chest, node)
        node.wait_rows("SELECT * FROM deliveries", until=lambda rows: len(rows) == ANSWER_OBJECTS and all(
            r["status"] == "dead" for r in rows), timeout=300)
        listed = json.loads(_cli("outbox", "list", "--json", "--data-dir", str(data)).stdout)
        assert all(d["status"] == "dead" and d["next_attempt_at"] is None for d in listed)

        retried = _cli("outbox", "retry", "--config", str(right), "--data-dir", str(data))
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.count("redirected to") == ANSWER_OBJECTS
        rows = _delivered_to(node, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        assert len(rows) == ANSWER_OBJECTS
    statuses = sorted(r["status"] for r in node.query("SELECT status FROM deliveries"))
    assert statuses == ["redirected"] * ANSWER_OBJECTS + ["sent"] * ANSWER_OBJECTS
    assert len(orthanc.instances()) == ANSWER_OBJECTS
    actions = json.loads(_cli("audit", "--actions", "--json", "--data-dir", str(data)).stdout)
    assert actions[0]["command"].startswith("lpm-node outbox retry") and "redirected" in actions[0]["outcome"]
    detail = json.loads(_cli("audit", "--series", uid, "--json", "--data-dir", str(data)).stdout)
    assert len(detail["deliveries"]) == 2 * ANSWER_OBJECTS


def _delivered_to(node: NodeProcess, destination: str) -> list:
    return node.wait_rows("SELECT * FROM deliveries WHERE destination = ? AND status = 'sent'", (destination,),
                          until=lambda rows: len(rows) == ANSWER_OBJECTS, timeout=120)

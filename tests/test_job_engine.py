"""Jobs and deliveries the same way on SQLite (the embedded queue) and on PostgreSQL (procrastinate), with real
processes: storescu as the sender, ``lpm-node serve`` in its roles, Orthanc as the PACS, SIGKILL for crashes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from lpm_node.answer.outbox import KINDS
from lpm_node.core.audit import operator_name
from lpm_node.demo.orthanc import orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.node.engine import MEASURE_QUEUE, MEASURE_TASK, SUSPENDED_QUEUE
from tests.support_net import DATABASE_ERRORS, REPO, NodeProcess, dcmtk_env, echoscu, free_port, have_dcmtk, storescu

pytestmark = [
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
]

STUDY = "1.2.826.0.1.3680043.8.498.78001"


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> list[Path]:
    return write_ct_series(make_phantom(30.0, n_slices=48, size=128, pixel_spacing=2.8, seed=31),
                           tmp_path_factory.mktemp("chest"), study_uid=STUDY)


def _uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _sent(files: list[Path], port: int) -> None:
    result = storescu(port, files)
    assert result.returncode == 0, result.stderr


def _delivered(node: NodeProcess, uid: str, timeout: float = 300) -> list:
    rows = node.wait_rows("SELECT * FROM deliveries WHERE series_instance_uid = ?", (uid,),
                          until=lambda rows: len(rows) == len(KINDS) and all(r["status"] == "sent" for r in rows),
                          timeout=timeout)
    assert [r["status"] for r in rows] == ["sent"] * len(KINDS), [dict(r) for r in rows]
    return rows


def _roles_config(tmp_path: Path, orthanc, **node: object) -> Path:
    path = tmp_path / "roles.toml"
    lines = ["[node]"] + [f"{k} = {json.dumps(v)}" for k, v in node.items()]
    lines += ["[rules]", "min_slices = 10", "min_z_coverage_mm = 40"]
    lines += ["[output]", f'destinations = ["{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_contract_one_process_measures_once_and_delivers_once(tmp_path, orthanc, chest, node_database_url):
    """The same story in the audit on SQLite and on PostgreSQL: queued -> processing -> done, one job that ran once,
    each answer object sent once."""
    uid = _uid(chest)
    config = _roles_config(tmp_path, orthanc)
    with NodeProcess(tmp_path / "node", stable_seconds=1, config=config, measure=True,
                     database_url=node_database_url) as node:
        _sent(chest, node.port)
        node.wait_series_status(uid, ["done", "failed", "rejected"], timeout=300)
        _delivered(node, uid)
        jobs = node.query("SELECT * FROM jobs")
        assert [(j["status"], j["attempts"], j["error"]) for j in jobs] == [("done", 1, "")]
        statuses = [r["status"] for r in node.query(
            "SELECT status FROM series_decisions WHERE series_instance_uid = ? ORDER BY id", (uid,))]
        assert statuses[-3:] == ["queued", "processing", "done"]
        if node_database_url:  # the job ran on procrastinate, deferred with the rules' commit
            engine_id = jobs[0]["engine_job_id"]
            rows = node.query("SELECT status, lock, queueing_lock FROM procrastinate_jobs WHERE id = ?", (engine_id,))
            assert [tuple(r) for r in rows] == [("succeeded", f"series:{uid}", f"job:{jobs[0]['id']}")]
        else:
            assert jobs[0]["engine_job_id"] is None
        beats = node.query("SELECT role, data_marker FROM role_heartbeats WHERE stopped_at IS NULL")
        assert [b["role"] for b in beats] == ["all"] and beats[0]["data_marker"]
    assert len(orthanc.instances()) == len(KINDS)


def _serve(data: Path, role: str, config: Path, database_url: str, port: int = 0,
           extra: list[str] | None = None, stable: float = 1.0) -> NodeProcess:
    node = NodeProcess(data, port=port or free_port(), stable_seconds=stable, config=config, measure=role != "receiver",
                       database_url=database_url, extra=[*(extra or []), "--role", role],
                       ready_by_echo=role in ("receiver", "all"))
    if role in ("receiver", "all"):
        return node.start()
    return _start_without_port(node)


def _start_without_port(node: NodeProcess, timeout: float = 120) -> NodeProcess:
    """Start a worker or sender (no DICOM port): ready once its heartbeat row is there."""
    node.data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lpm_node.cli", "serve", "--data-dir", str(node.data_dir), "--config",
           str(node.config), "--database-url", node.database_url, *node.extra]
    if node.measure:
        cmd.append("--demo-model")
    node.log_path = node.data_dir / f"{node.extra[-1]}-{time.monotonic_ns()}.log"
    with open(node.log_path, "wb") as log:
        node.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if node.query("SELECT id FROM role_heartbeats WHERE pid = ? AND stopped_at IS NULL", (node.proc.pid,)):
                return node
        except DATABASE_ERRORS:  # the first process to start may still be creating the tables
            pass
        assert node.proc.poll() is None, node.log()
        time.sleep(0.2)
    node.kill()
    raise TimeoutError(node.log())


def test_roles_in_separate_processes_share_one_database_and_data_folder(tmp_path, orthanc, chest, postgres):
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc)
    data = tmp_path / "shared"
    uid = _uid(chest)
    receiver = _serve(data, "receiver", config, url)
    worker = _serve(data, "worker", config, url)
    sender = _serve(data, "sender", config, url)
    try:
        _sent(chest, receiver.port)
        receiver.wait_series_status(uid, ["done", "failed", "rejected"], timeout=300)
        _delivered(receiver, uid)
        beats = receiver.query("SELECT role, pid, data_marker FROM role_heartbeats WHERE stopped_at IS NULL "
                               "ORDER BY id")
        assert [b["role"] for b in beats] == ["receiver", "worker", "sender"]
        assert len({b["data_marker"] for b in beats}) == 1
        doctor = subprocess.run([sys.executable, "-m", "lpm_node.cli", "doctor", "--demo-model", "--config",
                                 str(config), "--data-dir", str(data), "--database-url", url],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        line = next(x for x in doctor.stdout.splitlines() if "data folder" in x)
        assert line.startswith("OK") and "the same as 3 processes (receiver@" in line, doctor.stdout
        other = subprocess.run([sys.executable, "-m", "lpm_node.cli", "doctor", "--demo-model", "--config",
                                str(config), "--data-dir", str(tmp_path / "elsewhere"), "--database-url", url],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
        line = next(x for x in other.stdout.splitlines() if "data folder" in x)
        assert line.startswith("PROBLEM") and "does not see their data folder" in line, other.stdout
        for node in (receiver, worker, sender):
            assert node.stop() == 0
    finally:
        for node in (receiver, worker, sender):
            node.kill()
    assert len(orthanc.instances()) == len(KINDS)


def test_killed_worker_job_is_taken_over_and_a_third_cut_fails_it(tmp_path, orthanc, chest, postgres):
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5, stalled_after_seconds=3.0)
    data = tmp_path / "shared"
    uid = _uid(chest)
    receiver = _serve(data, "receiver", config, url)
    try:
        _sent(chest, receiver.port)
        receiver.wait_series_status(uid, ["queued", "rejected"], timeout=60)
        for start in (1, 2, 3):  # each worker is killed while it measures
            worker = _serve(data, "worker", config, url)
            receiver.wait_rows("SELECT id FROM jobs WHERE status = 'running' AND attempts = ?", (start,),
                               timeout=120)
            worker.kill()
        job = receiver.query("SELECT * FROM jobs")[0]
        assert (job["status"], job["attempts"]) == ("running", 3)
        last = _serve(data, "worker", config, url)  # takes the job over once the killed one's heartbeat lapsed
        try:
            rows = receiver.wait_rows("SELECT * FROM jobs WHERE status = 'failed'", timeout=120)
            assert rows, receiver.query("SELECT * FROM jobs")
            assert rows[0]["attempts"] == 4 and "gave up: the node crashed 3 times" in rows[0]["error"]
            assert receiver.series(uid)["status"] == "failed"
            assert "taken over" in last.log()
            assert orthanc.instances() == []
            sender = _serve(data, "sender", config, url)
            try:  # the operator queues it again: measured by the live worker, delivered once
                rerun = subprocess.run([sys.executable, "-m", "lpm_node.cli", "rerun", "--failed", "--config",
                                        str(config), "--data-dir", str(data), "--database-url", url],
                                       cwd=REPO, capture_output=True, text=True, timeout=120)
                assert rerun.returncode == 0, rerun.stderr
                receiver.wait_series_status(uid, ["done"], timeout=300)
                _delivered(receiver, uid)
            finally:
                sender.kill()
        finally:
            last.kill()
    finally:
        receiver.kill()
    assert len(orthanc.instances()) == len(KINDS)


def test_series_split_over_two_receivers_completes_once_and_receivers_share_a_port(tmp_path, orthanc, chest,
                                                                                  postgres):
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc)
    data = tmp_path / "shared"
    uid = _uid(chest)
    port = free_port()
    first = _serve(data, "receiver", config, url, port=port, extra=["--reuse-port"])
    second = _serve(data, "receiver", config, url, port=port, extra=["--reuse-port"])  # the same port
    other = _serve(data, "receiver", config, url)
    try:
        _sent(chest[:24], other.port)  # half through one receiver, the rest through the shared port
        _sent(chest[24:], port)
        for _ in range(16):  # the kernel spreads the shared port's connections over both receivers
            assert echoscu(port).returncode == 0
        assert first.proc.poll() is None and second.proc.poll() is None
        pids = {str(n.proc.pid) for n in (first, second)}
        rows = other.wait_rows("SELECT receiver FROM associations WHERE calling_ae = 'ECHOSCU'",
                               until=lambda rows: pids <= {r["receiver"].rsplit(":", 1)[-1] for r in rows})
        assert pids <= {r["receiver"].rsplit(":", 1)[-1] for r in rows}, [r["receiver"] for r in rows]
        row = other.wait_series_status(uid, ["queued", "rejected"], timeout=60)
        assert row["instance_count"] == 48 and row["status"] == "queued"
        time.sleep(3)  # every receiver has had several rounds
        decisions = [r["status"] for r in other.query(
            "SELECT status FROM series_decisions WHERE series_instance_uid = ? ORDER BY id", (uid,))]
        assert decisions.count("complete") == 1 and decisions.count("queued") == 1, decisions
        assert len(other.query("SELECT id FROM jobs")) == 1
        ended = other.query("SELECT outcome FROM associations WHERE calling_ae = 'STORESCU' ORDER BY id")
        assert [r["outcome"] for r in ended] == ["released", "released"]
    finally:
        for node in (first, second, other):
            node.kill()


def test_one_series_sent_through_two_receivers_at_once_counts_every_instance(tmp_path, orthanc, chest, postgres):
    """Four senders at once, two into each receiver, one series: both receivers update its row concurrently and
    neither overwrites the other's count."""
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc)
    data = tmp_path / "shared"
    uid = _uid(chest)
    receivers = [_serve(data, "receiver", config, url, stable=3.0) for _ in range(2)]
    try:
        parts = [chest[i::4] for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: storescu(receivers[i % 2].port, parts[i]), range(4)))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        row = receivers[0].wait_series_status(uid, ["queued", "rejected"], timeout=60)
        assert row["instance_count"] == len(chest) and row["status"] == "queued", dict(row)
        assert len(receivers[0].query("SELECT id FROM instances WHERE series_instance_uid = ?", (uid,))) == len(chest)
    finally:
        for node in receivers:
            node.kill()


def _measuring(node: NodeProcess, timeout: float = 0) -> list[tuple[int, int, int]]:
    """(job id, start, pid of the worker process measuring it) of each running job, from its latest start in the audit
    (waits up to ``timeout`` seconds for one)."""
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for job in node.query("SELECT id, attempts, series_instance_uid FROM jobs WHERE status = 'running'"):
            reasons = [r["reason"] for r in node.query(
                "SELECT reason FROM series_decisions WHERE series_instance_uid = ? AND status = 'processing' "
                "ORDER BY id", (job["series_instance_uid"],))]
            start = f"measuring (job {job['id']}, start {job['attempts']}) in "
            if reasons and reasons[-1].startswith(start):
                running.append((job["id"], job["attempts"], int(reasons[-1].rsplit(":", 1)[1])))
        if running or time.monotonic() >= deadline:
            return running
        time.sleep(0.2)


def test_orderly_stop_mid_job_gives_the_job_to_another_worker_at_once(tmp_path, orthanc, chest, postgres):
    """SIGTERM a worker while it measures: past ``stop_grace_seconds`` its job goes back to the queue, uncounted,
    and the other worker starts it at once (not once the stopped one's heartbeat lapsed: 60 s here)."""
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5, stalled_after_seconds=60.0,
                           stop_grace_seconds=0.2)
    data = tmp_path / "shared"
    uid = _uid(chest)
    workers = [_serve(data, "worker", config, url) for _ in range(2)]
    receiver = _serve(data, "receiver", config, url)
    sender = _serve(data, "sender", config, url)
    try:
        _sent(chest, receiver.port)
        [(job_id, start, pid)] = _measuring(receiver, timeout=120)
        assert start == 1
        [busy] = [w for w in workers if w.proc.pid == pid]
        [other] = [w for w in workers if w is not busy]
        stopped_at = time.monotonic()
        assert busy.stop(timeout=30) == 0
        taken = receiver.wait_rows("SELECT * FROM jobs WHERE id = ? AND attempts = 2", (job_id,), timeout=30)
        assert taken and time.monotonic() - stopped_at < 30, receiver.query("SELECT * FROM jobs")
        assert "given back to the job engine's queue" in busy.log()
        receiver.wait_series_status(uid, ["done"], timeout=300)
        _delivered(receiver, uid)
        [job] = receiver.query("SELECT * FROM jobs")
        assert (job["status"], job["attempts"], job["stopped_starts"]) == ("done", 2, 1)
        assert f"job {job['id']} series {uid}" in other.log()
        engine = receiver.query("SELECT status, attempts FROM procrastinate_jobs WHERE id = ?",
                                (job["engine_job_id"],))
        assert [tuple(r) for r in engine] == [("succeeded", 2)]
    finally:
        for node in (*workers, receiver, sender):
            node.kill()
    assert len(orthanc.instances()) == len(KINDS)


def _measuring_switch(node: NodeProcess, config: Path, action: str) -> str:
    """``lpm-node measuring suspend|resume`` against the running node's database; returns what it printed."""
    cmd = [sys.executable, "-m", "lpm_node.cli", "measuring", action, "--config", str(config), "--data-dir",
           str(node.data_dir)] + (["--database-url", node.database_url] if node.database_url else [])
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_series_received_while_measuring_is_suspended_is_measured_once_after_resume(tmp_path, orthanc, chest,
                                                                                   node_database_url):
    """Suspended, the job waits (on PostgreSQL in the job engine's queue, neither dropped nor failed); resumed, it
    runs once and its results are delivered once; both switches are audited with the operator's name."""
    uid = _uid(chest)
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5)
    with NodeProcess(tmp_path / "node", stable_seconds=1, config=config, measure=True,
                     database_url=node_database_url) as node:
        assert "measuring suspended" in _measuring_switch(node, config, "suspend")
        _sent(chest, node.port)
        node.wait_series_status(uid, ["queued", "rejected"], timeout=60)
        if node_database_url:  # a worker took the engine's job, saw the switch and put it back, unstarted
            parked = node.wait_rows("SELECT * FROM procrastinate_jobs WHERE task_name = ?", (MEASURE_TASK,),
                                    until=lambda rows: rows and rows[0]["queue_name"] == SUSPENDED_QUEUE,
                                    timeout=60)
            assert parked[0]["status"] == "todo", [dict(r) for r in parked]
        time.sleep(3)  # several rounds of the worker: still nothing measured
        [job] = node.query("SELECT * FROM jobs")
        assert (job["status"], job["attempts"]) == ("queued", 0)
        assert node.series(uid)["status"] == "queued" and orthanc.instances() == []

        assert "measuring resumed" in _measuring_switch(node, config, "resume")
        node.wait_series_status(uid, ["done", "failed"], timeout=300)
        _delivered(node, uid)
        [job] = node.query("SELECT * FROM jobs")
        assert (job["status"], job["attempts"], job["error"]) == ("done", 1, "")
        statuses = [r["status"] for r in node.query(
            "SELECT status FROM series_decisions WHERE series_instance_uid = ? ORDER BY id", (uid,))]
        assert statuses.count("processing") == 1 and statuses[-3:] == ["queued", "processing", "done"]
        if node_database_url:
            engine = node.query("SELECT status, queue_name FROM procrastinate_jobs WHERE task_name = ?",
                                (MEASURE_TASK,))
            assert [tuple(r) for r in engine] == [("succeeded", MEASURE_QUEUE)]
            assert "waits in the job engine: measuring is suspended" in node.log()
        actions = node.query('SELECT "user", command, outcome FROM operator_actions ORDER BY id')
        assert [(a["user"], a["command"].split()[1:3], a["outcome"]) for a in actions] == [
            (operator_name(), ["measuring", "suspend"], "measuring suspended: queued jobs wait"),
            (operator_name(), ["measuring", "resume"], "measuring resumed")]
    assert len(orthanc.instances()) == len(KINDS)


def test_restarting_receiver_leaves_the_fresh_instances_of_another_receiver_to_it(tmp_path, orthanc, postgres):
    """A receiver restarting while another receives into the shared spool indexes none of the other's fresh
    instances: the other records each itself, with its association, and refuses none (no 0xA700)."""
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5)
    data = tmp_path / "shared"
    series = [write_ct_series(make_phantom(30.0, n_slices=250, size=48, pixel_spacing=7.0, seed=40 + i),
                              tmp_path / f"long{i}", study_uid=f"1.2.826.0.1.3680043.8.498.7801{i}") for i in range(4)]
    restarting = _serve(data, "receiver", config, url)
    busy = _serve(data, "receiver", config, url)
    try:
        senders = [subprocess.Popen(["storescu", "-to", "10", "-aet", f"STORESCU{i}", "-aec", "LPM_NODE", "127.0.0.1",
                                     str(busy.port), *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for i, files in enumerate(series)]
        restarts = 0
        while any(s.poll() is None for s in senders):
            restarting.kill()
            restarting = _serve(data, "receiver", config, url, port=restarting.port)
            restarts += 1
        outputs = [s.communicate()[0] for s in senders]
        assert restarts >= 2, "the transfers ended before the receiver restarted twice: send more"
        for sender, output in zip(senders, outputs, strict=True):
            assert sender.returncode == 0 and "A700" not in output, output[-2000:]
        associations = busy.query("SELECT * FROM associations WHERE calling_ae LIKE ? ORDER BY id", ("STORESCU%",))
        assert [(a["instances_received"], a["instances_refused"]) for a in associations] == [(250, 0)] * 4, \
            [dict(a) for a in associations]
        for association in associations:  # every instance recorded by the receiver that took it
            linked = busy.query("SELECT COUNT(*) AS n FROM instances WHERE association_id = ?", (association["id"],))
            assert linked[0]["n"] == 250
        assert "IntegrityError" not in busy.log() and "UniqueViolation" not in busy.log()
    finally:
        for node in (restarting, busy):
            node.kill()


def _hold_association(port: int, file: Path) -> tuple[AE, object]:
    """An association to 127.0.0.1:port that stored ``file`` and stays open."""
    ds = dcmread(file)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="LPM_NODE")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    return ae, assoc


def _closed_by_stop(node: NodeProcess, pid: int, timeout: float) -> dict:
    rows = node.wait_rows("SELECT * FROM associations WHERE calling_ae = 'HOLDER'",
                          until=lambda rows: rows and rows[0]["ended_at"] is not None, timeout=timeout)
    [row] = rows
    assert row["ended_at"] is not None, dict(row)
    assert row["outcome"] == "aborted" and row["instances_received"] == 1
    assert f"receiver process {socket.gethostname()}:{pid} stopped" in row["reason"], row["reason"]
    assert row["receiver"] == f"{socket.gethostname()}:{pid}"
    return dict(row)


def test_killed_receivers_open_association_is_closed_once_its_heartbeat_lapsed(tmp_path, orthanc, chest, postgres):
    """SIGKILL a receiver in the middle of an association: another receiver closes it in the audit once the killed
    one's heartbeat lapsed, with when it was last heard from and why."""
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5, stalled_after_seconds=3.0)
    data = tmp_path / "shared"
    killed = _serve(data, "receiver", config, url)
    other = _serve(data, "receiver", config, url)
    ae, assoc = _hold_association(killed.port, chest[0])
    try:
        other.wait_rows("SELECT id FROM associations WHERE calling_ae = 'HOLDER' AND instances_received = 1")
        time.sleep(5)  # the receiver is alive: its association stays open
        assert other.query("SELECT ended_at FROM associations WHERE calling_ae = 'HOLDER'")[0]["ended_at"] is None
        pid = killed.proc.pid
        killed.kill()
        killed_at = time.monotonic()
        row = _closed_by_stop(other, pid, timeout=30)
        assert time.monotonic() - killed_at < 20
        [beat] = other.query("SELECT last_seen_at FROM role_heartbeats WHERE pid = ?", (pid,))
        assert row["ended_at"] >= beat["last_seen_at"] or row["ended_at"] >= row["started_at"]
    finally:
        assoc.abort()
        ae.shutdown()
        for node in (killed, other):
            node.kill()


def test_restarted_receiver_closes_the_association_its_killed_run_left_open(tmp_path, chest):
    """One process on SQLite: the association a killed run was receiving is closed by the next start."""
    node = NodeProcess(tmp_path / "node").start()
    ae, assoc = _hold_association(node.port, chest[0])
    try:
        node.wait_rows("SELECT id FROM associations WHERE calling_ae = 'HOLDER' AND instances_received = 1")
        pid = node.proc.pid
        node.kill()
        assert node.query("SELECT ended_at FROM associations WHERE calling_ae = 'HOLDER'")[0]["ended_at"] is None
        node.start()
        _closed_by_stop(node, pid, timeout=10)
    finally:
        assoc.abort()
        ae.shutdown()
        node.kill()


def test_deliveries_to_a_pacs_that_is_down_follow_the_job_engines_backoff_and_arrive_once(tmp_path, orthanc, chest,
                                                                                         postgres):
    """On PostgreSQL a destination's deliveries run as a procrastinate job retried with its capped exponential
    backoff: while the PACS is down every try is audited and the pending rows wait for the job's next run; once the
    PACS is up again each object arrives once."""
    url = postgres.new_database()
    uid = _uid(chest)
    config = _roles_config(tmp_path, orthanc)
    config.write_text(config.read_text() + "backoff_initial_s = 1\nbackoff_max_s = 4\n")
    orthanc.stop(graceful=False)
    with NodeProcess(tmp_path / "node", stable_seconds=1, config=config, measure=True, database_url=url) as node:
        _sent(chest, node.port)
        node.wait_series_status(uid, ["done", "failed", "rejected"], timeout=300)
        failed = node.wait_rows("SELECT d.id, a.at FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
                                "WHERE NOT a.ok ORDER BY a.id", until=lambda rows: len(rows) >= 3 * len(KINDS),
                                timeout=60)
        assert len(failed) >= 3 * len(KINDS), failed
        jobs = node.query("SELECT * FROM procrastinate_jobs WHERE task_name = 'lpm_node.deliver' ORDER BY id")
        *handed_over, job = jobs  # a job deferred while another ran takes its place
        assert [j["status"] for j in handed_over] == ["succeeded"] * len(handed_over), [dict(j) for j in jobs]
        assert job["queueing_lock"] == f"outbox:{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        assert job["status"] in ("todo", "doing") and job["attempts"] >= 1, dict(job)
        pending = node.query("SELECT status, next_attempt_at FROM deliveries WHERE series_instance_uid = ?", (uid,))
        assert {p["status"] for p in pending} == {"pending"}
        if job["status"] == "todo":  # waiting for its next try: the rows are due when the job runs again
            assert max(p["next_attempt_at"] for p in pending) <= job["scheduled_at"]
        tries = sorted({row["at"] for row in failed})
        gaps = [(b - a).total_seconds() for a, b in zip(tries, tries[1:], strict=False)]
        assert gaps[0] >= 1.5 and gaps[1] >= 3.5 and max(gaps) < 4 + 3, gaps  # 2 s, 4 s, then capped at 4 s
        orthanc.start()
        rows = _delivered(node, uid, timeout=60)
        attempts = node.query("SELECT delivery_id, ok FROM delivery_attempts ORDER BY id")
        for row in rows:
            mine = [a["ok"] for a in attempts if a["delivery_id"] == row["id"]]
            assert mine[-1] and not any(mine[:-1]) and len(mine) >= 3 and row["attempts"] == len(mine), mine
        engine = node.wait_rows("SELECT status, attempts FROM procrastinate_jobs WHERE task_name = 'lpm_node.deliver' "
                                "AND status <> 'todo'", until=lambda r: r and r[-1]["status"] == "succeeded")
        assert engine[-1]["status"] == "succeeded" and max(r["attempts"] for r in engine) >= 2, engine
        # one "next try" per failed run, the job engine's: the outbox's own backoff is not what happens here
        log = node.log()
        assert "next try in" not in log and log.count("not sent; next try at") >= 2, log[-3000:]
    assert len(orthanc.instances()) == len(KINDS)

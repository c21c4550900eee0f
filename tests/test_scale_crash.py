"""Many processes under fire, on a real PostgreSQL: 2 receivers, 3 workers and 1 sender as separate
``lpm-node serve --role ...`` processes, 4 concurrent dcmtk ``storescu`` senders with 20 series (some split over
both receivers), Orthanc as the PACS. Workers are SIGKILLed while they measure (no job cut short more than twice)
and one receiver once, in the middle of an association (its sender resends what was not acknowledged).

Nothing acknowledged is lost, every series is measured once and delivered once, and the audit tells it all.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from lpm_node.answer.outbox import KINDS
from lpm_node.demo.orthanc import orthanc_available
from lpm_node.demo.phantom import write_ct_series
from tests.support_net import NodeProcess, free_port, have_dcmtk, run_cli, storescu
from tests.support_phantom import small_phantom
from tests.test_job_engine import _measuring, _roles_config, _serve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
]

N_SERIES = 20
N_SENDERS = 4
N_WORKERS = 3
WORKER_KILLS = 3
MAX_CUTS = 2  # the third cut of one job would fail it (MAX_JOB_STARTS): never cut one more than twice


def _series(root: Path) -> list[list[Path]]:
    """20 small chest phantoms, each its own patient and study (the rules queue one series per study)."""
    return [write_ct_series(small_phantom(25.0 + 2 * i, n_slices=24, seed=100 + i), root / f"s{i:02d}",
                            patient_id=f"SCALE{i:03d}", patient_name=f"Scale^{i:03d}") for i in range(N_SERIES)]


def _acknowledged(output: str) -> list[str]:
    """The files ``storescu -v`` saw acknowledged with Success (each "Sending file" followed by its response)."""
    acknowledged = []
    current = None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


class Front:
    """The two receivers' ports as the senders see them: a receiver that is down is avoided, as a load balancer
    would; ``cut`` notes each association that a receiver's death cut short."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.down: set[int] = set()
        self.sending: dict[int, int] = {port: 0 for port in ports}
        self.lock = threading.Lock()
        self.cut: list[tuple[int, int, int]] = []  # (port, files sent, files acknowledged)
        self.unacknowledged_lost: list[str] = []

    def pick(self, wanted: int) -> int:
        with self.lock:
            port = self.ports[wanted % 2]
            return self.ports[(wanted + 1) % 2] if port in self.down else port

    def send(self, files: list[Path], wanted: int, spool_has: Callable[[Path], bool]) -> None:
        """Send ``files`` through one association; if it is cut, check that what was acknowledged is already in
        the spool and resend the rest (and any refused) through the other receiver."""
        for _ in range(5):
            port = self.pick(wanted)
            with self.lock:
                self.sending[port] += 1
            try:
                result = storescu(port, files, extra=["-v"], timeout=180)
            finally:
                with self.lock:
                    self.sending[port] -= 1
            acknowledged = set(_acknowledged(result.stdout + result.stderr))
            if result.returncode != 0:
                self.cut.append((port, len(files), len(acknowledged)))
            self.unacknowledged_lost += [f for f in acknowledged if not spool_has(Path(f))]
            files = [f for f in files if str(f) not in acknowledged]  # cut short or refused: sent again
            if not files:
                return
            wanted += 1
        raise AssertionError(f"could not send {len(files)} files after 5 associations")


def test_receivers_workers_and_sender_survive_sigkills_and_deliver_each_series_once(tmp_path, orthanc, postgres):
    url = postgres.new_database()
    config = _roles_config(tmp_path, orthanc, heartbeat_seconds=0.5, stalled_after_seconds=3.0)
    data = tmp_path / "shared"
    series = _series(tmp_path / "series")
    headers = [dcmread(files[0], stop_before_pixels=True) for files in series]
    uids = [str(h.SeriesInstanceUID) for h in headers]

    def spool_has(path: Path) -> bool:
        ds = dcmread(path, stop_before_pixels=True)
        return (data / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").is_file()

    ports = [free_port(), free_port()]
    receivers: list[NodeProcess] = []
    workers: list[NodeProcess] = []
    everyone: list[NodeProcess] = []  # every process started, killed at the end
    front = Front(ports)
    lock = threading.Lock()
    failures: list[BaseException] = []
    cuts: dict[int, int] = {}  # job id -> times a worker was killed while it ran it
    worker_kills: list[tuple[int, int, int]] = []  # (job id, start cut short, pid of the killed worker)

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                failures.append(exc)
        return run

    def sending(k: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(k, N_SERIES, N_SENDERS):
                files = series[i]
                if i % 3 == 0:  # split: half through each receiver, two associations
                    front.send(files[:12], i, spool_has)
                    front.send(files[12:], i + 1, spool_has)
                else:
                    front.send(files, i, spool_has)
                time.sleep(0.5)
        return run

    def kill_a_receiver() -> None:
        """SIGKILL the second receiver once, while an association to it is under way; restart it."""
        victim = receivers[1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with front.lock:
                busy = front.sending[victim.port] > 0
            if busy:  # an association is under way: cut it after its first instances
                time.sleep(0.3)
                break
            time.sleep(0.02)
        with front.lock:
            front.down.add(victim.port)
            victim.kill()
        time.sleep(1.0)
        restarted = _serve(data, "receiver", config, url, port=victim.port, stable=4.0)
        with lock:
            receivers[1] = restarted
            everyone.append(restarted)
        with front.lock:
            front.down.discard(victim.port)

    def kill_workers() -> None:
        """SIGKILL a worker while it measures, WORKER_KILLS times, never one job more than MAX_CUTS times; each
        killed worker is replaced by a new one."""
        rng = random.Random(19)
        deadline = time.monotonic() + 240
        while len(worker_kills) < WORKER_KILLS and time.monotonic() < deadline:
            alive = {w.proc.pid: w for w in workers if w.proc is not None and w.proc.poll() is None}
            choices = [(job_id, start, alive[pid]) for job_id, start, pid in _measuring(sender)
                       if pid in alive and cuts.get(job_id, 0) < MAX_CUTS]
            if not choices:
                time.sleep(0.3)
                continue
            job_id, attempts, victim = rng.choice(choices)
            victim.kill()
            row = sender.query("SELECT status, attempts FROM jobs WHERE id = ?", (job_id,))[0]
            if (row["status"], row["attempts"]) == ("running", attempts):  # it died mid-job: a cut-short start
                cuts[job_id] = cuts.get(job_id, 0) + 1
                worker_kills.append((job_id, attempts, victim.proc.pid))
            replacement = _serve(data, "worker", config, url)
            with lock:
                workers[workers.index(victim)] = replacement
                everyone.append(replacement)
            time.sleep(rng.uniform(1.0, 4.0))

    try:
        for port in ports:
            receivers.append(_serve(data, "receiver", config, url, port=port, stable=4.0))
            everyone.append(receivers[-1])
        for _ in range(N_WORKERS):
            workers.append(_serve(data, "worker", config, url))
            everyone.append(workers[-1])
        sender = _serve(data, "sender", config, url)
        everyone.append(sender)
        started = time.monotonic()
        threads = [threading.Thread(target=guarded(sending(k))) for k in range(N_SENDERS)]
        threads += [threading.Thread(target=guarded(kill_a_receiver)), threading.Thread(target=guarded(kill_workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not failures, failures
        assert not any(t.is_alive() for t in threads)
        sent_at = time.monotonic() - started

        # the receiver died in the middle of an association; what it had acknowledged was already in the spool
        assert [c for c in front.cut if c[0] == ports[1]], front.cut
        assert front.unacknowledged_lost == []
        assert len(worker_kills) == WORKER_KILLS and max(cuts.values()) <= MAX_CUTS, worker_kills

        for uid in uids:
            sender.wait_series_status(uid, ["done", "failed", "rejected"], timeout=240)
        delivered = sender.wait_rows("SELECT * FROM deliveries", until=lambda rows: len(rows) == N_SERIES * len(KINDS)
                                     and all(r["status"] == "sent" for r in rows), timeout=120)
        finished_at = time.monotonic() - started

        # every instance sent is in the spool, once
        for files in series:
            missing = [f for f in files if not spool_has(f)]
            assert missing == [], missing
        spooled = list((data / "spool").glob("*/*/*.dcm"))
        assert len(spooled) == N_SERIES * 24

        # every series measured once (one job, done), its answer sent once to the one destination
        jobs = sender.query("SELECT * FROM jobs ORDER BY id")
        assert sorted(j["series_instance_uid"] for j in jobs) == sorted(uids)
        assert [j["status"] for j in jobs] == ["done"] * N_SERIES, [(j["id"], j["status"], j["error"]) for j in jobs]
        assert sorted((r["series_instance_uid"], r["object_kind"]) for r in delivered) == sorted(
            (uid, kind) for uid in uids for kind in KINDS)
        assert all(r["attempts"] == 1 for r in delivered), [dict(r) for r in delivered if r["attempts"] != 1]
        assert len(orthanc.instances()) == N_SERIES * len(KINDS)
        for row in delivered:
            assert len(orthanc.find_by_sop_uid(row["sop_instance_uid"])) == 1, dict(row)

        # the audit tells the story: each job's starts (the cut-short ones too), its decisions, its deliveries
        summary = {s["series_instance_uid"]: s for s in sender.audit_json()}
        assert {uid: (summary[uid]["status"], summary[uid]["job_status"], summary[uid]["delivery_status"])
                for uid in uids} == {uid: ("done", "done", "sent") for uid in uids}
        for job in jobs:
            detail = _audit_series(sender, job["series_instance_uid"])
            [audited] = detail["jobs"]
            assert audited["attempts"] == 1 + cuts.get(job["id"], 0), (audited, cuts)
            starts = [d["reason"] for d in detail["decisions"] if d["status"] == "processing"]
            assert [x.split(" in ")[0] for x in starts] == [f"measuring (job {job['id']}, start {n})"
                                                            for n in range(1, audited["attempts"] + 1)]
            killed_in = {start: pid for job_id, start, pid in worker_kills if job_id == job["id"]}
            pids = [int(reason.rsplit(":", 1)[1]) for reason in starts]  # each start names its process
            assert {n: pids[n - 1] for n in killed_in} == killed_in, (starts, worker_kills)  # cut: the killed one
            assert pids[-1] not in killed_in.values(), (starts, worker_kills)  # the last: a live one
            assert [d["status"] for d in detail["decisions"]][-1] == "done"
            assert sorted(d["object"] for d in detail["deliveries"]) == sorted(KINDS)
            assert all(d["status"] == "sent" and [a["ok"] for a in d["attempt_log"]] == [True]
                       for d in detail["deliveries"]), detail["deliveries"]
        print(f"\n{N_SERIES} series, {len(front.cut)} associations cut by the receiver's death, "
              f"{len(worker_kills)} workers killed mid-job ({sum(cuts.values())} cut-short starts); "
              f"sending and kills over after {sent_at:.0f} s, all delivered after {finished_at:.0f} s")
    finally:
        for node in everyone:
            node.kill()


def _audit_series(node: NodeProcess, uid: str) -> dict:
    """``lpm-node audit --series UID --json``, parsed."""
    out = run_cli("audit", *node.cli_database(), "--series", uid, "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)

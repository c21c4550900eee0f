"""The front door against a hostile peer over raw sockets.

One node serves every case. After each case: the node answers C-ECHO and stores a legitimate
instance, its memory grew by less than 50 MB, its threads are back, nothing was written outside
the spool, and the audit database (and ``lpm-node audit --refusals``) shows the refusal.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.intake.header import is_valid_uid
from lpm_node.node.roles import MARKER_FILE
from tests.support_net import REPO, NodeProcess, echoscu, have_dcmtk, storescu
from tests.support_peer import (
    A_ABORT,
    A_RELEASE_RQ,
    CT,
    MR,
    associate,
    associate_rq_pdu,
    c_store_command,
    c_store_pdus,
    closed_by_node,
    connect,
    dataset_bytes,
    drip,
    p_data,
    pdv,
    random_bytes,
    store_status,
)

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")

ASSOCIATE_S = 3.0
IDLE_S = 4.0


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return values


@dataclass
class Door:
    node: NodeProcess
    legit: list[Path]
    baseline_rss_kb: int
    baseline_threads: int
    seen_rows: int = 0

    @property
    def port(self) -> int:
        return self.node.port

    def new_rows(self) -> list[dict]:
        rows = [dict(r) for r in self.node.query("SELECT * FROM associations ORDER BY id")]
        fresh = rows[self.seen_rows :]
        return fresh


@pytest.fixture(scope="module")
def door(tmp_path_factory) -> Door:
    tmp = tmp_path_factory.mktemp("door")
    legit = write_ct_series(make_phantom(n_slices=70, size=64, pixel_spacing=5.6), tmp / "legit")
    config = tmp / "door.toml"
    config.write_text(f"[node]\nassociate_timeout_s = {ASSOCIATE_S}\nidle_timeout_s = {IDLE_S}\n"
                      "max_connections = 64\nmax_associations = 16\n")
    node = NodeProcess(tmp / "node", config=config, stable_seconds=3600).start()
    try:
        assert storescu(node.port, legit[:1]).returncode == 0  # warm: first imports done
        time.sleep(0.5)
        status = _proc_status(node.proc.pid)
        d = Door(node, legit[1:], status["VmRSS"], status["Threads"])
        d.seen_rows = len(node.query("SELECT id FROM associations"))
        yield d
    finally:
        node.stop()


def _wait_threads(door: Door, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        threads = _proc_status(door.node.proc.pid)["Threads"]
        if threads <= door.baseline_threads or time.monotonic() > deadline:
            return threads
        time.sleep(0.1)


def _outside_spool(data_dir: Path) -> list[Path]:
    """Files in the data folder that are neither the audit database, a log, the data folder marker nor a spooled
    instance."""
    odd = []
    for path in data_dir.rglob("*"):
        rel = path.relative_to(data_dir)
        if path.is_dir() or rel.parts[0] != "spool":
            if path.is_file() and not (path.name.startswith("audit.sqlite") or path.suffix == ".log"
                                       or rel == Path(MARKER_FILE)):
                odd.append(path)
            continue
        parts = rel.parts[1:]
        if parts[0] == ".incoming":
            continue
        if not (len(parts) == 3 and all(is_valid_uid(p) for p in parts[:2]) and parts[2].endswith(".dcm")
                and is_valid_uid(parts[2][:-4])):
            odd.append(path)
    return odd


def _check_after(door: Door, expect: str, *, audited: bool = True) -> None:
    """The node is whole after a hostile case, and the audit tells what was refused (``expect`` in a reason)."""
    node = door.node
    assert node.proc.poll() is None, "the node died"
    assert echoscu(node.port).returncode == 0
    legit = door.legit.pop(0)
    result = storescu(node.port, [legit])
    assert result.returncode == 0, result.stderr
    sop = str(dcmread(legit, stop_before_pixels=True).SOPInstanceUID)
    assert list((node.data_dir / "spool").rglob(f"{sop}.dcm"))
    grown_mb = (_proc_status(node.proc.pid)["VmRSS"] - door.baseline_rss_kb) / 1024
    assert grown_mb < 50, f"RSS grew by {grown_mb:.0f} MB"
    threads = _wait_threads(door)
    assert threads <= door.baseline_threads, f"{threads} threads, {door.baseline_threads} before"
    assert _outside_spool(node.data_dir) == []
    deadline = time.monotonic() + (15 if audited else 0)
    while True:
        rows = door.new_rows()
        reasons = [f"{r['outcome']}: {r['reason']}" for r in rows if r["outcome"] != "released" or r["reason"]]
        if any(expect.lower() in r.lower() for r in reasons) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(expect.lower() in r.lower() for r in reasons) or not audited, reasons
    door.seen_rows += len(rows)


def _send_and_close(port: int, payload: bytes, linger: float = 0.3) -> None:
    with connect(port) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass
        closed_by_node(sock, linger)


def _assoc_and_send(port: int, payload: bytes, within_s: float = 5.0) -> bool:
    with associate(port) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return True
        return closed_by_node(sock, within_s)


def _ct_dataset(door: Door, **changes: str) -> tuple[bytes, str, str]:
    """(data set bytes, SOP Instance UID, SOP Class UID) of a CT file, with header changes written by pydicom."""
    path = door.legit[-1]
    if not changes:
        ds = dcmread(path, stop_before_pixels=True)
        return dataset_bytes(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    ds = dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    out = path.parent / f"changed-{len(changes)}-{time.monotonic_ns()}.dcm"
    ds.save_as(out, enforce_file_format=True)
    data = dataset_bytes(out)
    out.unlink()
    return data, str(ds.SOPInstanceUID), str(ds.SOPClassUID)


# --- cases: wire level ------------------------------------------------------------------------------
def test_random_bytes(door):
    _send_and_close(door.port, random_bytes(4096))
    _check_after(door, "")


@pytest.mark.parametrize("pdu_type", [1, 2, 3, 4, 5, 6, 7])
def test_huge_declared_length(door, pdu_type):
    header = struct.pack(">BBL", pdu_type, 0, 0xFFFFFFFF)
    if pdu_type == 1:
        _send_and_close(door.port, header + b"\0" * 64)
    else:
        assert _assoc_and_send(door.port, header + b"\0" * 64)
    _check_after(door, "above" if pdu_type in (1, 2, 4) else "declares")


def test_pdata_before_association(door):
    _send_and_close(door.port, p_data(pdv(1, 0x03, b"\0" * 10)))
    _check_after(door, "before an association")


@pytest.mark.parametrize("contexts,expect", [
    ([], "aborted"),
    ([(2 * i + 1, CT) for i in range(128)] + [(1, CT)] * 72, "aborted"),  # 200 contexts, duplicate IDs
    ([(1, CT)], "aborted"),  # made an even ID below
])
def test_malformed_associate_rq(door, contexts, expect):
    rq = bytearray(associate_rq_pdu("ODD", contexts=contexts))
    if contexts == [(1, CT)]:
        item = rq.index(b"\x20\x00", 74)  # the presentation context item
        rq[item + 4] = 2
    with connect(door.port) as sock:
        sock.sendall(bytes(rq))
        closed_by_node(sock, 3)
    _check_after(door, "")


def test_associate_rq_with_absurd_item_length(door):
    rq = bytearray(associate_rq_pdu("ABSURD"))
    rq[74 + 2 : 74 + 4] = b"\xff\xff"  # the application context item claims 65535 bytes
    _send_and_close(door.port, bytes(rq))
    _check_after(door, "")


def test_garbage_ae_titles(door):
    rq = bytearray(associate_rq_pdu("GARBAGE"))
    rq[10:42] = bytes(range(200, 232))  # called and calling AE titles: non-ASCII bytes
    _send_and_close(door.port, bytes(rq))
    _check_after(door, "")


def test_pdv_longer_than_its_pdu(door):
    bad = struct.pack(">BBL", 0x04, 0, 12) + struct.pack(">LBB", 5000, 1, 0x03) + b"\0" * 6
    assert _assoc_and_send(door.port, bad)
    _check_after(door, "does not fit")


def test_pdv_on_unaccepted_context(door):
    assert _assoc_and_send(door.port, p_data(pdv(77, 0x03, b"\0" * 10)))
    _check_after(door, "not accepted")


def test_garbage_command_set(door):
    assert _assoc_and_send(door.port, p_data(pdv(1, 0x03, random_bytes(64))))
    _check_after(door, "")


def test_data_set_without_command(door):
    assert _assoc_and_send(door.port, p_data(pdv(1, 0x02, b"\0" * 100)))
    _check_after(door, "data set without a command")


def test_oversized_command_set(door):
    fragments = b"".join(p_data(pdv(1, 0x01, b"\0" * 16000)) for _ in range(6))
    assert _assoc_and_send(door.port, fragments)
    _check_after(door, "command set above")


def test_many_tiny_pdus(door):
    tiny = p_data(pdv(1, 0x01, b"\0\0"))  # 12 bytes on the wire each
    with associate(door.port) as sock:
        try:
            sock.sendall(tiny * 8000)
        except OSError:
            pass
        closed_by_node(sock, 3)
    _check_after(door, "")


# --- cases: C-STORE content -------------------------------------------------------------------------
def _store(door: Door, command: bytes, dataset: bytes) -> int | None:
    with associate(door.port) as sock:
        sock.sendall(c_store_pdus(command, dataset))
        return store_status(sock)


def test_command_and_data_set_instance_uids_differ(door):
    data, _sop, sop_class = _ct_dataset(door)
    assert _store(door, c_store_command(sop_class, "1.2.3.4.5.6"), data) == 0xA900
    _check_after(door, "differs from the command")


def test_mr_data_set_on_a_ct_context(door):
    data, sop, _cls = _ct_dataset(door, SOPClassUID=MR)
    assert _store(door, c_store_command(CT, sop), data) == 0xA900
    _check_after(door, "differs from the command")


def test_command_class_differs_from_context(door):
    data, sop, _cls = _ct_dataset(door)
    assert _store(door, c_store_command(MR, sop), data) == 0xA900
    _check_after(door, "is not the context")


def test_command_without_affected_sop_instance_uid(door):
    data, _sop, sop_class = _ct_dataset(door)
    assert _store(door, c_store_command(sop_class, None), data) is None  # aborted, as storescp does
    _check_after(door, "without an Affected SOP Instance UID")


def _with_raw_uid(door: Door, keyword: str, raw: bytes) -> tuple[bytes, str, str]:
    """A data set whose ``keyword`` holds exactly ``raw`` (pydicom would tidy such a value on writing)."""
    placeholder = "9." + "9" * (len(raw) - 2)
    data, sop, sop_class = _ct_dataset(door, **{keyword: placeholder})
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), raw), sop, sop_class


@pytest.mark.parametrize("uid", [b"../../escape", b"1.2.3.4\n", b"1.2.3.45  ", b"1.2.3/44"])
def test_uids_with_path_characters_and_trailing_whitespace(door, uid):
    data, sop, sop_class = _with_raw_uid(door, "SeriesInstanceUID", uid)
    assert _store(door, c_store_command(sop_class, sop), data) == 0xC000
    data, _sop, sop_class = _with_raw_uid(door, "SOPInstanceUID", uid)
    assert _store(door, c_store_command(sop_class, uid.decode()), data) in (0xC000, None)  # refused, or aborted
    assert not list(door.node.data_dir.parent.rglob("*escape*"))
    _check_after(door, "invalid")


def test_truncated_and_aborted_transfers(door):
    data, sop, sop_class = _ct_dataset(door, SOPInstanceUID="1.2.826.0.1.3680043.8.498.424242")
    pdus = c_store_pdus(c_store_command(sop_class, sop), data)
    with associate(door.port) as sock:
        sock.sendall(pdus[: len(pdus) // 2])  # then the peer vanishes
    with associate(door.port) as sock:
        sock.sendall(pdus[: len(pdus) // 2] + A_ABORT)
        closed_by_node(sock, 3)
    assert not list((door.node.data_dir / "spool").rglob(f"{sop}.dcm"))
    _check_after(door, "abort")


# --- cases: deadlines and connections ---------------------------------------------------------------
def test_dripping_peer_while_associating(door):
    with connect(door.port) as sock:
        assert drip(sock, associate_rq_pdu("DRIP"), every_s=0.5, until_s=ASSOCIATE_S + 10)
    _check_after(door, "associate deadline")


def test_dripping_peer_in_the_data_phase(door):
    data, sop, sop_class = _ct_dataset(door)
    with associate(door.port) as sock:
        assert drip(sock, c_store_pdus(c_store_command(sop_class, sop), data), every_s=0.5, until_s=IDLE_S + 10)
    _check_after(door, "not complete within")


def test_peer_that_keeps_sending_after_an_abort_is_closed(door):
    with connect(door.port) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 20) + b"\0" * 20)  # an A-ASSOCIATE-RQ that does not decode
        closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(A_RELEASE_RQ)
            except OSError:
                closed = True
                break
            closed = closed_by_node(sock, 0.2)
        assert closed
    _check_after(door, "")


def test_forty_idle_connections_and_a_legitimate_sender(door):
    idle = [connect(door.port) for _ in range(40)]
    try:
        legit = door.legit[0]
        result = storescu(door.port, [legit])
        assert result.returncode == 0, result.stderr
    finally:
        for sock in idle:
            sock.close()
    _check_after(door, "association")


def test_refusals_are_in_lpm_node_audit(door):
    out = subprocess.run([sys.executable, "-m", "lpm_node.cli", "audit", "--data-dir", str(door.node.data_dir),
                          "--refusals", "--json", "--limit", "500"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    rows = json.loads(out.stdout)
    reasons = " | ".join(r["reason"] for r in rows)
    for expect in ("not accepted", "data set without a command", "associate deadline", "0xA900", "0xC000"):
        assert expect in reasons, expect
    assert all(r["peer"].startswith("127.0.0.1:") for r in rows)
    text = subprocess.run([sys.executable, "-m", "lpm_node.cli", "audit", "--data-dir", str(door.node.data_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "refused and aborted connections" in text and "aborted" in text
    listing = json.loads(subprocess.run(
        [sys.executable, "-m", "lpm_node.cli", "audit", "--data-dir", str(door.node.data_dir), "--json",
         "--limit", "500"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout)
    assert "series" in listing and any("0xA900" in r["reason"] for r in listing["refusals"])


# --- property: any sequence of PDUs leaves the node whole --------------------------------------------
_pdu = st.one_of(
    st.builds(lambda t, body: struct.pack(">BBL", t, 0, len(body)) + body,
              st.integers(0, 9), st.binary(max_size=300)),
    st.builds(lambda t, n, body: struct.pack(">BBL", t, 0, n) + body,
              st.integers(0, 9), st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)),
    st.builds(lambda cid, ctrl, body: p_data(pdv(cid, ctrl, body)),
              st.sampled_from([1, 3, 5, 255]), st.integers(0, 3), st.binary(max_size=200)),
    st.just(A_RELEASE_RQ), st.just(A_ABORT),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(associate_first=st.booleans(), pdus=st.lists(_pdu, max_size=6))
def test_pdu_sequences_leave_the_node_whole(door, associate_first, pdus):
    with connect(door.port) as sock:
        try:
            if associate_first:
                sock.sendall(associate_rq_pdu("FUZZ"))
            for pdu in pdus:
                sock.sendall(pdu)
        except OSError:
            pass
        assert closed_by_node(sock, ASSOCIATE_S + IDLE_S + 4) or not pdus  # never held open past the deadlines
    assert door.node.proc.poll() is None


def test_after_fuzzing_the_node_is_whole(door):
    _check_after(door, "", audited=False)



def test_connections_beyond_the_cap_are_closed_without_a_thread_each(door):
    opened = []
    try:
        for _ in range(150):
            opened.append(connect(door.port))
        time.sleep(0.5)
        threads = _proc_status(door.node.proc.pid)["Threads"]
        assert threads <= door.baseline_threads + 2 * 64 + 4, threads  # two per admitted connection at most
        closed = sum(closed_by_node(sock, 0.01) for sock in opened)
        assert closed >= 150 - 64
    finally:
        for sock in opened:
            sock.close()
    _check_after(door, "connection limit reached")

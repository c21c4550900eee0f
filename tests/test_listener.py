"""The listener against real dcmtk peers: storage, selection, refusals, robustness, full disk."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import NodeProcess, associate_rq, dcmtk_env, echoscu, have_dcmtk, read_pdu, storescu

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu, echoscu) not installed")


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(n_slices=64)  # 512 x 512 int16, 160 mm of z-coverage


@pytest.fixture(scope="module")
def chest(phantom, tmp_path_factory) -> list[Path]:
    return write_ct_series(phantom, tmp_path_factory.mktemp("chest"))


def _spooled(node: NodeProcess, expect: int = 0, timeout: float = 15.0) -> list[Path]:
    """The node's spool files, waiting up to ``timeout`` for ``expect`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted((node.data_dir / "spool").rglob("*.dcm"))
        if len(files) >= expect or time.monotonic() > deadline:
            return files
        time.sleep(0.02)


def test_series_is_stored_durably_queued_and_audited(tmp_path, chest):
    with NodeProcess(tmp_path / "node", stable_seconds=1) as node:
        result = storescu(node.port, chest)
        assert result.returncode == 0, result.stderr
        series_uid = str(dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
        row = node.wait_series_status(series_uid, ["queued"])
        assert row["instance_count"] == 64
        assert row["reason"].startswith("selected: soft kernel B30f, 2.5 mm slices, 160 mm coverage, 64 slices")
        jobs = node.query("SELECT series_instance_uid, status FROM jobs")
        assert [tuple(j) for j in jobs] == [(series_uid, "queued")]

        # every instance is in the spool, byte-identical in its data set
        files = _spooled(node, 64)
        assert len(files) == 64
        by_sop = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in chest}
        for stored in files[:5]:
            got = dcmread(stored)
            sent = dcmread(by_sop[got.SOPInstanceUID])
            assert got.PixelData == sent.PixelData
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
            assert stored.parent.name == series_uid and stored.parent.parent.name == sent.StudyInstanceUID

        # the same series again: accepted, not stored twice, not queued twice
        again = storescu(node.port, chest)
        assert again.returncode == 0, again.stderr
        time.sleep(1.5)  # past stable_seconds: a second job would have been queued by now
        assert len(_spooled(node)) == 64
        assert node.series(series_uid)["instance_count"] == 64
        assert len(node.query("SELECT id FROM jobs")) == 1
        assocs = node.wait_rows(
            "SELECT calling_ae, outcome, instances_received FROM associations WHERE calling_ae = ?", ("STORESCU",),
            until=lambda rows: len(rows) == 2 and all(r["outcome"] == "released" for r in rows))
        assert [tuple(a) for a in assocs] == [("STORESCU", "released", 64)] * 2

        listing = node.audit_json()
        entry = next(e for e in listing if e["series_instance_uid"] == series_uid)
        assert entry["status"] == "queued" and entry["instances"] == 64
        assert entry["study_instance_uid"] == str(dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID)
        assert entry["job_status"] == "queued"
        assert entry["dl_parenchymal_hu"] is None and entry["category"] is None and entry["delivery_status"] is None
        assert node.stop() == 0
    log = node.log()
    assert f"listening on 127.0.0.1:{node.port} as AE title LPM_NODE" in log
    assert "Phantom" not in log  # logs carry UIDs, not patient names


def test_concurrent_associations_rules_and_selection(tmp_path, phantom, chest):
    study = str(dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID)
    soft = chest
    lung = write_ct_series(phantom, tmp_path / "lung", series_number=3, series_description="CHEST LUNG 2.5mm",
                           overrides={"ConvolutionKernel": "B70f"})
    localizer = write_ct_series(phantom, tmp_path / "loc", series_number=1, series_description="TOPOGRAM",
                                overrides={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})[:3]
    contrast = write_ct_series(phantom, tmp_path / "contrast", study_uid=_uid(),
                               overrides={"ContrastBolusAgent": "IOHEXOL"})[:10]
    abdomen = write_ct_series(phantom, tmp_path / "abdomen", study_uid=_uid(), body_part="ABDOMEN",
                              study_description="CT ABDOMEN", series_description="ABD 2.5mm")[:10]
    uids = {name: str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in [("soft", soft), ("lung", lung), ("loc", localizer), ("contrast", contrast),
                                ("abdomen", abdomen)]}
    with NodeProcess(tmp_path / "node", stable_seconds=1) as node:
        procs = [
            subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "LPM_NODE", "127.0.0.1", str(node.port),
                              *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i, files in enumerate([soft, lung, localizer, contrast, abdomen])
        ]
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
        rows = {name: node.wait_series_status(uid, ["queued", "not_selected", "rejected"])
                for name, uid in uids.items()}
        assert rows["soft"]["status"] == "queued"
        assert rows["lung"]["status"] == "not_selected" and uids["soft"] in rows["lung"]["reason"]
        assert rows["loc"]["status"] == "rejected"
        assert rows["loc"]["reason"] == "localizer: ImageType contains LOCALIZER"
        assert rows["contrast"]["status"] == "rejected"
        assert rows["contrast"]["reason"] == "contrast-enhanced: ContrastBolusAgent=IOHEXOL"
        assert rows["abdomen"]["status"] == "rejected"
        assert rows["abdomen"]["reason"] == "abdominal study: BodyPartExamined=ABDOMEN"
        assert rows["soft"]["study_instance_uid"] == rows["lung"]["study_instance_uid"] == study
        sql = "SELECT calling_ae, instances_received FROM associations WHERE calling_ae LIKE 'MOD%'"
        counts = {r["calling_ae"]: r["instances_received"] for r in node.query(sql)}
        assert counts == {"MOD0": 64, "MOD1": 64, "MOD2": 3, "MOD3": 10, "MOD4": 10}
        assert [tuple(j) for j in node.query("SELECT series_instance_uid, status FROM jobs")] == [
            (uids["soft"], "queued")]


def test_rule_refusal_reasons_quote_header_text_in_the_audit_but_never_in_the_log(tmp_path, phantom):
    """A series description (patient data may hide there) decides a refusal: the audit keeps it as the reason, the
    node's log names the rule and the series only."""
    secret = "ARTERIAL Doe^Jane 19700101"
    contrast = write_ct_series(phantom, tmp_path / "contrast", study_uid=_uid(), series_description=secret,
                               overrides={"ContrastBolusAgent": "IOHEXOL-SECRET"})[:10]
    described = write_ct_series(phantom, tmp_path / "described", study_uid=_uid(), series_description=secret)[:10]
    uids = {name: str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for name, files in [("contrast", contrast), ("described", described)]}
    with NodeProcess(tmp_path / "node", stable_seconds=1) as node:
        for files in (contrast, described):
            result = storescu(node.port, files)
            assert result.returncode == 0, result.stderr
        rows = {name: node.wait_series_status(uid, ["rejected", "queued"]) for name, uid in uids.items()}
        assert rows["contrast"]["reason"] == "contrast-enhanced: ContrastBolusAgent=IOHEXOL-SECRET"
        assert rows["described"]["reason"] == f"contrast-enhanced: SeriesDescription {secret!r} contains 'arterial'"
        log = node.log()
        for name in ("contrast", "described"):
            rule = "contrast-attribute" if name == "contrast" else "contrast-description"
            assert f"series {uids[name]} (audit id {rows[name]['id']}) rejected by rule {rule}" in log, log
        assert "Doe^Jane" not in log and "IOHEXOL" not in log and "ARTERIAL" not in log, log


def test_unknown_calling_ae_is_rejected_and_audited(tmp_path):
    with NodeProcess(tmp_path / "node", allow_ae=["PACS", "ECHOSCU"]) as node:
        refused = echoscu(node.port, calling="INTRUDER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        assert echoscu(node.port, calling="PACS").returncode == 0
        rows = node.wait_rows("SELECT calling_ae, outcome, reason FROM associations WHERE outcome = 'rejected'")
        assert [r["calling_ae"] for r in rows] == ["INTRUDER"]
        assert "not in allowed_ae_titles" in rows[0]["reason"]


def test_unsupported_sop_class_is_refused_at_negotiation(tmp_path, chest):
    mr = tmp_path / "mr.dcm"
    ds = dcmread(chest[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.save_as(mr)
    with NodeProcess(tmp_path / "node") as node:
        result = storescu(node.port, [mr])
        assert result.returncode != 0
        assert "no presentation context" in (result.stdout + result.stderr).lower()
        assert _spooled(node) == []


def _send_raw(port: int, payload: bytes, *, linger: float = 0.1) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        time.sleep(linger)


def test_garbage_truncated_and_aborted_input_is_survived(tmp_path, chest):
    bad_uid = tmp_path / "bad_uid.dcm"
    ds = dcmread(chest[0])
    ds.SeriesInstanceUID = "../../escape"
    ds.save_as(bad_uid)
    no_study = tmp_path / "no_study.dcm"
    ds = dcmread(chest[1])
    del ds.StudyInstanceUID
    ds.save_as(no_study)
    with NodeProcess(tmp_path / "node") as node:
        _send_raw(node.port, os.urandom(4096))  # garbage bytes
        _send_raw(node.port, struct.pack(">BBL", 0x01, 0, 5000) + b"\x00\x01" + b"x" * 100)  # truncated A-ASSOCIATE-RQ
        _send_raw(node.port, struct.pack(">BBL", 0x04, 0, 1 << 30) + b"\x00" * 64)  # P-DATA without association
        _send_raw(node.port, b"")  # connect and close
        with socket.create_connection(("127.0.0.1", node.port), timeout=5):  # an idle peer does not block others
            assert echoscu(node.port).returncode == 0
        # an association killed in the middle of a transfer
        many = [str(p) for p in chest] * 20  # long enough to be killed in the middle
        sender = subprocess.Popen(["storescu", "-aec", "LPM_NODE", "127.0.0.1", str(node.port), *many],
                                  env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while len(_spooled(node)) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        sender.kill()
        sender.wait(10)
        # datasets with an unsafe or missing UID: refused with a cannot-understand status, nothing written
        refused = storescu(node.port, [bad_uid, no_study], extra=["-v", "--no-halt"])
        out = refused.stdout + refused.stderr
        assert out.count("Error: CannotUnderstand") == 2, out
        assert not list((node.data_dir / "spool").rglob("*escape*"))
        assert not list(tmp_path.rglob("escape*"))
        assert echoscu(node.port).returncode == 0
        assert node.proc.poll() is None
        deadline = time.monotonic() + 15  # outcomes are settled shortly after each connection closes
        outcomes: list[str] = []
        while "aborted" not in outcomes and time.monotonic() < deadline:
            time.sleep(0.2)
            outcomes = [r["outcome"] for r in node.query("SELECT outcome FROM associations")]
        assert "aborted" in outcomes
        refusals = node.wait_rows("SELECT instances_refused, reason FROM associations WHERE instances_refused > 0",
                                  until=lambda rows: rows and rows[0]["instances_refused"] >= 2)
        assert len(refusals) == 1
        assert refusals and refusals[0]["instances_refused"] == 2 and "cannot understand" in refusals[0]["reason"]


def test_full_spool_answers_out_of_resources_and_recovers(tmp_path, chest):
    data = tmp_path / "node"
    (data / "spool").mkdir(parents=True)
    ballast = data / "spool" / "ballast.bin"
    ballast.write_bytes(b"\0" * (16 * 2**20))
    config = tmp_path / "quota.toml"
    config.write_text("[node]\nspool_quota_mb = 40\n")  # 16 MB ballast + 64 x 0.5 MB do not fit
    series_uid = str(dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
    with NodeProcess(data, config=config, stable_seconds=1) as node:
        full = storescu(node.port, chest, extra=["-v", "--no-halt"])
        assert "Refused: OutOfResources" in full.stdout + full.stderr
        sql = "SELECT instances_received, instances_refused, reason FROM associations WHERE calling_ae = 'STORESCU'"
        refused = node.wait_rows(
            sql, until=lambda rows: rows and rows[0]["instances_received"] + rows[0]["instances_refused"] == 64)[0]
        kept = _spooled(node, refused["instances_received"])
        assert 0 < len(kept) < 64
        kept_bytes = {p: p.read_bytes() for p in kept}
        assert refused["instances_received"] == len(kept)
        assert refused["instances_refused"] == 64 - len(kept)
        assert "out of resources" in refused["reason"] and "spool quota" in refused["reason"]

        ballast.unlink()  # free space; the node notices without a restart
        time.sleep(1.2)
        again = storescu(node.port, chest)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(_spooled(node, 64)) == 64
        assert all(p.read_bytes() == b for p, b in kept_bytes.items())  # nothing lost or rewritten
        row = node.wait_series_status(series_uid, ["queued"])
        assert row["instance_count"] == 64


def test_low_free_disk_answers_out_of_resources(tmp_path, chest):
    config = tmp_path / "disk.toml"
    config.write_text("[node]\nmin_free_disk_mb = 1000000000\n")  # more than any disk has free
    with NodeProcess(tmp_path / "node", config=config) as node:
        result = storescu(node.port, chest[:2], extra=["-v", "--no-halt"])
        assert "Refused: OutOfResources" in result.stdout + result.stderr
        assert _spooled(node) == []
        assert echoscu(node.port).returncode == 0
        row = node.wait_rows("SELECT instances_refused, reason FROM associations WHERE instances_refused > 0",
                             until=lambda rows: rows and rows[0]["instances_refused"] >= 2)[0]
        assert row["instances_refused"] == 2 and "min_free_disk_mb" in row["reason"]


# --- the spool on its own ----------------------------------------------------------------------
def test_uid_validation():
    from lpm_node.intake.header import is_valid_uid

    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert not is_valid_uid("1.2.840.10008.5.1.4.1.1.2\n") and not is_valid_uid("1.2.3 ")
    assert is_valid_uid("2.25." + "9" * 59)  # 64 characters
    for bad in ("", "1", "1.2.", ".1.2", "1..2", "1.02", "../../etc", "1.2/3", "1.2 3", "2.25." + "9" * 60, None, 12):
        assert not is_valid_uid(bad), bad


def test_spool_adopt_duplicate_quota_and_stale_temporaries(tmp_path):
    from lpm_node.intake.spool import Spool, SpoolFull

    spool = Spool(tmp_path / "spool", quota_mb=1)

    def received(name: str, data: bytes) -> Path:
        path = spool.incoming / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    first = spool.adopt(received("a", b"a" * 2000), "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert not first.duplicate and first.path.read_bytes() == b"a" * 2000
    assert first.path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    again = spool.adopt(received("c", b"c" * 10), "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert again.duplicate and first.path.read_bytes()[:1] == b"a"
    with pytest.raises(SpoolFull, match="spool quota"):
        spool.adopt(received("x", b"x" * (2**20)), "1.2.3", "1.2.3.4", "1.2.3.4.6")
    assert not (first.path.parent / "1.2.3.4.6.dcm").exists()
    with pytest.raises(ValueError):
        spool.adopt(received("y", b"x"), "1.2.3", "../x", "1.2.3.4.7")
    stale = first.path.parent / ".1.2.3.4.8.99.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 600, time.time() - 600))  # untouched for 10 minutes: nobody is writing it
    fresh = first.path.parent / ".1.2.3.4.9.99.tmp"  # the data folder may be shared: another process writes this now
    fresh.write_bytes(b"in progress")
    reopened = Spool(tmp_path / "spool")
    assert [p.name for p in reopened.root.rglob("*.tmp")] == [fresh.name]
    fresh.unlink()
    assert [p.name for _s, _r, p in reopened.iter_instances()] == ["1.2.3.4.5.dcm"]


def test_compressed_and_deflated_transfer_syntaxes_are_stored_as_received(tmp_path):
    import numpy as np
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    small = make_phantom(n_slices=2, size=64, pixel_spacing=5.6)
    sent: dict[str, Path] = {}
    for ts in (ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1):
        sent[str(ts)] = write_ct_series(small, tmp_path / str(ts), transfer_syntax=ts,
                                        series_description=f"CHEST {ts}")[0]
    deflated = tmp_path / "deflated.dcm"
    ds = dcmread(write_ct_series(small, tmp_path / "plain", series_description="CHEST deflated")[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    sent[str(DeflatedExplicitVRLittleEndian)] = deflated
    propose = {str(ImplicitVRLittleEndian): "-xi", str(RLELossless): "-xr", str(JPEG2000Lossless): "-xv",
               str(JPEGLSLossless): "-xt", str(JPEGLosslessSV1): "-xs", str(DeflatedExplicitVRLittleEndian): "-xd"}
    with NodeProcess(tmp_path / "node") as node:
        for ts, path in sent.items():
            result = storescu(node.port, [path], extra=["-v", propose[ts]])
            assert result.returncode == 0 and "Success" in result.stdout + result.stderr, (ts, result.stderr)
        spooled = _spooled(node, len(sent))
        stored = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID): p for p in spooled}
        assert set(stored) == set(sent)  # kept in the syntax it was sent in: no decoding, no re-encoding
        for ts, path in sent.items():
            assert np.array_equal(dcmread(stored[ts]).pixel_array, dcmread(path).pixel_array), ts


def test_peer_address_outside_allowed_hosts_is_rejected(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    config = tmp_path / "hosts.toml"
    config.write_text('[node]\nallowed_hosts = ["127.0.0.1"]\n')
    with NodeProcess(tmp_path / "node", config=config) as node:
        # read on the wire: a pynetdicom requestor may take an RJ this quick for a lost connection
        with socket.create_connection(("127.0.0.1", node.port), timeout=5, source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(associate_rq("ELSEWHERE"))
            # A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised
            assert read_pdu(sock) == bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x03])
        scu = AE(ae_title="ELSEWHERE")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", node.port, ae_title="LPM_NODE")  # from an allowed address
        assert assoc.is_established
        assoc.release()
        rows = node.wait_rows("SELECT calling_ae, peer_address, reason FROM associations WHERE outcome = 'rejected'")
        assert [(r["calling_ae"], r["peer_address"]) for r in rows] == [("ELSEWHERE", "127.0.0.2")]
        assert "not in allowed_hosts" in rows[0]["reason"]

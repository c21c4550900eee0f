"""End to end against real peers: storescu -> lpm-node serve -> Orthanc, with the faults a PACS sees.

The node runs the bundled phantom model on the CPU; each test sends a 64-slice phantom chest CT.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.measurement import Category
from tests.support_net import REPO, NodeProcess, echoscu, have_dcmtk, storescu

pytestmark = [
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
]

TRUE_HU = 30.0
KINDS = {"SEG", "SR", "OT", "KO"}  # the key image is a Secondary Capture (Modality OT); KO: key object selection


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> list[Path]:
    """A 64-slice unenhanced phantom chest CT, liver at 30 HU (moderate-to-severe steatosis)."""
    phantom = make_phantom(TRUE_HU, n_slices=64, size=256, pixel_spacing=1.4, seed=21)
    return write_ct_series(phantom, tmp_path_factory.mktemp("chest"))


def _uid(files: list[Path], keyword: str) -> str:
    return str(dcmread(files[0], stop_before_pixels=True)[keyword].value)


def _node(tmp: Path, orthanc: Orthanc, **kw) -> NodeProcess:
    config = tmp / "node.toml"
    config.write_text("[output]\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\nmax_attempts = 100\n")
    return NodeProcess(
        tmp / "node", measure=True, stable_seconds=1, config=config,
        extra=["--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"], **kw,
    )


def _wait_delivered(node: NodeProcess, series_uid: str, timeout: float = 300) -> list:
    deadline = time.monotonic() + timeout
    rows: list = []
    while time.monotonic() < deadline:
        rows = node.query("SELECT * FROM deliveries WHERE series_instance_uid = ?", (series_uid,))
        if rows and all(r["status"] == "sent" for r in rows):
            return rows
        time.sleep(0.3)
    raise TimeoutError(f"deliveries not all sent: {[dict(r) for r in rows]}\n{node.log()[-3000:]}")


def _results_at(orthanc: Orthanc, study_uid: str) -> dict[str, list]:
    """The node's objects stored at Orthanc in the study, by modality."""
    found: dict[str, list] = {}
    for instance in orthanc.instances():
        tags = orthanc.instance_tags(instance)
        if tags.get("StudyInstanceUID") == study_uid and tags.get("Modality") in KINDS:
            found.setdefault(tags["Modality"], []).append(dcmread(DicomBytesIO(orthanc.instance_file(instance))))
    return found


def _sr_value(sr) -> float:  # noqa: ANN001
    """The DL-parenchymal value, found as the README says: by its measurement method, not a tracking identifier."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    for group in report.content.get_volumetric_roi_measurement_groups():
        for measurement in group.get_measurements():
            if measurement.name.value == "112031" and measurement.method and measurement.method.value == "DLPAR":
                return float(measurement.value)
    raise AssertionError("no DL-parenchymal attenuation in the SR")


def test_phantom_ct_is_measured_and_answered_at_orthanc(tmp_path, orthanc, chest):
    series_uid, study_uid = _uid(chest, "SeriesInstanceUID"), _uid(chest, "StudyInstanceUID")
    with _node(tmp_path, orthanc) as node:
        sent = storescu(node.port, chest)
        assert sent.returncode == 0, sent.stderr
        row = node.wait_series_status(series_uid, ["done", "failed"], timeout=300)
        assert row["status"] == "done", row["reason"]
        deliveries = _wait_delivered(node, series_uid)
        assert sorted(d["object_kind"] for d in deliveries) == ["KEY", "KOS", "SEG", "SR"]
        audit = {s["series_instance_uid"]: s for s in node.audit_json()}[series_uid]
        job = node.query("SELECT model_name, model_version, model_weights_sha256, model_test FROM jobs "
                         "WHERE series_instance_uid = ?", (series_uid,))[0]
    # the audit names the model, and that it is the bundled test model
    assert job["model_name"] == "LpmLiver" and job["model_test"] == 1 and len(job["model_weights_sha256"]) == 64
    assert "3d_fullres" in job["model_version"]
    assert abs(audit["dl_parenchymal_hu"] - TRUE_HU) <= 1.5
    assert audit["category"] == Category.STEATOSIS
    assert audit["status"] == "done" and audit["job_status"] == "done" and audit["delivery_status"] == "sent"

    found = _results_at(orthanc, study_uid)
    assert sorted(found) == sorted(KINDS) and all(len(v) == 1 for v in found.values())
    seg, sr, key = found["SEG"][0], found["SR"][0], found["OT"][0]
    # the same study and patient as the CT, referencing the source series
    source = dcmread(chest[0], stop_before_pixels=True)
    for ds in (seg, sr, key):
        assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {s.SegmentLabel for s in seg.SegmentSequence} >= {"Liver", "DL-parenchymal ROI"}
    evidence_study = sr.CurrentRequestedProcedureEvidenceSequence[0]
    evidence = {item.SeriesInstanceUID for item in evidence_study.ReferencedSeriesSequence}
    assert series_uid in evidence
    assert abs(_sr_value(sr) - audit["dl_parenchymal_hu"]) < 0.01
    assert key.BurnedInAnnotation == "YES"


def test_results_wait_while_the_pacs_is_down_and_go_out_once_it_is_back(tmp_path, orthanc, chest):
    series_uid, study_uid = _uid(chest, "SeriesInstanceUID"), _uid(chest, "StudyInstanceUID")
    orthanc.stop()
    with _node(tmp_path, orthanc) as node:
        assert storescu(node.port, chest).returncode == 0
        assert node.wait_series_status(series_uid, ["done", "failed"], timeout=300)["status"] == "done"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = node.query("SELECT * FROM deliveries WHERE series_instance_uid = ?", (series_uid,))
            if len(rows) == 4 and all(r["attempts"] >= 2 for r in rows):
                break
            time.sleep(0.3)
        assert all(r["status"] == "pending" and "ConnectionRefused" in r["last_error"] for r in rows), rows
        orthanc.start()  # the PACS is back, with the same storage
        _wait_delivered(node, series_uid)
    found = _results_at(orthanc, study_uid)
    assert sorted(found) == sorted(KINDS) and all(len(v) == 1 for v in found.values())


def test_node_killed_mid_series_completes_it_after_restart_and_delivers_once(tmp_path, orthanc, chest):
    series_uid, study_uid = _uid(chest, "SeriesInstanceUID"), _uid(chest, "StudyInstanceUID")
    node = _node(tmp_path, orthanc)
    node.start()
    try:
        assert storescu(node.port, chest[:40]).returncode == 0
        node.kill()  # SIGKILL: no clean-up at all
        node.start()  # same data folder and port
        assert storescu(node.port, chest[40:]).returncode == 0
        row = node.wait_series_status(series_uid, ["done", "failed"], timeout=300)
        assert row["status"] == "done" and row["instance_count"] == len(chest), row["reason"]
        first = {r["sop_instance_uid"] for r in _wait_delivered(node, series_uid)}
        node.kill()  # killed again after delivery: a restart must not send anything twice
        node.start()
        time.sleep(3)
        again = node.query("SELECT sop_instance_uid, status, attempts FROM deliveries")
        jobs = node.query("SELECT status FROM jobs WHERE series_instance_uid = ?", (series_uid,))
    finally:
        node.stop()
    assert {r["sop_instance_uid"] for r in again} == first and all(r["status"] == "sent" for r in again)
    assert [j["status"] for j in jobs] == ["done"]
    found = _results_at(orthanc, study_uid)
    assert sorted(found) == sorted(KINDS) and all(len(v) == 1 for v in found.values())


def test_corrupt_series_fails_with_its_reason_and_the_node_keeps_serving(tmp_path, orthanc, chest):
    broken = []
    for path in chest:  # headers intact, pixel data cut in half: the rules accept it, loading must fail
        ds = dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        target = tmp_path / "broken" / path.name
        target.parent.mkdir(exist_ok=True)
        ds.save_as(target)
        broken.append(target)
    series_uid = _uid(broken, "SeriesInstanceUID")
    with _node(tmp_path, orthanc) as node:
        assert storescu(node.port, broken).returncode == 0
        row = node.wait_series_status(series_uid, ["done", "failed"], timeout=300)
        assert row["status"] == "failed"
        job = node.query("SELECT status, error FROM jobs WHERE series_instance_uid = ?", (series_uid,))[0]
        assert job["status"] == "failed" and job["error"]
        assert echoscu(node.port).returncode == 0  # still serving
        shown = subprocess.run(
            [sys.executable, "-m", "lpm_node.cli", "audit", "--data-dir", str(node.data_dir), "--series", series_uid],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        assert "failed" in shown and job["error"][:40] in shown
        audit = {s["series_instance_uid"]: s for s in node.audit_json()}[series_uid]
        assert audit["status"] == "failed" and audit["dl_parenchymal_hu"] is None
    assert json.dumps(audit)  # plain JSON


def test_results_go_back_to_the_sending_ae_when_configured(tmp_path, orthanc, chest):
    series_uid, study_uid = _uid(chest, "SeriesInstanceUID"), _uid(chest, "StudyInstanceUID")
    config = tmp_path / "reply.toml"
    config.write_text(f"[output]\nreply_to_sender = true\nreply_port = {orthanc.dicom_port}\n")
    with NodeProcess(tmp_path / "node", measure=True, stable_seconds=1, config=config) as node:
        assert storescu(node.port, chest, calling="PACS_A").returncode == 0
        rows = _wait_delivered(node, series_uid)
    assert {r["destination"] for r in rows} == {f"PACS_A@127.0.0.1:{orthanc.dicom_port}"}
    found = _results_at(orthanc, study_uid)
    assert sorted(found) == sorted(KINDS)

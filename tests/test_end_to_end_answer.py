"""End to end for the answer: Enhanced and Legacy Converted Enhanced CT sent by storescu to ``lpm-node serve`` are
answered at Orthanc; a series re-reported with another threshold gets new UIDs and an SR that names the first."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom
from tests.support_net import NodeProcess, have_dcmtk, storescu
from tests.support_sources import ENHANCED_CT, LEGACY_CONVERTED_ENHANCED_CT, write_multiframe
from tests.test_end_to_end import _wait_delivered

pytestmark = [
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
    pytest.mark.timeout(900),
]


def _node(tmp: Path, orthanc: Orthanc, threshold: float = 40.0) -> NodeProcess:
    config = tmp / f"node-{threshold:g}.toml"
    config.write_text(f"[output]\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\n\n"
                      f"[measurement]\nthreshold_hu = {threshold}\n")
    return NodeProcess(tmp / "node", measure=True, stable_seconds=1, config=config,
                       extra=["--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"])


def _answer_at(orthanc: Orthanc, study_uid: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for instance in orthanc.instances():
        tags = orthanc.instance_tags(instance)
        if tags.get("StudyInstanceUID") == study_uid and tags.get("Modality") in {"SEG", "SR", "OT", "KO"}:
            found.setdefault(tags["Modality"], []).append(dcmread(DicomBytesIO(orthanc.instance_file(instance))))
    return found


@pytest.mark.parametrize("enhanced", [True, False], ids=["enhanced-ct", "legacy-converted-enhanced-ct"])
def test_multiframe_ct_is_answered_at_orthanc(tmp_path, orthanc, enhanced):
    phantom = make_phantom(33.0, n_slices=64, size=256, pixel_spacing=1.4, seed=41)
    path = write_multiframe(phantom, tmp_path / "ct", enhanced=enhanced)
    source = dcmread(path, stop_before_pixels=True)
    assert source.SOPClassUID == (ENHANCED_CT if enhanced else LEGACY_CONVERTED_ENHANCED_CT)
    with _node(tmp_path, orthanc) as node:
        sent = storescu(node.port, [path], extra=["-R"])  # propose exactly the file's class (-R: required only)
        assert sent.returncode == 0, sent.stderr[-2000:]
        row = node.wait_series_status(source.SeriesInstanceUID, ["done", "failed"], timeout=300)
        assert row["status"] == "done", (row["reason"], node.log()[-3000:])
        deliveries = _wait_delivered(node, source.SeriesInstanceUID)
        assert sorted(d["object_kind"] for d in deliveries) == ["KEY", "KOS", "SEG", "SR"]
    found = _answer_at(orthanc, source.StudyInstanceUID)
    assert sorted(found) == ["KO", "OT", "SEG", "SR"] and all(len(v) == 1 for v in found.values())
    seg, sr, key = found["SEG"][0], found["SR"][0], found["OT"][0]
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(key.SourceImageSequence[0].ReferencedFrameNumber) >= 1
    assert sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == key.SOPInstanceUID


def test_a_series_re_reported_with_another_threshold_gets_new_uids_and_names_its_predecessor(tmp_path, orthanc):
    """The node measures a series, is restarted with another threshold, and the series' job is queued again (as
    an administrator re-reporting it would): the new answer has new UIDs and its SR names the first SR."""
    import sqlite3
    import time

    from lpm_node.demo.phantom import write_ct_series

    phantom = make_phantom(42.0, n_slices=64, size=256, pixel_spacing=1.4, seed=43)
    files = write_ct_series(phantom, tmp_path / "ct")
    source = dcmread(files[0], stop_before_pixels=True)
    series_uid = source.SeriesInstanceUID
    with _node(tmp_path, orthanc, 40.0) as node:
        assert storescu(node.port, files).returncode == 0
        first = {r["object_kind"]: r["sop_instance_uid"] for r in _wait_delivered(node, series_uid)}
        db = node.db_path
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE jobs SET status = 'queued' WHERE series_instance_uid = ?", (series_uid,))
    with _node(tmp_path, orthanc, 45.0) as node:
        deadline = time.monotonic() + 300
        second: dict[str, str] = {}
        while time.monotonic() < deadline and len(second) < 4:
            rows = node.query("SELECT * FROM deliveries WHERE series_instance_uid = ? AND status = 'sent'",
                              (series_uid,))
            second = {r["object_kind"]: r["sop_instance_uid"] for r in rows
                      if r["sop_instance_uid"] not in first.values()}
            time.sleep(0.5)
        assert len(second) == 4, node.log()[-3000:]
    found = _answer_at(orthanc, source.StudyInstanceUID)
    srs = {ds.SOPInstanceUID: ds for ds in found["SR"]}
    assert set(srs) == {first["SR"], second["SR"]}
    previous = srs[second["SR"]].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert previous.ReferencedSOPInstanceUID == first["SR"]
    assert "PredecessorDocumentsSequence" not in srs[first["SR"]]

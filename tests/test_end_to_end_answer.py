"""End to end for the answer: Enhanced and Legacy Converted Enhanced CT sent by storescu to ``lpm-node serve`` are
answered at Orthanc; a series re-reported with another threshold, or measured again after more of its instances
arrived, gets new UIDs and an SR that names the first."""

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


def _node(tmp: Path, orthanc: Orthanc, threshold: float = 40.0, more: str = "") -> NodeProcess:
    config = tmp / f"node-{threshold:g}.toml"
    config.write_text(f"[output]\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\n\n"
                      f"[measurement]\nthreshold_hu = {threshold}\n\n{more}")
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


def _sent_answers(node: NodeProcess, series_uid: str, known: set[str], timeout: float = 300) -> dict[str, str]:
    """Kind -> SOP Instance UID of the four answer objects delivered for the series that are not in ``known``."""
    import time

    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    while time.monotonic() < deadline and len(found) < 4:
        rows = node.query("SELECT * FROM deliveries WHERE series_instance_uid = ? AND status = 'sent'", (series_uid,))
        found = {r["object_kind"]: r["sop_instance_uid"] for r in rows if r["sop_instance_uid"] not in known}
        time.sleep(0.3)
    assert len(found) == 4, node.log()[-3000:]
    return found


def _evidence(sr, series_uid: str) -> set[str]:
    """The SOP Instance UIDs of ``series_uid`` that the SR lists as evidence."""
    return {str(item.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence if series.SeriesInstanceUID == series_uid
            for item in series.ReferencedSOPSequence}


def _seg_references(seg, series_uid: str) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence if series.SeriesInstanceUID == series_uid
            for item in series.ReferencedInstanceSequence}


def test_a_series_measured_again_on_more_instances_gets_new_uids_and_names_its_predecessor(tmp_path, orthanc):
    """Half a series arrives and is answered; the rest arrives in a second association and the series is measured
    again: the PACS holds both answers, the second SR names the first, and each answer lists exactly the
    instances it measured (one UID, one content)."""
    from lpm_node.demo.phantom import write_ct_series

    files = write_ct_series(make_phantom(35.0, n_slices=64, size=256, pixel_spacing=1.4, seed=44), tmp_path / "ct")
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    series_uid, study_uid = headers[0].SeriesInstanceUID, headers[0].StudyInstanceUID
    half = {str(h.SOPInstanceUID) for h in headers[:40]}
    everything = {str(h.SOPInstanceUID) for h in headers}
    with _node(tmp_path, orthanc, more="[rules]\nmin_slices = 10\nmin_z_coverage_mm = 40\n") as node:
        assert storescu(node.port, files[:40]).returncode == 0
        first = _sent_answers(node, series_uid, set())
        assert storescu(node.port, files[40:]).returncode == 0
        second = _sent_answers(node, series_uid, set(first.values()))
        assert sorted(first) == sorted(second) == ["KEY", "KOS", "SEG", "SR"]
    found = _answer_at(orthanc, study_uid)
    assert {m: len(v) for m, v in found.items()} == {"KO": 2, "OT": 2, "SEG": 2, "SR": 2}
    by_uid = {str(ds.SOPInstanceUID): ds for kind in found.values() for ds in kind}
    assert set(by_uid) == set(first.values()) | set(second.values())  # both answers, no UID shared
    first_sr, second_sr = by_uid[first["SR"]], by_uid[second["SR"]]
    assert "PredecessorDocumentsSequence" not in first_sr
    (study,) = second_sr.PredecessorDocumentsSequence
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first["SR"]
    assert _evidence(first_sr, series_uid) == half
    assert _evidence(second_sr, series_uid) == everything
    assert _seg_references(by_uid[first["SEG"]], series_uid) == half
    assert _seg_references(by_uid[second["SEG"]], series_uid) == everything

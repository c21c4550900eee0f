"""The QC's calibration (``lpm_node/demo/qc_cases.py``): every control gets its definite category and every hazard
is not assessable, through the measurement, ``lpm-node measure``, ``lpm-node process`` and the node; the field of
view margin, the liver's side and the per-disk statistics each on their own."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lpm_node.cli.measure import measure_command
from lpm_node.core.config import Settings
from lpm_node.demo.qc_cases import (
    QcCase,
    all_cases,
    ellipsoid_shape,
    series_cases,
    shared_folder,
    tight_field_of_view,
    write_dicom,
)
from lpm_node.imaging.measurement import MIN_LATERAL_TISSUE_PX, Category, QCFlag, measure
from lpm_node.imaging.orientation import axes_code, dicom_orientation, nifti_form_codes
from lpm_node.imaging.segmentation import largest_component
from tests.support_net import NodeProcess, have_dcmtk, storescu
from tests.support_reference import reference_dir

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.5, 0.7, 0.7)
# the reason each hazard must be withheld for (any one of them)
HAZARD_REASONS = {
    "mirrored": {"liver_not_on_patient_right"},
    "orientation lost": {"liver_not_on_patient_right"},
    "spleen-like": {"liver_not_on_patient_right", "component_not_liver_like"},
    "lesion over a quarter": {"roi_disk_changes_category"},
    "into the liver": {"lateral_edge_at_field_of_view"},
}


@pytest.fixture(scope="module")
def cases() -> Callable[[], Iterator[QcCase]]:
    """The cases, made one at a time (each holds a whole CT: the table at once would not fit in memory)."""
    reference_dir()  # the published masks are part of the table: fail, never skip, without them
    assert shared_folder() is not None
    return all_cases


def _failures(case: QcCase, item: dict) -> list[str]:
    """What is wrong with one row ([] when it is as it must be)."""
    category, flags, reasons = item["category"], item["qc_flags"], item["not_assessable_reasons"]
    wrong = []
    if case.group == "control":
        if category != case.expected:
            wrong.append(f"control {case.name}: {category} ({flags}), expected {case.expected}")
        if "wall cut" in case.name and "body_wall_cut_by_field_of_view" in flags and reasons:
            wrong.append(f"tight field of view {case.name} withheld: {reasons}")
    else:
        if category != Category.NOT_ASSESSABLE:
            wrong.append(f"hazard {case.name}: {category} at {item['dl_parenchymal_hu']:.1f} HU ({flags})")
        expected = next(v for k, v in HAZARD_REASONS.items() if k in case.name)
        if not expected & set(reasons):
            wrong.append(f"hazard {case.name}: withheld for {reasons}, not for any of {sorted(expected)}")
    if reasons != [f for f in QCFlag if f.withholds and f in flags]:
        wrong.append(f"{case.name}: reasons {reasons} are not the withholding flags of {flags}")
    return wrong


def _via_api(case: QcCase) -> dict:
    hu, label = case.claimed()
    result, _ = measure(hu, largest_component(label > 0).view(bool), SPACING)
    return result.to_dict()


def test_the_table_has_every_kind_of_control_and_hazard(cases: Callable[[], Iterator[QcCase]]) -> None:
    groups = {c.name: c.group for c in cases()}
    names = list(groups)
    for wanted in ("30 HU", "38 HU", "42 HU", "60 HU", "noise 12", "noise 25", "wall cut 15 mm", "wall cut 25 mm",
                   "RAS-stored", "feet-first", "prone", "published label", "published nnU-Net mask", "ellipsoid",
                   "phantom seed 3", *HAZARD_REASONS):
        assert any(wanted in n for n in names), wanted
    controls = sum(g == "control" for g in groups.values())
    assert controls >= 60 and len(groups) - controls >= 15


def test_every_control_and_hazard_through_the_measurement(cases: Callable[[], Iterator[QcCase]]) -> None:
    wrong = [w for case in cases() for w in _failures(case, _via_api(case))]
    assert wrong == [], "\n".join(wrong)


def test_stored_controls_and_every_hazard_through_the_measure_command(
    cases: Callable[[], Iterator[QcCase]], tmp_path: Path
) -> None:
    """Through the command's own code, in this process, on the stored files and their header: every hazard, every
    other storage (RAS-stored, feet-first, prone) and every tight field of view (the measurement test has every
    control; ``test_representative_cases_through_lpm_node_measure`` runs the command itself)."""
    wrong = []
    picked = (c for c in cases() if c.group == "hazard" or c.storage != "LPS" or "wall cut" in c.name)
    for number, case in enumerate(picked):
        ct, liver = case.write_nifti(tmp_path / f"case{number}", compress=False)
        out = io.StringIO()
        args = argparse.Namespace(ct=str(ct), liver_mask=str(liver), spleen_mask=None, roi_out=None, json=True)
        with contextlib.redirect_stdout(out):
            assert measure_command(Settings(), args) == 0
        wrong += _failures(case, json.loads(out.getvalue()))
        for path in (ct, liver):
            path.unlink()
    assert wrong == [], "\n".join(wrong)


def _lpm_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lpm_node.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("pick", ["wall cut 15 mm", "RAS-stored", "feet-first", "orientation lost", "spleen-like",
                                  "lesion over a quarter"])
def test_representative_cases_through_lpm_node_measure(
    cases: Callable[[], Iterator[QcCase]], pick: str, tmp_path: Path
) -> None:
    case = next(c for c in cases() if pick in c.name)
    ct, liver = case.write_nifti(tmp_path)
    proc = _lpm_node("measure", "--ct", str(ct), "--liver-mask", str(liver), "--json")
    assert proc.returncode == 0, proc.stderr
    assert _failures(case, json.loads(proc.stdout)) == []


def test_a_nifti_without_orientation_is_measured_and_says_so(tmp_path: Path) -> None:
    case = QcCase("ellipsoid, no orientation", "control", "no_moderate_to_severe_steatosis",
                  lambda: ellipsoid_shape(42.0, 12.0))
    ct, liver = case.write_nifti(tmp_path, compress=False)
    for path in (ct, liver):  # qform_code and sform_code 0: the file states no orientation
        data = bytearray(path.read_bytes())
        data[252:256] = b"\0\0\0\0"
        path.write_bytes(bytes(data))
    assert nifti_form_codes(ct) == (0, 0)
    proc = _lpm_node("measure", "--ct", str(ct), "--liver-mask", str(liver), "--json")
    assert proc.returncode == 0, proc.stderr
    item = json.loads(proc.stdout)
    assert item["category"] == "no_moderate_to_severe_steatosis" and "orientation_unknown" in item["qc_flags"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> dict[str, dict]:
    """Every DICOM case through one ``lpm-node process`` run (the lesion case first without its lesion, to put the
    lesion on the disk the node chooses); items by case name."""
    root = tmp_path_factory.mktemp("qc-process")
    items: dict[str, dict] = {}
    cases = series_cases()
    centres = {}
    for number, case in enumerate(cases):
        if case.lesion:
            write_dicom(case, root / "first" / f"case{number}")
            first = _lpm_node("process", "--demo-model", str(root / "first" / f"case{number}"), "--json")
            assert first.returncode == 0, first.stderr[-2000:]
            centres[number] = json.loads(first.stdout.splitlines()[0])["roi_centres"]
    uids = {}
    for number, case in enumerate(cases):
        uid = f"2.25.{9000 + number}"
        write_dicom(case, root / "batch" / f"case{number}", series_uid=uid, roi_centres=centres.get(number))
        uids[uid] = case.name
    proc = _lpm_node("process", "--demo-model", str(root / "batch"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.splitlines():
        item = json.loads(line)
        items[uids[item["series_instance_uid"]]] = item
    return items


@pytest.mark.parametrize("name", [c.name for c in series_cases()])
def test_controls_and_hazards_through_process(processed: dict[str, dict], name: str) -> None:
    series = next(c for c in series_cases() if c.name == name)
    item = processed[name]
    assert item["status"] == "measured", item
    case = QcCase(series.name, series.group, series.expected, build=lambda: ellipsoid_shape(42.0, 12.0))
    assert _failures(case, item) == [], item
    if "prone" in name:
        assert "patient_not_supine" in item["qc_flags"]


@pytest.mark.parametrize("band_px, withheld", [(MIN_LATERAL_TISSUE_PX - 1, True), (MIN_LATERAL_TISSUE_PX, False)])
def test_the_field_of_view_margin_is_the_rois_near_rim(band_px: int, withheld: bool) -> None:
    """Tissue beyond the liver's edge up to the image border: 18 px is withheld, 19 px (13.3 mm) is measured."""
    hu, label, origin = ellipsoid_shape(38.0, 12.0)
    x_min = int(np.argmax(label.any(axis=(0, 1))))
    hu, label = hu[:, :, x_min - band_px:], label[:, :, x_min - band_px:]
    result, _ = measure(hu, label > 0, SPACING)
    assert min(t for t in result.lateral_tissue_mm if t is not None) == pytest.approx(band_px * 0.7, abs=0.75)
    assert ("lateral_edge_at_field_of_view" in result.not_assessable_reasons) is withheld
    assert result.category == (Category.NOT_ASSESSABLE if withheld else "moderate_to_severe_steatosis")
    if not withheld:
        assert "body_wall_cut_by_field_of_view" in result.qc_flags


def test_padding_beside_the_liver_counts_as_the_edge_of_the_field_of_view() -> None:
    """A round field of view: padding (-3024) 8 mm beyond the liver on the ROI rows is withheld, 20 mm measured."""
    hu, label, origin = ellipsoid_shape(42.0, 12.0)
    x_min = int(np.argmax(label.any(axis=(0, 1))))
    for margin_mm, withheld in ((8.0, True), (20.0, False)):
        padded = hu.copy()
        padded[:, :, : x_min - int(round(margin_mm / 0.7))] = -3024
        result, _ = measure(padded, label > 0, SPACING)
        assert (result.category == Category.NOT_ASSESSABLE) is withheld, (margin_mm, result.qc_flags)


def test_a_tight_field_of_view_keeps_the_published_roi() -> None:
    """Cropping the body wall away changes nothing the method reads: the same ROI, value and category."""
    hu, label, origin = ellipsoid_shape(38.0, 18.0)
    full, _ = measure(hu, label > 0, SPACING)
    hu_t, label_t, _ = tight_field_of_view(hu, label, origin, 15.0)
    tight, _ = measure(hu_t, label_t > 0, SPACING)
    shift = hu.shape[2] - hu_t.shape[2]
    assert [[z, y, x + shift] for z, y, x in tight.roi_centres] == full.roi_centres
    assert tight.dl_parenchymal_hu == pytest.approx(full.dl_parenchymal_hu)
    assert tight.category == full.category == "moderate_to_severe_steatosis"


def test_per_disk_statistics_are_reported() -> None:
    hu, label, _ = ellipsoid_shape(60.0, 12.0)
    result, _ = measure(hu, label > 0, SPACING)
    assert len(result.roi_disk_means_hu) == len(result.roi_disk_sds_hu) == len(result.roi_disk_outlier_fractions) == 3
    assert all(abs(m - 60.0) < 3.0 for m in result.roi_disk_means_hu)
    assert all(10.0 < s < 14.0 for s in result.roi_disk_sds_hu)
    assert all(f < 0.02 for f in result.roi_disk_outlier_fractions)
    assert result.liver_right_fraction > 0.8


def test_orientation_statements() -> None:
    assert axes_code((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"
    assert axes_code((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == "RAS"
    assert axes_code((1, 0, 0, 0, 1, 0, 0, 0, -1)) == "LPI"
    prone = dicom_orientation((-1, 0, 0, 0, -1, 0, 0, 0, 1), "HFP")
    assert prone.known and prone.supine is False and prone.stored_axes == "RAS"
    assert dicom_orientation(np.eye(3), "").supine is None
    assert dicom_orientation(np.eye(3), "FFS").supine is True


SERVED = ("phantom, 38 HU, wall cut 15 mm beyond the liver", "phantom, 30 HU, mirrored")


@pytest.mark.slow
@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_a_tight_field_of_view_and_a_mirrored_series_through_the_node(tmp_path: Path) -> None:
    """storescu -> lpm-node serve: the tight field of view is measured with its note, the mirrored series is not
    assessable, with its reason in the audit and in the SR."""
    files: list[Path] = []
    uids = {}
    for number, case in enumerate(c for c in series_cases() if c.name in SERVED):
        uids[case.name] = f"2.25.{9100 + number}"
        files += write_dicom(case, tmp_path / f"case{number}", series_uid=uids[case.name])
    with NodeProcess(tmp_path / "node", measure=True, stable_seconds=1) as node:
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr
        for uid in uids.values():
            row = node.wait_series_status(uid, ["done", "failed"], timeout=900)
            assert row["status"] == "done", row["reason"]
        jobs = {r["series_instance_uid"]: r for r in node.query(
            "SELECT series_instance_uid, category, qc_flags, dl_parenchymal_hu FROM jobs")}
    tight, mirrored = (jobs[uids[name]] for name in SERVED)
    assert tight["category"] == "moderate_to_severe_steatosis", dict(tight)
    assert "body_wall_cut_by_field_of_view" in json.loads(tight["qc_flags"])
    assert mirrored["category"] == Category.NOT_ASSESSABLE and mirrored["dl_parenchymal_hu"] is not None
    assert "liver_not_on_patient_right" in json.loads(mirrored["qc_flags"])
    reports = [pydicom.dcmread(p) for p in (tmp_path / "node").rglob("SR_*.dcm")]
    said = [str(sr) for sr in reports if uids[SERVED[1]] in {
        str(series.SeriesInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence}]
    assert said and "liver is not on the patient's right" in said[0]

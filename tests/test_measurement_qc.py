"""The worst cases of a radiologist's day through the measurement and through ``lpm-node measure``: each gives the
expected category and QC flags; the faithful value is still reported when there is one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lpm_node.core.config import MeasurementSettings
from lpm_node.imaging.measurement import Category, QCFlag, failed_measurement, flag_sentence, measure

SPACING = (2.5, 0.7, 0.7)
SHAPE = (40, 200, 240)  # (z, y, x) on the method grid: 100 x 140 x 168 mm
BODY_CENTRE_YX, BODY_AXES_YX = (100.0, 120.0), (88.0, 112.0)
LIVER_CENTRE, LIVER_AXES = (20.0, 100.0, 68.0), (17.0, 56.0, 48.0)  # z, y, x (voxels): ~ 250 ml


@dataclass
class Chest:
    """A synthetic chest on the method grid: air, body wall (fat, muscle), soft tissue, a liver."""

    hu: np.ndarray
    liver: np.ndarray
    interpolated: list[int] = field(default_factory=list)


def chest(liver_hu: float = 55.0, seed: int = 0, noise_sd: float = 8.0) -> Chest:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    (cy, cx), (ay, ax) = BODY_CENTRE_YX, BODY_AXES_YX
    radius = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[np.broadcast_to(radius <= 1.0, SHAPE)] = -100.0  # subcutaneous fat
    hu[np.broadcast_to(radius <= 0.93, SHAPE)] = 50.0  # muscle
    hu[np.broadcast_to(radius <= 0.90, SHAPE)] = 35.0  # soft tissue
    liver = (((zz - LIVER_CENTRE[0]) / LIVER_AXES[0]) ** 2 + ((yy - LIVER_CENTRE[1]) / LIVER_AXES[1]) ** 2
             + ((xx - LIVER_CENTRE[2]) / LIVER_AXES[2]) ** 2) <= 1.0
    hu[liver] = liver_hu
    hu += rng.normal(0.0, noise_sd, SHAPE).astype(np.float32)
    return Chest(hu, liver)


def _middle_roi(case: Chest) -> tuple[int, int, int]:
    result, _ = measure(case.hu, case.liver, SPACING)
    z, y, x = result.roi_centres[1]
    return z, y, x


def lesion_under_the_roi() -> Chest:
    """A 24 mm, 5 HU cyst under the ROIs of a 60 HU liver."""
    case = chest(60.0)
    z, y, x = _middle_roi(case)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cyst = (((zz - z) * 2.5) ** 2 + ((yy - y) * 0.7) ** 2 + ((xx - x) * 0.7) ** 2) <= 12.0**2
    case.hu[cyst & case.liver] = 5.0 + np.random.default_rng(1).normal(0, 8, int((cyst & case.liver).sum()))
    return case


def fov_cut(body_wall: bool) -> Callable[[], Chest]:
    """The right lobe cut by the field of view: the image starts 20 mm inside the liver's lateral edge; with
    ``body_wall`` the new edge shows body wall (fat and muscle) and the liver mask stops short of it."""

    def make() -> Chest:
        case = chest(35.0)
        start = int(LIVER_CENTRE[2] - LIVER_AXES[2]) + 28
        hu, liver = case.hu[:, :, start:].copy(), case.liver[:, :, start:].copy()
        if body_wall:
            hu[:, :, :6] = -100.0
            hu[:, :, 6:10] = 50.0
            liver[:, :, :10] = False
        return Chest(np.ascontiguousarray(hu), np.ascontiguousarray(liver))

    return make


def no_liver() -> Chest:
    case = chest(55.0)
    return Chest(case.hu, np.zeros_like(case.liver))


def tiny_liver() -> Chest:
    """A few millilitres of 'liver' (a mis-segmented blob): the ROI falls beside it."""
    case = chest(55.0)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = (((zz - 20) / 2.0) ** 2 + ((yy - 100) / 8.0) ** 2 + ((xx - 60) / 8.0) ** 2) <= 1.0
    return Chest(case.hu, blob)


def metal_in_the_roi() -> Chest:
    case = chest(55.0)
    z, y, x = _middle_roi(case)
    case.hu[z - 2 : z + 3, y - 3 : y + 4, x - 3 : x + 4] = 3000.0  # a clip, streaks left out
    return case


def roi_outside_the_image() -> Chest:
    """A liver label within 19 columns of the image's right-hand border (the patient's left): every ROI disk lies
    beyond the border."""
    case = chest(55.0)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    label = (((zz - 20) / 14.0) ** 2 + ((yy - 100) / 50.0) ** 2 + ((xx - (SHAPE[2] - 10)) / 9.5) ** 2) <= 1.0
    return Chest(case.hu, label)


def missing_source_slice_at_the_roi() -> Chest:
    case = chest(55.0)
    z, _, _ = _middle_roi(case)
    case.interpolated = [z]
    return case


def clean(liver_hu: float) -> Callable[[], Chest]:
    return lambda: chest(liver_hu, noise_sd=4.0)


@dataclass
class Expect:
    category: str
    flags: set[str]  # these must be present
    reasons: set[str] | None = None  # exactly these not-assessable reasons (None: at least ``flags`` & reasons)
    absent: set[str] = field(default_factory=set)


CASES: dict[str, tuple[Callable[[], Chest], Expect]] = {
    "lesion under the ROI": (lesion_under_the_roi, Expect(
        Category.NOT_ASSESSABLE, {"faithful_robust_disagree", "roi_disk_unlike_liver"},
        {"faithful_robust_disagree", "roi_disk_changes_category"})),
    "FOV cut, no body wall at the new edge": (fov_cut(False), Expect(
        Category.NOT_ASSESSABLE, {"lateral_edge_at_field_of_view", "liver_cut_by_field_of_view"})),
    "FOV cut, body wall at the new edge": (fov_cut(True), Expect(
        Category.NOT_ASSESSABLE, {"lateral_edge_at_field_of_view"})),
    "no liver": (no_liver, Expect(Category.NOT_ASSESSABLE, {"no_liver"}, {"no_liver"})),
    "tiny liver": (tiny_liver, Expect(Category.NOT_ASSESSABLE, {"little_liver", "roi_largely_outside_liver"})),
    "metal in the ROI": (metal_in_the_roi, Expect(Category.NOT_ASSESSABLE, {"roi_noisy", "roi_mean_implausible"})),
    "ROI outside the image": (roi_outside_the_image, Expect(Category.NOT_ASSESSABLE, {"roi_outside_image"})),
    "missing source slice at an ROI slice": (missing_source_slice_at_the_roi, Expect(
        Category.NO_STEATOSIS, {"roi_slice_interpolated"}, set())),
    "clean liver at 39 HU": (clean(39.0), Expect(Category.STEATOSIS, set(), set(), {"liver_cut_by_field_of_view"})),
    "clean liver at 41 HU": (clean(41.0), Expect(Category.NO_STEATOSIS, set(), set(), {"liver_cut_by_field_of_view"})),
}


def _check(case_name: str, category: str, flags: list[str], reasons: list[str], expect: Expect) -> None:
    assert category == expect.category, (case_name, flags)
    assert expect.flags <= set(flags), (case_name, flags)
    assert not (expect.absent & set(flags)), (case_name, flags)
    assert reasons == [f for f in QCFlag if f.withholds and f in flags]  # the reasons are the flags, in order
    if expect.reasons is not None:
        assert set(reasons) == expect.reasons, (case_name, reasons)
    assert (category == Category.NOT_ASSESSABLE) == bool(reasons)


@pytest.mark.parametrize("name", list(CASES))
def test_worst_case_through_measure(name: str) -> None:
    make, expect = CASES[name]
    case = make()
    result, roi = measure(case.hu, case.liver, SPACING, interpolated_slices=case.interpolated)
    _check(name, result.category, result.qc_flags, result.not_assessable_reasons, expect)
    assert roi.shape == case.liver.shape
    if name == "lesion under the ROI":
        assert result.dl_parenchymal_hu < 40.0  # the faithful value is still reported, and it says "steatosis"
        assert abs(result.robust_parenchymal_hu - 60.0) < 1.5
    if name == "ROI outside the image":
        assert result.dl_parenchymal_hu is None and result.roi_pixels == [0, 0, 0]
    if name.startswith("clean"):
        assert result.dl_parenchymal_hu == pytest.approx(float(name.split()[-2]), abs=0.5)


def _write(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(path))
    return path


def _lpm_node() -> list[str]:
    return [sys.executable, "-m", "lpm_node.cli"]


@pytest.mark.parametrize("name", [n for n in CASES if n != "missing source slice at an ROI slice"])
def test_worst_case_through_the_measure_command(name: str, tmp_path: Path) -> None:
    """The same cases through ``lpm-node measure`` on NIfTI files (a missing source slice needs DICOM: see
    test_process_qc)."""
    make, expect = CASES[name]
    case = make()
    ct = _write(np.rint(case.hu).astype(np.int16), tmp_path / "ct.nii.gz")
    mask = _write(case.liver.astype(np.uint8), tmp_path / "liver.nii.gz")
    proc = subprocess.run([*_lpm_node(), "measure", "--ct", str(ct), "--liver-mask", str(mask), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    item = json.loads(proc.stdout)
    _check(name, item["category"], item["qc_flags"], item["not_assessable_reasons"], expect)


def test_clean_cases_pass_with_the_default_minimum_volume() -> None:
    result, _ = measure(chest(55.0).hu, chest(55.0).liver, SPACING)
    assert result.liver_volume_ml > MeasurementSettings().min_liver_volume_ml


def test_plausible_range_and_disagreement_are_configurable() -> None:
    case = lesion_under_the_roi()
    loose = MeasurementSettings(max_faithful_robust_difference_hu=100.0, max_roi_disk_difference_hu=1000.0,
                                max_roi_disk_outlier_fraction=1.0)
    result, _ = measure(case.hu, case.liver, SPACING, settings=loose)
    assert result.category == Category.STEATOSIS and "faithful_robust_disagree" not in result.qc_flags
    assert "roi_disk_unlike_liver" not in result.qc_flags
    narrow = MeasurementSettings(plausible_min_hu=60.0, plausible_max_hu=100.0)
    clean_case = chest(55.0)
    result, _ = measure(clean_case.hu, clean_case.liver, SPACING, settings=narrow)
    assert result.not_assessable_reasons == ["roi_mean_implausible"]


@pytest.mark.parametrize("body_wall", [False, True])
def test_a_lateral_edge_at_the_field_of_view_alone_makes_it_not_assessable(body_wall: bool) -> None:
    case = fov_cut(body_wall)()
    lenient = MeasurementSettings(min_liver_volume_ml=0.0, min_roi_in_liver_fraction=0.0)
    result, _ = measure(case.hu, case.liver, SPACING, settings=lenient)
    # without body wall the liver itself also touches the border beside the ROI
    beside = ["liver_cut_by_field_of_view_at_roi"] if not body_wall else []
    assert result.not_assessable_reasons == ["lateral_edge_at_field_of_view", *beside]
    assert result.dl_parenchymal_hu == pytest.approx(35.0, abs=2.0)  # the value is reported, the category is not


def test_liver_cut_flags_only_when_the_cut_can_change_k() -> None:
    case = chest(55.0)
    low = int(LIVER_CENTRE[0]) - 6  # cut 6 slices below the largest section: k stays inside the scan
    result, _ = measure(case.hu[low:], case.liver[low:], SPACING)
    assert case.liver[low].any() and "liver_cut_inferior" not in result.qc_flags
    near = int(LIVER_CENTRE[0]) - 1  # cut just below the largest section: k sits at the scan's end
    result, _ = measure(case.hu[near:], case.liver[near:], SPACING)
    assert "liver_cut_inferior" in result.qc_flags and "roi_on_edge_slices" in result.qc_flags
    top = int(LIVER_CENTRE[0]) + 2
    result, _ = measure(case.hu[: top + 1], case.liver[: top + 1], SPACING)
    assert "liver_cut_superior" in result.qc_flags and "liver_cut_inferior" not in result.qc_flags


def test_every_flag_has_a_sentence_and_no_sentence_shows_a_flag_name() -> None:
    for flag in QCFlag:
        assert flag_sentence(flag) == flag_sentence(flag.value) == flag.sentence
        assert "_" not in flag.sentence and flag.sentence.endswith(".") and flag.sentence[0].isupper()
    assert flag_sentence("a_flag_of_another_version") == "A flag of another version."
    failed = failed_measurement(40.0)
    assert failed.category == Category.NOT_ASSESSABLE and failed.not_assessable_reasons == ["measurement_failed"]


def test_stored_values_of_categories_and_flags_stay_as_they_were() -> None:
    """Audit rows, JSON, CSV and SR text hold these words: existing data must keep reading."""
    assert [str(c) for c in Category] == ["moderate_to_severe_steatosis", "no_moderate_to_severe_steatosis",
                                           "not_assessable"]
    assert [f.value for f in QCFlag if f.withholds] == [
        "no_liver", "little_liver", "roi_largely_outside_liver", "roi_clipped", "roi_outside_image", "roi_noisy",
        "roi_mean_implausible", "faithful_robust_disagree", "lateral_edge_at_field_of_view",
        "liver_cut_by_field_of_view_at_roi", "liver_not_on_patient_right", "component_not_liver_like",
        "roi_disk_changes_category", "measurement_failed"]
    assert [f.value for f in QCFlag if not f.withholds] == [
        "roi_outside_liver", "liver_cut_inferior", "liver_cut_superior", "liver_cut_by_field_of_view",
        "roi_slice_interpolated", "roi_on_edge_slices", "roi_slice_without_liver", "off_method_grid", "no_spleen",
        "body_wall_cut_by_field_of_view", "orientation_unknown", "liver_side_not_checked", "patient_not_supine",
        "roi_disk_unlike_liver"]
    assert json.dumps([QCFlag.NO_LIVER, Category.STEATOSIS]) == '["no_liver", "moderate_to_severe_steatosis"]'
    assert f"{QCFlag.ROI_NOISY}|{Category.NO_STEATOSIS}" == "roi_noisy|no_moderate_to_severe_steatosis"

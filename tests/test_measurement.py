"""DL-parenchymal measurement on synthetic masks: ROI placement, category, QC flags, robust and spleen values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lpm_node.core.config import MeasurementSettings
from lpm_node.imaging.measurement import Category, dl_parenchymal_roi, measure, roi_structuring_element

SPACING = (2.5, 0.7, 0.7)
ELEMENT = roi_structuring_element()


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]):
    """Boolean ellipsoid (z, y, x) in voxel units."""
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def ct_of(liver: np.ndarray, liver_hu: float, noise_sd: float = 8.0, seed: int = 0) -> np.ndarray:
    """Soft tissue (30 HU) everywhere, the liver at ``liver_hu``, Gaussian noise; air (-1000 HU) in the outermost
    columns that hold no liver (the body lies inside the field of view)."""
    rng = np.random.default_rng(seed)
    hu = np.where(liver, liver_hu, 30.0) + rng.normal(0.0, noise_sd, liver.shape)
    with_air(hu, liver)
    return hu.astype(np.float32)


def with_air(hu: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """Air in the columns at the image's left (patient's right) border up to two columns before the liver."""
    columns = np.flatnonzero(liver.any(axis=(0, 1)))
    if columns.size and columns[0] >= 3:
        hu[:, :, : columns[0] - 2] = -1000.0
    return hu


CLEAN = MeasurementSettings(min_liver_volume_ml=0.0)  # the small synthetic livers here are not "little"


def published_roi(liver: np.ndarray) -> np.ndarray:
    """The published recipe written out plainly (loop over slices, a single pixel dilated by cv2)."""
    best, best_area = 0, 0
    for z in range(liver.shape[0]):
        area = int(liver[z].sum())
        if area > best_area:
            best, best_area = z, area
    slices = [0, 2, 4] if best < 2 else [best - 2, best, best + 2]
    roi = np.zeros(liver.shape, dtype=np.uint8)
    for z in slices:
        ys, xs = np.nonzero(liver[z])
        x_min = xs.min()
        y = ys[xs == x_min][0]
        seed = np.zeros(liver.shape[1:], dtype=np.float64)
        seed[y, x_min + 30] = 1
        roi[z] = cv2.dilate(seed, ELEMENT).astype(np.uint8)
    return roi


@pytest.mark.parametrize("seed", range(6))
def test_roi_matches_the_published_recipe_on_random_livers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (14, 96, 96)
    blob = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.5, 6, 6))
    liver = (blob > 0.02) & ellipsoid(shape, (7, 48, 40), (8, 40, 30))
    liver = ndimage.binary_opening(liver)
    assert liver.sum() > 1000

    roi, slices, centres = dl_parenchymal_roi(liver)

    assert np.array_equal(roi, published_roi(liver))
    assert slices == [int(z) for z in np.flatnonzero(roi.any(axis=(1, 2)))]
    assert [c[0] for c in centres] == slices


def test_centre_is_first_row_of_the_lateral_column_plus_30() -> None:
    liver = np.zeros((9, 100, 120), dtype=bool)
    liver[:, 30:90, 21:80] = True
    liver[:, 50:61, 20] = True  # the lateral-most column holds liver from row 50
    liver[4, 30:95, 21:80] = True  # largest slice: 4

    roi, slices, centres = dl_parenchymal_roi(liver)

    assert slices == [2, 4, 6]
    assert centres == [[2, 50, 50], [4, 50, 50], [6, 50, 50]]
    expected = np.zeros((100, 120), dtype=np.uint8)
    expected[39:62, 39:62] = ELEMENT
    for z in slices:
        assert np.array_equal(roi[z], expected)
    assert roi.sum() == 3 * 401


def test_first_maximum_wins_on_equal_areas() -> None:
    liver = np.zeros((12, 60, 80), dtype=bool)
    liver[:, 10:50, 10:60] = True
    roi, slices, _ = dl_parenchymal_roi(liver)
    assert slices == [0, 2, 4]  # every slice ties: k = 0 < 2
    liver[5:12, 10:51, 10:60] = True
    _, slices, _ = dl_parenchymal_roi(liver)
    assert slices == [3, 5, 7]


@pytest.mark.parametrize("k", [0, 1])
def test_largest_slice_near_the_bottom_uses_slices_0_2_4(k: int) -> None:
    shape = (20, 96, 96)
    liver = ellipsoid(shape, (k, 48, 40), (9, 35, 28))
    hu = ct_of(liver, 55.0)
    result, roi = measure(hu, liver, SPACING)
    assert int(np.argmax(liver.sum(axis=(1, 2)))) == k
    assert result.roi_slices == [0, 2, 4]
    assert "roi_on_edge_slices" in result.qc_flags
    assert "liver_cut_inferior" in result.qc_flags
    assert [int(z) for z in np.flatnonzero(roi.any(axis=(1, 2)))] == [0, 2, 4]


@pytest.mark.parametrize("from_top", [0, 1])
def test_largest_slice_near_the_top_is_mirrored(from_top: int) -> None:
    shape = (20, 96, 96)
    n = shape[0]
    liver = ellipsoid(shape, (n - 1 - from_top, 48, 40), (9, 35, 28))
    result, roi = measure(ct_of(liver, 55.0), liver, SPACING)
    assert result.roi_slices == [n - 5, n - 3, n - 1]
    assert "roi_on_edge_slices" in result.qc_flags
    assert "liver_cut_superior" in result.qc_flags
    assert "liver_cut_inferior" not in result.qc_flags
    assert result.roi_pixels == [401, 401, 401]


def test_middle_case_has_no_edge_flag_and_no_cut_flags() -> None:
    shape = (30, 96, 96)
    liver = ellipsoid(shape, (14, 48, 40), (10, 35, 28))
    result, _ = measure(ct_of(liver, 55.0), liver, SPACING)
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    assert result.roi_slices == [k - 2, k, k + 2]
    for flag in ("roi_on_edge_slices", "liver_cut_inferior", "liver_cut_superior", "roi_clipped", "no_liver"):
        assert flag not in result.qc_flags


def test_roi_clipped_at_the_image_border() -> None:
    liver = np.zeros((7, 60, 60), dtype=bool)
    liver[:, 0:40, 0:50] = True  # first liver row is 0: the disk's upper half falls off the image
    result, roi = measure(ct_of(liver, 60.0), liver, SPACING)
    lower_half = int(ELEMENT[11:].sum())
    assert result.roi_centres[0][1:] == [0, 30]
    assert result.roi_pixels == [lower_half] * 3
    assert int(roi.sum()) == 3 * lower_half
    assert "roi_clipped" in result.qc_flags

    # centre beyond the right edge (x_min + 30 >= width): only the disk's left part remains
    liver = np.zeros((7, 60, 40), dtype=bool)
    liver[:, 20:50, 15:40] = True
    result, roi = measure(ct_of(liver, 60.0), liver, SPACING)
    assert result.roi_centres[0][1:] == [20, 45]
    padded = np.zeros((60, 80), dtype=np.uint8)
    padded[20, 45] = 1
    expected = cv2.dilate(padded, ELEMENT)[:, :40]
    assert np.array_equal(roi[result.roi_slices[0]], expected)
    assert result.roi_pixels == [int(expected.sum())] * 3
    assert "roi_clipped" in result.qc_flags


def test_roi_outside_liver_fraction() -> None:
    liver = np.zeros((7, 100, 120), dtype=bool)
    liver[:, 40:90, 20:100] = True  # centre on the top edge: rows above 40 are outside the liver
    result, roi = measure(ct_of(liver, 60.0), liver, SPACING)
    inside = int(ELEMENT[11:].sum())
    assert result.roi_in_liver_fraction == pytest.approx(inside / 401)
    assert "roi_outside_liver" in result.qc_flags
    assert roi.sum() == 3 * 401


@pytest.mark.parametrize(
    ("liver_hu", "category"),
    [(39.0, Category.STEATOSIS), (41.0, Category.NO_STEATOSIS), (40.0, Category.NO_STEATOSIS)],
)
def test_category_around_the_threshold(liver_hu: float, category: str) -> None:
    liver = ellipsoid((20, 96, 96), (10, 48, 40), (8, 35, 28))
    hu = with_air(np.where(liver, liver_hu, 20.0), liver).astype(np.float32)  # noise-free: the mean is exact
    result, _ = measure(hu, liver, SPACING, settings=CLEAN)
    assert result.dl_parenchymal_hu == pytest.approx(liver_hu)
    assert result.not_assessable_reasons == []
    assert result.category == category
    assert result.threshold_hu == 40.0


def test_threshold_is_configurable() -> None:
    liver = ellipsoid((20, 96, 96), (10, 48, 40), (8, 35, 28))
    hu = with_air(np.where(liver, 39.0, 20.0), liver).astype(np.float32)
    result, _ = measure(hu, liver, SPACING, settings=MeasurementSettings(threshold_hu=38.0, min_liver_volume_ml=0))
    assert result.category == Category.NO_STEATOSIS
    assert result.threshold_hu == 38.0


def test_no_liver_is_not_assessable() -> None:
    liver = np.zeros((10, 64, 64), dtype=bool)
    result, roi = measure(ct_of(liver, 60.0), liver, SPACING)
    assert result.category == Category.NOT_ASSESSABLE
    assert result.dl_parenchymal_hu is None
    assert result.dl_volumetric_hu is None
    assert result.robust_parenchymal_hu is None
    assert result.roi_in_liver_fraction is None
    assert result.liver_volume_ml == 0.0
    assert result.roi_slices == [] and result.roi_centres == [] and result.roi_pixels == []
    assert "no_liver" in result.qc_flags
    assert roi.shape == liver.shape and not roi.any()
    assert json.loads(json.dumps(result.to_dict()))["dl_parenchymal_hu"] is None


def test_values_volume_and_noise_flags() -> None:
    shape = (30, 96, 96)
    liver = ellipsoid(shape, (14, 48, 40), (10, 35, 28))
    hu = ct_of(liver, 60.0, noise_sd=10.0)
    result, roi = measure(hu, liver, SPACING)
    assert result.dl_parenchymal_hu == pytest.approx(float(hu[roi > 0].mean()))
    assert result.dl_volumetric_hu == pytest.approx(float(hu[liver].mean()))
    assert result.roi_sd_hu == pytest.approx(float(hu[roi > 0].std(ddof=1)))
    assert result.liver_volume_ml == pytest.approx(liver.sum() * 2.5 * 0.7 * 0.7 / 1000)
    assert result.liver_volume_ml < 200 and "little_liver" in result.qc_flags
    assert "roi_noisy" not in result.qc_flags
    assert "off_method_grid" not in result.qc_flags

    noisy, _ = measure(ct_of(liver, 60.0, noise_sd=45.0), liver, SPACING)
    assert noisy.roi_sd_hu > 30 and "roi_noisy" in noisy.qc_flags

    big, _ = measure(hu, liver, SPACING, settings=MeasurementSettings(min_liver_volume_ml=10.0))
    assert "little_liver" not in big.qc_flags

    off, _ = measure(hu, liver, (1.0, 1.0, 1.0))
    assert "off_method_grid" in off.qc_flags


def test_a_chosen_slice_without_liver_gets_no_roi() -> None:
    liver = np.zeros((10, 64, 64), dtype=bool)
    liver[0:3, 10:50, 10:50] = True  # k = 0: slices 0, 2, 4, but slice 4 is empty
    result, roi = measure(ct_of(liver, 60.0), liver, SPACING)
    assert result.roi_slices == [0, 2]
    assert "roi_slice_without_liver" in result.qc_flags
    assert result.dl_parenchymal_hu is not None


def _liver_and_ct(liver_hu: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    shape = (40, 128, 128)
    liver = ellipsoid(shape, (20, 64, 60), (16, 45, 45))
    return liver, ct_of(liver, liver_hu, noise_sd=10.0, seed=3)


def test_robust_estimate_resists_a_lesion_in_the_roi() -> None:
    liver, hu = _liver_and_ct(60.0)
    clean, roi = measure(hu, liver, SPACING)
    assert abs(clean.robust_parenchymal_hu - 60.0) < 0.5

    lesion = ndimage.binary_dilation(roi > 0, iterations=3, structure=np.ones((3, 3, 3), bool)) & liver
    hu_lesion = hu.copy()
    hu_lesion[lesion] = 5.0 + np.random.default_rng(4).normal(0.0, 10.0, int(lesion.sum()))  # a cyst
    with_lesion, roi_lesion = measure(hu_lesion, liver, SPACING, settings=CLEAN)

    assert np.array_equal(roi, roi_lesion)
    assert with_lesion.dl_parenchymal_hu < clean.dl_parenchymal_hu - 30  # the faithful value moves
    assert with_lesion.dl_parenchymal_hu < 40.0
    assert with_lesion.category == Category.NOT_ASSESSABLE  # not "steatosis": faithful and robust disagree
    # every disk lies on the cyst: without them the robust estimate gives another category
    assert with_lesion.not_assessable_reasons == ["faithful_robust_disagree", "roi_disk_changes_category"]
    assert abs(with_lesion.robust_parenchymal_hu - 60.0) < 1.0  # the robust one does not
    assert abs(with_lesion.robust_parenchymal_hu - clean.robust_parenchymal_hu) < 1.0


def test_robust_estimate_resists_a_vessel_through_the_roi() -> None:
    liver, hu = _liver_and_ct(60.0)
    clean, roi = measure(hu, liver, SPACING)
    _, y, x = clean.roi_centres[1]
    zz, yy, xx = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    vessel = ((yy - y) ** 2 + (xx - x) ** 2 <= 7**2) & liver  # a vein along z through the ROI, blood at 38 HU
    hu_vessel = hu.copy()
    hu_vessel[vessel] = 38.0 + np.random.default_rng(5).normal(0.0, 10.0, int(vessel.sum()))
    with_vessel, _ = measure(hu_vessel, liver, SPACING)

    assert with_vessel.dl_parenchymal_hu < clean.dl_parenchymal_hu - 5
    assert abs(with_vessel.robust_parenchymal_hu - 60.0) < 1.0
    assert abs(with_vessel.dl_volumetric_hu - clean.dl_volumetric_hu) < 1.0


def test_robust_estimate_ignores_partial_volume_at_the_liver_edge() -> None:
    liver, hu = _liver_and_ct(60.0)
    edge = liver & ~ndimage.binary_erosion(liver)
    hu_edge = hu.copy()
    hu_edge[edge] = -150.0  # mask overreaching into fat
    result, _ = measure(hu_edge, liver, SPACING)
    assert result.dl_volumetric_hu < 50.0
    assert abs(result.robust_parenchymal_hu - 60.0) < 0.5


def _liver_spleen_ct() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Liver at 60 HU on the image's left (patient's right), spleen at 48 HU on the other side; noise 10 HU."""
    shape = (40, 128, 192)
    liver = ellipsoid(shape, (20, 64, 55), (16, 45, 45))
    spleen = ellipsoid(shape, (20, 70, 150), (10, 30, 22))
    hu = ct_of(liver, 60.0, noise_sd=10.0, seed=3)
    hu[spleen] = 48.0 + np.random.default_rng(6).normal(0.0, 10.0, int(spleen.sum()))
    return liver, spleen, hu


def test_spleen_difference() -> None:
    liver, spleen, hu = _liver_spleen_ct()
    hu[spleen & ~ndimage.binary_erosion(spleen)] = -100.0  # the spleen's edge, in fat
    result, _ = measure(hu, liver, SPACING, spleen=spleen)
    assert result.spleen_hu is not None and abs(result.spleen_hu - 48.0) < 1.0
    assert result.liver_minus_spleen_hu == pytest.approx(result.dl_parenchymal_hu - result.spleen_hu)
    assert abs(result.liver_minus_spleen_hu - 12.0) < 2.0

    none, _ = measure(hu, liver, SPACING)
    assert none.spleen_hu is None and none.liver_minus_spleen_hu is None

    empty, _ = measure(hu, liver, SPACING, spleen=np.zeros_like(liver))
    assert empty.spleen_hu is None and empty.liver_minus_spleen_hu is None
    assert "no_spleen" in empty.qc_flags


def test_full_size_grid() -> None:
    shape = (130, 512, 512)
    liver = ellipsoid(shape, (40, 300, 160), (45, 130, 120))
    hu = np.full(shape, 30, dtype=np.int16)
    hu[liver] = 55
    result, roi = measure(hu, liver, SPACING)
    assert result.dl_parenchymal_hu == pytest.approx(55.0)
    assert roi.shape == shape


# --- the command line ---------------------------------------------------------------------------------------------


def _lpm_node() -> list[str]:
    script = Path(sys.executable).parent / "lpm-node"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lpm_node.cli"]


def _write(array: np.ndarray, path: Path, spacing_xyz=(0.7, 0.7, 2.5), direction=None, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_lpm_node(), "measure", *args], capture_output=True, text=True, timeout=120)


def test_measure_command_json_summary_and_spleen(tmp_path: Path) -> None:
    liver, spleen, hu = _liver_spleen_ct()
    ct = _write(np.rint(hu).astype(np.int16), tmp_path / "ct.nii.gz")
    mask = _write(liver.astype(np.uint8), tmp_path / "liver.nii.gz")
    spleen_path = _write(spleen.astype(np.uint8), tmp_path / "spleen.nii.gz")
    roi_out = tmp_path / "roi.nii.gz"

    proc = _run(
        "--ct",
        str(ct),
        "--liver-mask",
        str(mask),
        "--spleen-mask",
        str(spleen_path),
        "--roi-out",
        str(roi_out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected, roi = measure(np.rint(hu).astype(np.int16), liver, SPACING, spleen=spleen)
    for key in ("dl_parenchymal_hu", "dl_volumetric_hu", "liver_volume_ml", "category", "roi_slices", "roi_centres"):
        assert key in result
    expected_dict = json.loads(json.dumps(expected.to_dict()))
    # the NIfTI stores the spacing in float32: the volume agrees to float32 precision
    assert result.pop("liver_volume_ml") == pytest.approx(expected_dict.pop("liver_volume_ml"), rel=1e-6)
    # the command adds what it did to the mask, and that no model of ours made it
    assert result.pop("largest_component_removed_voxels") == 0 and result.pop("model_identity") is None
    assert result == expected_dict
    assert abs(result["spleen_hu"] - 48.0) < 1.0
    written = sitk.ReadImage(str(roi_out))
    assert np.array_equal(sitk.GetArrayFromImage(written), roi)
    assert written.GetSpacing() == pytest.approx((0.7, 0.7, 2.5))

    proc = _run("--ct", str(ct), "--liver-mask", str(mask))
    assert proc.returncode == 0, proc.stderr
    assert "DL-parenchymal" in proc.stdout and f"{expected.dl_parenchymal_hu:.1f} HU" in proc.stdout


def test_measure_command_reports_indices_of_a_flipped_grid(tmp_path: Path) -> None:
    """A right-to-left, feet-first array is measured in LPS and reported in its own indices."""
    liver, hu = _liver_and_ct(60.0)
    expected, roi = measure(hu, liver, SPACING)
    flipped_hu = np.ascontiguousarray(hu[::-1, :, ::-1])
    flipped_liver = np.ascontiguousarray(liver[::-1, :, ::-1]).astype(np.uint8)
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    ct = _write(flipped_hu, tmp_path / "ct.nii.gz", direction=direction)
    mask = _write(flipped_liver, tmp_path / "liver.nii.gz", direction=direction)
    roi_out = tmp_path / "roi.nii.gz"

    proc = _run("--ct", str(ct), "--liver-mask", str(mask), "--roi-out", str(roi_out), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    nz, _, nx = hu.shape
    assert result["dl_parenchymal_hu"] == pytest.approx(expected.dl_parenchymal_hu, abs=1e-4)
    assert sorted(result["roi_slices"]) == sorted(nz - 1 - z for z in expected.roi_slices)
    flipped_centres = [[nz - 1 - z, y, nx - 1 - x] for z, y, x in expected.roi_centres]
    assert sorted(result["roi_centres"]) == sorted(flipped_centres)
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(roi_out)))
    assert np.array_equal(written, roi[::-1, :, ::-1])


def test_measure_command_refuses_other_grids(tmp_path: Path) -> None:
    liver = ellipsoid((20, 64, 64), (10, 32, 30), (8, 20, 20)).astype(np.uint8)
    ct = _write(ct_of(liver > 0, 60.0).astype(np.int16), tmp_path / "ct.nii.gz")

    shifted = _write(liver, tmp_path / "shifted.nii.gz", origin=(5.0, 0.0, 0.0))
    proc = _run("--ct", str(ct), "--liver-mask", str(shifted), "--json")
    assert proc.returncode == 2
    assert "grids differ" in proc.stderr and proc.stdout == ""

    smaller = _write(liver[:, :60], tmp_path / "smaller.nii.gz")
    proc = _run("--ct", str(ct), "--liver-mask", str(smaller), "--json")
    assert proc.returncode == 2 and "grids differ" in proc.stderr

    iso = _write(ct_of(liver > 0, 60.0).astype(np.int16), tmp_path / "iso.nii.gz", spacing_xyz=(1.0, 1.0, 1.0))
    iso_mask = _write(liver, tmp_path / "iso_mask.nii.gz", spacing_xyz=(1.0, 1.0, 1.0))
    proc = _run("--ct", str(iso), "--liver-mask", str(iso_mask), "--json")
    assert proc.returncode == 2
    assert "0.7 x 0.7 x 2.5" in proc.stderr and "1 x 1 x 1" in proc.stderr

    proc = _run("--ct", str(tmp_path / "missing.nii.gz"), "--liver-mask", str(iso_mask))
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.parametrize("spacing", [(2.5, 0.7, 0.7), (1.0, 0.8, 0.6)])
def test_erosion_is_the_euclidean_distance_transform(spacing: tuple[float, float, float]) -> None:
    """The fast erosion (in-plane OpenCV erosions per z offset of the ball) keeps exactly the voxels a Euclidean
    distance transform puts farther than the radius from the background, the array's edges not counting."""
    from lpm_node.imaging.measurement import _bounding_box, _erode

    rng = np.random.default_rng(11)
    for trial in range(8):
        shape = (int(rng.integers(6, 24)), int(rng.integers(30, 70)), int(rng.integers(30, 70)))
        mask = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
        if trial % 2:
            mask[0] = mask[:, :, 0] = True  # cut by the scan and by the field of view
        box = _bounding_box(mask)
        if box is None:
            continue
        sub = mask[box]
        for radius in (5.0, 2.5):
            expected = ndimage.distance_transform_edt(sub, sampling=spacing) > radius
            assert np.array_equal(_erode(sub, spacing, radius), expected), (trial, radius)

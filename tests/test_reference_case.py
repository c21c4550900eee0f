"""The published reference case (LIDC-IDRI_0002): its nnU-Net mask through `lpm-node measure` gives the published ROI
voxel for voxel; its manual label gives the same slices. These tests fail when the reference files are missing."""

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

from lpm_node.imaging.measurement import Category, dl_parenchymal_roi, roi_structuring_element
from tests.support_reference import LABEL_NAME, NNUNET_MASK_NAME, PUBLISHED_ROI_NAME
from tests.support_reference import reference_dir as find_reference_dir

MAX_CENTRE_DISTANCE_PX = 8.0


def _lpm_node() -> list[str]:
    script = Path(sys.executable).parent / "lpm-node"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lpm_node.cli"]


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    return find_reference_dir()


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    label = sitk.ReadImage(str(reference_dir / LABEL_NAME))
    liver = sitk.GetArrayFromImage(label) > 0
    published = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_dir / PUBLISHED_ROI_NAME))) > 0
    return label, liver, published


def test_structuring_element_is_opencv_ellipse() -> None:
    element = roi_structuring_element()
    expected = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (23, 23))
    assert element.shape == (23, 23)
    assert np.array_equal(element, expected)
    assert int(element.sum()) == 401
    yy, xx = np.mgrid[-11:12, -11:12]
    euclidean = (yy**2 + xx**2 <= 11**2).astype(np.uint8)
    assert int(euclidean.sum()) == 377
    assert not np.array_equal(element, euclidean)


def test_published_disk_is_the_structuring_element(reference: tuple[sitk.Image, np.ndarray, np.ndarray]) -> None:
    _, _, published = reference
    element = roi_structuring_element().astype(bool)
    for z in np.flatnonzero(published.any(axis=(1, 2))):
        box = ndimage.find_objects(published[z].astype(np.uint8))[0]
        assert np.array_equal(published[z][box], element), f"published disk on slice {z}"


def test_roi_on_reference_label(reference: tuple[sitk.Image, np.ndarray, np.ndarray]) -> None:
    _, liver, published = reference
    published_slices = [int(z) for z in np.flatnonzero(published.any(axis=(1, 2)))]
    assert published_slices == [13, 15, 17]

    roi, slices, centres = dl_parenchymal_roi(liver)

    assert roi.shape == liver.shape and roi.dtype == np.uint8
    assert slices == published_slices
    assert [int(np.count_nonzero(roi[z])) for z in range(roi.shape[0]) if roi[z].any()] == [401, 401, 401]
    assert [c[0] for c in centres] == slices
    for z, y, x in centres:
        assert roi[z, y, x] == 1
        py, px = ndimage.center_of_mass(published[z])
        distance = float(np.hypot(py - y, px - x))
        assert distance <= MAX_CENTRE_DISTANCE_PX, f"slice {z}: centre {y, x} is {distance:.1f} px from {py, px}"
        ry, rx = ndimage.center_of_mass(roi[z])
        assert (ry, rx) == pytest.approx((y, x))


def test_measure_command_on_reference_label(
    reference: tuple[sitk.Image, np.ndarray, np.ndarray], reference_dir: Path, tmp_path: Path
) -> None:
    label, liver, _ = reference
    rng = np.random.default_rng(2)
    ct = np.full(liver.shape, -1000, dtype=np.int16)
    ct[liver] = np.rint(50.0 + rng.normal(0.0, 12.0, int(liver.sum()))).astype(np.int16)
    ct_image = sitk.GetImageFromArray(ct)
    ct_image.CopyInformation(label)
    ct_path = tmp_path / "ct.nii"
    sitk.WriteImage(ct_image, str(ct_path))
    roi_path = tmp_path / "roi.nii.gz"

    proc = subprocess.run(
        [
            *_lpm_node(),
            "measure",
            "--ct",
            str(ct_path),
            "--liver-mask",
            str(reference_dir / LABEL_NAME),
            "--roi-out",
            str(roi_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(roi_path))) > 0
    assert [int(z) for z in np.flatnonzero(roi.any(axis=(1, 2)))] == [13, 15, 17]
    assert result["roi_slices"] == [13, 15, 17]
    assert result["roi_pixels"] == [401, 401, 401]
    assert [c[0] for c in result["roi_centres"]] == [13, 15, 17]
    assert result["dl_parenchymal_hu"] == pytest.approx(float(ct[roi].mean()), abs=1e-6)
    assert result["dl_volumetric_hu"] == pytest.approx(float(ct[liver].mean()), abs=1e-6)
    assert abs(result["dl_parenchymal_hu"] - 50.0) < 4 * 12.0 / np.sqrt(roi.sum())
    spacing = label.GetSpacing()
    assert result["liver_volume_ml"] == pytest.approx(liver.sum() * np.prod(spacing) / 1000.0)
    assert result["category"] == Category.NO_STEATOSIS
    assert result["roi_in_liver_fraction"] == pytest.approx(float(liver[roi].mean()))
    assert abs(result["robust_parenchymal_hu"] - 50.0) < 0.5
    # the label reaches the first slice of the scan, but its largest section (k = 15) lies well inside the scan:
    # the cut cannot change the result, so it is not flagged
    assert liver[0].any() and "liver_cut_inferior" not in result["qc_flags"]
    assert "liver_cut_superior" not in result["qc_flags"]
    assert result["largest_component_removed_voxels"] == 0


def _ct_for(mask_image: sitk.Image, liver: np.ndarray, path: Path) -> Path:
    """A CT on the mask's grid: air outside the body, 50 HU liver with 12 HU noise, 40 HU elsewhere in the body."""
    rng = np.random.default_rng(7)
    ct = np.full(liver.shape, 40, dtype=np.int16)
    ct[:, :, :40] = -1000  # air lateral to the right lobe (the image's left columns)
    ct[liver] = np.rint(50.0 + rng.normal(0.0, 12.0, int(liver.sum()))).astype(np.int16)
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(mask_image)
    sitk.WriteImage(image, str(path))
    return path


def _measure_cli(ct: Path, mask: Path, roi_out: Path) -> dict:
    proc = subprocess.run([*_lpm_node(), "measure", "--ct", str(ct), "--liver-mask", str(mask), "--roi-out",
                           str(roi_out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_published_nnunet_mask_gives_the_published_roi_voxel_for_voxel(
    reference: tuple[sitk.Image, np.ndarray, np.ndarray], reference_dir: Path, tmp_path: Path
) -> None:
    _, _, published = reference
    mask_path = reference_dir / NNUNET_MASK_NAME
    mask_image = sitk.ReadImage(str(mask_path))
    liver = sitk.GetArrayFromImage(mask_image) > 0
    result = _measure_cli(_ct_for(mask_image, liver, tmp_path / "ct.nii.gz"), mask_path, tmp_path / "roi.nii.gz")

    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "roi.nii.gz"))) > 0
    assert np.array_equal(roi, published)  # voxel for voxel
    assert result["roi_slices"] == [13, 15, 17]
    assert result["roi_centres"] == [[13, 229, 85], [15, 226, 86], [17, 224, 87]]
    assert result["roi_pixels"] == [401, 401, 401]
    assert result["largest_component_removed_voxels"] == 0
    assert result["category"] == Category.NO_STEATOSIS and result["not_assessable_reasons"] == []


def test_measure_keeps_the_largest_component_as_the_method_does(
    reference: tuple[sitk.Image, np.ndarray, np.ndarray], reference_dir: Path, tmp_path: Path
) -> None:
    """A second, small component on a lower slice makes that slice the largest (k 15 -> 12); measure removes it."""
    _, _, published = reference
    mask_image = sitk.ReadImage(str(reference_dir / NNUNET_MASK_NAME))
    liver = sitk.GetArrayFromImage(mask_image) > 0
    stray = np.zeros_like(liver)
    stray[12, 20:80, 400:460] = True  # 60 x 60 pixels on slice 12, far from the liver
    areas = (liver | stray).sum(axis=(1, 2))
    near_stray = ndimage.binary_dilation(stray, np.ones((3, 3, 3), dtype=bool))
    assert int(np.argmax(areas)) == 12 and not (near_stray & liver).any()
    assert dl_parenchymal_roi(liver | stray)[1] == [10, 12, 14]  # what the mask would give without the step
    two = sitk.GetImageFromArray((liver | stray).astype(np.uint8))
    two.CopyInformation(mask_image)
    sitk.WriteImage(two, str(tmp_path / "two_components.nii.gz"))
    result = _measure_cli(_ct_for(mask_image, liver, tmp_path / "ct.nii.gz"), tmp_path / "two_components.nii.gz",
                          tmp_path / "roi.nii.gz")

    assert result["largest_component_removed_voxels"] == int(stray.sum())
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "roi.nii.gz"))) > 0
    assert np.array_equal(roi, published)
    assert result["roi_slices"] == [13, 15, 17]

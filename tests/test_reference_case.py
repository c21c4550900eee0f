"""The published reference case (LIDC-IDRI_0002) reproduced on its manual liver label."""

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

from lpm_node.imaging.measurement import NO_STEATOSIS, dl_parenchymal_roi, roi_structuring_element

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "dl-parenchymal"
LABEL = REFERENCE_DIR / "LIDC-IDRI_0002_3d_liver_seg.nii.gz"
PUBLISHED_ROI = REFERENCE_DIR / "LIDC-IDRI_0002_AI_ROI_seg.nii.gz"
MAX_CENTRE_DISTANCE_PX = 8.0

needs_reference = pytest.mark.skipif(
    not (LABEL.is_file() and PUBLISHED_ROI.is_file()),
    reason=f"reference files of the published method not found in {REFERENCE_DIR}",
)


def _lpm_node() -> list[str]:
    script = Path(sys.executable).parent / "lpm-node"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lpm_node.cli"]


@pytest.fixture(scope="module")
def reference() -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    label = sitk.ReadImage(str(LABEL))
    liver = sitk.GetArrayFromImage(label) > 0
    published = sitk.GetArrayFromImage(sitk.ReadImage(str(PUBLISHED_ROI))) > 0
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


@needs_reference
def test_published_disk_is_the_structuring_element(reference: tuple[sitk.Image, np.ndarray, np.ndarray]) -> None:
    _, _, published = reference
    element = roi_structuring_element().astype(bool)
    for z in np.flatnonzero(published.any(axis=(1, 2))):
        box = ndimage.find_objects(published[z].astype(np.uint8))[0]
        assert np.array_equal(published[z][box], element), f"published disk on slice {z}"


@needs_reference
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


@needs_reference
def test_measure_command_on_reference_label(
    reference: tuple[sitk.Image, np.ndarray, np.ndarray], tmp_path: Path
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
            str(LABEL),
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
    assert result["category"] == NO_STEATOSIS
    assert result["roi_in_liver_fraction"] == pytest.approx(float(liver[roi].mean()))
    assert abs(result["robust_parenchymal_hu"] - 50.0) < 0.5
    # the label reaches the first slice of the scan: the liver is cut at the bottom
    assert liver[0].any() and "liver_cut_inferior" in result["qc_flags"]
    assert "liver_cut_superior" not in result["qc_flags"]

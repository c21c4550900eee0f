"""Resampling to the 0.7 x 0.7 x 2.5 mm method grid and mapping masks back to the source grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lpm_node.demo.phantom import make_phantom, phantom_image
from lpm_node.imaging.loading import load_series
from lpm_node.imaging.resampling import (
    METHOD_SPACING,
    SPLIT_GAP,
    mask_to_source_grid,
    mask_to_source_slab,
    resample_label_like,
    resample_to_method_grid,
)
from tests.support_phantom import flip_columns, flip_stored, write_series
from tests.support_reference import LABEL_NAME, reference_dir

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_reference_files_share_our_convention() -> None:
    """The published label is on the method grid: identity direction, liver at low x (right) and low z."""
    label = sitk.ReadImage(str(reference_dir() / LABEL_NAME))
    assert label.GetDirection() == IDENTITY
    assert np.allclose(label.GetSpacing(), METHOD_SPACING, atol=1e-6)
    assert label.GetOrigin()[2] == pytest.approx(-334.5)
    arr = sitk.GetArrayFromImage(label)
    zz, _, xx = np.nonzero(arr)
    assert xx.mean() < arr.shape[2] / 2  # the liver is on the patient's right = low x
    assert zz.mean() < arr.shape[0] / 2  # chest CT: the liver is at the inferior end = low z
    # an image already on the method grid passes through unchanged
    ct_like = sitk.Cast(label, sitk.sitkFloat32)
    out = resample_to_method_grid(ct_like)
    assert out.GetSize() == label.GetSize() and out.GetOrigin() == label.GetOrigin()
    assert np.array_equal(sitk.GetArrayViewFromImage(out), arr.astype(np.float32))
    # so does the phantom's own grid: same orientation conventions
    ph = make_phantom(50.0, n_slices=12, liver_cut=True, seed=0)
    method = resample_to_method_grid(phantom_image(ph))
    assert method.GetDirection() == IDENTITY
    assert np.array_equal(sitk.GetArrayViewFromImage(method), ph.hu.astype(np.float32))
    assert np.nonzero(ph.masks["liver"])[2].mean() < 256


def test_generic_grid_is_interpolated_linearly() -> None:
    ph = make_phantom(30.0, n_slices=20, size=256, pixel_spacing=1.4, slice_spacing=2.0, liver_cut=True,
                      noise_sd=0.0, seed=1)
    src = phantom_image(ph)
    method = resample_to_method_grid(src)
    assert method.GetDirection() == IDENTITY
    assert method.GetSpacing() == pytest.approx(METHOD_SPACING)
    assert method.GetOrigin() == pytest.approx(src.GetOrigin())
    size = method.GetSize()
    assert size == (511, 511, int((19 * 2.0) // 2.5) + 1)
    arr = sitk.GetArrayFromImage(method)
    assert arr.dtype == np.float32
    liver = resample_label_like(phantom_image(ph, ph.masks["liver_parenchyma"]), method)
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(liver, [3, 3, 1]))
    assert inner.sum() > 1000
    assert arr[inner.astype(bool)].mean() == pytest.approx(30.0, abs=0.01)
    # method slice 1 (z = 2.5 mm) lies a quarter of the way between source slices 1 and 2 (2.0 and 4.0 mm);
    # method column 2c / row 2r coincide with source column c / row r
    hu = ph.hu.astype(np.float32)
    expected = 0.75 * hu[1] + 0.25 * hu[2]
    assert np.allclose(arr[1, ::2, ::2], expected, atol=1e-3)
    # method slice 4 (10 mm) is source slice 5; halfway between two source columns: the mean of the two
    assert np.allclose(arr[4, ::2, 1::2], 0.5 * hu[5, :, :-1] + 0.5 * hu[5, :, 1:], atol=1e-3)


def test_outside_gets_default_and_oblique_input() -> None:
    img = sitk.Image([20, 20, 10], sitk.sitkFloat32) + 100.0
    img.SetSpacing((1.0, 1.0, 3.0))
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    out = resample_to_method_grid(img, default_hu=-1000.0)
    arr = sitk.GetArrayFromImage(out)
    assert out.GetDirection() == IDENTITY
    assert arr.max() == pytest.approx(100.0) and arr.min() == -1000.0  # the rotated box's corners are outside
    assert np.isclose(arr, 100.0).mean() > 0.4


def test_label_nearest_keeps_values() -> None:
    lab = sitk.Image([10, 10, 4], sitk.sitkUInt8)
    lab[2:5, 2:5, 1:3] = 2
    lab[6, 6, 2] = 7
    ref = sitk.Image([20, 20, 4], sitk.sitkFloat32)
    ref.SetSpacing((0.5, 0.5, 1.0))
    out = resample_label_like(lab, ref)
    assert out.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(out))) == {0, 2, 7}


@pytest.mark.parametrize("variant", ["head_first", "feet_first", "flipped_iop"])
def test_mask_round_trip_to_source_grid(tmp_path: Path, variant: str) -> None:
    """A truth mask taken onto the method grid and back matches the phantom's own mask on the source frames."""
    ph = make_phantom(42.0, n_slices=20, size=224, pixel_spacing=1.6, slice_spacing=2.0, liver_cut=True, seed=3)
    paths = write_series(ph, tmp_path, feet_first=variant == "feet_first")
    if variant == "flipped_iop":
        flip_columns(paths)
    series = load_series(paths)
    method = resample_to_method_grid(series.image)
    truth = resample_label_like(phantom_image(ph, ph.masks["liver"]), method)
    mask = sitk.GetArrayFromImage(truth)
    assert mask.sum() > 10000
    back = mask_to_source_grid(mask, method, series.image)
    assert back.dtype == np.uint8 and back.shape == sitk.GetArrayViewFromImage(series.image).shape
    # the phantom's mask in the source frame order and column order
    zs = ph.z_positions()
    expected = np.empty_like(back)
    for k, (di, _) in enumerate(series.frame_refs):
        ds = series.datasets[di]
        kk = int(np.argmin(np.abs(zs - float(ds.ImagePositionPatient[2]))))
        m = ph.masks["liver"][kk]
        expected[k] = m[:, ::-1] if float(ds.ImageOrientationPatient[0]) < 0 else m
    assert _dice(back, expected) > 0.97


def test_mask_shape_mismatch_is_an_error() -> None:
    img = sitk.Image([8, 8, 4], sitk.sitkFloat32)
    with pytest.raises(ValueError, match="does not match"):
        mask_to_source_grid(np.zeros((3, 8, 8), np.uint8), img, img)


@pytest.mark.parametrize(("feet_first", "x", "y"), [(False, False, False), (True, True, False), (True, True, True)])
def test_mask_back_is_exact_on_method_spacing_sources(tmp_path: Path, feet_first: bool, x: bool, y: bool) -> None:
    """A source already at 0.7 x 0.7 x 2.5 mm maps back voxel for voxel, whatever the storage order."""
    ph = make_phantom(42.0, n_slices=6, size=160, pixel_spacing=0.7, liver_cut=True, seed=4)
    paths = write_series(ph, tmp_path, feet_first=feet_first)
    if x or y:
        flip_stored(paths, x=x, y=y)
    series = load_series(paths)
    method = resample_to_method_grid(series.image)
    assert np.array_equal(sitk.GetArrayViewFromImage(method), ph.hu.astype(np.float32))
    mask = ph.masks["liver"]
    back = mask_to_source_grid(mask, method, series.image)
    src = sitk.GetArrayViewFromImage(series.image)
    assert back.shape == src.shape
    # the mapped mask selects exactly the liver's voxels in the source array
    assert back.sum() == mask.sum() > 0
    assert np.array_equal(np.sort(src[back.astype(bool)]), np.sort(ph.hu[mask.astype(bool)].astype(np.float32)))


def test_bounding_box_path_equals_full_resampling() -> None:
    rng = np.random.default_rng(0)
    src = sitk.Image([40, 36, 12], sitk.sitkFloat32)
    src.SetSpacing((0.9, 0.9, 3.0))
    c, s = np.cos(np.radians(8)), np.sin(np.radians(8))
    src.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    src.SetOrigin((-10.0, 5.0, 20.0))
    method = resample_to_method_grid(src)
    mask = np.zeros(sitk.GetArrayViewFromImage(method).shape, np.uint8)
    zc, yc, xc = (n // 2 for n in mask.shape)
    mask[zc - 3:zc + 3, yc - 12:yc + 9, xc - 15:xc + 10] = 1
    mask[rng.random(mask.shape) < 0.001] = 1
    got = mask_to_source_grid(mask, method, src)
    m = sitk.GetImageFromArray(mask.astype(np.float32))
    m.CopyInformation(method)
    full = sitk.GetArrayFromImage(sitk.Resample(m, src, sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5
    assert got.sum() > 100
    assert np.array_equal(got, full.astype(np.uint8))


def _sitk_linear(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """SimpleITK's own linear resampling of ``image`` onto ``reference``'s grid (float32)."""
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _worst_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], pixel: int, seed: int) -> sitk.Image:
    """A CT-like volume with the steepest edges real CT has: air, bone and noise side by side, full HU range."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    arr[:, : shape[1] // 3] = -1024  # a flat air region next to noise
    arr[:, :, -2:] = 3071
    image = sitk.GetImageFromArray(arr.astype(np.float32) if pixel == sitk.sitkFloat32 else arr)
    image.SetSpacing(spacing)
    image.SetOrigin((-180.3, -171.9, -412.6))
    return image


def test_mask_back_to_an_off_grid_source_equals_full_resampling() -> None:
    """A compact mask far from the edges, back onto a thin-slice source grid: only its box is resampled, with
    the same voxels as resampling the whole volume."""
    src = sitk.Image([90, 80, 60], sitk.sitkInt16)
    src.SetSpacing((0.78, 0.78, 1.25))
    src.SetOrigin((-35.0, -30.0, 100.0))
    method = resample_to_method_grid(src)
    mask = np.zeros(sitk.GetArrayViewFromImage(method).shape, np.uint8)
    zz, yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    mask[((zz - 15) / 6.0) ** 2 + ((yy - 50) / 20.0) ** 2 + ((xx - 45) / 17.0) ** 2 <= 1.0] = 1
    got = mask_to_source_grid(mask, method, src)
    m = sitk.GetImageFromArray(mask.astype(np.float32))
    m.CopyInformation(method)
    full = sitk.GetArrayFromImage(sitk.Resample(m, src, sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5
    assert got.shape == full.shape and got.sum() > 1000
    assert np.array_equal(got, full.astype(np.uint8))
    assert not mask_to_source_grid(np.zeros_like(mask), method, src).any()


def test_mask_in_runs_far_apart_maps_box_by_box_to_the_same_voxels() -> None:
    """Blobs separated by just over, just under and far over ``SPLIT_GAP`` empty slices, on a tilted thin-slice
    source: mapped in separate boxes where they are far apart, with the same voxels as resampling everything, and
    the slab reported holds every mapped voxel."""
    src = sitk.Image([70, 64, 120], sitk.sitkInt16)
    src.SetSpacing((0.78, 0.78, 1.25))
    c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
    src.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    src.SetOrigin((-25.0, -20.0, 50.0))
    method = resample_to_method_grid(src)
    mask = np.zeros(sitk.GetArrayViewFromImage(method).shape, np.uint8)
    z = 3
    for gap in (SPLIT_GAP, SPLIT_GAP + 1, SPLIT_GAP + 2, 12):
        mask[z:z + 3, 20:30, 25:40] = 1
        z += 3 + gap
    mask[z:z + 2, 45:50, 10:14] = 1
    assert z + 2 < mask.shape[0]
    got, slab = mask_to_source_slab(mask, method, src)
    m = sitk.GetImageFromArray(mask.astype(np.float32))
    m.CopyInformation(method)
    full = sitk.GetArrayFromImage(sitk.Resample(m, src, sitk.Transform(), sitk.sitkLinear, 0.0)) >= 0.5
    assert got.sum() > 1000
    assert np.array_equal(got, full.astype(np.uint8))
    assert got[slab].sum() == got.sum() and slab.stop - slab.start < got.shape[0]
    assert mask_to_source_slab(np.zeros_like(mask), method, src)[1] == slice(0, 0)

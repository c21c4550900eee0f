"""The loader against an independent one: dicom2nifti must see the same HU on the same patient grid.

Both volumes are brought to nibabel's closest canonical (RAS) orientation before comparing, so slice order,
mirrored storage and file order may differ between the two loaders without hiding a real disagreement.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import dicom2nifti.convert_dicom as dicom2nifti
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lpm_node.imaging.loading import load_series
from tests.support_phantom import flip_stored

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ours(paths: list[Path]) -> nib.Nifti1Image:
    image = load_series(paths).image
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    voxels = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)  # (column, row, slice)
    return nib.as_closest_canonical(nib.Nifti1Image(voxels, LPS_TO_RAS @ affine))


def _theirs(paths: list[Path], out: Path) -> nib.Nifti1Image:
    datasets = [pydicom.dcmread(p) for p in paths]
    result = dicom2nifti.dicom_array_to_nifti(datasets, str(out), reorient_nifti=False)
    return nib.as_closest_canonical(result["NII"])


@pytest.mark.parametrize("variant", ["head_first", "feet_first", "mirrored_rows_and_columns", "shuffled_files"])
def test_loader_agrees_with_dicom2nifti(
    tmp_path: Path, phantom_series: Callable[..., list[Path]], variant: str
) -> None:
    paths = phantom_series(liver_hu=47.0, n_slices=16, feet_first=variant == "feet_first")
    if variant == "mirrored_rows_and_columns":
        flip_stored(paths, x=True, y=True)
    if variant == "shuffled_files":
        random.Random(3).shuffle(paths)
    ours, theirs = _ours(paths), _theirs(paths, tmp_path / "theirs.nii.gz")
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    difference = np.abs(np.asarray(ours.dataobj) - np.asarray(theirs.dataobj, dtype=np.float64))
    assert difference.max() == 0.0

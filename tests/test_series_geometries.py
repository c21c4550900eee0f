"""The benchmarks' series shapes: phantoms on real chest CT geometry, written as DICOM and loaded back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lpm_node.demo.phantom import GEOMETRIES, write_ct_series
from lpm_node.imaging.loading import load_series
from lpm_node.imaging.resampling import METHOD_SPACING, resample_to_method_grid


def test_the_named_shapes() -> None:
    assert {name: (g.n_slices, g.size, g.pixel_spacing, g.slice_spacing) for name, g in GEOMETRIES.items()} == {
        "on-grid": (300, 512, 0.7, 2.5),
        "thin": (600, 512, 0.78, 1.25),
        "thick": (72, 512, 0.68, 5.0),
    }
    assert GEOMETRIES["thin"].series_description == "CHEST WO CONTRAST 1.25mm"


@pytest.mark.parametrize("name", ["thin", "thick"])
def test_off_grid_series_load_and_resample(name: str, tmp_path: Path) -> None:
    """A short stack of each off-grid shape: the files carry its geometry, and the method grid covers it."""
    geometry = replace(GEOMETRIES[name], n_slices=8, size=128)  # same spacings, a small matrix
    phantom = geometry.make_phantom(40.0, seed=2, noise_sd=0.0)
    assert phantom.spacing == (geometry.slice_spacing, geometry.pixel_spacing, geometry.pixel_spacing)
    paths = write_ct_series(phantom, tmp_path, series_description=geometry.series_description)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert [float(v) for v in ds.PixelSpacing] == [geometry.pixel_spacing] * 2
    assert float(ds.SliceThickness) == geometry.slice_spacing
    series = load_series(paths)
    assert series.image.GetSize() == (128, 128, 8)
    assert series.image.GetSpacing() == pytest.approx((geometry.pixel_spacing,) * 2 + (geometry.slice_spacing,))
    method = resample_to_method_grid(series.image)
    assert method.GetSpacing() == pytest.approx(METHOD_SPACING)
    extent = [(n - 1) * s for n, s in zip(series.image.GetSize(), series.image.GetSpacing(), strict=True)]
    assert method.GetSize() == tuple(int(np.floor(e / m + 1e-3)) + 1 for e, m in zip(extent, METHOD_SPACING,
                                                                                      strict=True))
    # interpolated values stay within the source's range (up to float32 rounding)
    hu = sitk.GetArrayViewFromImage(method)
    assert hu.min() >= phantom.hu.min() - 1e-3 and hu.max() <= phantom.hu.max() + 1e-3

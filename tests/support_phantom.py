"""Helpers for tests: phantom series and DICOM variants of them (rewritten in place with pydicom)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lpm_node.phantom import Phantom, make_phantom, write_ct_series

SMALL = {"size": 128, "pixel_spacing": 2.8}


def small_phantom(liver_hu: float = 45.0, n_slices: int = 24, seed: int = 0, **kw: object) -> Phantom:
    """A quick phantom (128 x 128, 2.8 mm pixels) through the liver."""
    args = {**SMALL, "n_slices": n_slices, "seed": seed, "liver_cut": True, **kw}
    return make_phantom(liver_hu, **args)  # type: ignore[arg-type]


def rewrite(paths: list[Path], edit: Callable[[Dataset, int], None]) -> None:
    """Apply ``edit(ds, index)`` to every file and save it back (uncompressed)."""
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        edit(ds, i)
        ds.save_as(p, enforce_file_format=True)


def set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    """Replace the pixel data by ``stored`` (uint16 or int16), updating the pixel representation."""
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def hu_of(ds: Dataset) -> np.ndarray:
    """HU of a single-frame CT dataset written by the phantom."""
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def flip_columns(paths: list[Path]) -> None:
    """Store every slice mirrored left-right with IOP [-1, 0, 0, 0, 1, 0]: same patient geometry."""

    def edit(ds: Dataset, _: int) -> None:
        arr = ds.pixel_array
        ps = float(ds.PixelSpacing[1])
        x0 = float(ds.ImagePositionPatient[0]) + (arr.shape[1] - 1) * ps
        set_pixels(ds, arr[:, ::-1].copy())
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, ds.ImagePositionPatient[1], ds.ImagePositionPatient[2]]

    rewrite(paths, edit)


def write_series(ph: Phantom, out: Path, **kw: object) -> list[Path]:
    """The phantom as DICOM under ``out`` (see :func:`write_ct_series`)."""
    return write_ct_series(ph, out, **kw)  # type: ignore[arg-type]


def new_uid(ds: Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

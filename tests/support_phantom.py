"""Helpers for tests: phantom series and DICOM variants of them (rewritten in place with pydicom)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lpm_node.demo.phantom import Phantom, make_phantom, write_ct_series

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
    flip_stored(paths, x=True, y=False)


def flip_stored(paths: list[Path], *, x: bool, y: bool) -> None:
    """Mirror the stored columns (``x``) and/or rows (``y``), negating the IOP vectors: same patient geometry."""

    def edit(ds: Dataset, _: int) -> None:
        arr = ds.pixel_array
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        if x:
            ipp = ipp + row_dir * (arr.shape[1] - 1) * float(ds.PixelSpacing[1])
            row_dir, arr = -row_dir, arr[:, ::-1]
        if y:
            ipp = ipp + col_dir * (arr.shape[0] - 1) * float(ds.PixelSpacing[0])
            col_dir, arr = -col_dir, arr[::-1, :]
        set_pixels(ds, arr.copy())
        ds.ImageOrientationPatient = [float(v) + 0.0 for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in ipp]

    rewrite(paths, edit)


def write_series(ph: Phantom, out: Path, **kw: object) -> list[Path]:
    """The phantom as DICOM under ``out`` (see :func:`write_ct_series`)."""
    return write_ct_series(ph, out, **kw)  # type: ignore[arg-type]


def new_uid(ds: Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

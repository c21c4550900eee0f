"""NumPy arrays into SimpleITK images, with the image allocated ahead while the pixels are still being computed.

``sitk.GetImageFromArray`` allocates a zero-filled image and then copies the array into it. For a volume of
hundreds of MB the allocation (page faults and zero fill) costs several times the copy, so the loader and the
resampler allocate the image on a side thread while they parse or interpolate, and only copy at the end.

The copy uses SimpleITK's private ``_SetImageFromArray`` (the second half of ``GetImageFromArray``). Checked with
SimpleITK 2.5.7 (ITK 5.4): on a 600-slice 512 x 512 series on two shared cores, allocating ahead saves about
0.13 s of a 0.87 s load, and 0.2 s of 0.25 s when a 300 x 570 x 570 float32 method-grid image is made from its
array (allocation 0.21 s, copy 0.03 s). Where the private function is missing the arrays are converted with
the public ``GetImageFromArray``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk

try:
    from SimpleITK.SimpleITK import _SetImageFromArray as _copy_into_image
except ImportError:  # pragma: no cover - other SimpleITK builds: the public conversion
    _copy_into_image = None

__all__ = ["CAN_FILL", "new_image", "image_fits", "image_from_array", "allocate_ahead"]

CAN_FILL = _copy_into_image is not None  # whether an image allocated ahead can be filled from an array
_PIXEL_IDS = {np.dtype(np.int16): sitk.sitkInt16, np.dtype(np.float32): sitk.sitkFloat32}


def new_image(shape: tuple[int, int, int], dtype: type[np.generic]) -> sitk.Image:
    """A zero-filled image for an array of ``shape`` (k, rows, cols) of ``dtype`` (int16 or float32)."""
    return sitk.Image([shape[2], shape[1], shape[0]], _PIXEL_IDS[np.dtype(dtype)])


def image_fits(image: sitk.Image, shape: tuple[int, ...], dtype: type[np.generic]) -> bool:
    """Whether ``image`` was allocated for an array of ``shape`` and ``dtype``."""
    return image.GetSize() == tuple(reversed(shape)) and image.GetPixelID() == _PIXEL_IDS.get(np.dtype(dtype))


def image_from_array(arr: np.ndarray, spare: sitk.Image | None = None) -> sitk.Image:
    """``arr`` (k, rows, cols) as an image: copied into ``spare`` when that was allocated for it, else into a new
    image (``sitk.GetImageFromArray``)."""
    if spare is not None and _copy_into_image is not None and image_fits(spare, arr.shape, arr.dtype.type):
        _copy_into_image(np.ascontiguousarray(arr), spare)
        return spare
    return sitk.GetImageFromArray(arr, isVector=False)


def allocate_ahead(
    pool: ThreadPoolExecutor, shape: tuple[int, int, int], dtype: type[np.generic]
) -> Future[sitk.Image] | None:
    """Start allocating the image for an array of ``shape`` on ``pool``; None where it could not be filled."""
    if not CAN_FILL or np.dtype(dtype) not in _PIXEL_IDS:
        return None
    return pool.submit(new_image, shape, dtype)

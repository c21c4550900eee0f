"""Resampling between a source CT grid and the method grid (0.7 x 0.7 x 2.5 mm, axis-aligned LPS).

On the method grid ``sitk.GetArrayFromImage`` gives (z, y, x) with z increasing toward the head and x toward
the patient's left. When the source grid is already axis-aligned with the method spacing (the common axial
case, in any slice order or orientation sign) the resampling is an exact flip/transpose, not an interpolation.
Any other grid (real CT: 0.6-0.9 mm pixels, 0.625-5 mm slices) is interpolated linearly by SimpleITK
(``sitk.Resample``, multi-threaded), the well-kept implementation the method's resampling is defined by.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["METHOD_SPACING", "resample_to_method_grid", "resample_label_like", "mask_to_source_grid",
           "mask_to_source_slab", "method_slices_near"]

METHOD_SPACING: tuple[float, float, float] = (0.7, 0.7, 2.5)  # (x, y, z) mm
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _direction(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def _extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS) min and max corners of the voxel centres of ``image``."""
    size = np.asarray(image.GetSize(), dtype=np.float64) - 1.0
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])])
    d = _direction(image)
    pts = np.asarray(image.GetOrigin()) + (corners * np.asarray(image.GetSpacing())) @ d.T
    return pts.min(axis=0), pts.max(axis=0)


def _axis_permutation(image: sitk.Image, spacing: tuple[float, float, float]) -> tuple[list[int], list[bool]] | None:
    """For an axis-aligned image with the target spacing: physical axis p <- image axis perm[p], flipped or not."""
    d = _direction(image)
    if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-6):
        return None
    perm = [int(np.argmax(np.abs(d[p]))) for p in range(3)]  # image axis along physical axis p
    if sorted(perm) != [0, 1, 2]:
        return None
    sp = image.GetSpacing()
    if not all(abs(sp[perm[p]] - spacing[p]) <= 1e-4 * spacing[p] for p in range(3)):
        return None
    flips = [bool(d[p, perm[p]] < 0) for p in range(3)]
    return perm, flips


def _same_geometry(image: sitk.Image, spacing: tuple[float, float, float], origin: np.ndarray) -> bool:
    return (
        np.allclose(image.GetSpacing(), spacing, rtol=1e-7, atol=0)
        and np.allclose(image.GetOrigin(), origin, rtol=0, atol=1e-6)
        and np.allclose(image.GetDirection(), _IDENTITY, rtol=0, atol=1e-9)
    )


_EXACT_PIXEL_TYPES = (sitk.sitkFloat32, sitk.sitkInt16)


def resample_to_method_grid(
    image: sitk.Image, spacing: tuple[float, float, float] = METHOD_SPACING, default_hu: float = -1024.0
) -> sitk.Image:
    """Resample a CT image (linear) onto an axis-aligned LPS grid with ``spacing`` (x, y, z) mm.

    The output has identity direction and covers the input's physical extent (voxel centres); points outside the
    input get ``default_hu``. A grid that only needs axes flipped or permuted is not interpolated and keeps its
    pixel type (int16 HU stay int16); an interpolated one is float32.
    """
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    lo, hi = _extent(image)
    exact = _axis_permutation(image, spacing)
    if exact is not None:
        perm, flips = exact
        out = image if image.GetPixelID() in _EXACT_PIXEL_TYPES else sitk.Cast(image, sitk.sitkFloat32)
        if perm != [0, 1, 2]:
            out = sitk.PermuteAxes(out, perm)
        if any(flips):
            out = sitk.Flip(out, flips, False)
        if out is image:
            if _same_geometry(image, spacing, lo):
                # Already on the grid: the same image. (A shallow sitk copy would share the pixels only until a
                # NumPy view of either is taken, which makes SimpleITK copy the whole volume.)
                return image
            out = sitk.Image(image)
        out.SetSpacing(spacing)
        out.SetOrigin(tuple(float(v) for v in lo))
        out.SetDirection(_IDENTITY)
        return out
    size = [int(np.floor((hi[p] - lo[p]) / spacing[p] + 1e-3)) + 1 for p in range(3)]
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, tuple(float(v) for v in lo), spacing, _IDENTITY,
        float(default_hu), sitk.sitkFloat32,
    )


def resample_label_like(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (pixel type kept)."""
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, label.GetPixelID())


def method_slices_near(source_slices: list[int], source_image: sitk.Image, method_image: sitk.Image) -> list[int]:
    """The method-grid slices whose linear interpolation uses any of ``source_slices`` (indices along the source
    image's third axis): those closer than one source slice step to it along the patient's z axis."""
    if not source_slices:
        return []
    n_method = method_image.GetSize()[2]
    z0 = float(method_image.GetOrigin()[2])
    dz = float(method_image.GetSpacing()[2])
    d = _direction(source_image)
    reach = abs(float(d[2, 2]) * source_image.GetSpacing()[2]) or float(source_image.GetSpacing()[2])
    ci, cj = (source_image.GetSize()[0] - 1) / 2.0, (source_image.GetSize()[1] - 1) / 2.0
    method_z = z0 + dz * np.arange(n_method)
    near: set[int] = set()
    for k in source_slices:
        z = source_image.TransformContinuousIndexToPhysicalPoint((ci, cj, float(k)))[2]
        near.update(int(m) for m in np.flatnonzero(np.abs(method_z - z) < reach - 1e-6))
    return sorted(near)


def mask_to_source_grid(mask: np.ndarray, method_image: sitk.Image, source_image: sitk.Image) -> np.ndarray:
    """Map a binary mask (z, y, x) on ``method_image``'s grid onto ``source_image``'s grid.

    Returns uint8 shaped like ``sitk.GetArrayFromImage(source_image)`` (k, rows, cols). Exact when the grids
    are related by a flip/transpose (the method grid made from this source); otherwise the mask is
    interpolated linearly and thresholded at 0.5, over the mask's bounding box only.
    """
    return mask_to_source_slab(mask, method_image, source_image)[0]


def mask_to_source_slab(
    mask: np.ndarray, method_image: sitk.Image, source_image: sitk.Image
) -> tuple[np.ndarray, slice]:
    """:func:`mask_to_source_grid`, and the source slices (along k) outside which the mapped mask is all zero, so
    that callers read only those (on a 600-slice series each full pass over a mask costs tens of ms)."""
    mask = np.asarray(mask)
    if mask.shape != sitk.GetArrayViewFromImage(method_image).shape:
        raise ValueError(f"mask shape {mask.shape} does not match the method image {method_image.GetSize()[::-1]}")
    out_shape = tuple(reversed(source_image.GetSize()))
    exact = _exact_inverse(mask, method_image, source_image)
    if exact is not None:
        ks = np.flatnonzero(exact.any(axis=(1, 2)))
        return exact, slice(int(ks[0]), int(ks[-1]) + 1) if len(ks) else slice(0, 0)
    out = np.zeros(out_shape, dtype=np.uint8)
    slabs = [slab for box in _bounding_boxes(mask) if (slab := _map_box(mask, box, method_image, source_image, out))]
    if not slabs:
        return out, slice(0, 0)
    return out, slice(min(slab.start for slab in slabs), max(slab.stop for slab in slabs))


def _map_box(
    mask: np.ndarray, box: tuple[list[int], list[int]], method_image: sitk.Image, source_image: sitk.Image,
    out: np.ndarray,
) -> slice | None:
    """Interpolate the part of ``mask`` in ``box`` (first and last (z, y, x) index holding it) onto the source
    grid, OR-ed into ``out``; returns the source slices it covered (None when none)."""
    # the box (index, with a 1-voxel margin) on the method grid; only that part is resampled
    lo_idx = [max(a - 1, 0) for a in reversed(box[0])]  # (x, y, z)
    hi_idx = [min(b + 1, n - 1) for b, n in zip(reversed(box[1]), method_image.GetSize(), strict=True)]
    corners = [method_image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
               for i in (lo_idx[0], hi_idx[0]) for j in (lo_idx[1], hi_idx[1]) for k in (lo_idx[2], hi_idx[2])]
    src_idx = np.array([source_image.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    size = np.asarray(source_image.GetSize())
    start = np.clip(np.floor(src_idx.min(axis=0)).astype(int) - 1, 0, size - 1)
    stop = np.clip(np.ceil(src_idx.max(axis=0)).astype(int) + 1, 0, size - 1)
    if np.any(stop < start):
        return None
    ref = sitk.Image([int(v) for v in stop - start + 1], sitk.sitkUInt8)
    ref.SetSpacing(source_image.GetSpacing())
    ref.SetDirection(source_image.GetDirection())
    ref.SetOrigin(source_image.TransformIndexToPhysicalPoint([int(v) for v in start]))
    # outside the box (and its margin) the mask is 0, which is what the crop's default value gives
    crop = mask[lo_idx[2]:hi_idx[2] + 1, lo_idx[1]:hi_idx[1] + 1, lo_idx[0]:hi_idx[0] + 1]
    # uint8 0/1 in: the linear interpolator computes in double from either pixel type (same values as float32
    # 0.0/1.0), with a quarter of the memory
    m = sitk.GetImageFromArray((crop > 0).view(np.uint8))
    m.SetSpacing(method_image.GetSpacing())
    m.SetDirection(method_image.GetDirection())
    m.SetOrigin(method_image.TransformIndexToPhysicalPoint([int(v) for v in lo_idx]))
    sub = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    region = out[start[2]:stop[2] + 1, start[1]:stop[1] + 1, start[0]:stop[0] + 1]
    region |= sitk.GetArrayViewFromImage(sub) >= 0.5
    return slice(int(start[2]), int(stop[2]) + 1)


# Runs of method slices holding the mask that are further apart than this many empty slices are mapped in boxes
# of their own (a stray blob far from the organ no longer makes one box of everything between them). Two runs'
# margins never touch, so no source voxel interpolates between them and OR-ing the boxes gives the same mask.
SPLIT_GAP = 3


def _bounding_boxes(mask: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """First and last (z, y, x) index holding a non-zero voxel, for each run of slices holding the mask (runs
    more than ``SPLIT_GAP`` empty slices apart are kept apart); empty for an empty mask."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    boxes = []
    for run in np.split(z, np.flatnonzero(np.diff(z) > SPLIT_GAP + 1) + 1) if len(z) else []:
        slab = mask[run[0]:run[-1] + 1]
        y = np.flatnonzero(slab.any(axis=(0, 2)))
        x = np.flatnonzero(slab.any(axis=(0, 1)))
        boxes.append(([int(run[0]), int(y[0]), int(x[0])], [int(run[-1]), int(y[-1]), int(x[-1])]))
    return boxes




def _exact_inverse(mask: np.ndarray, method_image: sitk.Image, source_image: sitk.Image) -> np.ndarray | None:
    """The inverse of the exact flip/transpose path of :func:`resample_to_method_grid`, when it applies."""
    spacing = tuple(float(v) for v in method_image.GetSpacing())
    if not np.allclose(method_image.GetDirection(), _IDENTITY, atol=1e-9):
        return None
    exact = _axis_permutation(source_image, spacing)  # type: ignore[arg-type]
    if exact is None:
        return None
    perm, flips = exact
    lo, _ = _extent(source_image)
    src_size = source_image.GetSize()
    if not np.allclose(method_image.GetOrigin(), lo, atol=1e-4 * min(spacing)):
        return None
    if tuple(method_image.GetSize()) != tuple(src_size[perm[p]] for p in range(3)):
        return None
    arr = (np.asarray(mask) > 0).astype(np.uint8)
    flip_axes = tuple(2 - p for p in range(3) if flips[p])
    if flip_axes:
        arr = np.flip(arr, axis=flip_axes)
    axes_t = [2 - perm[2], 2 - perm[1], 2 - perm[0]]  # method numpy axis a <- source numpy axis axes_t[a]
    return np.ascontiguousarray(np.transpose(arr, np.argsort(axes_t)))

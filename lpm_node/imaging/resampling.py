"""Resampling between a source CT grid and the method grid (0.7 x 0.7 x 2.5 mm, axis-aligned LPS).

On the method grid ``sitk.GetArrayFromImage`` gives (z, y, x) with z increasing toward the head and x toward
the patient's left. When the source grid is already axis-aligned with the method spacing (the common axial
case, in any slice order or orientation sign) the resampling is an exact flip/transpose, not an interpolation.
Any other axis-aligned grid (real CT: 0.6-0.9 mm pixels, 0.625-5 mm slices) is interpolated linearly one axis
at a time, in slabs on several threads: the same values as SimpleITK's linear resampling within float32
rounding, at a fraction of its time. Oblique grids go through ``sitk.Resample``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import sparse

from lpm_node.imaging.arrays import allocate_ahead, image_from_array

__all__ = ["METHOD_SPACING", "resample_to_method_grid", "resample_label_like", "mask_to_source_grid"]

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
    separable = _separable_linear(image, lo, spacing, size, float(default_hu))
    if separable is not None:
        return separable
    return sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, tuple(float(v) for v in lo), spacing, _IDENTITY,
        float(default_hu), sitk.sitkFloat32,
    )


# ------------------------------------------------------------------------------------------- separable linear

_AXIS_TOL = 1e-9  # direction cosines: only an exactly axis-aligned grid is interpolated axis by axis
_SLAB = 4  # output slices per task


@dataclass(frozen=True)
class _Axis:
    """Linear interpolation along one axis: output i = (1 - w) * source[lower] + w * source[upper]."""

    lower: np.ndarray  # intp
    upper: np.ndarray  # intp
    weight: np.ndarray  # float32
    inside: np.ndarray  # bool: within half a voxel of the source's first and last voxel centres

    @property
    def exact(self) -> bool:
        """Every output point on a source voxel centre (a plain gather)."""
        return bool(np.all(self.weight == 0))


def _axis_weights(n_out: int, start: float, step: float, n_in: int) -> _Axis:
    """Weights for output points at continuous source indices ``start + step * arange(n_out)``.

    Like ITK's linear interpolator: indices are clamped to the first/last voxel and points more than half a
    voxel outside are outside.
    """
    t = start + step * np.arange(n_out, dtype=np.float64)
    inside = (t >= -0.5) & (t < n_in - 0.5)
    tc = np.clip(t, 0.0, n_in - 1.0)
    lower = np.minimum(np.floor(tc), max(n_in - 2, 0)).astype(np.intp)
    weight = tc - lower
    weight[np.abs(weight) < 1e-9] = 0.0  # on a voxel centre up to the rounding of the grid arithmetic
    upper = np.minimum(lower + 1, n_in - 1)
    return _Axis(lower, upper, weight.astype(np.float32), inside)


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a + w * (b - a) in place in ``a`` (float32); ``b`` is overwritten."""
    b -= a
    b *= w
    a += b
    return a


def _take(arr: np.ndarray, axis: _Axis, dim: int) -> np.ndarray:
    """Interpolate ``arr`` (float32 or int16) along numpy axis ``dim``; float32 result."""
    a = np.take(arr, axis.lower, axis=dim).astype(np.float32, copy=False)
    if axis.exact:
        return a
    shape = [1] * arr.ndim
    shape[dim] = -1
    return _lerp(a, np.take(arr, axis.upper, axis=dim).astype(np.float32, copy=False), axis.weight.reshape(shape))


def _rows_matrix(axis: _Axis, n_in: int) -> sparse.csr_matrix:
    """``axis`` as a sparse (n_out, n_in) float32 matrix: two weights per row."""
    n_out = len(axis.lower)
    rows = np.repeat(np.arange(n_out), 2)
    cols = np.stack([axis.lower, axis.upper], axis=1).ravel()
    w = axis.weight.astype(np.float64)
    vals = np.stack([1.0 - w, w], axis=1).ravel().astype(np.float32)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def _in_plane(slices: np.ndarray, rows: sparse.csr_matrix, ax_x: _Axis, out: np.ndarray) -> None:
    """Bilinear in-plane interpolation of ``slices`` (c, ny_in, nx_in) into ``out`` (c, ny_out, nx_out).

    Along y a sparse product (two whole rows per output row), along x a gather of two columns."""
    for i in range(slices.shape[0]):
        out[i] = _take(rows @ slices[i], ax_x, 1)


def _separable_linear(
    image: sitk.Image, lo: np.ndarray, spacing: tuple[float, float, float], size: list[int], default_hu: float
) -> sitk.Image | None:
    """Linear resampling of an axis-aligned ``image`` onto the identity grid (``lo``, ``spacing``, ``size``), one
    axis at a time; None for an oblique image or a pixel type other than int16/float32."""
    d = _direction(image)
    if not np.allclose(np.abs(d), np.round(np.abs(d)), rtol=0, atol=_AXIS_TOL):
        return None
    perm = [int(np.argmax(np.abs(d[p]))) for p in range(3)]  # image axis along physical axis p
    if sorted(perm) != [0, 1, 2] or image.GetPixelID() not in _EXACT_PIXEL_TYPES:
        return None
    src = sitk.GetArrayViewFromImage(image)  # (k, j, i) = image axes (2, 1, 0)
    view = src.transpose(2 - perm[2], 2 - perm[1], 2 - perm[0])  # numpy axes = physical (z, y, x)
    origin, src_spacing, src_size = image.GetOrigin(), image.GetSpacing(), image.GetSize()
    axes = []
    for p in range(3):
        a = perm[p]
        step_in = float(np.sign(d[p, a])) * src_spacing[a]
        axes.append(_axis_weights(size[p], (float(lo[p]) - origin[p]) / step_in, spacing[p] / step_in, src_size[a]))
    ax_x, ax_y, ax_z = axes
    rows = _rows_matrix(ax_y, view.shape[1])
    out = np.empty((size[2], size[1], size[0]), dtype=np.float32)
    z_first = size[2] <= view.shape[0]
    # more output slices than source slices: every source slice the output needs is interpolated in-plane once,
    # then the output slices along z
    needed = np.unique(np.concatenate([ax_z.lower, ax_z.upper])) if not z_first else None
    planes = np.empty((len(needed), size[1], size[0]), dtype=np.float32) if needed is not None else None

    def in_plane(j0: int) -> None:  # source slices needed[j0:j0 + _SLAB] into planes
        assert needed is not None and planes is not None
        j1 = min(j0 + _SLAB, len(needed))
        _in_plane(view[needed[j0:j1]].astype(np.float32, copy=False), rows, ax_x, planes[j0:j1])

    def slab(k0: int) -> None:
        k1 = min(k0 + _SLAB, size[2])
        zsel = _Axis(ax_z.lower[k0:k1], ax_z.upper[k0:k1], ax_z.weight[k0:k1], ax_z.inside[k0:k1])
        if planes is None:  # no more output slices than source slices: along z first
            _in_plane(_take(view, zsel, 0), rows, ax_x, out[k0:k1])
            return
        assert needed is not None
        where = _Axis(np.searchsorted(needed, zsel.lower), np.searchsorted(needed, zsel.upper), zsel.weight,
                      zsel.inside)
        out[k0:k1] = _take(planes, where, 0)

    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=1) as ahead, ThreadPoolExecutor(max_workers=workers) as pool:
        allocating = allocate_ahead(ahead, out.shape, np.float32)  # meanwhile the image is allocated
        if needed is not None:
            list(pool.map(in_plane, range(0, len(needed), _SLAB)))
        list(pool.map(slab, range(0, size[2], _SLAB)))
        spare = allocating.result() if allocating is not None else None
    # points more than half a voxel outside the source along any axis (none on grids made by the caller)
    out[~ax_z.inside] = np.float32(default_hu)
    out[:, ~ax_y.inside] = np.float32(default_hu)
    out[:, :, ~ax_x.inside] = np.float32(default_hu)
    result = image_from_array(out, spare)
    del spare
    result.SetSpacing(spacing)
    result.SetOrigin(tuple(float(v) for v in lo))
    result.SetDirection(_IDENTITY)
    return result


def resample_label_like(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (pixel type kept)."""
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, label.GetPixelID())


def mask_to_source_grid(mask: np.ndarray, method_image: sitk.Image, source_image: sitk.Image) -> np.ndarray:
    """Map a binary mask (z, y, x) on ``method_image``'s grid onto ``source_image``'s grid.

    Returns uint8 shaped like ``sitk.GetArrayFromImage(source_image)`` (k, rows, cols). Exact when the grids
    are related by a flip/transpose (the method grid made from this source); otherwise the mask is
    interpolated linearly and thresholded at 0.5, over the mask's bounding box only.
    """
    mask = np.asarray(mask)
    if mask.shape != sitk.GetArrayViewFromImage(method_image).shape:
        raise ValueError(f"mask shape {mask.shape} does not match the method image {method_image.GetSize()[::-1]}")
    out_shape = tuple(reversed(source_image.GetSize()))
    exact = _exact_inverse(mask, method_image, source_image)
    if exact is not None:
        return exact
    out = np.zeros(out_shape, dtype=np.uint8)
    box = _bounding_box(mask)
    if box is None:
        return out
    # the mask's bounding box (index, with a 1-voxel margin) on the method grid; only that part is resampled
    lo_idx = [max(a - 1, 0) for a in reversed(box[0])]  # (x, y, z)
    hi_idx = [min(b + 1, n - 1) for b, n in zip(reversed(box[1]), method_image.GetSize(), strict=True)]
    corners = [method_image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
               for i in (lo_idx[0], hi_idx[0]) for j in (lo_idx[1], hi_idx[1]) for k in (lo_idx[2], hi_idx[2])]
    src_idx = np.array([source_image.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    size = np.asarray(source_image.GetSize())
    start = np.clip(np.floor(src_idx.min(axis=0)).astype(int) - 1, 0, size - 1)
    stop = np.clip(np.ceil(src_idx.max(axis=0)).astype(int) + 1, 0, size - 1)
    if np.any(stop < start):
        return out
    ref = sitk.Image([int(v) for v in stop - start + 1], sitk.sitkUInt8)
    ref.SetSpacing(source_image.GetSpacing())
    ref.SetDirection(source_image.GetDirection())
    ref.SetOrigin(source_image.TransformIndexToPhysicalPoint([int(v) for v in start]))
    # outside the box (and its margin) the mask is 0, which is what the crop's default value gives
    crop = mask[lo_idx[2]:hi_idx[2] + 1, lo_idx[1]:hi_idx[1] + 1, lo_idx[0]:hi_idx[0] + 1]
    m = sitk.GetImageFromArray((crop > 0).astype(np.float32))
    m.SetSpacing(method_image.GetSpacing())
    m.SetDirection(method_image.GetDirection())
    m.SetOrigin(method_image.TransformIndexToPhysicalPoint([int(v) for v in lo_idx]))
    sub = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out[start[2]:stop[2] + 1, start[1]:stop[1] + 1, start[0]:stop[0] + 1] = sitk.GetArrayViewFromImage(sub) >= 0.5
    return out


def _bounding_box(mask: np.ndarray) -> tuple[list[int], list[int]] | None:
    """First and last (z, y, x) index holding a non-zero voxel, or None for an empty mask (no index arrays made)."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(z) == 0:
        return None
    slab = mask[z[0]:z[-1] + 1]
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab.any(axis=(0, 1)))
    return [int(z[0]), int(y[0]), int(x[0])], [int(z[-1]), int(y[-1]), int(x[-1])]


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

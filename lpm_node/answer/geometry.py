"""The answer's geometry on the source grid: the masks mapped back, the ROI disks on their source slices, the
organ outlines and the key slice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from lpm_node.answer.source import GAP, nearest_source_slice
from lpm_node.imaging.resampling import mask_to_source_slab
from lpm_node.imaging.result import SeriesResult


@dataclass(frozen=True)
class RoiDisk:
    """One DL-parenchymal ROI disk on a source frame, for the SR's image regions.

    ``centre`` and ``radius`` are in the source frame's pixels: (column, row), 0-based pixel centres at integers.
    """

    index: int  # index into the source datasets
    frame: int  # 0-based frame of that dataset
    centre: tuple[float, float]
    radius: float
    mean_hu: float
    pixels: int
    label: str  # e.g. "slice k-2"


@dataclass(frozen=True)
class Outline:
    """A structure's outline on one source frame, as a closed polygon of (column, row) pixel centres (0-based)."""

    index: int  # index into the source datasets
    frame: int  # 0-based frame of that dataset
    points: tuple[tuple[float, float], ...]


def mask_outline(mask: np.ndarray, index: int, frame: int, tolerance_px: float = 1.0) -> Outline | None:
    """The outer contour of the largest region of a 2-D mask, simplified to ``tolerance_px``, closed; None when the
    mask is empty."""
    import cv2

    contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    ring = cv2.approxPolyDP(largest, tolerance_px, True).reshape(-1, 2)
    if len(ring) < 3:
        return None
    points = tuple((float(x), float(y)) for x, y in ring)
    return Outline(index, frame, (*points, points[0]))


@dataclass(frozen=True)
class SourceMasks:
    """The masks on the source series' own grid, in the loader's slice order, with each mask's pixel count per
    source slice (counted once, on the slices the mapping could set: every later question about which slices
    hold a structure reads these counts, not the 600-slice arrays)."""

    arrays: dict[str, np.ndarray]  # name -> uint8 (k, rows, cols)
    areas: dict[str, np.ndarray]  # name -> int64 (k,): pixels of the mask on each source slice


def slice_areas(mask: np.ndarray, slab: slice | None = None) -> np.ndarray:
    """Pixels of a (k, rows, cols) mask on each slice k, counted only within ``slab`` (zero outside it)."""
    areas = np.zeros(mask.shape[0], dtype=np.int64)
    part = mask[slab] if slab is not None else mask
    if part.size:
        start = slab.start if slab is not None else 0
        areas[start:start + part.shape[0]] = np.count_nonzero(part.reshape(part.shape[0], -1), axis=1)
    return areas


def source_masks(result: SeriesResult) -> SourceMasks:
    """The liver, ROI (and spleen) masks on the source series' own grid, in the loader's slice order."""
    wanted = {"liver": result.masks["liver"], "roi": result.roi}
    if "spleen" in result.masks and result.masks["spleen"].any():
        wanted["spleen"] = result.masks["spleen"]
    arrays: dict[str, np.ndarray] = {}
    areas: dict[str, np.ndarray] = {}
    for name, mask in wanted.items():
        arrays[name], slab = mask_to_source_slab(mask, result.method_image, result.source.image)
        areas[name] = slice_areas(arrays[name], slab)
    return SourceMasks(arrays, areas)


def key_slice_without_disks(areas: dict[str, np.ndarray], frame_refs: Sequence[tuple[int, int]]) -> int:
    """The source slice to show without ROI disks: most ROI pixels, else most liver, else the middle; always a real
    source frame. ``areas``: pixels of each mask per source slice (:attr:`SourceMasks.areas`)."""
    for name in ("roi", "liver"):
        if areas[name].any():
            return nearest_source_slice(frame_refs, int(np.argmax(areas[name])))
    return nearest_source_slice(frame_refs, len(frame_refs) // 2)


def key_slice(result: SeriesResult, disks: Sequence[tuple[int, RoiDisk]], masks: SourceMasks) -> int:
    """The method's index slice k on the source grid: the middle ROI disk's slice, else (no disks) the slice with
    most ROI, else most liver, else the middle."""
    if disks:
        return disks[len(disks) // 2][0]
    return key_slice_without_disks(masks.areas, result.source.frame_refs)


def roi_disks(result: SeriesResult) -> list[tuple[int, RoiDisk]]:
    """Each ROI disk of the measurement on its nearest source slice: (source slice k, disk).

    The centre is mapped from the method grid through patient coordinates; the radius is that of a circle with
    the disk's area, in source pixels; the mean is over the disk's pixels on the method grid (as measured)."""
    m = result.measurement
    hu = sitk.GetArrayViewFromImage(result.method_image)
    refs = result.source.frame_refs
    method_spacing = result.method_image.GetSpacing()
    source_spacing = result.source.image.GetSpacing()
    labels = ["slice k-2", "slice k", "slice k+2"] if len(m.roi_centres) == 3 else []
    out: list[tuple[int, RoiDisk]] = []
    for number, (z, y, x) in enumerate(m.roi_centres):
        disk = result.roi[z] > 0
        if not disk.any():
            continue
        point = result.method_image.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        col, row, k = result.source.image.TransformPhysicalPointToContinuousIndex(point)
        k = min(max(round(k), 0), len(refs) - 1)
        if tuple(refs[k]) == GAP:
            k = nearest_source_slice(refs, k)
        index, frame = refs[k]
        pixels = int(disk.sum())
        radius_mm = float(np.sqrt(pixels * method_spacing[0] * method_spacing[1] / np.pi))
        out.append((k, RoiDisk(
            index=index, frame=frame, centre=(float(col), float(row)), radius=radius_mm / source_spacing[0],
            mean_hu=float(np.asarray(hu[z])[disk].mean()), pixels=pixels,
            label=labels[number] if labels else f"method slice {z}",
        )))
    return out


def outlines(masks: SourceMasks, frame_refs: Sequence[tuple[int, int]], k: int) -> dict[str, Outline]:
    """The liver's outline on source slice ``k`` and the spleen's on its largest source slice (real frames only)."""
    out: dict[str, Outline] = {}
    for name in ("liver", "spleen"):
        if name not in masks.arrays or not masks.areas[name].any():
            continue
        if name == "liver" and masks.areas[name][k]:
            slice_k = k
        else:
            slice_k = nearest_source_slice(frame_refs, int(np.argmax(masks.areas[name])))
        index, frame = frame_refs[slice_k]
        outline = mask_outline(masks.arrays[name][slice_k], index, frame)
        if outline is not None:
            out[name] = outline
    return out

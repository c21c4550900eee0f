"""Is a series geometrically whole? Slice positions along the normal, read from the headers only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from lpm_node.core.frames import functional_group_value

_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "SharedFunctionalGroupsSequence",
         "PerFrameFunctionalGroupsSequence"]
DUPLICATE_MM = 0.01  # two slices closer than this along the normal are the same position
GAP_TOLERANCE = 0.05  # a step may exceed the regular spacing by 5 % (rounding in the headers)


def _frames(ds: Dataset) -> list[tuple[list[float], list[float] | None]]:
    """(position, orientation) of each frame of a multi-frame (Enhanced CT) instance that has a position."""
    found = []
    for frame in range(len(ds.get("PerFrameFunctionalGroupsSequence") or [])):
        position = functional_group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        if position is None:
            continue
        orientation = functional_group_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        found.append(([float(v) for v in position], [float(v) for v in orientation] if orientation else None))
    return found


def read_slices(paths: Sequence[Path]) -> tuple[np.ndarray, list[list[float]]] | None:
    """Positions (N, 3) and the distinct orientations of every slice in ``paths``; None when one is unreadable."""
    positions: list[list[float]] = []
    orientations: list[list[float]] = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except Exception:
            return None
        if "PerFrameFunctionalGroupsSequence" in ds:
            slices = _frames(ds)
        else:
            ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
            if ipp is None or len(ipp) != 3 or iop is None or len(iop) != 6:
                return None
            slices = [([float(v) for v in ipp], [float(v) for v in iop])]
        for pos, ori in slices:
            if ori is None or len(ori) != 6:
                return None
            positions.append(pos)
            if not any(np.allclose(ori, o, atol=1e-4) for o in orientations):
                orientations.append(ori)
    return np.array(positions, dtype=float).reshape(-1, 3), orientations


def contiguity(positions: np.ndarray, orientations: list[list[float]]) -> tuple[bool, str]:
    """Whether slices are contiguous along the normal: one orientation, no duplicate, no step above the spacing.

    The spacing is the median step; a missing slice shows as a step of twice it. Returns (ok, why)."""
    if len(orientations) != 1:
        return False, f"{len(orientations)} slice orientations"
    if len(positions) < 2:
        return False, "fewer than 2 slices"
    ori = np.array(orientations[0])
    normal = np.cross(ori[:3], ori[3:])
    z = np.sort(positions @ normal)
    steps = np.diff(z)
    if np.any(steps < DUPLICATE_MM):
        return False, f"{int(np.sum(steps < DUPLICATE_MM))} duplicate slice position(s)"
    spacing = float(np.median(steps))
    worst = float(steps.max())
    if worst > spacing * (1 + GAP_TOLERANCE):
        return False, f"a gap of {worst:.2f} mm where slices are {spacing:.2f} mm apart"
    return True, f"{len(z)} contiguous slices {spacing:.2f} mm apart"

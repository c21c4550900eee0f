"""Is a series geometrically whole? Slice positions along the normal (read by :mod:`lpm_node.intake.headers`)."""

from __future__ import annotations

import numpy as np

DUPLICATE_MM = 0.01  # two slices closer than this along the normal are the same position
GAP_TOLERANCE = 0.05  # a step may exceed the regular spacing by 5 % (rounding in the headers)


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

"""Where the measured liver component lies in the body, read from the image on the LPS method grid.

The published method reads the image's leftmost liver column (the smallest x on the LPS grid) as the lateral edge
of the patient's right lobe. That holds only when the component is the liver, on the patient's right, and the edge
is the liver's own, not the edge of the field of view. These functions measure what those checks need; the
measurement (``imaging/measurement.py``) turns the figures into QC flags.

- ``body_midline_x``: the body's left-right middle (median over rows of the centre of the body's extent).
- ``right_fraction``: the share of the component's voxels on the patient's right of the midline. A liver holds
  most of its volume there (the left lobe crosses the midline: 85-95 % in the controls); a mirrored image, a prone
  image read as supine, situs inversus or a spleen kept by the largest-component rule hold 0-30 %.
- ``wall_gap_fraction``: on the ROI rows, the gap between the body's right surface and the component's lateral
  edge, as a share of the distance from that surface to the midline. The right lobe lies against the lateral body
  wall (the gap is the wall itself, 10-35 % of the half width); a component whose edge lies nearer the midline than
  the wall (a kidney, bowel, a gallbladder) is not the liver the method measures from.
- ``lateral_tissue_px``: on each ROI row, how many pixels of non-liver tissue lie between the liver's lateral edge
  and the edge of the field of view; None where air (outside the body, or lung) is in view beyond the edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TISSUE_ABOVE_HU = -400.0  # body (fat, soft tissue, bone) vs air and lung
PADDING_BELOW_HU = -1500.0  # outside the scanner's field of view (padding, e.g. -2048 or -3024)


def _row_extents(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of a 2-D tissue mask holding tissue: (first column, last column, row index)."""
    rows = np.flatnonzero(tissue.any(axis=1))
    sub = tissue[rows]
    first = np.argmax(sub, axis=1)
    last = sub.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    return first, last, rows


def body_midline_x(hu: np.ndarray, slices: Sequence[int], component: np.ndarray) -> float | None:
    """The body's left-right middle (column, may be fractional) over the given axial slices; None when the image
    shows no body around the component (less tissue outside it than in it: a mask on a blank image).

    On each slice the rows whose body extent is at least half the widest one (not the table, not the neck or the
    arms' tips) give the centre of their extent; the median over all of them is the midline. A field of view that
    cuts the body on one side moves it toward the other side by half the cut, at most."""
    centres: list[np.ndarray] = []
    inside = outside = 0
    for z in slices:
        plane = np.asarray(hu[z])
        tissue = (plane > TISSUE_ABOVE_HU) & (plane > PADDING_BELOW_HU)
        if not tissue.any():
            continue
        in_component = int(np.count_nonzero(tissue & component[z]))
        inside += in_component
        outside += int(np.count_nonzero(tissue)) - in_component
        first, last, _ = _row_extents(tissue)
        width = last - first
        wide = width >= 0.5 * width.max()
        centres.append((first[wide] + last[wide]) / 2.0)
    if not centres or outside < inside:
        return None
    return float(np.median(np.concatenate(centres)))


def right_fraction(liver: np.ndarray, midline_x: float, slices: Sequence[int]) -> float:
    """Share of the component's voxels (on ``slices``) on the patient's right of the midline (smaller x, LPS)."""
    split = int(np.floor(midline_x)) + 1  # columns 0 .. floor(midline) lie on the right
    right = total = 0
    for z in slices:
        plane = np.asarray(liver[z])
        right += int(np.count_nonzero(plane[:, :split]))
        total += int(np.count_nonzero(plane))
    return right / total if total else 0.0


def wall_gap_fraction(hu: np.ndarray, edges: Sequence[tuple[int, int, int]], midline_x: float) -> float | None:
    """Largest, over the ROI rows (z, y, x_min), of (x_min - body's right surface) / (midline - right surface);
    None when no row has its edge on the patient's right of the midline. The surface is the first air (or padding,
    or the image border) going outward from the edge, so an arm beside the chest does not count as body wall."""
    worst: float | None = None
    for z, y, x_min in edges:
        row = np.asarray(hu[z, y, :x_min], dtype=np.float64)[::-1]  # from the component outward
        air = np.flatnonzero(row <= TISSUE_ABOVE_HU)
        surface = x_min - (int(air[0]) if air.size else x_min)
        half = midline_x - surface
        if half <= 0 or x_min >= midline_x:
            continue
        fraction = (x_min - surface) / half
        worst = fraction if worst is None else max(worst, fraction)
    return worst


def lateral_tissue_px(hu: np.ndarray, edges: Sequence[tuple[int, int, int]]) -> list[int | None]:
    """Per ROI row (z, y, x_min): pixels from the liver's lateral edge outward to the edge of the field of view
    (the image border or padding), when no air lies between; None when air or lung is in view beyond the edge."""
    out: list[int | None] = []
    for z, y, x_min in edges:
        row = np.asarray(hu[z, y, :x_min], dtype=np.float64)[::-1]  # from the liver outward
        low = np.flatnonzero(row < TISSUE_ABOVE_HU)
        if low.size and row[low[0]] > PADDING_BELOW_HU:
            out.append(None)  # air or lung: the body's surface (or the lung) is in view
        else:
            out.append(int(low[0]) if low.size else int(row.size))
    return out

"""DL-parenchymal liver attenuation (Zhang et al., Sci Rep 2024) and the node's QC on it.

Works on arrays in the method's grid: (z, y, x), 0.7 x 0.7 x 2.5 mm, LPS: x toward the patient's left,
y toward the back, z toward the head (slice 0 is the inferior end of the scan).

The published method, reproduced exactly (``dl_parenchymal_roi``):

1. k = the axial slice with the largest liver area (the first one on a tie); ROI slices k-2, k, k+2; if k < 2
   they are 0, 2, 4, and mirrored at the top of the scan (k > n-3: n-5, n-3, n-1);
2. on each slice, x_min = the smallest column holding liver and y = the row of the first liver pixel in it;
   the ROI centre is (y, x_min + 30);
3. the ROI is OpenCV's 23 x 23 elliptic structuring element (401 pixels) stamped at the centre, clipped at the
   image border;
4. DL-parenchymal attenuation = mean HU over all the ROI pixels of the three slices pooled; DL-volumetric
   attenuation = mean HU over the whole liver mask; DL-parenchymal < threshold (40 HU) => moderate-to-severe
   steatosis.

Beyond the paper, reported beside the faithful values and never instead of them:

- ``robust_parenchymal_hu``: the liver mask is eroded by ``ROBUST_EROSION_MM`` (5 mm, a 3-D Euclidean distance in
  mm; the cut faces at the first and last slice of the scan do not count as liver edges), the HU values of the
  remaining voxels are clipped at ``ROBUST_CLIP_SD`` (3) robust SDs (1.4826 x MAD) around their median, and the
  mean of the inliers is reported. Vessels, lesions and partial-volume edges fall out; if fewer than
  ``MIN_ROBUST_VOXELS`` voxels survive the erosion, half of it is tried, then the whole mask.
- ``spleen_hu``: the same erosion on the spleen mask, plain mean; ``liver_minus_spleen_hu`` = DL-parenchymal minus
  spleen attenuation.
- QC flags (``QCFlag``: stable snake_case values, in ``Measurement.qc_flags``; each with its ``sentence``). Those
  that withhold the answer (``QCFlag.withholds``) make the category ``not_assessable`` (the faithful value is still
  reported) and are listed again, in the enum's order, in ``Measurement.not_assessable_reasons``:

  ``no_liver``                        the liver mask is empty: HU values None;
  ``little_liver``                    liver volume < ``min_liver_volume_ml``;
  ``roi_largely_outside_liver``       an ROI disk is less than ``min_roi_in_liver_fraction`` inside the liver;
  ``roi_clipped``                     an ROI disk was clipped at the image border (fewer than 401 pixels);
  ``roi_outside_image``               an ROI disk lies wholly outside the image (no pixel to measure);
  ``roi_noisy``                       SD of HU over the ROI pixels > ``max_roi_sd_hu``;
  ``roi_mean_implausible``            the ROI mean lies outside ``plausible_min_hu`` .. ``plausible_max_hu``;
  ``faithful_robust_disagree``        DL-parenchymal and the robust estimate differ by more than
                                      ``max_faithful_robust_difference_hu`` (lesion, vessel or misplaced ROI);
  ``lateral_edge_at_field_of_view``   on an ROI row, no air lies between the liver's lateral edge (which the ROI is
                                      placed from) and the edge of the field of view, and fewer than
                                      ``MIN_LATERAL_TISSUE_PX`` pixels of tissue do (see there);
  ``liver_cut_by_field_of_view_at_roi`` on the ROI slices, the liver touches the image border or the padding
                                      within ``ROI_REACH_PX`` columns of its lateral edge (where the ROI is placed
                                      and lies);
  ``liver_not_on_patient_right``      less than half the component lies on the patient's right of the body's
                                      midline (``imaging/anatomy.py``): a mirrored image, a prone image read as
                                      supine, situs inversus or another organ kept as the largest component;
  ``component_not_liver_like``        the component's lateral edge lies nearer the body's midline than its right
                                      wall on an ROI row (the right lobe lies against the wall);
  ``roi_disk_changes_category``       one ROI disk is unlike the rest of the liver (``roi_disk_unlike_liver``) and
                                      the category without it differs from the faithful category.

  Informative only:

  ``roi_outside_liver``               some ROI pixel lies outside the liver mask (``roi_in_liver_fraction`` < 1);
  ``liver_cut_inferior``/``_superior`` the liver is cut by the first/last slice and the slice of largest liver
                                      area lies within two slices of that end, so k may not be the true maximum;
  ``liver_cut_by_field_of_view``      the liver touches the in-plane border of the image (or its padding);
  ``body_wall_cut_by_field_of_view``  the field of view cuts the body wall beyond the liver on an ROI row, with at
                                      least ``MIN_LATERAL_TISSUE_PX`` pixels of tissue beyond the liver's edge:
                                      measured;
  ``roi_disk_unlike_liver``           one ROI disk holds more than ``max_roi_disk_outlier_fraction`` of pixels
                                      beyond ``DISK_OUTLIER_SD`` robust SDs of the liver's median, or its mean lies
                                      more than ``max_roi_disk_difference_hu`` from the robust estimate;
  ``orientation_unknown``             the header states no orientation (the anatomy alone gave the patient's right);
  ``liver_side_not_checked``          the image shows no body around the liver (a mask on a blank image);
  ``patient_not_supine``              the patient lay prone or on one side (the header's orientation was used);
  ``roi_slice_interpolated``          an ROI slice was interpolated across a gap in the source slices;
  ``roi_on_edge_slices``              k < 2 or k > n-3: the ROI slices were taken as 0, 2, 4 or mirrored at the top;
  ``roi_slice_without_liver``         one of the chosen slices holds no liver, so it has no ROI;
  ``off_method_grid``                 the spacing given is not 0.7 x 0.7 x 2.5 mm, so the ROI's size in mm is wrong;
  ``no_spleen``                       a spleen mask was given but is empty.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import cv2
import numpy as np

from lpm_node.imaging.anatomy import (
    PADDING_BELOW_HU,
    body_midline_x,
    lateral_tissue_px,
    right_fraction,
    wall_gap_fraction,
)

if TYPE_CHECKING:

    from lpm_node.core.config import MeasurementSettings
    from lpm_node.imaging.orientation import PatientOrientation

class Category(StrEnum):
    """The answer for a series; the value is what the audit, the JSON, the CSV and the console store and show."""

    STEATOSIS = "moderate_to_severe_steatosis"
    NO_STEATOSIS = "no_moderate_to_severe_steatosis"
    NOT_ASSESSABLE = "not_assessable"


METHOD_SPACING_ZYX = (2.5, 0.7, 0.7)  # mm
SPACING_TOLERANCE = 0.02  # relative
ROI_KERNEL_SIZE = 23  # pixels, OpenCV MORPH_ELLIPSE
ROI_OFFSET_PX = 30  # ROI centre: 30 px (21 mm) medial to the liver's lateral edge
ROI_SLICE_STEP = 2  # slices k-2, k, k+2
ROI_RADIUS_PX = ROI_KERNEL_SIZE // 2  # 11 px
# The ROI's reach from the liver's lateral edge: its far rim, 30 + 11 = 41 px (28.7 mm) medial to the edge. The liver
# there decides where the ROI goes (its lateral edge and first row) and holds it: cut by the field of view there,
# the ROI is not where the method puts it.
ROI_REACH_PX = ROI_OFFSET_PX + ROI_RADIUS_PX
# The least tissue, in pixels along the ROI row, between the liver's lateral edge and the edge of the field of view
# for the edge to be read as the liver's own: the ROI's near rim, 30 - 11 = 19 px (13.3 mm) inside the edge. The
# method relies on that band inside the liver to keep the ROI off the edge's partial volume; the node asks for as
# much tissue outside it, so that a segmentation edge drawn by the field of view (a liver cut by it, its mask stopped
# a few millimetres short, as in a tight reconstruction of a large patient) is withheld, while a field of view that
# cuts the body wall 15-25 mm beyond the liver (a common tight chest reconstruction) is measured.
MIN_LATERAL_TISSUE_PX = ROI_OFFSET_PX - ROI_RADIUS_PX
# share of the component on the patient's right: 0.85-0.95 for the controls' livers; 0-0.3 mirrored, prone read as
# supine, or a spleen kept as the largest component
MIN_RIGHT_FRACTION = 0.5
MAX_WALL_GAP_FRACTION = 0.5  # the right lobe's edge lies nearer the right body wall than the midline
DISK_OUTLIER_SD = 3.0  # a disk pixel beyond 3 robust SDs of the liver's median is an outlier
MIN_LIVER_SD_HU = 5.0  # floor of the liver's robust SD for the outlier test (noise-free images)
ROBUST_EROSION_MM = 5.0
ROBUST_CLIP_SD = 3.0
MIN_ROBUST_VOXELS = 1000


class QCFlag(StrEnum):
    """A quality-control flag: its stable snake_case value (stored in the audit, the JSON and the CSV), the sentence
    a radiologist reads for it (SR, key image, console; never the value itself), and whether it withholds the
    answer (makes the category not_assessable: the ROI may not have measured liver parenchyma)."""

    sentence: str
    withholds: bool

    def __new__(cls, value: str, sentence: str, withholds: bool = False) -> QCFlag:
        flag = str.__new__(cls, value)
        flag._value_ = value
        flag.sentence = sentence
        flag.withholds = withholds
        return flag

    NO_LIVER = ("no_liver", "No liver was found in the scan.", True)
    LITTLE_LIVER = ("little_liver", "Too little liver is in view for a reliable measurement.", True)
    ROI_LARGELY_OUTSIDE_LIVER = (
        "roi_largely_outside_liver",
        "A measurement region lies largely outside the segmented liver.",
        True,
    )
    ROI_CLIPPED = ("roi_clipped", "A measurement region was cut by the edge of the image.", True)
    ROI_OUTSIDE_IMAGE = ("roi_outside_image", "A measurement region lies wholly outside the image.", True)
    ROI_NOISY = (
        "roi_noisy",
        "The attenuation in the measurement region varies too much (noise, metal or a lesion).",
        True,
    )
    ROI_MEAN_IMPLAUSIBLE = (
        "roi_mean_implausible",
        "The mean attenuation in the measurement region is not plausible for unenhanced liver.",
        True,
    )
    FAITHFUL_ROBUST_DISAGREE = (
        "faithful_robust_disagree",
        "The measurement region and the rest of the liver parenchyma differ strongly (a lesion, a vessel or a "
        "misplaced region).",
        True,
    )
    LATERAL_EDGE_AT_FIELD_OF_VIEW = (
        "lateral_edge_at_field_of_view",
        "The liver's outer edge, from which the region is placed, is cut by the field of view.",
        True,
    )
    ROI_OUTSIDE_LIVER = ("roi_outside_liver", "Part of the measurement region lies outside the segmented liver.")
    LIVER_CUT_INFERIOR = (
        "liver_cut_inferior",
        "The liver is cut by the lower end of the scan near its largest section.",
    )
    LIVER_CUT_SUPERIOR = (
        "liver_cut_superior",
        "The liver is cut by the upper end of the scan near its largest section.",
    )
    LIVER_CUT_BY_FIELD_OF_VIEW = ("liver_cut_by_field_of_view", "The liver is cut by the edge of the field of view.")
    ROI_SLICE_INTERPOLATED = (
        "roi_slice_interpolated",
        "A measurement slice was interpolated across a missing source slice.",
    )
    ROI_ON_EDGE_SLICES = ("roi_on_edge_slices", "The measurement slices were taken at the end of the scan.")
    ROI_SLICE_WITHOUT_LIVER = ("roi_slice_without_liver", "A measurement slice holds no liver.")
    OFF_METHOD_GRID = ("off_method_grid", "The image is not on the method's 0.7 x 0.7 x 2.5 mm grid.")
    NO_SPLEEN = ("no_spleen", "No spleen was found, so liver-minus-spleen attenuation is not reported.")
    BODY_WALL_CUT_BY_FIELD_OF_VIEW = (
        "body_wall_cut_by_field_of_view",
        "The field of view cuts the body wall beyond the liver; the liver's outer edge and the tissue beyond "
        "it are in view, so the liver was measured.",
    )
    LIVER_CUT_BY_FIELD_OF_VIEW_AT_ROI = (
        "liver_cut_by_field_of_view_at_roi",
        "The liver is cut by the field of view beside the measurement regions.",
        True,
    )
    LIVER_NOT_ON_PATIENT_RIGHT = (
        "liver_not_on_patient_right",
        "The liver is not on the patient's right (mirrored image, situs inversus or a wrong header).",
        True,
    )
    COMPONENT_NOT_LIVER_LIKE = (
        "component_not_liver_like",
        "The measured component is not liver-like (its outer edge lies far from the right body wall).",
        True,
    )
    ORIENTATION_UNKNOWN = (
        "orientation_unknown",
        "The image header states no orientation; the patient's right was found from the anatomy alone.",
    )
    LIVER_SIDE_NOT_CHECKED = (
        "liver_side_not_checked",
        "No body was found around the liver, so its side could not be checked.",
    )
    PATIENT_NOT_SUPINE = (
        "patient_not_supine",
        "The patient lay prone or on one side; the image's orientation was used to find the patient's right.",
    )
    ROI_DISK_UNLIKE_LIVER = (
        "roi_disk_unlike_liver",
        "A measurement region differs from the rest of the liver (part of it lies on a lesion, a vessel or "
        "tissue outside the liver).",
    )
    ROI_DISK_CHANGES_CATEGORY = (
        "roi_disk_changes_category",
        "Leaving out the measurement region that differs from the rest of the liver changes the category.",
        True,
    )
    MEASUREMENT_FAILED = ("measurement_failed", "The measurement could not be completed on this series.", True)


def flag_sentence(flag: str) -> str:
    """The sentence that explains a QC flag, stored or new (the flag itself, humanised, for one this version does
    not know)."""
    try:
        return QCFlag(flag).sentence
    except ValueError:
        return flag.replace("_", " ").capitalize() + "."


@dataclass
class Measurement:
    """What the node measured on one series (HU values are means; None when not measurable)."""

    dl_parenchymal_hu: float | None
    dl_volumetric_hu: float | None
    liver_volume_ml: float
    category: Category
    threshold_hu: float
    roi_slices: list[int] = field(default_factory=list)  # z indices on the method grid
    roi_centres: list[list[int]] = field(default_factory=list)  # [z, y, x] on the method grid
    roi_pixels: list[int] = field(default_factory=list)  # pixels per ROI disk
    roi_sd_hu: float | None = None  # SD of HU over the three ROIs
    robust_parenchymal_hu: float | None = None  # beyond the paper: resists vessels and lesions
    roi_in_liver_fraction: float | None = None  # over the three ROIs pooled
    roi_in_liver_fractions: list[float] = field(default_factory=list)  # per ROI disk
    qc_flags: list[QCFlag] = field(default_factory=list)
    not_assessable_reasons: list[QCFlag] = field(default_factory=list)  # the qc_flags that withhold the answer
    spleen_hu: float | None = None
    liver_minus_spleen_hu: float | None = None
    roi_disk_means_hu: list[float | None] = field(default_factory=list)  # per ROI disk
    roi_disk_sds_hu: list[float | None] = field(default_factory=list)
    roi_disk_outlier_fractions: list[float | None] = field(default_factory=list)  # vs the robust liver distribution
    liver_right_fraction: float | None = None  # share of the liver on the patient's right of the body's midline
    lateral_tissue_mm: list[float | None] = field(default_factory=list)  # per ROI row; None: air beyond the edge

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


def failed_measurement(threshold_hu: float, reason_flag: QCFlag = QCFlag.MEASUREMENT_FAILED) -> Measurement:
    """A not_assessable Measurement for a series on which measuring itself failed."""
    return Measurement(
        dl_parenchymal_hu=None, dl_volumetric_hu=None, liver_volume_ml=0.0, category=Category.NOT_ASSESSABLE,
        threshold_hu=float(threshold_hu), qc_flags=[reason_flag], not_assessable_reasons=[reason_flag],
    )


def roi_structuring_element() -> np.ndarray:
    """The published ROI disk: OpenCV's 23 x 23 MORPH_ELLIPSE (uint8, 401 ones)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ROI_KERNEL_SIZE, ROI_KERNEL_SIZE))


ROI_DISK_PIXELS = int(roi_structuring_element().sum())


def roi_slice_indices(areas: np.ndarray) -> tuple[list[int], bool]:
    """ROI slices from the per-slice liver areas: ([k-2, k, k+2] or the edge variant, edge case used)."""
    n = int(areas.shape[0])
    k = int(np.argmax(areas))  # first maximum, as the published loop with a strict '>'
    step = ROI_SLICE_STEP
    if k < step:
        slices, edge = [0, step, 2 * step], True
    elif k > n - 1 - step:
        slices, edge = [n - 1 - 2 * step, n - 1 - step, n - 1], True
    else:
        slices, edge = [k - step, k, k + step], False
    kept: list[int] = []
    for z in slices:  # scans shorter than 5 slices
        z = min(max(z, 0), n - 1)
        if z not in kept:
            kept.append(z)
    return kept, edge


def _disk_window(
    shape_yx: tuple[int, int], centre_yx: tuple[int, int], element: np.ndarray
) -> tuple[slice, slice, np.ndarray] | None:
    """Where ``element`` centred on ``centre_yx`` falls in a plane: (rows, columns, the clipped element as bool),
    or None when it lies wholly outside (the centre may lie outside)."""
    half_y, half_x = element.shape[0] // 2, element.shape[1] // 2
    y0, x0 = centre_yx[0] - half_y, centre_yx[1] - half_x
    y1, x1 = y0 + element.shape[0], x0 + element.shape[1]
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y1, shape_yx[0]), min(x1, shape_yx[1])
    if cy0 >= cy1 or cx0 >= cx1:
        return None
    part = element[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(bool)
    if not part.any():
        return None
    return slice(cy0, cy1), slice(cx0, cx1), part


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean view of a mask (no copy when it is boolean already, or uint8 holding 0 and 1 only)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype == np.uint8 and mask.flags.c_contiguous and (mask.size == 0 or int(mask.max()) <= 1):
        return mask.view(bool)
    return mask > 0


def _slice_areas(liver: np.ndarray) -> np.ndarray:
    """Liver pixels per axial slice (slice by slice: no temporary of the whole volume)."""
    return np.fromiter((np.count_nonzero(plane) for plane in liver), dtype=np.int64, count=liver.shape[0])


@dataclass
class _Placement:
    """The published ROI as placed on one liver mask: slices, centres, the disks' windows and how it went."""

    slices: list[int]
    centres: list[list[int]]
    windows: list[tuple[slice, slice, np.ndarray] | None]  # per ROI slice; None: the disk is outside the image
    lateral_edges: list[tuple[int, int, int]]  # (z, y, x_min) the ROI was placed from
    flags: list[str]
    k: int


def _place_roi(liver: np.ndarray, areas: np.ndarray) -> _Placement:
    """The published ROI placement on a non-empty (z, y, x) liver mask, given its per-slice areas."""
    slices, edge = roi_slice_indices(areas)
    flags = [QCFlag.ROI_ON_EDGE_SLICES] if edge else []
    element = roi_structuring_element()
    placement = _Placement([], [], [], [], flags, int(np.argmax(areas)))
    for z in slices:
        columns = liver[z].any(axis=0)
        if not columns.any():
            if QCFlag.ROI_SLICE_WITHOUT_LIVER not in flags:
                flags.append(QCFlag.ROI_SLICE_WITHOUT_LIVER)
            continue
        x_min = int(np.argmax(columns))
        y = int(np.argmax(liver[z, :, x_min]))
        x = x_min + ROI_OFFSET_PX
        placement.slices.append(z)
        placement.centres.append([z, y, x])
        placement.windows.append(_disk_window(liver.shape[1:], (y, x), element))
        placement.lateral_edges.append((z, y, x_min))
    return placement


def _roi_array(shape: tuple[int, ...], placement: _Placement) -> np.ndarray:
    roi = np.zeros(shape, dtype=np.uint8)
    for z, window in zip(placement.slices, placement.windows, strict=True):
        if window is not None:
            rows, cols, part = window
            roi[z, rows, cols] |= part.view(np.uint8)
    return roi


def dl_parenchymal_roi(liver: np.ndarray) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """The published DL-parenchymal ROI on a (z, y, x) liver mask on the method grid.

    Returns the ROI mask (uint8, same shape), the ROI slices and the ROI centres [z, y, x]. The ROI centre may lie
    outside the image (then the disk is clipped); a chosen slice without liver gets no ROI and is left out of both
    lists. An empty mask gives an empty ROI and empty lists.
    """
    liver = _as_mask(liver)
    if liver.ndim != 3:
        raise ValueError(f"liver mask must be 3-D (z, y, x), got shape {liver.shape}")
    areas = _slice_areas(liver)
    if areas.size == 0 or areas.max() == 0:
        return np.zeros(liver.shape, dtype=np.uint8), [], []
    placement = _place_roi(liver, areas)
    return _roi_array(liver.shape, placement), placement.slices, placement.centres


def _bounding_box(mask: np.ndarray, areas: np.ndarray | None = None) -> tuple[slice, ...] | None:
    """Bounding box of a (z, y, x) mask, grown by one voxel inside the array; None when empty.

    One pass over the slices that hold the mask (``areas``, the per-slice counts, when known)."""
    if areas is None:
        areas = _slice_areas(mask)
    present_z = np.flatnonzero(areas)
    if present_z.size == 0:
        return None
    z0, z1 = int(present_z[0]), int(present_z[-1]) + 1
    plane = np.any(mask[z0:z1], axis=0)
    rows = np.flatnonzero(plane.any(axis=1))
    cols = np.flatnonzero(plane.any(axis=0))
    n_z, n_y, n_x = mask.shape
    return (
        slice(max(z0 - 1, 0), min(z1 + 1, n_z)),
        slice(max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, n_y)),
        slice(max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, n_x)),
    )


def _ellipsoid_layers(spacing_zyx: tuple[float, float, float], radius_mm: float) -> list[tuple[int, np.ndarray]]:
    """The ball of ``radius_mm`` (Euclidean, in mm, boundary included) as (z offset, in-plane uint8 kernel)."""
    sz, sy, sx = spacing_zyx
    nz, ny, nx = (int(np.floor(radius_mm / s + 1e-9)) for s in spacing_zyx)
    yy, xx = np.mgrid[-ny : ny + 1, -nx : nx + 1]
    layers = []
    for dz in range(-nz, nz + 1):
        distance = np.sqrt((dz * sz) ** 2 + (yy * sy) ** 2 + (xx * sx) ** 2)
        kernel = (distance <= radius_mm).astype(np.uint8)
        if kernel.any():
            layers.append((dz, kernel))
    return layers


def _erode(mask: np.ndarray, spacing_zyx: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Voxels of ``mask`` farther than ``radius_mm`` from every non-mask voxel of the array (the array's own edges
    are not mask edges): the same set as a Euclidean distance transform's ``distance > radius_mm``, computed as
    the intersection, over the z offsets of the ball, of in-plane erosions (OpenCV) shifted along z."""
    src = np.ascontiguousarray(mask, dtype=np.uint8)
    n = src.shape[0]
    out = np.ones(src.shape, dtype=np.uint8)
    eroded_cache: dict[bytes, np.ndarray] = {}
    for dz, kernel in _ellipsoid_layers(spacing_zyx, radius_mm):
        key = kernel.tobytes() + bytes(kernel.shape)
        if key not in eroded_cache:
            eroded = np.empty_like(src)
            for z in range(n):  # default border: outside the array counts as mask
                cv2.erode(src[z], kernel, dst=eroded[z])
            eroded_cache[key] = eroded
        eroded = eroded_cache[key]
        # out[z] &= eroded[z + dz] where z + dz is inside the array (outside: mask)
        lo, hi = max(0, -dz), min(n, n - dz)
        if lo < hi:
            out[lo:hi] &= eroded[lo + dz : hi + dz]
    return out.view(bool)


def eroded_mask_values(
    values: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float], erosion_mm: float, min_voxels: int,
    box: tuple[slice, ...] | None = None,
) -> np.ndarray:
    """Values inside ``mask`` eroded by ``erosion_mm`` (Euclidean, in mm).

    If fewer than ``min_voxels`` survive, half the erosion is tried, then the whole mask is used.

    The edges of the array do not count as the mask's edge (a liver cut by the scan is not eroded at the cut).
    ``box``: the mask's bounding box grown by one voxel (``_bounding_box``), when already known.
    """
    if box is None:
        box = _bounding_box(mask)
    if box is None:
        return np.empty(0, dtype=np.float64)
    sub = mask[box]
    inner = sub
    for depth in (erosion_mm, erosion_mm / 2):
        candidate = _erode(sub, spacing_zyx, depth)
        if int(np.count_nonzero(candidate)) >= min_voxels:
            inner = candidate
            break
    return np.asarray(values[box][inner], dtype=np.float64)


@dataclass(frozen=True)
class RobustStatistics:
    """The liver's robust HU distribution: median, robust SD (1.4826 x MAD) and the mean of the inliers."""

    median: float
    sd: float
    mean: float


def robust_statistics(values: np.ndarray, clip_sd: float = ROBUST_CLIP_SD) -> RobustStatistics | None:
    """Median, robust SD and the mean of the values within ``clip_sd`` robust SDs of the median; None when empty."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    if sigma == 0.0:
        return RobustStatistics(median, 0.0, median)
    inliers = values[np.abs(values - median) <= clip_sd * sigma]
    return RobustStatistics(median, sigma, float(inliers.mean()))


def robust_mean(values: np.ndarray, clip_sd: float = ROBUST_CLIP_SD) -> float | None:
    """Mean of the values within ``clip_sd`` robust SDs (1.4826 x MAD) of their median; None when empty."""
    stats = robust_statistics(values, clip_sd)
    return None if stats is None else stats.mean


def _robust_liver(
    hu: np.ndarray, liver: np.ndarray, spacing_zyx: tuple[float, float, float], box: tuple[slice, ...] | None = None
) -> RobustStatistics | None:
    values = eroded_mask_values(hu, _as_mask(liver), spacing_zyx, ROBUST_EROSION_MM, MIN_ROBUST_VOXELS, box)
    return robust_statistics(values)


def robust_parenchymal_hu(
    hu: np.ndarray, liver: np.ndarray, spacing_zyx: tuple[float, float, float], box: tuple[slice, ...] | None = None
) -> float | None:
    """Beyond the paper: MAD-clipped mean HU over the liver eroded by 5 mm (see the module docstring)."""
    stats = _robust_liver(hu, liver, spacing_zyx, box)
    return None if stats is None else stats.mean


def on_method_grid(spacing_zyx: tuple[float, float, float]) -> bool:
    """Whether a (z, y, x) spacing in mm is the method's grid (``METHOD_SPACING_ZYX``, within 2 %)."""
    return all(abs(s - m) <= SPACING_TOLERANCE * m for s, m in zip(spacing_zyx, METHOD_SPACING_ZYX, strict=True))


def _spleen(
    hu: np.ndarray, spleen: np.ndarray, spacing_zyx: tuple[float, float, float], flags: list[str]
) -> float | None:
    mask = _as_mask(spleen)
    if mask.shape != hu.shape:
        raise ValueError(f"spleen mask shape {mask.shape} differs from the CT's {hu.shape}")
    values = eroded_mask_values(hu, mask, spacing_zyx, ROBUST_EROSION_MM, MIN_ROBUST_VOXELS // 10)
    if values.size == 0:
        flags.append(QCFlag.NO_SPLEEN)
        return None
    return float(values.mean())


def _field_of_view_flags(hu: np.ndarray, liver: np.ndarray, placement: _Placement, pixel_mm: float,
                         result: Measurement) -> list[str]:
    """The field of view beside the liver's lateral edge, on the ROI rows and slices (see ``MIN_LATERAL_TISSUE_PX``
    and ``ROI_REACH_PX``); fills ``result.lateral_tissue_mm``."""
    flags: list[str] = []
    tissue = lateral_tissue_px(hu, placement.lateral_edges)
    result.lateral_tissue_mm = [None if t is None else round(t * pixel_mm, 1) for t in tissue]
    if any(t is not None and t < MIN_LATERAL_TISSUE_PX for t in tissue):
        flags.append(QCFlag.LATERAL_EDGE_AT_FIELD_OF_VIEW)
    elif any(t is not None for t in tissue):
        flags.append(QCFlag.BODY_WALL_CUT_BY_FIELD_OF_VIEW)
    if placement.lateral_edges:
        z0 = min(z for z, _, _ in placement.lateral_edges)
        z1 = max(z for z, _, _ in placement.lateral_edges) + 1
        x1 = min(max(x for _, _, x in placement.lateral_edges) + ROI_REACH_PX + 1, liver.shape[2])
        reach = (slice(z0, z1), slice(0, liver.shape[1]), slice(0, x1))
        if _liver_cut_by_field_of_view(hu[reach], liver[reach], reach, liver.shape):
            flags.append(QCFlag.LIVER_CUT_BY_FIELD_OF_VIEW_AT_ROI)
    return flags


def _side_flags(hu: np.ndarray, liver: np.ndarray, areas: np.ndarray, placement: _Placement,
                result: Measurement) -> list[str]:
    """Is the component the liver on the patient's right (``imaging/anatomy.py``)? Fills
    ``result.liver_right_fraction``."""
    present = np.flatnonzero(areas)
    step = max(1, present.size // 24)  # the midline from two dozen slices through the liver
    midline = body_midline_x(hu, [int(z) for z in present[::step]], liver)
    if midline is None:
        return [QCFlag.LIVER_SIDE_NOT_CHECKED]
    result.liver_right_fraction = round(right_fraction(liver, midline, [int(z) for z in present]), 3)
    if result.liver_right_fraction < MIN_RIGHT_FRACTION:
        return [QCFlag.LIVER_NOT_ON_PATIENT_RIGHT]
    gap = wall_gap_fraction(hu, placement.lateral_edges, midline)
    if gap is not None and gap > MAX_WALL_GAP_FRACTION:
        return [QCFlag.COMPONENT_NOT_LIVER_LIKE]
    return []


def _orientation_flags(orientation: PatientOrientation | None) -> list[str]:
    if orientation is None:
        return []
    flags = [] if orientation.known else [QCFlag.ORIENTATION_UNKNOWN]
    if orientation.supine is False:
        flags.append(QCFlag.PATIENT_NOT_SUPINE)
    return flags


def _disk_flags(disk_values: list[np.ndarray], liver_stats: RobustStatistics | None, result: Measurement,
                settings: MeasurementSettings) -> list[str]:
    """Per ROI disk: mean, SD and the fraction of outlier pixels against the liver's robust distribution; a disk
    unlike the liver is reported, and withheld when the category without it differs (``roi_disk_changes_category``).
    """
    means: list[float | None] = []
    sds: list[float | None] = []
    outliers: list[float | None] = []
    unlike: list[bool] = []
    for values in disk_values:
        if values.size == 0 or liver_stats is None:
            means.append(None)
            sds.append(None)
            outliers.append(None)
            unlike.append(False)
            continue
        mean = float(values.mean())
        sigma = max(liver_stats.sd, MIN_LIVER_SD_HU)
        fraction = float(np.count_nonzero(np.abs(values - liver_stats.median) > DISK_OUTLIER_SD * sigma)) / values.size
        means.append(round(mean, 2))
        sds.append(round(float(values.std(ddof=1)), 2) if values.size > 1 else 0.0)
        outliers.append(round(fraction, 4))
        unlike.append(fraction > settings.max_roi_disk_outlier_fraction
                      or abs(mean - liver_stats.mean) > settings.max_roi_disk_difference_hu)
    result.roi_disk_means_hu, result.roi_disk_sds_hu, result.roi_disk_outlier_fractions = means, sds, outliers
    if not any(unlike) or result.dl_parenchymal_hu is None or liver_stats is None:
        return []
    kept = [v for v, bad in zip(disk_values, unlike, strict=True) if not bad and v.size]
    without = float(np.concatenate(kept).mean()) if kept else liver_stats.mean
    threshold = settings.threshold_hu
    if (result.dl_parenchymal_hu < threshold) != (without < threshold):
        return [QCFlag.ROI_DISK_UNLIKE_LIVER, QCFlag.ROI_DISK_CHANGES_CATEGORY]
    return [QCFlag.ROI_DISK_UNLIKE_LIVER]


def _liver_cut_by_field_of_view(hu_box: np.ndarray, liver_box: np.ndarray, box: tuple[slice, ...],
                                shape: tuple[int, ...]) -> bool:
    """The liver touches the in-plane border of the image, or the padding outside the field of view."""
    if box[1].start == 0 and liver_box[:, 0, :].any() or box[1].stop == shape[1] and liver_box[:, -1, :].any():
        return True
    if box[2].start == 0 and liver_box[:, :, 0].any() or box[2].stop == shape[2] and liver_box[:, :, -1].any():
        return True
    padding = hu_box <= PADDING_BELOW_HU
    if not padding.any():
        return False
    kernel = np.ones((5, 5), dtype=np.uint8)
    near = np.empty(padding.shape, dtype=np.uint8)
    padding_u8 = padding.view(np.uint8)
    for z in range(padding.shape[0]):
        cv2.dilate(padding_u8[z], kernel, dst=near[z])
    return bool(np.any(near.view(bool) & liver_box))


def _cut_flags(areas: np.ndarray, k: int) -> list[str]:
    """liver_cut_inferior/_superior when the liver reaches that end of the scan and the slice of largest area
    lies within ``ROI_SLICE_STEP`` slices of it: the liver's true largest section may lie beyond the scan."""
    n = int(areas.shape[0])
    flags = []
    if areas[0] > 0 and k <= ROI_SLICE_STEP:
        flags.append(QCFlag.LIVER_CUT_INFERIOR)
    if areas[-1] > 0 and k >= n - 1 - ROI_SLICE_STEP:
        flags.append(QCFlag.LIVER_CUT_SUPERIOR)
    return flags


def _categorise(result: Measurement, settings: MeasurementSettings) -> None:
    """Set the not_assessable reasons (the flags that make it so) and the category."""
    result.not_assessable_reasons = [f for f in QCFlag if f.withholds and f in result.qc_flags]
    if result.dl_parenchymal_hu is None or result.not_assessable_reasons:
        result.category = Category.NOT_ASSESSABLE
    else:
        below = result.dl_parenchymal_hu < settings.threshold_hu
        result.category = Category.STEATOSIS if below else Category.NO_STEATOSIS


def measure(
    hu: np.ndarray,
    liver: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    spleen: np.ndarray | None = None,
    settings: MeasurementSettings | None = None,
    interpolated_slices: Collection[int] = (),
    orientation: PatientOrientation | None = None,
) -> tuple[Measurement, np.ndarray]:
    """Measure liver attenuation on a (z, y, x) HU volume and liver mask on the method grid.

    Returns the Measurement (faithful DL-parenchymal and DL-volumetric values, category, and the node's QC, robust
    and spleen values beside them) and the ROI mask (uint8, same shape). ``interpolated_slices``: method-grid
    slices interpolated across a gap in the source slices (flagged when an ROI slice is one of them).
    ``orientation``: what the image's header said of its orientation (flagged when it said nothing, or that the
    patient was not supine); the side of the liver is checked on the anatomy whatever it says.
    """
    if settings is None:
        from lpm_node.core.config import MeasurementSettings

        settings = MeasurementSettings()
    hu = np.asarray(hu)
    liver = _as_mask(liver)
    if liver.ndim != 3:
        raise ValueError(f"liver mask must be 3-D (z, y, x), got shape {liver.shape}")
    if hu.shape != liver.shape:
        raise ValueError(f"liver mask shape {liver.shape} differs from the CT's {hu.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    areas = _slice_areas(liver)
    count = int(areas.sum())
    result = Measurement(
        dl_parenchymal_hu=None,
        dl_volumetric_hu=None,
        liver_volume_ml=count * float(np.prod(spacing)) / 1000.0,
        category=Category.NOT_ASSESSABLE,
        threshold_hu=float(settings.threshold_hu),
    )
    flags = result.qc_flags
    if count == 0:
        flags.append(QCFlag.NO_LIVER)
        if not on_method_grid(spacing):
            flags.append(QCFlag.OFF_METHOD_GRID)
        flags += _orientation_flags(orientation)
        if spleen is not None:
            result.spleen_hu = _spleen(hu, spleen, spacing, flags)
        _categorise(result, settings)
        return result, np.zeros(liver.shape, dtype=np.uint8)

    placement = _place_roi(liver, areas)
    flags += placement.flags
    if not on_method_grid(spacing):
        flags.append(QCFlag.OFF_METHOD_GRID)
    result.roi_slices = placement.slices
    result.roi_centres = placement.centres
    # ROI pixels disk by disk, in the order a boolean mask of the whole volume would give them (z, y, x)
    disk_values: list[np.ndarray] = []
    disk_in_liver: list[np.ndarray] = []
    for z, window in zip(placement.slices, placement.windows, strict=True):
        if window is None:
            disk_values.append(np.empty(0, dtype=np.float64))
            disk_in_liver.append(np.empty(0, dtype=bool))
            continue
        rows, cols, part = window
        disk_values.append(np.asarray(hu[z, rows, cols][part], dtype=np.float64))
        disk_in_liver.append(liver[z, rows, cols][part])
    result.roi_pixels = [int(v.size) for v in disk_values]
    roi_values = np.concatenate(disk_values) if disk_values else np.empty(0, dtype=np.float64)

    box = _bounding_box(liver, areas)
    assert box is not None
    liver_box = liver[box]
    hu_box = hu[box]
    result.dl_volumetric_hu = float(hu_box[liver_box].astype(np.float64).mean())
    liver_stats = _robust_liver(hu, liver, spacing, box)
    result.robust_parenchymal_hu = None if liver_stats is None else liver_stats.mean
    if roi_values.size:
        result.dl_parenchymal_hu = float(roi_values.mean())
        result.roi_sd_hu = float(roi_values.std(ddof=1)) if roi_values.size > 1 else 0.0
        in_liver = np.concatenate(disk_in_liver)
        result.roi_in_liver_fraction = float(np.count_nonzero(in_liver)) / in_liver.size
    result.roi_in_liver_fractions = [
        float(np.count_nonzero(v)) / v.size if v.size else 0.0 for v in disk_in_liver
    ]

    if result.liver_volume_ml < settings.min_liver_volume_ml:
        flags.append(QCFlag.LITTLE_LIVER)
    if any(f < settings.min_roi_in_liver_fraction for f, n in zip(result.roi_in_liver_fractions,
                                                                    result.roi_pixels, strict=True) if n):
        flags.append(QCFlag.ROI_LARGELY_OUTSIDE_LIVER)
    if any(0 < n < ROI_DISK_PIXELS for n in result.roi_pixels):
        flags.append(QCFlag.ROI_CLIPPED)
    if any(n == 0 for n in result.roi_pixels):
        flags.append(QCFlag.ROI_OUTSIDE_IMAGE)
    if result.roi_sd_hu is not None and result.roi_sd_hu > settings.max_roi_sd_hu:
        flags.append(QCFlag.ROI_NOISY)
    if result.dl_parenchymal_hu is not None and not (
        settings.plausible_min_hu <= result.dl_parenchymal_hu <= settings.plausible_max_hu
    ):
        flags.append(QCFlag.ROI_MEAN_IMPLAUSIBLE)
    if (
        result.dl_parenchymal_hu is not None
        and result.robust_parenchymal_hu is not None
        and abs(result.dl_parenchymal_hu - result.robust_parenchymal_hu) > settings.max_faithful_robust_difference_hu
    ):
        flags.append(QCFlag.FAITHFUL_ROBUST_DISAGREE)
    flags += _disk_flags(disk_values, liver_stats, result, settings)
    flags += _field_of_view_flags(hu, liver, placement, spacing[2], result)
    flags += _side_flags(hu, liver, areas, placement, result)
    flags += _orientation_flags(orientation)
    if result.roi_in_liver_fraction is not None and result.roi_in_liver_fraction < 1.0:
        flags.append(QCFlag.ROI_OUTSIDE_LIVER)
    flags += _cut_flags(areas, placement.k)
    if _liver_cut_by_field_of_view(hu_box, liver_box, box, liver.shape):
        flags.append(QCFlag.LIVER_CUT_BY_FIELD_OF_VIEW)
    if set(placement.slices) & {int(z) for z in interpolated_slices}:
        flags.append(QCFlag.ROI_SLICE_INTERPOLATED)
    if spleen is not None:
        result.spleen_hu = _spleen(hu, spleen, spacing, flags)
        if result.spleen_hu is not None and result.dl_parenchymal_hu is not None:
            result.liver_minus_spleen_hu = result.dl_parenchymal_hu - result.spleen_hu
    _categorise(result, settings)
    return result, _roi_array(liver.shape, placement)

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
- QC flags (stable snake_case strings, in ``Measurement.qc_flags``):

  ``no_liver``                the liver mask is empty: category not_assessable, HU values None;
  ``roi_outside_liver``       some ROI pixel lies outside the liver mask (``roi_in_liver_fraction`` < 1);
  ``liver_cut_inferior``      the liver touches the first (inferior) slice of the scan;
  ``liver_cut_superior``      the liver touches the last (superior) slice of the scan;
  ``little_liver``            liver volume < ``min_liver_volume_ml``;
  ``roi_noisy``               SD of HU over the ROI pixels > ``max_roi_sd_hu``;
  ``roi_on_edge_slices``      k < 2 or k > n-3: the ROI slices were taken as 0, 2, 4 or mirrored at the top;
  ``roi_clipped``             an ROI disk was clipped at the image border (fewer than 401 pixels);
  ``roi_slice_without_liver`` one of the chosen slices holds no liver, so it has no ROI;
  ``off_method_grid``         the spacing given is not 0.7 x 0.7 x 2.5 mm, so the ROI's size in mm is wrong;
  ``no_spleen``               a spleen mask was given but is empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy import ndimage

if TYPE_CHECKING:

    from lpm_node.core.config import MeasurementSettings

STEATOSIS = "moderate_to_severe_steatosis"
NO_STEATOSIS = "no_moderate_to_severe_steatosis"
NOT_ASSESSABLE = "not_assessable"

METHOD_SPACING_ZYX = (2.5, 0.7, 0.7)  # mm
SPACING_TOLERANCE = 0.02  # relative
ROI_KERNEL_SIZE = 23  # pixels, OpenCV MORPH_ELLIPSE
ROI_OFFSET_PX = 30  # ROI centre: 30 px (21 mm) medial to the liver's lateral edge
ROI_SLICE_STEP = 2  # slices k-2, k, k+2
ROBUST_EROSION_MM = 5.0
ROBUST_CLIP_SD = 3.0
MIN_ROBUST_VOXELS = 1000

QC_NO_LIVER = "no_liver"
QC_ROI_OUTSIDE_LIVER = "roi_outside_liver"
QC_LIVER_CUT_INFERIOR = "liver_cut_inferior"
QC_LIVER_CUT_SUPERIOR = "liver_cut_superior"
QC_LITTLE_LIVER = "little_liver"
QC_ROI_NOISY = "roi_noisy"
QC_ROI_ON_EDGE_SLICES = "roi_on_edge_slices"
QC_ROI_CLIPPED = "roi_clipped"
QC_ROI_SLICE_WITHOUT_LIVER = "roi_slice_without_liver"
QC_OFF_METHOD_GRID = "off_method_grid"
QC_NO_SPLEEN = "no_spleen"

# Every flag as a sentence a radiologist reads (SR, key image, README); never show the snake_case name.
QC_FLAG_SENTENCES: dict[str, str] = {
    QC_NO_LIVER: "No liver was found in the scan.",
    QC_ROI_OUTSIDE_LIVER: "Part of the measurement region lies outside the segmented liver.",
    QC_LIVER_CUT_INFERIOR: "The liver is cut by the lower end of the scan.",
    QC_LIVER_CUT_SUPERIOR: "The liver is cut by the upper end of the scan.",
    QC_LITTLE_LIVER: "Too little liver is in view for a reliable measurement.",
    QC_ROI_NOISY: "The attenuation in the measurement region varies too much (noise, metal or a lesion).",
    QC_ROI_ON_EDGE_SLICES: "The measurement slices were taken at the end of the scan.",
    QC_ROI_CLIPPED: "A measurement disk was cut by the edge of the image.",
    QC_ROI_SLICE_WITHOUT_LIVER: "A measurement slice holds no liver.",
    QC_OFF_METHOD_GRID: "The image is not on the method's 0.7 x 0.7 x 2.5 mm grid.",
    QC_NO_SPLEEN: "No spleen was found, so liver-minus-spleen attenuation is not reported.",
}


def flag_sentence(flag: str) -> str:
    """The sentence that explains a QC flag (the flag itself, humanised, for one this version does not know)."""
    return QC_FLAG_SENTENCES.get(flag) or flag.replace("_", " ").capitalize() + "."


@dataclass
class Measurement:
    """What the node measured on one series (HU values are means; None when not measurable)."""

    dl_parenchymal_hu: float | None
    dl_volumetric_hu: float | None
    liver_volume_ml: float
    category: str  # STEATOSIS | NO_STEATOSIS | NOT_ASSESSABLE
    threshold_hu: float
    roi_slices: list[int] = field(default_factory=list)  # z indices on the method grid
    roi_centres: list[list[int]] = field(default_factory=list)  # [z, y, x] on the method grid
    roi_pixels: list[int] = field(default_factory=list)  # pixels per ROI disk
    roi_sd_hu: float | None = None  # SD of HU over the three ROIs
    robust_parenchymal_hu: float | None = None  # beyond the paper: resists vessels and lesions
    roi_in_liver_fraction: float | None = None
    qc_flags: list[str] = field(default_factory=list)
    spleen_hu: float | None = None
    liver_minus_spleen_hu: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


def roi_structuring_element() -> np.ndarray:
    """The published ROI disk: OpenCV's 23 x 23 MORPH_ELLIPSE (uint8, 401 ones)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ROI_KERNEL_SIZE, ROI_KERNEL_SIZE))


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


def _stamp(plane: np.ndarray, centre_yx: tuple[int, int], element: np.ndarray) -> None:
    """OR ``element`` centred on ``centre_yx`` into ``plane``, clipped at the border (centre may lie outside)."""
    half_y, half_x = element.shape[0] // 2, element.shape[1] // 2
    y0, x0 = centre_yx[0] - half_y, centre_yx[1] - half_x
    y1, x1 = y0 + element.shape[0], x0 + element.shape[1]
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y1, plane.shape[0]), min(x1, plane.shape[1])
    if cy0 >= cy1 or cx0 >= cx1:
        return
    plane[cy0:cy1, cx0:cx1] |= element[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean view of a mask (no copy when it is boolean already)."""
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask > 0


def _roi_with_flags(liver: np.ndarray) -> tuple[np.ndarray, list[int], list[list[int]], list[str]]:
    """The published ROI plus the flags of how it was placed."""
    liver = _as_mask(liver)
    if liver.ndim != 3:
        raise ValueError(f"liver mask must be 3-D (z, y, x), got shape {liver.shape}")
    roi = np.zeros(liver.shape, dtype=np.uint8)
    areas = liver.reshape(liver.shape[0], -1).sum(axis=1)
    if areas.size == 0 or areas.max() == 0:
        return roi, [], [], [QC_NO_LIVER]
    slices, edge = roi_slice_indices(areas)
    flags = [QC_ROI_ON_EDGE_SLICES] if edge else []
    element = roi_structuring_element()
    roi_slices: list[int] = []
    centres: list[list[int]] = []
    for z in slices:
        columns = liver[z].any(axis=0)
        if not columns.any():
            if QC_ROI_SLICE_WITHOUT_LIVER not in flags:
                flags.append(QC_ROI_SLICE_WITHOUT_LIVER)
            continue
        x_min = int(np.argmax(columns))
        y = int(np.argmax(liver[z, :, x_min]))
        x = x_min + ROI_OFFSET_PX
        _stamp(roi[z], (y, x), element)
        roi_slices.append(z)
        centres.append([z, y, x])
    return roi, roi_slices, centres, flags


def dl_parenchymal_roi(liver: np.ndarray) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """The published DL-parenchymal ROI on a (z, y, x) liver mask on the method grid.

    Returns the ROI mask (uint8, same shape), the ROI slices and the ROI centres [z, y, x]. The ROI centre may lie
    outside the image (then the disk is clipped); a chosen slice without liver gets no ROI and is left out of both
    lists. An empty mask gives an empty ROI and empty lists.
    """
    roi, slices, centres, _ = _roi_with_flags(liver)
    return roi, slices, centres


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a non-empty mask, grown by one voxel inside the array; None when empty."""
    box = []
    for axis, n in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(np.any(mask, axis=others))  # projections: no full-size copy of the mask
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, n)))
    return tuple(box)


def eroded_mask_values(
    values: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float], erosion_mm: float, min_voxels: int
) -> np.ndarray:
    """Values inside ``mask`` eroded by ``erosion_mm`` (Euclidean, in mm).

    If fewer than ``min_voxels`` survive, half the erosion is tried, then the whole mask is used.

    The edges of the array do not count as the mask's edge (a liver cut by the scan is not eroded at the cut).
    """
    box = _bounding_box(mask)
    if box is None:
        return np.empty(0, dtype=np.float64)
    sub = mask[box]
    distance = ndimage.distance_transform_edt(sub, sampling=spacing_zyx)
    inner = sub
    for depth in (erosion_mm, erosion_mm / 2):
        candidate = distance > depth
        if int(np.count_nonzero(candidate)) >= min_voxels:
            inner = candidate
            break
    return np.asarray(values[box][inner], dtype=np.float64)


def robust_mean(values: np.ndarray, clip_sd: float = ROBUST_CLIP_SD) -> float | None:
    """Mean of the values within ``clip_sd`` robust SDs (1.4826 x MAD) of their median; None when empty."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    if sigma == 0.0:
        return median
    inliers = values[np.abs(values - median) <= clip_sd * sigma]
    return float(inliers.mean())


def robust_parenchymal_hu(hu: np.ndarray, liver: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float | None:
    """Beyond the paper: MAD-clipped mean HU over the liver eroded by 5 mm (see the module docstring)."""
    values = eroded_mask_values(hu, _as_mask(liver), spacing_zyx, ROBUST_EROSION_MM, MIN_ROBUST_VOXELS)
    return robust_mean(values)


def _on_method_grid(spacing_zyx: tuple[float, float, float]) -> bool:
    return all(abs(s - m) <= SPACING_TOLERANCE * m for s, m in zip(spacing_zyx, METHOD_SPACING_ZYX, strict=True))


def _category(dl_parenchymal_hu: float | None, threshold_hu: float) -> str:
    if dl_parenchymal_hu is None:
        return NOT_ASSESSABLE
    return STEATOSIS if dl_parenchymal_hu < threshold_hu else NO_STEATOSIS


def _spleen(
    hu: np.ndarray, spleen: np.ndarray, spacing_zyx: tuple[float, float, float], flags: list[str]
) -> float | None:
    mask = _as_mask(spleen)
    if mask.shape != hu.shape:
        raise ValueError(f"spleen mask shape {mask.shape} differs from the CT's {hu.shape}")
    values = eroded_mask_values(hu, mask, spacing_zyx, ROBUST_EROSION_MM, MIN_ROBUST_VOXELS // 10)
    if values.size == 0:
        flags.append(QC_NO_SPLEEN)
        return None
    return float(values.mean())


def measure(
    hu: np.ndarray,
    liver: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    spleen: np.ndarray | None = None,
    settings: MeasurementSettings | None = None,
) -> tuple[Measurement, np.ndarray]:
    """Measure liver attenuation on a (z, y, x) HU volume and liver mask on the method grid.

    Returns the Measurement (faithful DL-parenchymal and DL-volumetric values, category, and the node's QC, robust
    and spleen values beside them) and the ROI mask (uint8, same shape).
    """
    if settings is None:
        from lpm_node.core.config import MeasurementSettings

        settings = MeasurementSettings()
    hu = np.asarray(hu)
    liver = _as_mask(liver)
    if hu.shape != liver.shape:
        raise ValueError(f"liver mask shape {liver.shape} differs from the CT's {hu.shape}")
    spacing = tuple(float(s) for s in spacing_zyx)
    roi, roi_slices, centres, flags = _roi_with_flags(liver)
    count = int(liver.sum())
    volume_ml = count * float(np.prod(spacing)) / 1000.0
    result = Measurement(
        dl_parenchymal_hu=None,
        dl_volumetric_hu=None,
        liver_volume_ml=volume_ml,
        category=NOT_ASSESSABLE,
        threshold_hu=float(settings.threshold_hu),
        roi_slices=roi_slices,
        roi_centres=centres,
        roi_pixels=[int(roi[z].sum()) for z in roi_slices],
        qc_flags=flags,
    )
    if not _on_method_grid(spacing):
        flags.append(QC_OFF_METHOD_GRID)
    if count == 0:
        if spleen is not None:
            result.spleen_hu = _spleen(hu, spleen, spacing, flags)
        return result, roi
    roi_mask = roi.view(bool)  # the ROI holds 0 and 1 only
    roi_values = hu[roi_mask].astype(np.float64)
    result.dl_parenchymal_hu = float(roi_values.mean())
    result.dl_volumetric_hu = float(hu[liver].astype(np.float64).mean())
    result.category = _category(result.dl_parenchymal_hu, settings.threshold_hu)
    result.roi_sd_hu = float(roi_values.std(ddof=1)) if roi_values.size > 1 else 0.0
    result.roi_in_liver_fraction = float(np.count_nonzero(liver[roi_mask])) / roi_values.size
    result.robust_parenchymal_hu = robust_parenchymal_hu(hu, liver, spacing)
    if result.roi_in_liver_fraction < 1.0:
        flags.append(QC_ROI_OUTSIDE_LIVER)
    if any(n < int(roi_structuring_element().sum()) for n in result.roi_pixels):
        flags.append(QC_ROI_CLIPPED)
    if liver[0].any():
        flags.append(QC_LIVER_CUT_INFERIOR)
    if liver[-1].any():
        flags.append(QC_LIVER_CUT_SUPERIOR)
    if volume_ml < settings.min_liver_volume_ml:
        flags.append(QC_LITTLE_LIVER)
    if result.roi_sd_hu > settings.max_roi_sd_hu:
        flags.append(QC_ROI_NOISY)
    if spleen is not None:
        result.spleen_hu = _spleen(hu, spleen, spacing, flags)
        if result.spleen_hu is not None:
            result.liver_minus_spleen_hu = result.dl_parenchymal_hu - result.spleen_hu
    return result, roi

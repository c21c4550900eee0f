"""``lpm-node measure``: the method alone, on a CT and a liver mask already on the method grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lpm_node.core.config import Settings
from lpm_node.imaging.measurement import Category, Measurement, flag_sentence, measure, on_method_grid
from lpm_node.imaging.orientation import nifti_orientation
from lpm_node.imaging.segmentation import largest_component

# --- command line -------------------------------------------------------------------------------------------------


def _read_image(path: str, what: str) -> sitk.Image:
    import SimpleITK as sitk

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def _check_same_grid(reference: sitk.Image, other: sitk.Image, what: str) -> None:
    def describe(image: sitk.Image) -> str:
        size = "x".join(str(n) for n in image.GetSize())
        spacing = " x ".join(f"{s:g}" for s in image.GetSpacing())
        origin = ", ".join(f"{o:g}" for o in image.GetOrigin())
        return f"size {size}, spacing {spacing} mm, origin ({origin})"

    same = (
        reference.GetSize() == other.GetSize()
        and np.allclose(reference.GetSpacing(), other.GetSpacing(), rtol=1e-4, atol=1e-4)
        and np.allclose(reference.GetOrigin(), other.GetOrigin(), atol=1e-2)
        and np.allclose(reference.GetDirection(), other.GetDirection(), atol=1e-4)
    )
    if not same:
        raise ValueError(f"CT and {what} grids differ: CT {describe(reference)}; {what} {describe(other)}")


def _axis_flips(image: sitk.Image) -> tuple[bool, bool, bool]:
    """Array axes (z, y, x) to flip to reach LPS; refuses non-axial or oblique grids."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-3):
        raise ValueError(
            "the grid is not axial and aligned with the patient axes (direction "
            f"{np.round(direction, 4).tolist()}); resample onto the method grid (axial, LPS) first"
        )
    flip_xyz = np.diag(direction) < 0
    return bool(flip_xyz[2]), bool(flip_xyz[1]), bool(flip_xyz[0])


def _to_lps(array: np.ndarray, flips: tuple[bool, bool, bool]) -> np.ndarray:
    axes = tuple(axis for axis, flip in enumerate(flips) if flip)
    return np.flip(array, axis=axes) if axes else array


def _summary(result: Measurement, removed_voxels: int) -> str:
    def hu(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} HU"

    lines = [
        f"category:               {result.category} (threshold {result.threshold_hu:g} HU)",
        f"DL-parenchymal:         {hu(result.dl_parenchymal_hu)}",
        f"DL-volumetric:          {hu(result.dl_volumetric_hu)}",
        f"robust parenchymal:     {hu(result.robust_parenchymal_hu)}",
        f"liver volume:           {result.liver_volume_ml:.1f} ml",
        f"ROI slices (z):         {result.roi_slices}  pixels {result.roi_pixels}",
        f"ROI centres [z, y, x]:  {result.roi_centres}",
        f"largest component:      {removed_voxels} voxels of smaller components removed from the liver mask",
    ]
    if result.liver_right_fraction is not None:
        lines.append(f"liver's side:           {result.liver_right_fraction:.0%} on the patient's right of the body's "
                     "midline")
    if result.roi_disk_means_hu:
        def listed(values: list[float | None], fmt: str) -> str:
            return ", ".join("n/a" if v is None else format(v, fmt) for v in values)

        lines.append(f"ROI disks:              mean {listed(result.roi_disk_means_hu, '.1f')} HU, SD "
                     f"{listed(result.roi_disk_sds_hu, '.1f')} HU, outliers "
                     f"{listed(result.roi_disk_outlier_fractions, '.1%')}")
    if any(t is not None for t in result.lateral_tissue_mm):
        lines.append("tissue beyond the edge: " + ", ".join("air in view" if t is None else f"{t:.1f} mm"
                                                             for t in result.lateral_tissue_mm)
                     + " (to the edge of the field of view)")
    if result.spleen_hu is not None or result.liver_minus_spleen_hu is not None:
        lines.append(
            f"spleen:                 {hu(result.spleen_hu)} (liver - spleen {hu(result.liver_minus_spleen_hu)})"
        )
    lines.append(f"QC flags:               {', '.join(result.qc_flags) or 'none'}")
    if result.category == Category.NOT_ASSESSABLE:
        lines += ["not assessable because:"] + [f"  - {flag_sentence(f)}" for f in result.not_assessable_reasons]
    return "\n".join(lines)


def measure_command(settings: Settings, args: argparse.Namespace) -> int:
    """``lpm-node measure``: measure on a CT and liver mask (NIfTI) already on the 0.7 x 0.7 x 2.5 mm grid."""
    import SimpleITK as sitk

    ct = _read_image(args.ct, "CT")
    if ct.GetDimension() != 3:
        raise ValueError(f"CT {args.ct} is not a 3-D image")
    spacing_xyz = ct.GetSpacing()
    if not on_method_grid((spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])):
        raise ValueError(
            f"CT {args.ct} is on a {' x '.join(f'{s:g}' for s in spacing_xyz)} mm grid; the method needs "
            "0.7 x 0.7 x 2.5 mm (x, y, z): resample it (linear) and the mask (nearest) first"
        )
    flips = _axis_flips(ct)
    liver_image = _read_image(args.liver_mask, "liver mask")
    _check_same_grid(ct, liver_image, "liver mask")
    spleen = None
    if getattr(args, "spleen_mask", None):
        spleen_image = _read_image(args.spleen_mask, "spleen mask")
        _check_same_grid(ct, spleen_image, "spleen mask")
        spleen = _to_lps(sitk.GetArrayViewFromImage(spleen_image) > 0, flips)
    hu = _to_lps(sitk.GetArrayViewFromImage(ct), flips)
    raw_liver = sitk.GetArrayViewFromImage(liver_image) > 0
    liver = largest_component(raw_liver).view(bool)  # the method keeps the largest connected component
    removed_voxels = int(np.count_nonzero(raw_liver)) - int(np.count_nonzero(liver))
    del raw_liver
    liver = _to_lps(liver, flips)
    spacing_zyx = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    orientation = nifti_orientation(args.ct, ct.GetDirection())
    result, roi = measure(hu, liver, spacing_zyx, spleen=spleen, settings=settings.measurement,
                          orientation=orientation)
    if any(flips):  # report indices in the input's own array
        shape = hu.shape
        result.roi_centres = [
            [shape[a] - 1 - c if flips[a] else c for a, c in enumerate(cz)] for cz in result.roi_centres
        ]
        result.roi_slices = [shape[0] - 1 - z if flips[0] else z for z in result.roi_slices]
        roi = _to_lps(roi, flips)
    if getattr(args, "roi_out", None):
        roi_image = sitk.GetImageFromArray(np.ascontiguousarray(roi))
        roi_image.CopyInformation(ct)
        sitk.WriteImage(roi_image, str(args.roi_out), useCompression=True)
    if args.json:
        print(json.dumps({**result.to_dict(), "largest_component_removed_voxels": removed_voxels,
                          "model_identity": None}))  # the mask was given: no model of ours made it
    else:
        print(_summary(result, removed_voxels))
    return 0

"""One series from DICOM files to a measurement and the DICOM answer: load -> resample -> segment -> measure -> write.

This module only orchestrates the imaging steps and hands the result to ``answer/`` through its one entry
(:mod:`lpm_node.answer.build`). ``lpm-node process`` is its CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lpm_node.answer.build import ResultObject, build_answer, preview_png, warm_writers, write_answer
from lpm_node.core.config import Settings
from lpm_node.imaging.loading import CTSeries, load_series
from lpm_node.imaging.measurement import failed_measurement, measure
from lpm_node.imaging.orientation import dicom_orientation
from lpm_node.imaging.resampling import method_slices_near, resample_to_method_grid
from lpm_node.imaging.result import SeriesResult, timed
from lpm_node.imaging.segmentation import Segmenter
from lpm_node.intake.integrity import check_checksums

__all__ = ["ResultObject", "SeriesResult", "analyse_series", "build_answer", "preview_png", "save_nifti",
           "warm_writers", "write_answer"]

log = logging.getLogger(__name__)


def measured_instances(source: CTSeries) -> tuple[tuple[str, str], ...]:
    """(SOP Instance UID, file SHA-256) of each source instance the loader used, from the checksums it took of
    the bytes it read."""
    return tuple((str(ds.SOPInstanceUID), source.checksums[str(ds.filename)]) for ds in source.datasets)


def analyse_series(
    paths: Sequence[str | Path], settings: Settings, segmenter: Segmenter, recorded: Mapping[str, str] | None = None
) -> SeriesResult:
    """Load, resample, segment and measure one series (raises SeriesLoadError for a series it cannot use).

    ``recorded`` (path -> SHA-256 recorded at receipt): a file whose bytes as loaded differ from it stops the
    analysis before the model runs (ChecksumMismatch)."""
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        source = load_series(paths, keep_pixel_data=False, checksums=True)  # the HU image holds the pixels
        if recorded is not None:
            check_checksums(recorded, source.checksums)
        instances = measured_instances(source)
    with timed(timings, "resample"):
        method_image = resample_to_method_grid(source.image)
    with timed(timings, "segment"):
        masks = segmenter.segment(method_image)
    with timed(timings, "measure"):
        hu = sitk.GetArrayViewFromImage(method_image)
        spacing_zyx = tuple(float(s) for s in reversed(method_image.GetSpacing()))
        gaps = [k for k, ref in enumerate(source.frame_refs) if tuple(ref) == (-1, -1)]
        try:
            measurement, roi = measure(
                hu, masks["liver"], spacing_zyx, spleen=masks.get("spleen"), settings=settings.measurement,
                interpolated_slices=method_slices_near(gaps, source.image, method_image),
                orientation=dicom_orientation(source.image.GetDirection(), source.datasets[0].get("PatientPosition")),
            )
        except Exception:  # noqa: BLE001 - a series the measurement cannot handle is answered "not assessable"
            log.exception("measurement failed on series %s", source.series_instance_uid)
            measurement = failed_measurement(settings.measurement.threshold_hu)
            roi = np.zeros(hu.shape, dtype=np.uint8)
    return SeriesResult(
        source=source, method_image=method_image, masks=masks, roi=roi, measurement=measurement,
        device=segmenter.device, model=segmenter.description, model_identity=segmenter.identity,
        instances=instances, timings=timings,
    )


def save_nifti(result: SeriesResult, folder: str | Path) -> dict[str, Path]:
    """CT, masks and ROI on the method grid as NIfTI (the inputs of ``lpm-node measure``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"ct": folder / "ct.nii.gz"}
    sitk.WriteImage(result.method_image, str(out["ct"]), useCompression=True)
    for name, mask in {**result.masks, "roi": result.roi}.items():
        image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
        image.CopyInformation(result.method_image)
        out[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(out[name]), useCompression=True)
    return out

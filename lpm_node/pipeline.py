"""One series from DICOM files to a measurement and the DICOM answer: load -> resample -> segment -> measure -> write.

This module only orchestrates the steps; each step lives in its own module. ``lpm-node process`` is its CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

import lpm_node
from lpm_node.config import Settings
from lpm_node.loading import CTSeries, SeriesLoadError, find_series, load_series
from lpm_node.measurement import Measurement, measure
from lpm_node.resampling import mask_to_source_grid, resample_to_method_grid
from lpm_node.rules import eligibility, read_series_facts
from lpm_node.segmentation import Segmenter, load_segmenter
from lpm_node.writers import build_key_image, build_seg, build_sr, nearest_source_slice, write_dataset
from lpm_node.writers.keyimage import render_key_image

log = logging.getLogger(__name__)

STAGES = ("load", "resample", "segment", "measure", "write")


@dataclass
class SeriesResult:
    """Everything one run of the pipeline produced for one series."""

    source: CTSeries
    method_image: sitk.Image  # HU on the 0.7 x 0.7 x 2.5 mm grid
    masks: dict[str, np.ndarray]  # structure -> uint8 (z, y, x) on the method grid
    roi: np.ndarray  # uint8 (z, y, x) on the method grid
    measurement: Measurement
    device: str
    model: str
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @property
    def series_instance_uid(self) -> str:
        return self.source.series_instance_uid

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the measurement plus identity, device, model, timings and loader warnings."""
        return {
            "series_instance_uid": self.source.series_instance_uid,
            "study_instance_uid": self.source.study_instance_uid,
            "status": "measured",
            **self.measurement.to_dict(),
            "device": self.device,
            "model": self.model,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.source.warnings),
        }


@dataclass
class ResultObject:
    """One DICOM object of the answer, written to disk."""

    kind: str  # SEG | SR | KEY
    path: Path
    sop_instance_uid: str


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def analyse_series(paths: Sequence[str | Path], settings: Settings, segmenter: Segmenter) -> SeriesResult:
    """Load, resample, segment and measure one series (raises SeriesLoadError for a series it cannot use)."""
    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        source = load_series(paths, keep_pixel_data=False)  # the HU image holds the pixels
    with _timed(timings, "resample"):
        method_image = resample_to_method_grid(source.image)
    with _timed(timings, "segment"):
        masks = segmenter.segment(method_image)
    with _timed(timings, "measure"):
        hu = sitk.GetArrayViewFromImage(method_image)
        spacing_zyx = tuple(float(s) for s in reversed(method_image.GetSpacing()))
        measurement, roi = measure(
            hu, masks["liver"], spacing_zyx, spleen=masks.get("spleen"), settings=settings.measurement
        )
    return SeriesResult(
        source=source, method_image=method_image, masks=masks, roi=roi, measurement=measurement,
        device=segmenter.device, model=segmenter.description, timings=timings,
    )


def source_masks(result: SeriesResult) -> dict[str, np.ndarray]:
    """The liver, ROI (and spleen) masks on the source series' own grid, in the loader's slice order."""
    wanted = {"liver": result.masks["liver"], "roi": result.roi}
    if "spleen" in result.masks and result.masks["spleen"].any():
        wanted["spleen"] = result.masks["spleen"]
    return {
        name: mask_to_source_grid(mask, result.method_image, result.source.image) for name, mask in wanted.items()
    }


def _key_slice(source_masks: dict[str, np.ndarray], frame_refs: Sequence[tuple[int, int]]) -> int:
    """The source slice to show: most ROI pixels, else most liver, else the middle; always a real source frame."""
    for name in ("roi", "liver"):
        areas = source_masks[name].reshape(len(frame_refs), -1).sum(axis=1)
        if areas.any():
            return nearest_source_slice(frame_refs, int(np.argmax(areas)))
    return nearest_source_slice(frame_refs, len(frame_refs) // 2)


def build_answer(result: SeriesResult, settings: Settings) -> list[tuple[str, Dataset]]:
    """The DICOM answer for one measured series: SEG, SR and (when configured) the key image."""
    source = result.source
    masks = source_masks(result)
    seg = build_seg(
        source.datasets, source.frame_refs, masks,
        omit_empty_frames=settings.output.omit_empty_frames,
        algorithm_version=lpm_node.__version__, model_description=result.model,
    )
    sr = build_sr(source.datasets, seg, result.measurement, algorithm_version=lpm_node.__version__)
    objects = [("SEG", seg), ("SR", sr)]
    if settings.output.key_image:
        k = _key_slice(masks, source.frame_refs)
        key = build_key_image(
            source.datasets, source.frame_refs, k, masks["roi"][k], masks["liver"][k], result.measurement,
            algorithm_version=lpm_node.__version__, hu=sitk.GetArrayViewFromImage(source.image)[k],
        )
        objects.append(("KEY", key))
    return objects


def write_answer(result: SeriesResult, settings: Settings, folder: str | Path) -> list[ResultObject]:
    """Build the answer and write each object atomically into ``folder`` (named by kind and SOP Instance UID)."""
    written: list[ResultObject] = []
    with _timed(result.timings, "write"):
        for kind, ds in build_answer(result, settings):
            path = write_dataset(ds, Path(folder) / f"{kind}_{ds.SOPInstanceUID}.dcm")
            written.append(ResultObject(kind, path, str(ds.SOPInstanceUID)))
    return written


def preview_png(result: SeriesResult, path: str | Path) -> Path:
    """A picture of the ROI's central slice on the method grid: CT, liver and ROI outlines, the result."""
    from PIL import Image

    m = result.measurement
    hu = sitk.GetArrayViewFromImage(result.method_image)
    if m.roi_slices:
        z = m.roi_slices[len(m.roi_slices) // 2]
    else:
        areas = result.masks["liver"].reshape(hu.shape[0], -1).sum(axis=1)
        z = int(np.argmax(areas)) if areas.any() else hu.shape[0] // 2
    rgb = render_key_image(np.asarray(hu[z]), result.roi[z], result.masks["liver"][z], m)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(target)
    return target


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


# ------------------------------------------------------------------------------------------------------ the CLI


def _safe_name(uid: str) -> str:
    return "".join(c for c in uid if c.isdigit() or c == ".")[:64] or "series"


def _describe(item: dict[str, Any]) -> str:
    uid = item["series_instance_uid"]
    if item["status"] != "measured":
        return f"{uid}: {item['status']}: {item['reason']}"
    hu = item["dl_parenchymal_hu"]
    value = "n/a" if hu is None else f"{hu:.1f} HU"
    flags = ", ".join(item["qc_flags"]) or "none"
    return (f"{uid}: DL-parenchymal {value}, category {item['category']}, "
            f"liver {item['liver_volume_ml']:.0f} ml, QC flags: {flags}")


def process_folder(
    folder: str | Path, settings: Settings, *, out: str | Path | None = None, dicom_out: bool = False,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Measure every eligible CT series under ``folder``; yield one JSON-ready dict per series found.

    Refused series come with ``status`` "rejected" and their reason; series the loader cannot use with
    "failed". The model is loaded once, at the first eligible series.
    """
    from tqdm import tqdm

    series = find_series(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM series under {folder}")
    segmenter: Segmenter | None = None
    bar = tqdm(total=len(series), unit="series", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for uid, paths in sorted(series.items()):
            bar.set_postfix_str(f"{uid[-12:]} rules")
            ok, reason = eligibility(read_series_facts(paths), settings.rules)
            if not ok:
                yield {"series_instance_uid": uid, "status": "rejected", "reason": reason}
                bar.update()
                continue
            if segmenter is None:
                bar.set_postfix_str("loading model")
                segmenter = load_segmenter(settings.model)
            bar.set_postfix_str(f"{uid[-12:]} measuring")
            try:
                result = analyse_series(paths, settings, segmenter)
            except SeriesLoadError as exc:
                yield {"series_instance_uid": uid, "status": "failed", "reason": str(exc)}
                bar.update()
                continue
            item = result.summary()
            if out is not None:
                target = Path(out) / _safe_name(uid)
                item["files"] = {k: str(v) for k, v in save_nifti(result, target).items()}
                item["files"]["preview"] = str(preview_png(result, target / "preview.png"))
                if dicom_out:
                    for obj in write_answer(result, settings, target / "dicom"):
                        item["files"][obj.kind] = str(obj.path)
                    item["timings_s"] = {k: round(v, 3) for k, v in result.timings.items()}
            yield item
            bar.update()
    finally:
        bar.close()


def process_command(settings: Settings, args: argparse.Namespace) -> int:
    """``lpm-node process DIR [--model F] [--out D] [--dicom-out] [--json]``; exit 1 when a series failed."""
    if args.dicom_out and not args.out:
        raise ValueError("--dicom-out needs --out")
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    failed = 0
    progress = sys.stderr.isatty()
    items = process_folder(args.input, settings, out=args.out, dicom_out=args.dicom_out, progress=progress)
    with logging_redirect_tqdm():  # log lines and results above the progress bar, not through it
        for item in items:
            failed += item["status"] == "failed"
            line = json.dumps(item) if args.json else _describe(item)
            if progress:
                tqdm.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
    return 1 if failed else 0

"""One series from DICOM files to a measurement and the DICOM answer: load -> resample -> segment -> measure -> write.

This module only orchestrates the steps; each step lives in its own module. ``lpm-node process`` is its CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

import lpm_node
from lpm_node.answer import build_key_image, build_seg, build_sr, nearest_source_slice, write_dataset
from lpm_node.answer.frames import GAP, Outline, RoiDisk, mask_outline
from lpm_node.answer.keyimage import render_key_image
from lpm_node.answer.kos import build_kos
from lpm_node.answer.uids import ContentIdentity, instances_digest
from lpm_node.core.config import Settings
from lpm_node.core.files import file_checksum
from lpm_node.imaging.loading import CTSeries, load_series
from lpm_node.imaging.measurement import Measurement, failed_measurement, measure
from lpm_node.imaging.model_identity import ModelIdentity
from lpm_node.imaging.resampling import mask_to_source_grid, method_slices_near, resample_to_method_grid
from lpm_node.imaging.segmentation import Segmenter

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
    model_identity: ModelIdentity
    instances: tuple[tuple[str, str], ...] = ()  # measured source instances: (SOP Instance UID, file SHA-256)
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
            "model_identity": self.model_identity.as_dict(),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.source.warnings),
        }


@dataclass
class ResultObject:
    """One DICOM object of the answer, written to disk."""

    kind: str  # SEG | SR | KEY | KOS
    path: Path
    sop_instance_uid: str


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def measured_instances(source: CTSeries, checksums: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """(SOP Instance UID, file SHA-256) of each source instance the loader used; checksums are taken from
    ``checksums`` (by path, as verified at intake) and computed for files it does not name."""
    known = checksums or {}
    out = []
    for ds in source.datasets:
        path = str(ds.filename)
        out.append((str(ds.SOPInstanceUID), known.get(path) or file_checksum(path)))
    return tuple(out)


def analyse_series(
    paths: Sequence[str | Path], settings: Settings, segmenter: Segmenter, checksums: Mapping[str, str] | None = None
) -> SeriesResult:
    """Load, resample, segment and measure one series (raises SeriesLoadError for a series it cannot use).

    ``checksums`` (path -> SHA-256, as verified at intake) saves reading the files again for the content
    identity; files it does not name are checksummed here."""
    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        source = load_series(paths, keep_pixel_data=False)  # the HU image holds the pixels
        instances = measured_instances(source, checksums)
    with _timed(timings, "resample"):
        method_image = resample_to_method_grid(source.image)
    with _timed(timings, "segment"):
        masks = segmenter.segment(method_image)
    with _timed(timings, "measure"):
        hu = sitk.GetArrayViewFromImage(method_image)
        spacing_zyx = tuple(float(s) for s in reversed(method_image.GetSpacing()))
        gaps = [k for k, ref in enumerate(source.frame_refs) if tuple(ref) == (-1, -1)]
        try:
            measurement, roi = measure(
                hu, masks["liver"], spacing_zyx, spleen=masks.get("spleen"), settings=settings.measurement,
                interpolated_slices=method_slices_near(gaps, source.image, method_image),
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


def source_masks(result: SeriesResult) -> dict[str, np.ndarray]:
    """The liver, ROI (and spleen) masks on the source series' own grid, in the loader's slice order."""
    wanted = {"liver": result.masks["liver"], "roi": result.roi}
    if "spleen" in result.masks and result.masks["spleen"].any():
        wanted["spleen"] = result.masks["spleen"]
    return {
        name: mask_to_source_grid(mask, result.method_image, result.source.image) for name, mask in wanted.items()
    }


def _key_slice(source_masks: dict[str, np.ndarray], frame_refs: Sequence[tuple[int, int]]) -> int:
    """The source slice to show without ROI disks: most ROI pixels, else most liver, else the middle; always a real
    source frame."""
    for name in ("roi", "liver"):
        areas = source_masks[name].reshape(len(frame_refs), -1).sum(axis=1)
        if areas.any():
            return nearest_source_slice(frame_refs, int(np.argmax(areas)))
    return nearest_source_slice(frame_refs, len(frame_refs) // 2)


# Settings that change the content of the answer (and so its UIDs); device and threads do not.
RESULT_MODEL_SETTINGS = ("folds", "checkpoint", "profile", "mirroring", "resampling")
RESULT_OUTPUT_SETTINGS = ("omit_empty_frames", "key_image")


def result_settings(settings: Settings) -> dict[str, object]:
    """The settings that change the result, flattened to "section.name" -> value."""
    values: dict[str, object] = {
        f"measurement.{k}": v for k, v in dataclasses.asdict(settings.measurement).items()
    }
    values.update({f"model.{k}": getattr(settings.model, k, None) for k in RESULT_MODEL_SETTINGS})
    values.update({f"output.{k}": getattr(settings.output, k, None) for k in RESULT_OUTPUT_SETTINGS})
    return values


def content_identity(result: SeriesResult, settings: Settings) -> ContentIdentity:
    """What the answer's content, and so its UIDs, depends on."""
    return ContentIdentity(
        source_series_uid=result.series_instance_uid,
        software_version=lpm_node.__version__,
        model=result.model_identity,
        settings=result_settings(settings),
        instances=instances_digest(result.instances),
    )


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


def outlines(masks: dict[str, np.ndarray], frame_refs: Sequence[tuple[int, int]], k: int) -> dict[str, Outline]:
    """The liver's outline on source slice ``k`` and the spleen's on its largest source slice (real frames only)."""
    out: dict[str, Outline] = {}
    for name in ("liver", "spleen"):
        if name not in masks or not masks[name].any():
            continue
        if name == "liver" and masks[name][k].any():
            slice_k = k
        else:
            areas = masks[name].reshape(len(frame_refs), -1).sum(axis=1)
            slice_k = nearest_source_slice(frame_refs, int(np.argmax(areas)))
        index, frame = frame_refs[slice_k]
        outline = mask_outline(masks[name][slice_k], index, frame)
        if outline is not None:
            out[name] = outline
    return out


def build_answer(
    result: SeriesResult, settings: Settings, predecessor: Dataset | None = None
) -> list[tuple[str, Dataset]]:
    """The DICOM answer for one measured series: SEG, key image (when configured), SR and Key Object Selection.

    ``predecessor`` is the SR sent earlier for the same series; when this answer has other content (other UIDs),
    the new SR references it (Predecessor Documents Sequence)."""
    source = result.source
    content = content_identity(result, settings)
    masks = source_masks(result)
    seg = build_seg(
        source.datasets, source.frame_refs, masks,
        omit_empty_frames=settings.output.omit_empty_frames,
        algorithm_version=content.software_version, model_description=result.model, identity=content,
    )
    disks = roi_disks(result)
    # The method's index slice k (the middle ROI disk) on the source grid.
    k = disks[len(disks) // 2][0] if disks else _key_slice(masks, source.frame_refs)
    key = None
    if settings.output.key_image:
        key = build_key_image(
            source.datasets, source.frame_refs, k, masks["roi"][k], masks["liver"][k], result.measurement,
            algorithm_version=content.software_version, hu=sitk.GetArrayViewFromImage(source.image)[k],
            identity=content,
        )
    sr = build_sr(
        source.datasets, seg, result.measurement, algorithm_version=content.software_version, identity=content,
        roi_disks=[disk for _, disk in disks], outlines=outlines(masks, source.frame_refs, k), key_image=key,
        predecessor=predecessor,
    )
    objects = [("SEG", seg), ("SR", sr)]
    if key is not None:
        objects.append(("KEY", key))
    selected = [ds for ds in (key, sr, seg) if ds is not None]
    objects.append(("KOS", build_kos(selected, content, source.datasets[0])))
    return objects


def write_answer(
    result: SeriesResult, settings: Settings, folder: str | Path, predecessor: Dataset | None = None
) -> list[ResultObject]:
    """Build the answer and write each object atomically into ``folder`` (named by kind and SOP Instance UID)."""
    written: list[ResultObject] = []
    with _timed(result.timings, "write"):
        for kind, ds in build_answer(result, settings, predecessor):
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
    rgb = render_key_image(np.asarray(hu[z]), result.roi[z], result.masks["liver"][z], m,
                           result.model_identity)
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

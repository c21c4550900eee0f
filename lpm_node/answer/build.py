"""The answer to one measured series, built in one pass: SEG, SR, key image and Key Object Selection.

The one entry of ``answer/`` for the node: :func:`write_answer` (and :func:`build_answer`) take the imaging half's
:class:`~lpm_node.imaging.result.SeriesResult` and the settings; the geometry on the source grid, the content
identity the UIDs derive from and every object are made here, down the layers, never calling back up.
"""

from __future__ import annotations

import dataclasses
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset

import lpm_node
from lpm_node.answer.geometry import key_slice, outlines, roi_disks, source_masks
from lpm_node.answer.keyimage import build_key_image, render_key_image
from lpm_node.answer.kos import build_kos
from lpm_node.answer.seg import build_seg
from lpm_node.answer.sr import build_sr
from lpm_node.answer.uids import ContentIdentity, instances_digest
from lpm_node.core.config import Settings
from lpm_node.core.files import atomic_write
from lpm_node.imaging.result import SeriesResult, timed

ANSWER_KINDS = ("SEG", "SR", "KEY", "KOS")


@dataclass
class ResultObject:
    """One DICOM object of the answer, written to disk."""

    kind: str  # SEG | SR | KEY | KOS
    path: Path
    sop_instance_uid: str


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` encoded as a DICOM file (preamble, file meta, data set)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM file atomically (see :func:`lpm_node.core.files.atomic_write`); return the path."""
    return atomic_write(path, encode_dataset(ds))


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
        source.datasets, source.frame_refs, masks.arrays,
        omit_empty_frames=settings.output.omit_empty_frames,
        algorithm_version=content.software_version, model_description=result.model, identity=content,
        slice_areas=masks.areas,
    )
    disks = roi_disks(result)
    k = key_slice(result, disks, masks)
    key = None
    if settings.output.key_image:
        key = build_key_image(
            source.datasets, source.frame_refs, k, masks.arrays["roi"][k], masks.arrays["liver"][k],
            result.measurement,
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


# highdicom reads its tables of the standard (IODs, modules, attributes; JSON) at first use, about 1 s: loaded
# ahead by warm_writers. These are private functions of highdicom; were they renamed, the warm-up would do nothing
# and the first answer of the process pay the load, as before.
HIGHDICOM_TABLE_LOADERS = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")


def warm_writers() -> float:
    """Load once per process what the writers need at their first use (highdicom's tables of the standard), so
    that no answer pays it; the worker calls this when it loads its model. Returns the seconds it took."""
    t0 = time.perf_counter()
    from highdicom import _standard_utils

    for name in HIGHDICOM_TABLE_LOADERS:
        loader = getattr(_standard_utils, name, None)
        if callable(loader):
            loader()
    return time.perf_counter() - t0


def write_answer(
    result: SeriesResult, settings: Settings, folder: str | Path, predecessor: Dataset | None = None
) -> list[ResultObject]:
    """Build the answer and write each object atomically into ``folder`` (named by kind and SOP Instance UID)."""
    # Encoding holds the interpreter; writing and the fsyncs do not: each file goes to disk in a thread while the
    # next one is encoded, and all four are flushed to disk side by side.
    with timed(result.timings, "write"), ThreadPoolExecutor(len(ANSWER_KINDS), "answer-write") as pool:
        pending = [
            (kind, str(ds.SOPInstanceUID),
             pool.submit(atomic_write, Path(folder) / f"{kind}_{ds.SOPInstanceUID}.dcm", encode_dataset(ds)))
            for kind, ds in build_answer(result, settings, predecessor)
        ]
        return [ResultObject(kind, future.result(), uid) for kind, uid, future in pending]


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

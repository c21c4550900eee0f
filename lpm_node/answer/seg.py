"""DICOM Segmentation (BINARY) of the liver, the measurement ROI and the spleen, on the source CT's own grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

import lpm_node
from lpm_node.answer.frames import (
    DEVICE_SERIAL,
    GAP,
    MANUFACTURER,
    MODEL_NAME,
    SEG_SERIES_NUMBER,
    check_frame_refs,
    number_of_frames,
    source_series_uid,
)
from lpm_node.answer.uids import derive_uid

SERIES_DESCRIPTION = "Liver segmentation (lpm-node)"

LIVER = Code("10200004", "SCT", "Liver")
SPLEEN = Code("78961009", "SCT", "Spleen")
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
SPATIAL_AND_RELATIONAL_CONCEPT = Code("309825002", "SCT", "Spatial and Relational Concept")
REGION_OF_INTEREST = Code("C85402", "NCIt", "Imaging Region of Interest")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class SegmentSpec:
    """How one mask key is described as a SEG segment."""

    key: str
    label: str
    category: Code
    property_type: Code
    anatomic_regions: tuple[Code, ...] = ()
    rgb: tuple[int, int, int] = (255, 255, 255)  # recommended display colour


# Segment order in the SEG (segment numbers are given in this order, skipping masks that are not provided).
SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec("liver", "Liver", ANATOMICAL_STRUCTURE, LIVER, rgb=(221, 130, 101)),
    SegmentSpec(
        "roi", "DL-parenchymal ROI", SPATIAL_AND_RELATIONAL_CONCEPT, REGION_OF_INTEREST, (LIVER,), (255, 220, 0)
    ),
    SegmentSpec("spleen", "Spleen", ANATOMICAL_STRUCTURE, SPLEEN, rgb=(157, 108, 162)),
)
SEGMENT_LABELS: dict[str, str] = {spec.key: spec.label for spec in SEGMENTS}


def algorithm_identification(algorithm_version: str, model_description: str = "") -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence naming the node's algorithm and version."""
    parameters = {"model": model_description} if model_description else None
    return hd.AlgorithmIdentificationSequence(
        name=lpm_node.ALGORITHM_NAME,
        family=ARTIFICIAL_INTELLIGENCE,
        version=algorithm_version,
        parameters=parameters,
    )


def segment_number(seg: Dataset, key: str) -> int | None:
    """The segment number of mask ``key`` ("liver", "roi", "spleen") in a SEG built here, or None if absent."""
    label = SEGMENT_LABELS[key]
    for item in seg.SegmentSequence:
        if item.SegmentLabel == label:
            return int(item.SegmentNumber)
    return None


def _source_layout(
    datasets: Sequence[Dataset], frame_refs: Sequence[tuple[int, int]]
) -> tuple[list[Dataset], np.ndarray, np.ndarray | None]:
    """Source images for highdicom, the slices k that have a source frame, and for a multi-frame source the frame
    number of each of those k (None for single-frame sources)."""
    check_frame_refs(datasets, frame_refs)
    ks = np.array([k for k, ref in enumerate(frame_refs) if tuple(ref) != GAP], dtype=np.int64)
    refs = [frame_refs[k] for k in ks]
    used = sorted({index for index, _ in refs})
    if all(number_of_frames(datasets[i]) == 1 for i in used):
        return [datasets[index] for index, _ in refs], ks, None
    if len(used) == 1:
        return [datasets[used[0]]], ks, np.array([frame for _, frame in refs], dtype=np.int64)
    raise ValueError("a SEG can reference either single-frame images or one multi-frame image, not a mix")


def _checked_masks(masks: Mapping[str, np.ndarray], specs: Sequence[SegmentSpec], n_k: int) -> list[np.ndarray]:
    """The masks of ``specs`` in order, checked to be (k, rows, cols) with the same shape."""
    arrays = [np.asarray(masks[spec.key]) for spec in specs]
    first = arrays[0]
    if first.ndim != 3 or first.shape[0] != n_k:
        raise ValueError(f"masks must be (k, rows, cols) with k = {n_k}, got {first.shape}")
    for spec, mask in zip(specs, arrays, strict=True):
        if mask.shape != first.shape:
            raise ValueError(f"mask {spec.key!r} has shape {mask.shape}, expected {first.shape}")
    return arrays


def _segment_array(
    arrays: Sequence[np.ndarray], ks: np.ndarray, frames: np.ndarray | None, n_frames: int
) -> np.ndarray:
    """(frames, rows, cols, segments) uint8 array of slices ``ks`` in the source-image frame order."""
    rows, cols = arrays[0].shape[1:]
    n_out = len(ks) if frames is None else n_frames
    out = np.zeros((n_out, rows, cols, len(arrays)), dtype=np.uint8)
    for s, mask in enumerate(arrays):
        # Only slices holding this segment are copied (the strided write into the last axis is the slow part).
        present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)[ks])
        target = present if frames is None else frames[present]
        out[target, :, :, s] = mask[ks[present]] != 0
    return out


def build_seg(
    datasets: Sequence[Dataset],
    frame_refs: Sequence[tuple[int, int]],
    masks: Mapping[str, np.ndarray],
    *,
    omit_empty_frames: bool = True,
    algorithm_version: str = lpm_node.__version__,
    model_description: str = "",
) -> Dataset:
    """Build a BINARY DICOM-SEG of ``masks`` on the source CT grid.

    ``masks`` maps "liver" (required), "roi" and "spleen" (optional) to uint8 arrays (k, rows, cols) in the k order
    of ``frame_refs`` (for each k: index into ``datasets``, 0-based frame number; ``(-1, -1)`` for a slice
    interpolated across a gap, which is left out). Works for single-frame series in any order and for one
    multi-frame (Enhanced) CT. UIDs are derived from the source series and the version.
    """
    unknown = set(masks) - set(SEGMENT_LABELS)
    if unknown or "liver" not in masks:
        raise ValueError(f"masks need 'liver' and may hold {sorted(SEGMENT_LABELS)}; unexpected: {sorted(unknown)}")
    specs = [spec for spec in SEGMENTS if spec.key in masks]
    arrays = _checked_masks(masks, specs, len(frame_refs))
    source_images, ks, frames = _source_layout(datasets, frame_refs)
    further: list[Dataset] = []
    if omit_empty_frames and frames is None:
        # Same frames as highdicom's own omission, but highdicom then works only on the slices holding a segment;
        # the other slices stay recorded as source images (Referenced Series Sequence).
        present = np.logical_or.reduce([m.reshape(m.shape[0], -1).any(axis=1) for m in arrays])[ks]
        if present.any():
            further = [ds for ds, kept in zip(source_images, present, strict=True) if not kept]
            source_images = [ds for ds, kept in zip(source_images, present, strict=True) if kept]
            ks = ks[present]
    pixels = _segment_array(arrays, ks, frames, number_of_frames(source_images[0]))
    # highdicom refuses a SEG without any frame: keep all frames when every mask is empty.
    omit = omit_empty_frames and bool(pixels.any())
    series_uid = source_series_uid(datasets)
    algorithm = algorithm_identification(algorithm_version, model_description)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derive_uid(series_uid, algorithm_version, f"segment-{spec.key}"),
            tracking_id=spec.label,
            anatomic_regions=list(spec.anatomic_regions) or None,
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        for number, spec in enumerate(specs, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source_images,
        further_source_images=further or None,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derive_uid(series_uid, algorithm_version, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derive_uid(series_uid, algorithm_version, "seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=algorithm_version,
        device_serial_number=DEVICE_SERIAL,
        content_label="LIVER_SEG",
        content_description="Liver, DL-parenchymal ROI and spleen",
        content_creator_name=None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit,
    )
    seg.SeriesDescription = SERIES_DESCRIPTION
    return seg

"""DICOM Segmentation (BINARY) of the liver, the measurement ROI and the spleen, on the source CT's own grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

import lpm_node
from lpm_node.answer.equipment import (
    DEVICE_SERIAL,
    MANUFACTURER,
    MODEL_NAME,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    TEST_MODEL_NOTICE,
    stamp_context,
)
from lpm_node.answer.source import GAP, check_frame_refs, number_of_frames, source_series_uid
from lpm_node.answer.uids import ContentIdentity, identity_for
from lpm_node.imaging.model_identity import ModelIdentity

SERIES_DESCRIPTION = SEG_SERIES_DESCRIPTION
CONTENT_CREATOR = "lpm-node^^^^"  # Content Creator's Name of an automatic segmentation: the software itself

LIVER = Code("10200004", "SCT", "Liver")
SPLEEN = Code("78961009", "SCT", "Spleen")
ANATOMICAL_STRUCTURE = codes.cid7150.AnatomicalStructure  # (91723000, SCT), CID 7150
SPATIAL_AND_RELATIONAL_CONCEPT = codes.cid7150.SpatialAndRelationalConcept  # (309825002, SCT), CID 7150
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


def model_parameters(model: ModelIdentity | None, model_description: str = "") -> dict[str, str]:
    """Algorithm parameters naming the model (name, version, weights checksum; a test model says so)."""
    if model is None:
        return {"model": model_description} if model_description else {}
    parameters = {"model": model.name, "model version": model.version, "weights sha256": model.weights_sha256}
    if model.test_model:
        parameters["use"] = TEST_MODEL_NOTICE
    return parameters


def algorithm_identification(
    algorithm_version: str, model_description: str = "", model: ModelIdentity | None = None
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence naming the node's algorithm, its version and the model."""
    parameters = model_parameters(model, model_description) or None
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
    arrays: Sequence[np.ndarray], occupied: Sequence[np.ndarray], ks: np.ndarray, frames: np.ndarray | None,
    n_frames: int,
) -> np.ndarray:
    """(frames, rows, cols, segments) uint8 array of slices ``ks`` in the source-image frame order.

    ``occupied[s]`` says which slices k hold segment s: only those are copied. The array is a view of one
    (segments, frames, rows, cols) block, so each segment's frames are contiguous: filling it, highdicom's
    per-segment reads and the overlap check below run over contiguous memory."""
    rows, cols = arrays[0].shape[1:]
    n_out = len(ks) if frames is None else n_frames
    block = np.zeros((len(arrays), n_out, rows, cols), dtype=np.uint8)
    for s, (mask, holds) in enumerate(zip(arrays, occupied, strict=True)):
        present = np.flatnonzero(holds[ks])  # only slices holding it
        target = present if frames is None else frames[present]
        block[s, target] = mask[ks[present]] != 0
    return block.transpose(1, 2, 3, 0)


def segments_overlap(pixels: np.ndarray) -> bool:
    """Whether two segments of a binary (frames, rows, cols, segments) array share a pixel."""
    n = pixels.shape[-1]
    return any(np.logical_and(pixels[..., i], pixels[..., j]).any() for i in range(n) for j in range(i + 1, n))


class BinarySegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, with its pixel check done per segment for a binary uint8 stack of segments.

    highdicom finds overlapping segments by summing the whole (frames, rows, cols, segments) array into a
    uint64 array (about 1 s on a 600-slice chest CT); comparing the segments pairwise gives the same answer
    without it (``tests/test_writers.py`` checks both agree). Anything else goes to highdicom's own check."""

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls, pixel_array: Any, segment_numbers: np.ndarray, segmentation_type: Any, dtype: type
    ) -> tuple[Any, hd.seg.SegmentsOverlapValues]:
        simple = (
            isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4 and pixel_array.dtype == np.uint8
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
            and pixel_array.shape[-1] == len(segment_numbers) > 1
            and list(segment_numbers) == list(range(1, len(segment_numbers) + 1))
        )
        if not simple:
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        if pixel_array.max() > 1:
            raise ValueError("a binary stack of segments holds values other than 0 and 1")
        overlap = segments_overlap(pixel_array)
        return pixel_array, hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


def _reference_further_images(seg: Dataset, further: Sequence[Dataset]) -> None:
    """List ``further`` (source slices holding no segment) after the source images, in the Source Image Sequence
    and the Referenced Series Sequence, as highdicom's ``further_source_images`` does; done here because highdicom
    checks each such image against the standard's IOD tables, which on a 600-slice series took longer than the
    rest of the SEG."""
    if not further:
        return
    by_series = {str(item.SeriesInstanceUID): item for item in seg.ReferencedSeriesSequence}
    for ds in further:
        for sequence in (seg.SourceImageSequence, by_series[str(ds.SeriesInstanceUID)].ReferencedInstanceSequence):
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            sequence.append(ref)


def build_seg(
    datasets: Sequence[Dataset],
    frame_refs: Sequence[tuple[int, int]],
    masks: Mapping[str, np.ndarray],
    *,
    omit_empty_frames: bool = True,
    algorithm_version: str = lpm_node.__version__,
    model_description: str = "",
    identity: ContentIdentity | None = None,
    slice_areas: Mapping[str, np.ndarray] | None = None,
) -> BinarySegmentation:
    """Build a BINARY DICOM-SEG of ``masks`` on the source CT grid.

    ``masks`` maps "liver" (required), "roi" and "spleen" (optional) to uint8 arrays (k, rows, cols) in the k order
    of ``frame_refs`` (for each k: index into ``datasets``, 0-based frame number; ``(-1, -1)`` for a slice
    interpolated across a gap, which is left out). Works for single-frame series in any order and for one
    multi-frame (Enhanced) CT. UIDs are derived from ``identity`` (default: the source series and the version).
    ``slice_areas`` (pixels of each mask per slice k, when the caller counted them) saves reading the masks to find
    the slices that hold a segment.
    """
    unknown = set(masks) - set(SEGMENT_LABELS)
    if unknown or "liver" not in masks:
        raise ValueError(f"masks need 'liver' and may hold {sorted(SEGMENT_LABELS)}; unexpected: {sorted(unknown)}")
    specs = [spec for spec in SEGMENTS if spec.key in masks]
    arrays = _checked_masks(masks, specs, len(frame_refs))
    occupied = [
        np.asarray(slice_areas[spec.key]) > 0 if slice_areas is not None and spec.key in slice_areas
        else mask.reshape(mask.shape[0], -1).any(axis=1)
        for spec, mask in zip(specs, arrays, strict=True)
    ]
    source_images, ks, frames = _source_layout(datasets, frame_refs)
    further: list[Dataset] = []
    any_segment = np.logical_or.reduce(occupied)
    if omit_empty_frames and frames is None:
        # Same frames as highdicom's own omission, but highdicom then works only on the slices holding a segment;
        # the other slices stay recorded as source images (Referenced Series Sequence).
        present = any_segment[ks]
        if present.any():
            further = [ds for ds, kept in zip(source_images, present, strict=True) if not kept]
            source_images = [ds for ds, kept in zip(source_images, present, strict=True) if kept]
            ks = ks[present]
    pixels = _segment_array(arrays, occupied, ks, frames, number_of_frames(source_images[0]))
    # highdicom refuses a SEG without any frame: keep all frames when every mask is empty.
    omit = omit_empty_frames and bool(any_segment[ks].any())
    content = identity_for(source_series_uid(datasets), algorithm_version, identity)
    algorithm = algorithm_identification(algorithm_version, model_description, content.model)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=content.uid(f"segment-{spec.key}"),
            tracking_id=spec.label,
            anatomic_regions=list(spec.anatomic_regions) or None,
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        for number, spec in enumerate(specs, start=1)
    ]
    seg = BinarySegmentation(
        source_images=source_images,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=content.uid("seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=content.uid("seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=algorithm_version,
        device_serial_number=DEVICE_SERIAL,
        content_label="LIVER_SEG",
        content_description="Liver, DL-parenchymal ROI and spleen",
        content_creator_name=CONTENT_CREATOR,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit,
    )
    _reference_further_images(seg, further)
    seg.SeriesDescription = SERIES_DESCRIPTION
    if datasets[0].get("BodyPartExamined"):
        seg.BodyPartExamined = datasets[0].BodyPartExamined
    stamp_context(seg, datasets[0])
    return seg

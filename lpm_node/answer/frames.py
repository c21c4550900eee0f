"""Helpers shared by the writers: the node's equipment identity, source-frame access and atomic writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels import pixel_array as read_pixel_array

import lpm_node
from lpm_node.core.files import atomic_write
from lpm_node.imaging.functional_groups import functional_group_value
from lpm_node.imaging.model_identity import ModelIdentity

MANUFACTURER = "lpm-node"
MODEL_NAME = lpm_node.ALGORITHM_NAME
DEVICE_SERIAL = "lpm-node"

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
KEY_IMAGE_SERIES_NUMBER = 9903
KOS_SERIES_NUMBER = 9904

# Series descriptions a radiologist recognises in a series list; each says the result is AI-generated.
SEG_SERIES_DESCRIPTION = "AI liver segmentation (lpm-node)"
SR_SERIES_DESCRIPTION = "AI liver fat report (lpm-node)"
KEY_IMAGE_SERIES_DESCRIPTION = "AI liver fat key image (lpm-node)"
KOS_SERIES_DESCRIPTION = "AI liver fat key images (lpm-node)"

TEST_MODEL_NOTICE = "TEST MODEL, NOT FOR CLINICAL USE"

# Attributes copied from the source onto every output when the source has them (study and patient context that
# highdicom's constructors do not copy themselves).
COPIED_CONTEXT = ("StudyDescription", "PatientAge", "PatientSize", "PatientWeight")


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames of a dataset (1 when absent)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def source_series_uid(datasets: Sequence[Dataset]) -> str:
    """The one SeriesInstanceUID shared by the source datasets (ValueError when they differ or none is given)."""
    uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(uids) != 1:
        raise ValueError(f"source datasets must belong to exactly one series, got {len(uids)}")
    return uids.pop()


GAP = (-1, -1)  # frame reference of a slice the loader interpolated across a gap (no source frame)


def check_frame_refs(datasets: Sequence[Dataset], frame_refs: Sequence[tuple[int, int]]) -> None:
    """Raise ValueError when a frame reference points outside the datasets or their frames, or repeats.

    ``(-1, -1)`` marks an interpolated slice without a source frame and is allowed.
    """
    real = [tuple(ref) for ref in frame_refs if tuple(ref) != GAP]
    if not real:
        raise ValueError("frame_refs holds no source frame")
    if len(set(real)) != len(real):
        raise ValueError("frame_refs holds the same source frame twice")
    for index, frame in real:
        if not 0 <= index < len(datasets):
            raise ValueError(f"frame reference to dataset {index} out of range (0..{len(datasets) - 1})")
        if not 0 <= frame < number_of_frames(datasets[index]):
            raise ValueError(f"frame reference to frame {frame} of dataset {index} out of range")


def nearest_source_slice(frame_refs: Sequence[tuple[int, int]], k: int) -> int:
    """The slice index nearest to ``k`` that has a source frame (``k`` itself unless it was interpolated)."""
    real = [i for i, ref in enumerate(frame_refs) if tuple(ref) != GAP]
    if not real:
        raise ValueError("frame_refs holds no source frame")
    return min(real, key=lambda i: (abs(i - k), i))


def _frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` of one frame: its functional groups first, then the top-level dataset (single-frame)."""
    value = functional_group_value(ds, frame, sequence, keyword)
    return ds.get(keyword) if value is None else value


def frame_rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT for one frame."""
    slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(slope or 1.0), float(intercept or 0.0)


def frame_hu(ds: Dataset, frame: int) -> np.ndarray:
    """HU values (float32, rows x cols) of one frame of a CT dataset."""
    if number_of_frames(ds) > 1:
        stored = read_pixel_array(ds, index=frame)
    else:
        stored = ds.pixel_array
    slope, intercept = frame_rescale(ds, frame)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def frame_orientation(ds: Dataset, frame: int) -> tuple[float, ...]:
    """ImageOrientationPatient (six direction cosines) of one frame."""
    return tuple(float(v) for v in _frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))


def frame_pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float]:
    """PixelSpacing (row spacing, column spacing) in mm of one frame."""
    spacing = _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    return float(spacing[0]), float(spacing[1])


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM file atomically (see :func:`lpm_node.core.files.atomic_write`); return the path."""
    return atomic_write(path, lambda handle: ds.save_as(handle, enforce_file_format=True))


def stamp_context(ds: Dataset, source: Dataset, when: dt.datetime | None = None) -> None:
    """Give an output Series Date/Time (``when``, default now) and the source's study description and patient
    age, size and weight (when the source has them)."""
    when = when or dt.datetime.now()
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    for keyword in COPIED_CONTEXT:
        value = source.get(keyword)
        if value not in (None, ""):
            setattr(ds, keyword, value)


def model_text(model: ModelIdentity | None) -> str:
    """The model as one line for SR text and the key image ("" when unknown)."""
    return "" if model is None else model.short()


def honest_decimals(value: float, threshold: float, decimals: int = 1, most: int = 6) -> int:
    """The fewest decimals, at least ``decimals``, at which ``value`` rounded stays on its side of ``threshold``.

    39.96 against 40 needs 2 decimals ("39.96"), since "40.0" would read as equal to the threshold.
    """
    below = value < threshold
    for places in range(decimals, most + 1):
        shown = round(value, places)
        if (shown < threshold) == below:
            return places
    return most


def hu_text(value: float, threshold: float) -> str:
    """``value`` in HU as text with :func:`honest_decimals` places (never reads as the wrong side of the
    threshold)."""
    return f"{value:.{honest_decimals(value, threshold)}f}"


def honest_round(value: float, threshold: float, decimals: int = 2) -> float:
    """``value`` rounded to at least ``decimals`` places, more where fewer would cross ``threshold``."""
    return round(float(value), honest_decimals(float(value), threshold, decimals))


@dataclass(frozen=True)
class RoiDisk:
    """One DL-parenchymal ROI disk on a source frame, for the SR's image regions.

    ``centre`` and ``radius`` are in the source frame's pixels: (column, row), 0-based pixel centres at integers.
    """

    index: int  # index into the source datasets
    frame: int  # 0-based frame of that dataset
    centre: tuple[float, float]
    radius: float
    mean_hu: float
    pixels: int
    label: str  # e.g. "slice k-2"


def frame_geometry_view(ds: Dataset, frame: int) -> Dataset:
    """A header-only dataset describing one frame like a single-frame image (top-level Pixel Spacing, Image
    Position and Orientation, Slice Thickness), so libraries that read those attributes work on Enhanced CT."""
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "FrameOfReferenceUID",
                    "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    view.PixelSpacing = list(frame_pixel_spacing(ds, frame))
    view.ImageOrientationPatient = list(frame_orientation(ds, frame))
    position = functional_group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    view.ImagePositionPatient = list(position if position is not None else ds.ImagePositionPatient)
    thickness = functional_group_value(ds, frame, "PixelMeasuresSequence", "SliceThickness")
    if thickness is None:
        thickness = ds.get("SliceThickness", None)
    view.SliceThickness = thickness if thickness is not None else 0.0
    return view


@dataclass(frozen=True)
class Outline:
    """A structure's outline on one source frame, as a closed polygon of (column, row) pixel centres (0-based)."""

    index: int  # index into the source datasets
    frame: int  # 0-based frame of that dataset
    points: tuple[tuple[float, float], ...]


def mask_outline(mask: np.ndarray, index: int, frame: int, tolerance_px: float = 1.0) -> Outline | None:
    """The outer contour of the largest region of a 2-D mask, simplified to ``tolerance_px``, closed; None when the
    mask is empty."""
    import cv2

    contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    ring = cv2.approxPolyDP(largest, tolerance_px, True).reshape(-1, 2)
    if len(ring) < 3:
        return None
    points = tuple((float(x), float(y)) for x, y in ring)
    return Outline(index, frame, (*points, points[0]))

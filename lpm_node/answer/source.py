"""The source series as the writers see it: its frames, their HU, orientation and spacing, and the frame
references of the loader's slices (``(-1, -1)`` for a slice interpolated across a gap)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.pixels import pixel_array as read_pixel_array

from lpm_node.core.frames import frame_rescale, frame_value, functional_group_value, number_of_frames
from lpm_node.imaging.loading import stored_to_hu


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


def frame_hu(ds: Dataset, frame: int) -> np.ndarray:
    """HU values (float32, rows x cols) of one frame of a CT dataset, decoded as the loader decodes them."""
    stored = read_pixel_array(ds, index=frame) if number_of_frames(ds) > 1 else ds.pixel_array
    hu = np.empty(stored.shape, dtype=np.float32)
    stored_to_hu(stored, *frame_rescale(ds, frame), hu)
    return hu


def frame_orientation(ds: Dataset, frame: int) -> tuple[float, ...]:
    """ImageOrientationPatient (six direction cosines) of one frame."""
    return tuple(float(v) for v in frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"))


def frame_pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float]:
    """PixelSpacing (row spacing, column spacing) in mm of one frame."""
    spacing = frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    return float(spacing[0]), float(spacing[1])


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

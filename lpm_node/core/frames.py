"""Per-frame attributes of a DICOM image, single-frame or enhanced (multi-frame) alike: the number of frames, the
functional groups (PS3.3 C.7.6.16), and the modality LUT (stored value -> HU) of one frame."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames of a dataset (1 when absent, empty or not a number)."""
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(float(value))) if value not in (None, "") else 1
    except (TypeError, ValueError, OverflowError):
        return 1


def functional_group_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` from the ``sequence`` item of ``frame``'s functional groups, or None.

    The per-frame group of ``frame`` (0-based) is read first, then the shared group (PS3.3 C.7.6.16: an
    attribute is in one or the other). A group item that lacks the keyword does not hide the other group.
    """
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups is None or len(groups) <= index:
            continue
        items = groups[index].get(sequence)
        if items is not None and len(items) > 0 and keyword in items[0]:
            return items[0].get(keyword)
    return None


def decimals(ds: Dataset, keyword: str) -> Any:
    """A top-level decimal string (DS) attribute's numbers, read from the element's raw bytes while still unread.

    pydicom's conversion to ``DSfloat`` (with validation) costs more than the whole rest of the geometry for a
    600-file series; a plain ``float`` per value gives the same numbers. Anything that is not a clean list of
    numbers goes through pydicom as before (its value, or None when absent)."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    raw = elem.value
    if isinstance(raw, bytes):
        text = raw.decode("ascii", "replace").strip(" \0")
        if text:
            try:
                return [float(v) for v in text.split("\\")]
            except ValueError:
                pass
    return ds.get(keyword)


def decimal(ds: Dataset, keyword: str) -> Any:
    """One top-level decimal string attribute like :func:`decimals`: a float, pydicom's value, or None."""
    values = decimals(ds, keyword)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], float):
        return values[0]
    return values


def frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` of one frame: its functional groups first, then the top-level attribute (single-frame; a number
    read like :func:`decimal`)."""
    value = functional_group_value(ds, frame, sequence, keyword)
    return decimal(ds, keyword) if value is None else value


def frame_rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) of the modality LUT of one frame: HU = stored value * slope + intercept (1 and 0 when
    absent)."""
    slope = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)

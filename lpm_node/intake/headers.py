"""One pass over a series' headers (no pixel data): the facts the eligibility rules judge, and every slice's
position and orientation, which tell whether the series is geometrically whole (:mod:`lpm_node.intake.geometry`).

The series assembler reads them once, while a released series waits out its grace, and the rules take the same
facts when it completes: a 600-file series is not parsed twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from lpm_node.core.frames import decimal, decimals, functional_group_value, number_of_frames
from lpm_node.intake.header import read_header_dataset

__all__ = ["SeriesFacts", "SeriesHeaders", "classify_kernel", "read_series_facts", "read_series_headers"]

_DESCRIPTION_FIELDS = ("StudyDescription", "SeriesDescription", "ProtocolName")
_CONTRAST_FIELDS = ("ContrastBolusAgent", "ContrastBolusIngredient", "ContrastBolusRoute", "ContrastBolusVolume")
_SHARP_KERNEL_WORDS = ("LUNG", "BONE", "SHARP", "EDGE", "DETAIL", "HIGH", "ULTRA", "BONEPLUS", "YA", "YB", "YC", "YD")
_SOFT_KERNEL_WORDS = ("SOFT", "STANDARD", "STND", "SMOOTH", "BODY", "ABDOMEN", "MEDIASTINUM", "BRAIN")


@dataclass
class SeriesFacts:
    """What the rules know about a series, from its headers and its file count."""

    modality: str = ""
    image_type: list[str] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    body_part: str = ""
    contrast: dict[str, str] = field(default_factory=dict)
    slices: int = 0
    instances: int = 0
    slice_thickness_mm: float | None = None
    z_coverage_mm: float | None = None
    axial: bool | None = None
    kernel: str = ""
    kernel_class: str = "unknown"  # soft | unknown | sharp
    unreadable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SeriesHeaders:
    """What one pass over a series' headers found."""

    facts: SeriesFacts
    positions: np.ndarray  # (N, 3) LPS mm, one row per slice with a position
    orientations: list[list[float]]  # the distinct slice orientations
    geometry_readable: bool  # every file read, every slice with a position and an orientation

    @property
    def slices(self) -> tuple[np.ndarray, list[list[float]]] | None:
        """(positions, distinct orientations) for :func:`~lpm_node.intake.geometry.contiguity`; None when a header
        was unreadable or a slice lacked its geometry."""
        return (self.positions, self.orientations) if self.geometry_readable else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _numbers(value: Any, count: int) -> list[float] | None:
    """``count`` numbers from a multi-valued attribute, or None when it has another count or is absent."""
    try:
        if value is None or len(value) != count:
            return None
        return [float(v) for v in value]
    except (TypeError, ValueError):  # a single value, or text that is not a number
        return None


def classify_kernel(kernel: str) -> str:
    """``soft``, ``sharp`` or ``unknown`` for a ConvolutionKernel value (vendor heuristics)."""
    k = kernel.upper().strip()
    if not k:
        return "unknown"
    words = set(re.split(r"[^A-Z0-9]+", k))
    if words & set(_SHARP_KERNEL_WORDS) or k.startswith("BL"):
        return "sharp"
    if words & set(_SOFT_KERNEL_WORDS):
        return "soft"
    siemens = re.match(r"^[BIQDH][RFSVLA]?(\d{2})", k)  # B30f, Br40d, I31f, Qr40...
    if siemens:
        return "soft" if int(siemens.group(1)) < 50 else "sharp"
    canon = re.match(r"^FC(\d{2})", k)  # Canon/Toshiba FC01-FC18 body, FC5x lung/bone
    if canon:
        return "soft" if int(canon.group(1)) < 30 else "sharp"
    if re.fullmatch(r"[ABC]", k):  # Philips body filters
        return "soft"
    if re.fullmatch(r"[LDEY][A-D]?", k):
        return "sharp"
    return "unknown"


_Frame = tuple[list[float] | None, list[float] | None, float | None]  # position, orientation, thickness


def _frames(ds: Dataset) -> list[_Frame]:
    """Position, orientation and thickness of each frame of a multi-frame (Enhanced CT) instance, from its
    functional groups (frame 0 from the shared group when there is no per-frame group)."""
    frames = []
    for frame in range(max(len(ds.get("PerFrameFunctionalGroupsSequence") or []), 1)):
        position = functional_group_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = functional_group_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        thickness = functional_group_value(ds, frame, "PixelMeasuresSequence", "SliceThickness")
        frames.append((None if position is None else [float(v) for v in position],
                       [float(v) for v in orientation] if orientation else None, _float(thickness)))
    return frames


class _Pass:
    """The running state of one pass over a series' headers."""

    def __init__(self, instances: int) -> None:
        self.facts = SeriesFacts(instances=instances)
        self.positions: list[list[float]] = []  # every slice with a position (the facts' z-coverage)
        self.orientation: list[float] | None = None  # the first one found (the facts' axial test)
        self.thicknesses: list[float] = []
        self.first: Dataset | None = None
        self.slice_positions: list[list[float]] = []  # contiguity: every slice, or the geometry is unreadable
        self.orientations: list[list[float]] = []
        self.geometry_readable = True

    def unreadable(self) -> None:
        self.facts.unreadable += 1
        self.geometry_readable = False

    def add(self, ds: Dataset) -> None:
        if self.first is None:
            self.first = ds
        per_frame = "PerFrameFunctionalGroupsSequence" in ds
        ipp = iop = None
        if not per_frame:
            ipp = _numbers(decimals(ds, "ImagePositionPatient"), 3)
            iop = _numbers(decimals(ds, "ImageOrientationPatient"), 6)
        count = number_of_frames(ds)
        frames = _frames(ds) if count > 1 or per_frame else []
        if frames:
            self.positions.extend(position for position, _, _ in frames if position is not None)
            self.orientation = self.orientation or next((o for _, o, _ in frames if o is not None), None)
            thickness = next((t for _, _, t in frames if t is not None), None)
            self.facts.slices += count
        else:
            if ipp is not None:
                self.positions.append(ipp)
            if self.orientation is None and iop is not None:
                self.orientation = iop
            thickness = _float(decimal(ds, "SliceThickness"))
            self.facts.slices += 1
        if thickness:
            self.thicknesses.append(thickness)
        if per_frame:  # the per-frame groups' frames that have a position
            n = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
            self._add_slices([(p, o) for p, o, _ in frames[:n] if p is not None])
        else:
            self._add_slices([(ipp, iop)])

    def _add_slices(self, slices: list[tuple[list[float] | None, list[float] | None]]) -> None:
        for position, orientation in slices:
            if position is None or orientation is None or len(orientation) != 6:
                self.geometry_readable = False
                continue
            self.slice_positions.append(position)
            if not any(np.allclose(orientation, o, atol=1e-4) for o in self.orientations):
                self.orientations.append(orientation)

    def result(self) -> SeriesHeaders:
        facts, first = self.facts, self.first
        if first is not None:
            facts.modality = _text(first, "Modality").upper()
            facts.image_type = [v.strip().upper() for v in _text(first, "ImageType").split("\\") if v.strip()]
            facts.descriptions = {k: _text(first, k) for k in _DESCRIPTION_FIELDS}
            facts.body_part = _text(first, "BodyPartExamined")
            facts.contrast = {k: _text(first, k) for k in _CONTRAST_FIELDS if _text(first, k)}
            facts.kernel = _text(first, "ConvolutionKernel")
            facts.kernel_class = classify_kernel(facts.kernel)
            self._geometry_facts()
        positions = np.array(self.slice_positions, dtype=float).reshape(-1, 3)
        return SeriesHeaders(facts, positions, self.orientations, self.geometry_readable and first is not None)

    def _geometry_facts(self) -> None:
        facts = self.facts
        if self.thicknesses:
            facts.slice_thickness_mm = float(np.median(self.thicknesses))
        if self.orientation is None:
            return
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        normal = np.cross(row, col)
        facts.axial = bool(abs(normal[2]) > 0.95)
        if self.positions:
            z = np.sort(np.array(self.positions) @ normal)
            spacing = float(np.median(np.diff(z))) if len(z) > 1 else 0.0
            extra = facts.slice_thickness_mm or spacing
            facts.z_coverage_mm = float(z[-1] - z[0] + extra)
            if facts.slice_thickness_mm is None and spacing > 0:
                facts.slice_thickness_mm = spacing


def read_series_headers(paths: Sequence[Path]) -> SeriesHeaders:
    """Read each file's header once: the rules' facts and the slices' geometry."""
    state = _Pass(len(paths))
    for path in paths:
        try:
            ds, _ts = read_header_dataset(path)
        except Exception:
            state.unreadable()
            continue
        state.add(ds)
    return state.result()


def read_series_facts(paths: Sequence[Path]) -> SeriesFacts:
    """Facts from the headers of a series' files (pixel data are not read)."""
    return read_series_headers(paths).facts

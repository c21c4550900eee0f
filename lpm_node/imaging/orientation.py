"""How an image's axes lie on the patient, as its header states it (DICOM Image Orientation/Patient Position, or a
NIfTI affine), so the measurement can say what it trusted.

The measurement always works on the axis-aligned LPS method grid; the header decides how the stored image is turned
onto it. This module only describes the header's statement: whether there was one at all, how the stored axes ran,
and how the patient lay. Whether the anatomy agrees is checked on the image (``imaging/anatomy.py``).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPINE_POSITIONS = ("HFS", "FFS")
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))  # LPS direction +, - for physical x, y, z


@dataclass(frozen=True)
class PatientOrientation:
    """The header's statement of the image's orientation.

    ``known``: the header states an orientation (DICOM Image Orientation (Patient), a NIfTI qform or sform code
    other than 0); when False the image was taken as stored in LPS order, and only the anatomy tells the patient's
    right. ``stored_axes``: where the stored array's column, row and slice axes point (e.g. "LPS", "RAS", "LPI").
    ``patient_position``: DICOM Patient Position (HFS, HFP, FFS, HFDR, ...), None when not stated.
    """

    source: str
    known: bool
    stored_axes: str = "LPS"
    patient_position: str | None = None

    @property
    def supine(self) -> bool | None:
        """True for a supine position, False for prone or decubitus, None when the position is not stated."""
        if not self.patient_position:
            return None
        return self.patient_position in SUPINE_POSITIONS


def axes_code(direction: np.ndarray | tuple[float, ...]) -> str:
    """The letters the stored axes point to (columns, rows, slices), from a 3x3 direction matrix in LPS whose
    columns are the axes (SimpleITK's ``GetDirection``): identity is "LPS", diag(-1, -1, 1) is "RAS"."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    letters = []
    for axis in range(3):
        column = d[:, axis]
        physical = int(np.argmax(np.abs(column)))
        letters.append(_AXIS_LETTERS[physical][0 if column[physical] > 0 else 1])
    return "".join(letters)


def dicom_orientation(direction: np.ndarray | tuple[float, ...], patient_position: object) -> PatientOrientation:
    """A DICOM series' orientation: its direction (from Image Orientation (Patient), which the loader requires)
    and its Patient Position."""
    position = str(patient_position or "").strip().upper() or None
    return PatientOrientation(source="DICOM", known=True, stored_axes=axes_code(direction),
                              patient_position=position)


def nifti_form_codes(path: str | Path) -> tuple[int, int] | None:
    """(qform_code, sform_code) of a NIfTI-1 or NIfTI-2 file (plain or gzip); None for another format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
    except OSError:
        return None
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            return struct.unpack(order + "hh", header[252:256])  # type: ignore[return-value]
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            return struct.unpack(order + "ii", header[344:352])  # type: ignore[return-value]
    return None


def nifti_orientation(path: str | Path, direction: np.ndarray | tuple[float, ...]) -> PatientOrientation:
    """A NIfTI image's orientation: known when its qform or sform code is set (then SimpleITK's direction is the
    affine's); a file with both codes 0 carries no orientation (readers fall back to a default)."""
    codes = nifti_form_codes(path)
    known = codes is None or any(code > 0 for code in codes)
    return PatientOrientation(source="NIfTI", known=known, stored_axes=axes_code(direction))

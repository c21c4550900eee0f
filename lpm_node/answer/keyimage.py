"""Key image: a Secondary Capture of the CT slice with the liver and ROI outlined and the result written on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import lpm_node
from lpm_node.answer.equipment import (
    KEY_IMAGE_SERIES_DESCRIPTION,
    KEY_IMAGE_SERIES_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    TEST_MODEL_NOTICE,
    model_text,
    stamp_context,
)
from lpm_node.answer.source import (
    GAP,
    check_frame_refs,
    frame_hu,
    frame_orientation,
    frame_pixel_spacing,
    number_of_frames,
    source_series_uid,
)
from lpm_node.answer.uids import ContentIdentity, identity_for
from lpm_node.answer.wording import hu_text
from lpm_node.imaging.measurement import Category, Measurement, flag_sentence
from lpm_node.imaging.model_identity import ModelIdentity

SERIES_DESCRIPTION = KEY_IMAGE_SERIES_DESCRIPTION
WINDOW_CENTRE = 40.0
WINDOW_WIDTH = 400.0
LIVER_COLOUR = (0, 200, 255)  # RGB: light blue outline
ROI_COLOUR = (0, 255, 0)  # RGB: pure green outline, no grey CT pixel comes near it
TEXT_COLOURS = {Category.STEATOSIS: (255, 80, 80), Category.NOT_ASSESSABLE: (255, 200, 0)}
DEFAULT_TEXT_COLOUR = (120, 255, 120)


def window(hu: np.ndarray, centre: float = WINDOW_CENTRE, width: float = WINDOW_WIDTH) -> np.ndarray:
    """Linear window of HU values to uint8 (0 at centre - width/2, 255 at centre + width/2)."""
    low = centre - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation (row direction, column direction) letters from ImageOrientationPatient (LPS)."""

    def letters(vector: Sequence[float]) -> str:
        positive, negative = "LPH", "RAF"
        order = sorted(range(3), key=lambda i: -abs(vector[i]))
        text = "".join(positive[i] if vector[i] > 0 else negative[i] for i in order if abs(vector[i]) >= 0.25)
        return text or ("L" if vector[0] >= 0 else "R")

    return letters(orientation[:3]), letters(orientation[3:6])


def _outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, colour, thickness)


def _reasons(measurement: Measurement) -> list[str]:
    return list(measurement.not_assessable_reasons)


def series_description(measurement: Measurement) -> str:
    """The series description with the category (a viewer shows it over the image): at most 64 characters."""
    if measurement.dl_parenchymal_hu is None or measurement.category == Category.NOT_ASSESSABLE:
        verdict = "not assessable"
    else:
        verdict = "moderate-to-severe steatosis" if measurement.category == Category.STEATOSIS else (
            "no moderate-to-severe steatosis"
        )
    return f"{SERIES_DESCRIPTION}: {verdict}"


def result_lines(measurement: Measurement, model: ModelIdentity | None = None) -> list[str]:
    """The text burnt into the key image: the value and the category (or "Not assessable" and why), each QC flag
    as a sentence, the model and, for a test model, a notice that it is not for clinical use.

    Values are shown with as many decimals as it takes to stay on their side of the threshold."""
    value, threshold = measurement.dl_parenchymal_hu, measurement.threshold_hu
    lines: list[str] = []
    if model is not None and model.test_model:
        lines.append(f"{TEST_MODEL_NOTICE}")
    if value is None or measurement.category == Category.NOT_ASSESSABLE:
        lines.append("Not assessable")
        reasons = _reasons(measurement)
        lines += [f"- {flag_sentence(flag)}" for flag in reasons] or ["- No DL-parenchymal value could be measured."]
        if value is not None:
            lines.append(f"DL-parenchymal attenuation {hu_text(value, threshold)} HU (not used for a category)")
        others = [flag for flag in measurement.qc_flags if flag not in reasons]
    else:
        relation = "<" if measurement.category == Category.STEATOSIS else ">="
        verdict = "Moderate-to-severe" if measurement.category == Category.STEATOSIS else "No moderate-to-severe"
        lines += [
            f"DL-parenchymal attenuation: {hu_text(value, threshold)} HU",
            f"{verdict} hepatic steatosis ({hu_text(value, threshold)} {relation} {threshold:g} HU)",
        ]
        others = list(measurement.qc_flags)
    lines += [f"QC: {flag_sentence(flag)}" for flag in others]
    if model is not None:
        lines.append(f"Model: {model_text(model)}")
    return lines


def _wrap(lines: list[str], draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break lines at ", " or spaces so that each fits ``width`` pixels (a single long word stays whole)."""
    out: list[str] = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and draw.textlength(candidate, font=font) > width:
                out.append(current)
                current = "  " + word
            else:
                current = candidate
        out.append(current)
    return out


@dataclass(frozen=True)
class ResultText:
    """The result text's layout on a key image: font size, wrapped lines, first line's top left, line step."""

    size: int
    lines: list[str]
    left: int
    top: int
    step: int

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels around the text block."""
        font = ImageFont.load_default(size=self.size)
        width = max(font.getlength(line) for line in self.lines)
        return self.left, self.top, self.left + width, self.top + len(self.lines) * self.step


def result_text(rows: int, cols: int, measurement: Measurement, model: ModelIdentity | None = None) -> ResultText:
    """Where and how :func:`render_key_image` writes the result on a ``rows`` x ``cols`` image."""
    size = max(9, round(min(rows, cols) / 30))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(result_lines(measurement, model), draw, ImageFont.load_default(size=size), cols - size)
    return ResultText(size=size, lines=lines, left=size // 2, top=size // 2, step=round(size * 1.3))


def render_key_image(
    hu: np.ndarray,
    roi_mask_slice: np.ndarray,
    liver_mask_slice: np.ndarray,
    measurement: Measurement,
    model: ModelIdentity | None = None,
) -> np.ndarray:
    """RGB uint8 (rows, cols, 3): windowed CT, liver and ROI outlines, result text."""
    rows, cols = hu.shape
    grey = window(hu)
    rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    thickness = max(1, round(min(rows, cols) / 256))
    _outline(rgb, liver_mask_slice, LIVER_COLOUR, thickness)
    _outline(rgb, roi_mask_slice, ROI_COLOUR, thickness)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    text = result_text(rows, cols, measurement, model)
    size = text.size
    font = ImageFont.load_default(size=size)
    colour = TEXT_COLOURS.get(measurement.category, DEFAULT_TEXT_COLOUR)
    for number, line in enumerate(text.lines):
        y = text.top + number * text.step
        draw.text((text.left, y), line, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    footer = "AI-generated by lpm-node (not for primary diagnosis)"
    draw.text((size // 2, rows - size * 2), footer, fill=(200, 200, 200), font=font)
    return np.asarray(image, dtype=np.uint8)


def _source_image_item(ds: Dataset, frame: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if number_of_frames(ds) > 1:
        item.ReferencedFrameNumber = frame + 1
    return item


def build_key_image(
    datasets: Sequence[Dataset],
    frame_refs: Sequence[tuple[int, int]],
    hu_slice_index: int,
    roi_mask_slice: np.ndarray,
    liver_mask_slice: np.ndarray,
    measurement: Measurement,
    *,
    algorithm_version: str = lpm_node.__version__,
    hu: np.ndarray | None = None,
    identity: ContentIdentity | None = None,
) -> Dataset:
    """Secondary Capture (RGB) of source slice k = ``hu_slice_index`` with outlines and the result burnt in.

    ``hu`` is that slice in HU (rows, cols) when the caller has it already (e.g. the source datasets were loaded
    without their pixel data); otherwise it is decoded from the source frame.

    The masks are (rows, cols) on that source slice, which must have a source frame (see
    ``nearest_source_slice`` for slices the loader interpolated). Patient and study come from the source
    dataset; UIDs are derived from ``identity`` (default: the source series and the version).
    """
    check_frame_refs(datasets, frame_refs)
    if not 0 <= hu_slice_index < len(frame_refs):
        raise ValueError(f"hu_slice_index {hu_slice_index} outside 0..{len(frame_refs) - 1}")
    index, frame = frame_refs[hu_slice_index]
    if (index, frame) == GAP:
        raise ValueError(f"slice {hu_slice_index} was interpolated (no source frame); see nearest_source_slice")
    source = datasets[index]
    hu = frame_hu(source, frame) if hu is None else np.asarray(hu)
    for name, mask in (("roi", roi_mask_slice), ("liver", liver_mask_slice)):
        if np.shape(mask) != hu.shape:
            raise ValueError(f"{name} mask slice shape {np.shape(mask)} differs from the CT slice {hu.shape}")
    content = identity_for(source_series_uid(datasets), algorithm_version, identity)
    pixels = render_key_image(hu, roi_mask_slice, liver_mask_slice, measurement, content.model)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=content.uid("key-image-series"),
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=content.uid("key-image-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        pixel_spacing=frame_pixel_spacing(source, frame),
        patient_orientation=patient_orientation(frame_orientation(source, frame)),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.SeriesDescription = series_description(measurement)
    image.DerivationDescription = "CT slice (W400/L40) with liver and DL-parenchymal ROI outlined, result burnt in"
    image.SourceImageSequence = [_source_image_item(source, frame)]
    image.SoftwareVersions = content.software_version
    image.ManufacturerModelName = MODEL_NAME
    image.ConversionType = "WSD"  # a workstation rendering, not a digitised film (DI)
    stamp_context(image, source)
    if source.get("BodyPartExamined"):
        image.BodyPartExamined = source.BodyPartExamined
    else:
        image.Laterality = None  # General Series 2C: unknown whether a paired part is shown
    return image

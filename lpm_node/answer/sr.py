"""Comprehensive 3D SR with a TID 1500 Measurement Report of the node's liver attenuation measurement.

Content (PS3.16):

- TID 1411 volumetric groups that reference the SEG's segments: the DL-parenchymal ROI (the primary value, the
  steatosis category, the QC and liver minus spleen), the robust parenchymal estimate, the whole liver
  (attenuation and volume) and the spleen;
- TID 1410 planar groups, one per ROI disk, first in the report, with the disk as a CIRCLE (SCOORD) on its source
  CT image and one value named for what it is: the index slice k's disk the pooled DL-parenchymal value
  ("DL-parenchymal ROI"), the other disks their own mean ("DL-parenchymal disk 1 (slice k-2)"); viewers that draw
  image regions and label them with the values' concept names (OHIF 3.13) show one readable label per disk;
- for each volumetric group a planar partner with the same tracking UID (a viewer that merges groups by tracking
  UID, as OHIF does, then has an image region for every measurement) whose region is the structure on the SEG
  frame it was measured from (the ROI disk of slice k, the liver or spleen outline): the volumetric values stay
  off the CT image, where their standard concept names would stack unlabelled beside the disks. Without an ROI
  disk (no liver, or a result withheld before any ROI existed) the DL-parenchymal group's partner frames the
  result statement burnt into the key image (category and reasons), which a viewer then opens the report on;
  neither of the two carries a Finding Site, which such a viewer prints as a bare code beside the frame;
- the report's Qualitative Evaluations: the category as code and as sentences, the reasons when not assessable,
  every QC flag as a sentence, the model, and a notice for outputs of a test model.

Finding the primary value without our tracking identifiers: the NUM (112031, DCM, "Attenuation Coefficient")
with Measurement Method (370129005, SCT) = (DLPAR, 99LPM) in the measurement group whose Finding Site is
(10200004, SCT, "Liver"); the category is the CODE (197321007, SCT, "Steatosis of liver") in the same group, the
TID 1411 group with that Measurement Method (also when it has no value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import lpm_node
from lpm_node.answer.equipment import (
    DEVICE_SERIAL,
    MANUFACTURER,
    MODEL_NAME,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    TEST_MODEL_NOTICE,
    model_text,
    stamp_context,
)
from lpm_node.answer.geometry import Outline, RoiDisk
from lpm_node.answer.keyimage import result_text
from lpm_node.answer.seg import (
    ARTIFICIAL_INTELLIGENCE,
    LIVER,
    SPLEEN,
    BinarySegmentation,
    model_parameters,
    segment_number,
)
from lpm_node.answer.source import frame_geometry_view, number_of_frames, source_series_uid
from lpm_node.answer.uids import DEVICE_OBSERVER_UID, ContentIdentity, identity_for
from lpm_node.answer.wording import honest_round, hu_text
from lpm_node.imaging.measurement import Category, Measurement, flag_sentence

SERIES_DESCRIPTION = SR_SERIES_DESCRIPTION

# Local coding scheme for the node's own concepts, only where no standard code exists (declared in
# CodingSchemeIdentificationSequence).
LOCAL_SCHEME = "99LPM"
ATTENUATION = codes.DCM.AttenuationCoefficient  # (112031, DCM)
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
HU_DECIMALS = 2  # values are written rounded to 0.01 HU (more where that would cross the threshold) and 0.1 ml
ML_DECIMALS = 1
ML = Code("ml", "UCUM", "milliliter")
MEAN = codes.SCT.Mean  # (373098007, SCT)
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
VOLUME = codes.cid7472.Volume  # (118565006, SCT)
SUM_OF_VOXELS = codes.cid7474.SumOfSegmentedVoxelMethodForVolume  # (126030, DCM)
PARENCHYMA = Code("91772007", "SCT", "Parenchyma")
STEATOSIS_OF_LIVER = Code("197321007", "SCT", "Steatosis of liver")
MODERATE_TO_SEVERE = codes.cid3716.ModerateToSevere  # (371924009, SCT), CID 3716 Severity
UNDETERMINED = codes.cid230.Undetermined  # (373068000, SCT)
MEASUREMENT_METHOD = Code("370129005", "SCT", "Measurement Method")
PROCEDURE_REPORTED = codes.cid100.CTUnspecifiedBodyRegion  # (25045-6, LN), CID 100
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment  # (121106, DCM)

METHOD_DL_PARENCHYMAL = Code("DLPAR", LOCAL_SCHEME, "DL-parenchymal three-disk ROI (Zhang et al. 2024)")
METHOD_DL_PARENCHYMAL_DISK = Code("DLPARDISK", LOCAL_SCHEME, "One disk of the DL-parenchymal ROI")
METHOD_ROBUST = Code("ROBUSTPAR", LOCAL_SCHEME, "Robust parenchymal: liver eroded 5 mm, 3 robust-SD clipped mean")
METHOD_VOLUMETRIC = Code("DLVOL", LOCAL_SCHEME, "DL-volumetric: mean over the whole liver mask")
METHOD_LIVER_MINUS_SPLEEN = Code("LMS", LOCAL_SCHEME, "Liver minus spleen attenuation")
NO_MODERATE_TO_SEVERE = Code("NOMODSEV", LOCAL_SCHEME, "Not moderate to severe")
QC_FLAG = Code("QCFLAG", LOCAL_SCHEME, "Quality control flag")
NOT_ASSESSABLE_REASON = Code("NAREASON", LOCAL_SCHEME, "Reason not assessable")
MODEL = Code("MODEL", LOCAL_SCHEME, "Segmentation model")
# Names of the values drawn on the CT (a viewer labels a drawn region with its values' concept names): the pooled
# value on the index slice's disk, and each other disk's own mean.
DL_PARENCHYMAL_ROI = Code("DLPARROI", LOCAL_SCHEME, "DL-parenchymal ROI")

# The category as the value of (197321007, SCT, "Steatosis of liver"): moderate to severe (CID 3716), not
# assessable = undetermined (CID 230); below the threshold is not "absent" (mild steatosis stays possible), and no
# standard code says "not moderate to severe", hence the local one.
CATEGORY_VALUES = {
    Category.STEATOSIS: MODERATE_TO_SEVERE,
    Category.NO_STEATOSIS: NO_MODERATE_TO_SEVERE,
    Category.NOT_ASSESSABLE: UNDETERMINED,
}

TRACKING_DL_PARENCHYMAL = "DL-parenchymal ROI"
TRACKING_ROBUST = "Liver parenchyma, robust estimate"
TRACKING_LIVER = "Whole liver (DL-volumetric)"
TRACKING_SPLEEN = "Spleen"
TRACKING_DISK = "DL-parenchymal ROI disk {number} of {count} ({label})"
# Which structure's outline stands for each volumetric group in a viewer that draws only image regions.
TRACKING_STRUCTURES = {TRACKING_ROBUST: "liver", TRACKING_LIVER: "liver", TRACKING_SPLEEN: "spleen"}


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "lpm-node local concepts"
    item.CodingSchemeResponsibleOrganization = "lpm-node"
    return item


def _meaning(text: str) -> str:
    """A Code Meaning (LO, at most 64 characters) from a sentence."""
    text = text.rstrip(".")
    return text if len(text) <= 64 else text[:63].rstrip() + "…"


def qc_flag_code(flag: str) -> hd.sr.CodedConcept:
    """A local code for one QC flag: the flag's name as code value, its sentence (shortened) as meaning."""
    return hd.sr.CodedConcept(flag, LOCAL_SCHEME, _meaning(flag_sentence(flag)))


def effective_category(measurement: Measurement) -> str:
    """The category, not assessable whenever there is no DL-parenchymal value."""
    return measurement.category if measurement.dl_parenchymal_hu is not None else Category.NOT_ASSESSABLE


def not_assessable_reasons(measurement: Measurement) -> list[str]:
    """The QC flags that made the result not assessable."""
    return list(measurement.not_assessable_reasons)


def category_text(measurement: Measurement) -> str:
    """One sentence stating the category, the value it rests on and the threshold (or why it is not assessable).

    The value is shown with as many decimals as it takes to stay on its side of the threshold."""
    threshold = f"{measurement.threshold_hu:g} HU"
    value = measurement.dl_parenchymal_hu
    if effective_category(measurement) == Category.NOT_ASSESSABLE:
        reasons = " ".join(flag_sentence(f) for f in not_assessable_reasons(measurement))
        reasons = reasons or "No DL-parenchymal value could be measured."
        measured = "" if value is None else (
            f" The DL-parenchymal attenuation measured {hu_text(value, measurement.threshold_hu)} HU, "
            "but it is not used for a category."
        )
        return f"Not assessable. {reasons}{measured} Threshold {threshold}."
    shown = f"DL-parenchymal attenuation {hu_text(value, measurement.threshold_hu)} HU"
    if measurement.category == Category.STEATOSIS:
        return f"Moderate-to-severe hepatic steatosis: {shown} < {threshold}."
    return f"No moderate-to-severe hepatic steatosis: {shown} >= {threshold}."


def _attenuation(
    value: float, derivation: Code | None = MEAN, method: Code | None = None, threshold: float | None = None,
    name: Code = ATTENUATION,
) -> hd.sr.Measurement:
    shown = honest_round(value, threshold, HU_DECIMALS) if threshold is not None else round(float(value), HU_DECIMALS)
    return hd.sr.Measurement(name=name, value=shown, unit=HU, derivation=derivation, method=method)


def disk_concept(number: int, disk: RoiDisk) -> Code:
    """The name of one disk's own mean: says which disk it is (a viewer shows it as the disk's label)."""
    return Code(f"DLPARDISK{number}", LOCAL_SCHEME, _meaning(f"DL-parenchymal disk {number} ({disk.label})"))


def _tracking(content: ContentIdentity, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=content.uid(f"tracking-{label}"), identifier=label)


def _referenced_segment(seg: Dataset, key: str, series_uid: str) -> hd.sr.ReferencedSegment | None:
    number = segment_number(seg, key)
    if number is None:
        return None
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
    )


def _group_kwargs(
    content: ContentIdentity, label: str, seg: Dataset, key: str, algorithm: hd.sr.AlgorithmIdentification
) -> dict:
    """Common arguments of a TID 1411 group (tracking identifier, segment, algorithm)."""
    segment = _referenced_segment(seg, key, content.source_series_uid)
    if segment is None:
        raise ValueError(f"the SEG has no segment for {key!r}")
    return {"tracking_identifier": _tracking(content, label), "referenced_segment": segment, "algorithm_id": algorithm}


def _category_evaluations(measurement: Measurement) -> list[hd.sr.QualitativeEvaluation]:
    category = effective_category(measurement)
    evaluations = [hd.sr.QualitativeEvaluation(STEATOSIS_OF_LIVER, CATEGORY_VALUES[category])]
    if category == Category.NOT_ASSESSABLE:
        evaluations += [
            hd.sr.QualitativeEvaluation(NOT_ASSESSABLE_REASON, qc_flag_code(flag))
            for flag in not_assessable_reasons(measurement)
        ]
    evaluations += [hd.sr.QualitativeEvaluation(QC_FLAG, qc_flag_code(flag)) for flag in measurement.qc_flags]
    return evaluations


def _algorithm(content: ContentIdentity) -> hd.sr.AlgorithmIdentification:
    parameters = [f"{name}: {value}" for name, value in model_parameters(content.model).items()]
    return hd.sr.AlgorithmIdentification(
        name=lpm_node.ALGORITHM_NAME, version=content.software_version, parameters=parameters or None,
        family=ARTIFICIAL_INTELLIGENCE,
    )


def _disk_groups(
    datasets: Sequence[Dataset],
    disks: Sequence[RoiDisk],
    measurement: Measurement,
    content: ContentIdentity,
    algorithm: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 groups: each ROI disk as a CIRCLE on its source image with one value named for what it is: the
    index slice k's disk the pooled DL-parenchymal value (its own mean when there is none), the others their own
    mean. The index slice's disk comes first (a viewer opens the report on its first region). No Finding Site: a
    viewer would print its code beside the value; the volumetric groups carry it."""
    groups = []
    middle = len(disks) // 2
    order = [middle, *(n for n in range(len(disks)) if n != middle)] if disks else []
    for position in order:
        disk, number = disks[position], position + 1
        cx, cy = disk.centre
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
            # PS3.3 C.18.6.1.2: pixel coordinates with (0.5, 0.5) the centre of the top left pixel... here the
            # TLHC of the image is (0, 0), so a 0-based pixel centre c lies at c + 0.5.
            graphic_data=np.array([[cx + 0.5, cy + 0.5], [cx + 0.5 + disk.radius, cy + 0.5]]),
            source_image=_source_image(datasets, disk.index, disk.frame),
        )
        if position == middle and measurement.dl_parenchymal_hu is not None:
            value = _attenuation(
                measurement.dl_parenchymal_hu, MEAN, METHOD_DL_PARENCHYMAL, measurement.threshold_hu,
                name=DL_PARENCHYMAL_ROI,
            )
        else:
            value = _attenuation(disk.mean_hu, MEAN, METHOD_DL_PARENCHYMAL_DISK, name=disk_concept(number, disk))
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(
                    content, TRACKING_DISK.format(number=number, count=len(disks), label=disk.label)
                ),
                referenced_region=region,
                finding_type=PARENCHYMA,
                method=METHOD_DL_PARENCHYMAL,
                algorithm_id=algorithm,
                measurements=[value],
            )
        )
    return groups


def _source_image(datasets: Sequence[Dataset], index: int, frame: int) -> hd.sr.SourceImageForRegion:
    source = datasets[index]
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_frame_numbers=[frame + 1] if number_of_frames(source) > 1 else None,
    )


# (segment number, source SOP Instance UID, 0-based source frame or None for any) -> 1-based SEG frame
SegFrames = dict[tuple[int, str, int | None], int]


def seg_frames(seg: Dataset) -> SegFrames:
    """Where each segment's frames in ``seg`` were cut from, read once from its per-frame functional groups: the
    first SEG frame of a segment derived from a source frame, and from any frame of a source instance."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames: SegFrames = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        for derivation in item.get("DerivationImageSequence", []):
            for reference in derivation.SourceImageSequence:
                uid = str(reference.ReferencedSOPInstanceUID)
                frames.setdefault((number, uid, None), index)
                for n in np.atleast_1d(reference.get("ReferencedFrameNumber", 1)):
                    frames.setdefault((number, uid, int(n) - 1), index)
    return frames


def seg_frame(frames: SegFrames, seg: Dataset, key: str, source: Dataset, frame: int) -> int | None:
    """The SEG frame (1-based) of segment ``key`` cut from ``frame`` (0-based) of ``source`` (any frame of a
    single-frame source), looked up in ``frames`` (:func:`seg_frames` of ``seg``); None if none."""
    number = segment_number(seg, key)
    if number is None:
        return None
    return frames.get((number, str(source.SOPInstanceUID), frame if number_of_frames(source) > 1 else None))


def _on_seg(seg: Dataset, frame: int) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=seg.SOPClassUID, referenced_sop_instance_uid=seg.SOPInstanceUID,
        referenced_frame_numbers=[frame],
    )


def _statement_region(key_image: Dataset, measurement: Measurement, content: ContentIdentity) -> hd.sr.ImageRegion:
    """The result statement burnt into the key image (category, reasons, QC), as a closed POLYLINE around it."""
    text = result_text(int(key_image.Rows), int(key_image.Columns), measurement, content.model)
    left, top, right, bottom = text.box()
    margin = text.size / 4
    left, top, right, bottom = left - margin, top - margin, right + margin, bottom + margin
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key_image.SOPClassUID, referenced_sop_instance_uid=key_image.SOPInstanceUID,
        ),
    )


def _partner_region(
    datasets: Sequence[Dataset], seg: Dataset, frames: SegFrames, tracking: str, outlines: Mapping[str, Outline],
    disks: Sequence[RoiDisk], statement: hd.sr.ImageRegion | None,
) -> tuple[hd.sr.ImageRegion, Code] | None:
    """The image region of a volumetric group's planar partner, and the structure. On the SEG frame the structure
    was measured from: the index slice's ROI disk for the DL-parenchymal ROI, else the structure's outline. Where
    there is no ROI disk (for the DL-parenchymal ROI) or no structure, the ``statement`` on the key image: a viewer
    then opens a result without an ROI on the key image, where its category and reasons are written."""
    if tracking == TRACKING_DL_PARENCHYMAL and disks:
        disk = disks[len(disks) // 2]
        key = "roi" if segment_number(seg, "roi") is not None else "liver"
        frame = seg_frame(frames, seg, key, datasets[disk.index], disk.frame)
        if frame is not None:
            cx, cy = disk.centre
            return hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
                graphic_data=np.array([[cx + 0.5, cy + 0.5], [cx + 0.5 + disk.radius, cy + 0.5]]),
                source_image=_on_seg(seg, frame),
            ), LIVER
    elif tracking == TRACKING_DL_PARENCHYMAL and statement is not None:
        return statement, LIVER
    key = TRACKING_STRUCTURES.get(tracking, "liver")
    structure = SPLEEN if key == "spleen" else LIVER
    outline = outlines.get(key)
    frame = None if outline is None else seg_frame(frames, seg, key, datasets[outline.index], outline.frame)
    if outline is None or frame is None:
        return None if statement is None else (statement, structure)
    shift = np.array(outline.points) + 0.5  # 0-based pixel centres -> TLHC-origin pixel coordinates
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=shift, source_image=_on_seg(seg, frame)
    )
    return region, structure


def _on_instance(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, ds: Dataset) -> bool:
    """Whether ``group``'s image region lies on the instance ``ds``."""
    return group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def _partner_groups(
    datasets: Sequence[Dataset],
    seg: Dataset,
    outlines: Mapping[str, Outline],
    disks: Sequence[RoiDisk],
    volumetric: Sequence,
    algorithm: hd.sr.AlgorithmIdentification,
    statement: hd.sr.ImageRegion | None = None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """For each volumetric group: a TID 1410 group with the same tracking identifier and UID (the same finding)
    holding the structure on its SEG frame, or the result ``statement`` on the key image (see
    :func:`_partner_region`), without values. Viewers that merge groups by tracking UID (OHIF) then meet no group
    without an image region, and draw none of them on the CT."""
    groups = []
    frames = seg_frames(seg)
    for group in volumetric:
        found = _partner_region(datasets, seg, frames, group.tracking_identifier, outlines, disks, statement)
        if found is None:
            continue
        region, structure = found
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=group.tracking_uid, identifier=group.tracking_identifier
                ),
                referenced_region=region,
                finding_type=structure,
                algorithm_id=algorithm,
                finding_sites=None if region is statement else [hd.sr.FindingSite(structure)],
            )
        )
    return groups


def _measurement_groups(
    seg: Dataset, measurement: Measurement, content: ContentIdentity, algorithm: hd.sr.AlgorithmIdentification,
    on_statement: bool = False,
) -> list:
    """The TID 1411 groups. ``on_statement``: the DL-parenchymal group is drawn on the key image's result statement
    (it has no ROI disk), so it goes without Finding Site, which a viewer would print as a bare code beside it."""
    liver_site = [hd.sr.FindingSite(LIVER)]
    groups: list = []
    roi_key = "roi" if segment_number(seg, "roi") is not None else "liver"
    # The DL-parenchymal group always exists: it carries the category, also when the value is not assessable.
    roi_measurements = []
    if measurement.dl_parenchymal_hu is not None:
        roi_measurements.append(
            _attenuation(measurement.dl_parenchymal_hu, MEAN, METHOD_DL_PARENCHYMAL, measurement.threshold_hu)
        )
        if measurement.roi_sd_hu is not None:
            roi_measurements.append(_attenuation(measurement.roi_sd_hu, STANDARD_DEVIATION))
        if measurement.liver_minus_spleen_hu is not None:
            # A difference of two attenuations, kept in this group (a TID 1501 group of its own is read as a
            # TID 1411 group without a region by pixelmed's validator).
            roi_measurements.append(_attenuation(measurement.liver_minus_spleen_hu, None, METHOD_LIVER_MINUS_SPLEEN))
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            **_group_kwargs(content, TRACKING_DL_PARENCHYMAL, seg, roi_key, algorithm),
            finding_type=PARENCHYMA,
            method=METHOD_DL_PARENCHYMAL,
            finding_sites=None if on_statement else liver_site,
            measurements=roi_measurements or None,
            qualitative_evaluations=_category_evaluations(measurement),
        )
    )
    if measurement.robust_parenchymal_hu is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(content, TRACKING_ROBUST, seg, "liver", algorithm),
                finding_type=PARENCHYMA,
                method=METHOD_ROBUST,
                finding_sites=liver_site,
                measurements=[_attenuation(measurement.robust_parenchymal_hu, MEAN, METHOD_ROBUST)],
            )
        )
    liver_measurements = []
    if measurement.dl_volumetric_hu is not None:
        liver_measurements.append(_attenuation(measurement.dl_volumetric_hu, MEAN, METHOD_VOLUMETRIC))
    if measurement.liver_volume_ml and measurement.liver_volume_ml > 0:
        liver_measurements.append(
            hd.sr.Measurement(
                name=VOLUME, value=round(float(measurement.liver_volume_ml), ML_DECIMALS), unit=ML,
                method=SUM_OF_VOXELS,
            )
        )
    if liver_measurements:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(content, TRACKING_LIVER, seg, "liver", algorithm),
                finding_type=LIVER,
                method=METHOD_VOLUMETRIC,
                finding_sites=liver_site,
                measurements=liver_measurements,
            )
        )
    if measurement.spleen_hu is not None and segment_number(seg, "spleen") is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(content, TRACKING_SPLEEN, seg, "spleen", algorithm),
                finding_type=SPLEEN,
                finding_sites=[hd.sr.FindingSite(SPLEEN)],
                measurements=[_attenuation(measurement.spleen_hu)],
            )
        )
    return groups


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def report_sentences(measurement: Measurement, content: ContentIdentity) -> list[tuple[Code, str]]:
    """The report's text items: category sentence, each QC flag as a sentence, the model, a test-model notice."""
    items: list[tuple[Code, str]] = [(COMMENT, category_text(measurement))]
    if effective_category(measurement) == Category.NOT_ASSESSABLE:
        items += [(NOT_ASSESSABLE_REASON, flag_sentence(f)) for f in not_assessable_reasons(measurement)]
    items += [(QC_FLAG, flag_sentence(f)) for f in measurement.qc_flags]
    if content.model is not None:
        items.append((MODEL, model_text(content.model)))
        if content.model.test_model:
            items.append(
                (COMMENT, f"{TEST_MODEL_NOTICE}: this result comes from a test model trained on synthetic "
                          "phantoms; it is not for clinical use.")
            )
    return items


def _report_evaluations(measurement: Measurement, content: ContentIdentity) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations": the category as code and as sentences."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    category = effective_category(measurement)
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=STEATOSIS_OF_LIVER,
                value=CATEGORY_VALUES[category],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            *(_text(name, value) for name, value in report_sentences(measurement, content)),
        ]
    )
    return container


def _library_entry(ds: Dataset, frames: Sequence[int]) -> Dataset:
    """The image as the image library sees it: a multi-frame image described by its first referenced frame
    (Enhanced CT keeps Pixel Spacing and the plane in its functional groups)."""
    if number_of_frames(ds) > 1 or "PixelSpacing" not in ds:
        return frame_geometry_view(ds, min(frames) if frames else 0)
    return ds


def library_images(
    datasets: Sequence[Dataset], disks: Sequence[RoiDisk] = (), outlines: Mapping[str, Outline] | None = None
) -> list[Dataset]:
    """The source images the report's regions are drawn on, for the TID 1600 image library: each ROI disk's image,
    then the image each outline was cut from (its planar partner is drawn on that image's SEG frame); the middle
    image when there is none. Every source image is referenced anyway in the evidence of the SR; the library's
    descriptors (14 content items per image) are written only for the images a reader is pointed to."""
    frames: dict[int, list[int]] = {}
    for place in [*disks, *(outlines or {}).values()]:
        frames.setdefault(place.index, []).append(place.frame)
    if not frames:
        middle = len(datasets) // 2
        frames[middle] = [number_of_frames(datasets[middle]) // 2]
    return [_library_entry(datasets[index], indices) for index, indices in frames.items()]


def _concept_value(item: Dataset) -> str | None:
    sequence = item.get("ConceptNameCodeSequence")
    return str(sequence[0].CodeValue) if sequence else None


def fix_measurement_method_relationship(items: Sequence[Dataset]) -> None:
    """Measurement Method (370129005, SCT) of a measurement group is HAS CONCEPT MOD (TID 1419 row 1, TID 1501
    row 5); highdicom writes CONTAINS. Fixed in place, recursively."""
    for item in items:
        if _concept_value(item) == MEASUREMENT_METHOD.value and item.get("RelationshipType") == "CONTAINS":
            item.RelationshipType = "HAS CONCEPT MOD"
        if "ContentSequence" in item:
            fix_measurement_method_relationship(item.ContentSequence)


def _key_image_reference(key_image: Dataset) -> Dataset:
    """Pertinent Other Evidence item (Hierarchical SOP Instance Reference) of the key image."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = key_image.SOPClassUID
    instance.ReferencedSOPInstanceUID = key_image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = key_image.SeriesInstanceUID
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = key_image.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def build_sr(
    datasets: Sequence[Dataset],
    seg: BinarySegmentation,
    measurement: Measurement,
    *,
    algorithm_version: str = lpm_node.__version__,
    identity: ContentIdentity | None = None,
    roi_disks: Sequence[RoiDisk] = (),
    outlines: Mapping[str, Outline] | None = None,
    key_image: Dataset | None = None,
    predecessor: Dataset | None = None,
) -> Dataset:
    """Build a Comprehensive 3D SR (TID 1500) of ``measurement``, referencing ``seg``'s segments and the source.

    Values that are None are left out (never written as 0); the report then says why (category not assessable,
    QC flags). ``roi_disks`` become planar groups with image regions; every volumetric group gets a planar partner
    (same tracking UID) on the SEG frame of the middle disk or of the ``outlines`` ("liver", "spleen"), or, without
    a disk (for the DL-parenchymal group) or an outline, on the result statement of ``key_image``, which is then
    evidence of the report (else pertinent other evidence); ``predecessor`` (an earlier SR of the same series with
    other content) goes in the Predecessor Documents Sequence. UIDs are derived from ``identity`` (default: the
    series and the version).
    """
    content = identity_for(source_series_uid(datasets), algorithm_version, identity)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=lpm_node.ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
            serial_number=DEVICE_SERIAL,
        ),
    )
    algorithm = _algorithm(content)
    statement = None if key_image is None else _statement_region(key_image, measurement, content)
    volumetric = _measurement_groups(seg, measurement, content, algorithm, statement is not None and not roi_disks)
    partners = _partner_groups(datasets, seg, outlines or {}, roi_disks, volumetric, algorithm, statement)
    groups = [*_disk_groups(datasets, roi_disks, measurement, content, algorithm), *volumetric, *partners]
    on_key_image = key_image is not None and any(_on_instance(g, key_image) for g in partners)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=library_images(datasets, roi_disks, outlines),
    )
    report[0].ContentSequence.append(_report_evaluations(measurement, content))
    fix_measurement_method_relationship(report[0].ContentSequence)
    previous = None
    if predecessor is not None and predecessor.SOPInstanceUID != content.uid("sr-instance"):
        previous = [predecessor]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*datasets, seg, *([key_image] if on_key_image else [])],
        content=report[0],
        series_instance_uid=content.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=content.uid("sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous,
    )
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = content.software_version
    sr.DeviceSerialNumber = DEVICE_SERIAL
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    if key_image is not None and not on_key_image:  # else it is in the Current Requested Procedure Evidence
        sr.PertinentOtherEvidenceSequence = [_key_image_reference(key_image)]
    stamp_context(sr, datasets[0])
    return sr

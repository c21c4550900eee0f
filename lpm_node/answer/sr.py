"""Comprehensive 3D SR with a TID 1500 Measurement Report of the node's liver attenuation measurement."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import lpm_node
from lpm_node.answer.frames import (
    DEVICE_SERIAL,
    MANUFACTURER,
    MODEL_NAME,
    SR_SERIES_NUMBER,
    number_of_frames,
    source_series_uid,
)
from lpm_node.answer.seg import ARTIFICIAL_INTELLIGENCE, LIVER, SPLEEN, segment_number
from lpm_node.answer.uids import derive_uid
from lpm_node.imaging.measurement import NO_STEATOSIS, NOT_ASSESSABLE, STEATOSIS, Measurement

SERIES_DESCRIPTION = "Liver attenuation report (lpm-node)"

# Local coding scheme for the node's own concepts (declared in CodingSchemeIdentificationSequence).
LOCAL_SCHEME = "99LPM"
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
HU_DECIMALS = 2  # values are written rounded to 0.01 HU and 0.1 ml
ML_DECIMALS = 1
ML = Code("ml", "UCUM", "milliliter")
MEAN = Code("373098007", "SCT", "Mean")
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
VOLUME = Code("118565006", "SCT", "Volume")
PARENCHYMA = Code("91772007", "SCT", "Parenchyma")
STEATOSIS_OF_LIVER = Code("197321007", "SCT", "Steatosis of liver")
PRESENT = Code("52101004", "SCT", "Present")
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
COMPUTED_TOMOGRAPHY = Code("77477000", "SCT", "Computed Tomography")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")

METHOD_DL_PARENCHYMAL = Code("DLPAR", LOCAL_SCHEME, "DL-parenchymal three-disk ROI (Zhang et al. 2024)")
METHOD_ROBUST = Code("ROBUSTPAR", LOCAL_SCHEME, "Robust parenchymal: liver eroded 5 mm, 3 robust-SD clipped mean")
METHOD_VOLUMETRIC = Code("DLVOL", LOCAL_SCHEME, "DL-volumetric: mean over the whole liver mask")
METHOD_LIVER_MINUS_SPLEEN = Code("LMS", LOCAL_SCHEME, "Liver minus spleen attenuation")
STEATOSIS_CATEGORY = Code("CATEGORY", LOCAL_SCHEME, "Hepatic steatosis category")
QC_FLAG = Code("QCFLAG", LOCAL_SCHEME, "Quality control flag")
CATEGORY_CODES = {
    STEATOSIS: Code("MODSEV", LOCAL_SCHEME, "Moderate-to-severe hepatic steatosis"),
    NO_STEATOSIS: Code("NOMODSEV", LOCAL_SCHEME, "No moderate-to-severe hepatic steatosis"),
    NOT_ASSESSABLE: Code("NOTASSESSABLE", LOCAL_SCHEME, "Not assessable"),
}
# "Steatosis of liver" is coded only where the method says something about it: present (moderate-to-severe) or
# indeterminate. Below-threshold is not "absent" (mild steatosis stays possible): the category code says it.
STEATOSIS_PRESENCE = {STEATOSIS: PRESENT, NOT_ASSESSABLE: INDETERMINATE}

TRACKING_DL_PARENCHYMAL = "DL-parenchymal ROI"
TRACKING_ROBUST = "Liver parenchyma, robust estimate"
TRACKING_LIVER = "Whole liver (DL-volumetric)"
TRACKING_SPLEEN = "Spleen"
TRACKING_LIVER_MINUS_SPLEEN = "Liver minus spleen"


def _coding_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "lpm-node local concepts"
    item.CodingSchemeResponsibleOrganization = "lpm-node"
    return item


QC_FLAG_MEANINGS = {
    "no_liver": "No liver found",
    "roi_outside_liver": "ROI not fully inside the liver",
    "liver_cut_inferior": "Liver cut by the inferior end of the scan",
    "liver_cut_superior": "Liver cut by the superior end of the scan",
    "little_liver": "Too little liver in view",
    "roi_noisy": "High noise in the ROI",
    "roi_on_edge_slices": "ROI slices moved off the largest-liver slice (scan edge)",
    "roi_clipped": "ROI clipped at the image border",
    "roi_slice_without_liver": "An ROI slice holds no liver",
    "off_method_grid": "Measured off the 0.7 x 0.7 x 2.5 mm method grid",
    "no_spleen": "No spleen found",
}


def qc_flag_code(flag: str) -> hd.sr.CodedConcept:
    """A local code for one QC flag: the flag's name as code value, a readable meaning."""
    return hd.sr.CodedConcept(flag, LOCAL_SCHEME, QC_FLAG_MEANINGS.get(flag, flag)[:64])


def category_text(measurement: Measurement) -> str:
    """One sentence stating the category, the value it rests on and the threshold (or why it is not assessable)."""
    threshold = f"{measurement.threshold_hu:g} HU"
    if measurement.category == NOT_ASSESSABLE or measurement.dl_parenchymal_hu is None:
        reasons = ", ".join(measurement.qc_flags) or "no DL-parenchymal value"
        return f"Not assessable ({reasons}); no attenuation value is reported. Threshold {threshold}."
    value = f"DL-parenchymal attenuation {measurement.dl_parenchymal_hu:.1f} HU"
    if measurement.category == STEATOSIS:
        return f"Moderate-to-severe hepatic steatosis: {value} < {threshold}."
    return f"No moderate-to-severe hepatic steatosis: {value} >= {threshold}."


def _attenuation(value: float, derivation: Code = MEAN, method: Code | None = None) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=ATTENUATION, value=round(float(value), HU_DECIMALS), unit=HU, derivation=derivation, method=method
    )


def _tracking(series_uid: str, version: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derive_uid(series_uid, version, f"tracking-{label}"), identifier=label)


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
    series_uid: str, version: str, label: str, seg: Dataset, key: str, algorithm: hd.sr.AlgorithmIdentification
) -> dict:
    """Common arguments of a TID 1411 group (tracking identifier, segment, algorithm)."""
    segment = _referenced_segment(seg, key, series_uid)
    if segment is None:
        raise ValueError(f"the SEG has no segment for {key!r}")
    return {
        "tracking_identifier": _tracking(series_uid, version, label),
        "referenced_segment": segment,
        "algorithm_id": algorithm,
    }


def _category_evaluations(measurement: Measurement) -> list[hd.sr.QualitativeEvaluation]:
    category = measurement.category if measurement.dl_parenchymal_hu is not None else NOT_ASSESSABLE
    evaluations = []
    if category in STEATOSIS_PRESENCE:
        evaluations.append(hd.sr.QualitativeEvaluation(STEATOSIS_OF_LIVER, STEATOSIS_PRESENCE[category]))
    evaluations.append(hd.sr.QualitativeEvaluation(STEATOSIS_CATEGORY, CATEGORY_CODES[category]))
    evaluations += [hd.sr.QualitativeEvaluation(QC_FLAG, qc_flag_code(flag)) for flag in measurement.qc_flags]
    return evaluations


def _measurement_groups(
    seg: Dataset, measurement: Measurement, series_uid: str, version: str
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]:
    algorithm = hd.sr.AlgorithmIdentification(
        name=lpm_node.ALGORITHM_NAME, version=version, family=ARTIFICIAL_INTELLIGENCE
    )
    liver_site = [hd.sr.FindingSite(LIVER)]
    groups: list = []
    has_roi = segment_number(seg, "roi") is not None
    roi_key = "roi" if has_roi else "liver"
    # The DL-parenchymal group always exists: it carries the category, also when the value is not assessable.
    roi_measurements = []
    if measurement.dl_parenchymal_hu is not None:
        roi_measurements.append(_attenuation(measurement.dl_parenchymal_hu))
        if measurement.roi_sd_hu is not None:
            roi_measurements.append(_attenuation(measurement.roi_sd_hu, STANDARD_DEVIATION))
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            **_group_kwargs(series_uid, version, TRACKING_DL_PARENCHYMAL, seg, roi_key, algorithm),
            finding_type=PARENCHYMA,
            method=METHOD_DL_PARENCHYMAL,
            finding_sites=liver_site,
            measurements=roi_measurements or None,
            qualitative_evaluations=_category_evaluations(measurement),
        )
    )
    if measurement.robust_parenchymal_hu is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(series_uid, version, TRACKING_ROBUST, seg, "liver", algorithm),
                finding_type=PARENCHYMA,
                method=METHOD_ROBUST,
                finding_sites=liver_site,
                measurements=[_attenuation(measurement.robust_parenchymal_hu, MEAN, METHOD_ROBUST)],
            )
        )
    liver_measurements = []
    if measurement.dl_volumetric_hu is not None:
        liver_measurements.append(_attenuation(measurement.dl_volumetric_hu))
    if measurement.liver_volume_ml and measurement.liver_volume_ml > 0:
        liver_measurements.append(
            hd.sr.Measurement(name=VOLUME, value=round(float(measurement.liver_volume_ml), ML_DECIMALS), unit=ML)
        )
    if liver_measurements:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(series_uid, version, TRACKING_LIVER, seg, "liver", algorithm),
                finding_type=LIVER,
                method=METHOD_VOLUMETRIC,
                finding_sites=liver_site,
                measurements=liver_measurements,
            )
        )
    if measurement.spleen_hu is not None and segment_number(seg, "spleen") is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                **_group_kwargs(series_uid, version, TRACKING_SPLEEN, seg, "spleen", algorithm),
                finding_type=SPLEEN,
                finding_sites=[hd.sr.FindingSite(SPLEEN)],
                measurements=[_attenuation(measurement.spleen_hu)],
            )
        )
    if measurement.liver_minus_spleen_hu is not None:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(series_uid, version, TRACKING_LIVER_MINUS_SPLEEN),
                method=METHOD_LIVER_MINUS_SPLEEN,
                algorithm_id=algorithm,
                finding_sites=liver_site,
                measurements=[
                    hd.sr.Measurement(
                        name=ATTENUATION,
                        value=round(float(measurement.liver_minus_spleen_hu), HU_DECIMALS),
                        unit=HU,
                        method=METHOD_LIVER_MINUS_SPLEEN,
                    )
                ],
            )
        )
    return groups


def _report_evaluations(measurement: Measurement) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations": the category as code and as a sentence with the threshold."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    category = measurement.category if measurement.dl_parenchymal_hu is not None else NOT_ASSESSABLE
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.CodeContentItem(
                name=STEATOSIS_CATEGORY,
                value=CATEGORY_CODES[category],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=COMMENT,
                value=category_text(measurement),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    if measurement.qc_flags:
        container.ContentSequence.append(
            hd.sr.TextContentItem(
                name=QC_FLAG,
                value="QC flags: " + "; ".join(QC_FLAG_MEANINGS.get(f, f) for f in measurement.qc_flags),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return container


def _nonempty_frames(seg: Dataset) -> np.ndarray:
    """For each frame of a BINARY SEG: whether any pixel is set (read from the packed bits, no full decode)."""
    n_frames, n_pixels = number_of_frames(seg), int(seg.Rows) * int(seg.Columns)
    packed = np.frombuffer(seg.PixelData, dtype=np.uint8)
    if n_pixels % 8 == 0:
        return packed[: n_frames * n_pixels // 8].reshape(n_frames, n_pixels // 8).any(axis=1)
    bits = np.unpackbits(packed, bitorder="little")[: n_frames * n_pixels]
    return bits.reshape(n_frames, n_pixels).any(axis=1)


def library_images(datasets: Sequence[Dataset], seg: Dataset) -> list[Dataset]:
    """The source images the measurement was made on, for the TID 1600 image library.

    Those holding the ROI segment (or, without one, the liver segment); the middle image when both are empty.
    Every source image is referenced anyway in the evidence of the SR.
    """
    nonempty = _nonempty_frames(seg)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for key in ("roi", "liver"):
        number = segment_number(seg, key)
        uids: dict[str, None] = {}
        for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
            identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
            if identification[0].ReferencedSegmentNumber != number or not nonempty[frame]:
                continue
            for derivation in item.get("DerivationImageSequence", []):
                for source in derivation.SourceImageSequence:
                    uids[str(source.ReferencedSOPInstanceUID)] = None
        images = [by_uid[uid] for uid in uids if uid in by_uid]
        if images:
            return images
    return [datasets[len(datasets) // 2]]


def build_sr(
    datasets: Sequence[Dataset],
    seg: Dataset,
    measurement: Measurement,
    *,
    algorithm_version: str = lpm_node.__version__,
) -> Dataset:
    """Build a Comprehensive 3D SR (TID 1500) of ``measurement``, referencing ``seg``'s segments and the source.

    Values that are None are left out (never written as 0); the report then says why (category not assessable,
    QC flags). The robust estimate, the whole liver, the spleen and liver-minus-spleen are separate groups.
    """
    series_uid = source_series_uid(datasets)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(series_uid, algorithm_version, "device-observer"),
            name=lpm_node.ALGORITHM_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
            serial_number=DEVICE_SERIAL,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=COMPUTED_TOMOGRAPHY,
        imaging_measurements=_measurement_groups(seg, measurement, series_uid, algorithm_version),
        referenced_images=library_images(datasets, seg),
    )
    report[0].ContentSequence.append(_report_evaluations(measurement))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*datasets, seg],
        content=report[0],
        series_instance_uid=derive_uid(series_uid, algorithm_version, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derive_uid(series_uid, algorithm_version, "sr-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_identification()]
    return sr

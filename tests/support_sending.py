"""Small, valid DICOM result objects for delivery tests: a tiny CT series, a SEG, a Comprehensive 3D SR, an SC.

Built with highdicom from a three-slice 16 x 16 CT, so they carry the real SOP classes and transfer
syntaxes of the node's outputs while staying a few kilobytes each.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROWS = COLS = 16


@dataclass
class ResultFiles:
    """The written objects: (kind, path, SOPInstanceUID) triples plus the source CT files."""

    study_uid: str
    series_uid: str
    ct: list[Path]
    objects: list[tuple[str, Path, str]]

    def uids(self) -> list[str]:
        return [uid for _, _, uid in self.objects]


def write_ct(out_dir: Path, *, patient_id: str = "LPM-TEST-1", slices: int = 3) -> list[Path]:
    """Write a tiny axial CT series (uncompressed, explicit VR little endian)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", patient_id, "", "O"
        ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "A1", "1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "lpm-test", 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [0.0, 0.0, float(i * 2.5)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP = 120
        ds.PixelData = (np.full((ROWS, COLS), 50, dtype=np.int16) + i).tobytes()
        path = out_dir / f"ct_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_results(out_dir: Path, *, patient_id: str = "LPM-TEST-1") -> ResultFiles:
    """Write a CT series and a SEG, a Comprehensive 3D SR and a Secondary Capture derived from it."""
    ct_paths = write_ct(out_dir / "ct", patient_id=patient_id)
    source = [hd.imread(p) for p in ct_paths]
    out = out_dir / "results"
    out.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((len(source), ROWS, COLS), dtype=bool)
    mask[:, 4:12, 4:12] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="lpm-test", version="0", family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Liver",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lpm-test",
        manufacturer_model_name="lpm-test",
        software_versions="0",
        device_serial_number="0",
    )
    observation = hd.sr.ObservationContext()
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="liver"),
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.AttenuationCoefficient if hasattr(codes.DCM, "AttenuationCoefficient")
                else hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient"),
                value=50.0,
                unit=hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit"),
            )
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=source,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="lpm-test",
    )
    rgb = np.zeros((ROWS, COLS, 3), dtype=np.uint8)
    rgb[4:12, 4:12, 0] = 255
    ref = source[0]
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=ref.StudyInstanceUID,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=903,
        instance_number=1,
        manufacturer="lpm-test",
        patient_id=ref.PatientID,
        patient_name=ref.PatientName,
        patient_birth_date=ref.PatientBirthDate,
        patient_sex=ref.PatientSex,
        accession_number=ref.AccessionNumber,
        study_id=ref.StudyID,
        study_date=ref.StudyDate,
        study_time=ref.StudyTime,
        referring_physician_name=ref.ReferringPhysicianName,
        pixel_spacing=(0.7, 0.7),
        patient_orientation=("L", "P"),
    )
    objects = []
    for kind, ds in (("SEG", seg), ("SR", sr), ("KEY", sc)):
        path = out / f"{kind.lower()}.dcm"
        ds.save_as(path, enforce_file_format=True)
        objects.append((kind, path, str(ds.SOPInstanceUID)))
    return ResultFiles(ref.StudyInstanceUID, ref.SeriesInstanceUID, ct_paths, objects)

"""Test support for the writers: small synthetic CT series built in memory, and runners for the real validators."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"


@dataclass
class SyntheticSeries:
    """Single-frame CT datasets plus the k order a loader would give (inferior to superior) and masks in it."""

    datasets: list[Dataset]
    frame_refs: list[tuple[int, int]]
    liver: np.ndarray  # (k, rows, cols) uint8 in frame_refs order
    roi: np.ndarray


def make_ct_datasets(
    n_slices: int = 12,
    size: int = 64,
    *,
    feet_first: bool = False,
    spacing: float = 0.8,
    thickness: float = 2.5,
    seed: int = 0,
) -> SyntheticSeries:
    """CT Image Storage datasets of one series; instance order head-to-feet when ``feet_first`` is False.

    k runs from the inferior (lowest z) slice up, like the loader's LPS volume; the liver is an ellipsoid
    and the ROI a small square inside it on the middle slices.
    """
    rng = np.random.default_rng(seed)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    z = np.arange(n_slices)
    yy, xx = np.mgrid[:size, :size]
    liver = np.zeros((n_slices, size, size), np.uint8)
    roi = np.zeros_like(liver)
    for k in z:
        radius = size * 0.3 * np.sqrt(max(0.0, 1 - ((k - n_slices / 2) / (n_slices / 2 + 1)) ** 2))
        liver[k] = ((yy - size * 0.5) ** 2 + (xx - size * 0.4) ** 2) < radius**2
    for k in (n_slices // 2 - 2, n_slices // 2, n_slices // 2 + 2):
        if 0 <= k < n_slices:
            roi[k, size // 2 - 3 : size // 2 + 3, int(size * 0.3) : int(size * 0.3) + 6] = 1
    datasets: list[Dataset] = []
    # Instance order: head-first series are acquired from the top (highest z) down; feet-first from the bottom up.
    order = list(z) if feet_first else list(z[::-1])
    for number, k in enumerate(order, start=1):
        hu = np.where(liver[k] > 0, rng.normal(50, 10, (size, size)), -100.0)
        datasets.append(_ct_dataset(hu, k, number, study, series, frame_of_reference, spacing, thickness, size))
    frame_refs = [(order.index(k), 0) for k in z]
    return SyntheticSeries(datasets, frame_refs, liver, roi)


def _ct_dataset(
    hu: np.ndarray,
    k: int,
    number: int,
    study: str,
    series: str,
    frame_of_reference: str,
    spacing: float,
    thickness: float,
    size: int,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Writers", "WRT-001", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "Synthetic", 3, number
    ds.BodyPartExamined = "CHEST"
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-size * spacing / 2, -size * spacing / 2, -300.0 + k * thickness]
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = (np.clip(np.rint(hu), -1024, 3000) + 1024).astype(np.int16).tobytes()
    return ds


def run_dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dicom3tools' dciodvfy on one file."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if "Error" in ln], [ln for ln in lines if ln.startswith("Warning")]


def read_seg_with_dcmqi(seg_path: Path, out_dir: Path) -> dict[str, sitk.Image]:
    """Read a SEG back with dcmqi's segimage2itkimage: {segment label: image} (NIfTI via SimpleITK, LPS)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(SEGIMAGE2ITKIMAGE),
        "--inputDICOM",
        str(seg_path),
        "--outputDirectory",
        str(out_dir),
        "--outputType",
        "nifti",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"segimage2itkimage failed: {proc.stdout}\n{proc.stderr}")
    meta = json.loads((out_dir / "meta.json").read_text())
    images: dict[str, sitk.Image] = {}
    for position, attributes in enumerate(meta["segmentAttributes"], start=1):
        labels = sitk.ReadImage(str(out_dir / f"{position}.nii.gz"))
        for attr in attributes:
            images[attr["SegmentLabel"]] = sitk.Cast(labels == int(attr["labelID"]), sitk.sitkUInt8)
    return images

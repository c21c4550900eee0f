"""Writers: SEG, TID 1500 SR and key image, checked with dciodvfy, dcmqi, dsrdump and highdicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.uid import UID

from lpm_node.answer import (
    build_key_image,
    build_seg,
    build_sr,
    derive_uid,
    nearest_source_slice,
    segment_number,
    write_dataset,
)
from lpm_node.answer.build import HIGHDICOM_TABLE_LOADERS, warm_writers
from lpm_node.answer.geometry import Outline, RoiDisk
from lpm_node.answer.keyimage import LIVER_COLOUR, ROI_COLOUR, result_text, series_description
from lpm_node.answer.seg import ANATOMICAL_STRUCTURE, LIVER, BinarySegmentation
from lpm_node.demo.phantom import Phantom, make_phantom, write_ct_series
from lpm_node.imaging.loading import CTSeries, load_series
from lpm_node.imaging.measurement import Category, Measurement, dl_parenchymal_roi, flag_sentence, measure
from tests.support_writers import (
    SEGIMAGE2ITKIMAGE,
    SyntheticSeries,
    make_ct_datasets,
    read_seg_with_dcmqi,
    run_dciodvfy,
)

pytestmark = pytest.mark.timeout(300)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk (dsrdump) not installed")
needs_dcmqi = pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi not installed")


def _measurement(**overrides) -> Measurement:
    values = dict(
        dl_parenchymal_hu=31.75,
        dl_volumetric_hu=36.25,
        liver_volume_ml=1534.5,
        category=Category.STEATOSIS,
        threshold_hu=40.0,
        roi_slices=[13, 15, 17],
        roi_centres=[[13, 200, 150], [15, 198, 149], [17, 201, 152]],
        roi_pixels=[401, 401, 401],
        roi_sd_hu=7.5,
        robust_parenchymal_hu=33.5,
        roi_in_liver_fraction=1.0,
        qc_flags=["liver_cut_inferior"],
        spleen_hu=48.5,
        liver_minus_spleen_hu=-16.75,
    )
    values.update(overrides)
    return Measurement(**values)


def _masks(series: SyntheticSeries, spleen: bool = False) -> dict[str, np.ndarray]:
    masks = {"liver": series.liver, "roi": series.roi}
    if spleen:
        masks["spleen"] = np.roll(series.roi, 5, axis=2)
    return masks


def _grid_image(series: SyntheticSeries, mask: np.ndarray) -> sitk.Image:
    """The mask as an image on the source grid (k order of frame_refs, geometry from the source datasets)."""
    first = series.datasets[series.frame_refs[0][0]]
    second = series.datasets[series.frame_refs[1][0]]
    origin = np.array(first.ImagePositionPatient, float)
    step = np.array(second.ImagePositionPatient, float) - origin
    row, col = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetOrigin(tuple(origin))
    image.SetSpacing((float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), float(np.linalg.norm(step))))
    image.SetDirection(tuple(np.column_stack([row, col, step / np.linalg.norm(step)]).ravel()))
    return image


def _on_grid(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled)


# --- UIDs -----------------------------------------------------------------------------------------------------------


def test_derive_uid_is_deterministic_valid_and_distinct() -> None:
    uid = derive_uid("1.2.840.99.1", "0.1.0", "seg-instance")
    assert uid == derive_uid("1.2.840.99.1", "0.1.0", "seg-instance")
    assert UID(uid).is_valid and len(uid) <= 64
    others = {
        derive_uid("1.2.840.99.1", "0.1.1", "seg-instance"),
        derive_uid("1.2.840.99.2", "0.1.0", "seg-instance"),
        derive_uid("1.2.840.99.1", "0.1.0", "sr-instance"),
    }
    assert uid not in others and len(others) == 3


# --- SEG ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """A small chest phantom (40 slices of 128 x 128 at 2.8 mm: the whole body in view)."""
    return make_phantom(35.0, n_slices=40, size=128, pixel_spacing=2.8)


def _phantom_image(ph: Phantom, mask: np.ndarray) -> sitk.Image:
    """A (z, y, x) mask on the phantom's own geometry (independent of the loader and the writers)."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetOrigin(ph.origin)
    image.SetSpacing(tuple(reversed(ph.spacing)))
    return image


def _load(ph: Phantom, out_dir: Path, feet_first: bool, drop: int | None = None) -> CTSeries:
    paths = write_ct_series(ph, out_dir, feet_first=feet_first)
    if drop is not None:
        paths[drop].unlink()
        paths = [p for p in paths if p.exists()]
    return load_series(paths)


@needs_dcmqi
@needs_dciodvfy
@pytest.mark.parametrize("feet_first", [False, True], ids=["head_first", "feet_first"])
@pytest.mark.parametrize("omit_empty_frames", [True, False], ids=["omit_empty", "all_frames"])
def test_seg_of_phantom_series_validates_and_dcmqi_reads_back_the_masks(
    tmp_path: Path, phantom: Phantom, feet_first: bool, omit_empty_frames: bool
) -> None:
    series = _load(phantom, tmp_path / "ct", feet_first)
    liver = phantom.masks["liver"]
    roi, _, _ = dl_parenchymal_roi(liver)
    masks = {"liver": liver, "roi": roi, "spleen": phantom.masks["spleen"]}
    seg = build_seg(series.datasets, series.frame_refs, masks, omit_empty_frames=omit_empty_frames)
    path = write_dataset(seg, tmp_path / "seg.dcm")
    errors, warnings = run_dciodvfy(path)
    assert errors == [], warnings
    liver_frames = [
        item
        for item in seg.PerFrameFunctionalGroupsSequence
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
    ]
    expected = int(np.count_nonzero(liver.any(axis=(1, 2)))) if omit_empty_frames else liver.shape[0]
    assert len(liver_frames) == expected
    assert not liver[0].any()  # the phantom has liver-free slices, so omitting empty frames makes a difference
    images = read_seg_with_dcmqi(path, tmp_path / "dcmqi")
    assert set(images) == {"Liver", "DL-parenchymal ROI", "Spleen"}
    for label, mask in (("Liver", liver), ("DL-parenchymal ROI", roi), ("Spleen", phantom.masks["spleen"])):
        np.testing.assert_array_equal(_on_grid(images[label], _phantom_image(phantom, mask)), mask, err_msg=label)


@needs_dcmqi
def test_seg_leaves_out_slices_the_loader_interpolated(tmp_path: Path, phantom: Phantom) -> None:
    series = _load(phantom, tmp_path / "ct", feet_first=False, drop=15)  # instance 16 (z index 24) missing
    gaps = [k for k, ref in enumerate(series.frame_refs) if tuple(ref) == (-1, -1)]
    assert gaps == [24]
    liver = phantom.masks["liver"]
    seg = build_seg(series.datasets, series.frame_refs, {"liver": liver}, omit_empty_frames=False)
    assert seg.NumberOfFrames == liver.shape[0] - 1
    images = read_seg_with_dcmqi(write_dataset(seg, tmp_path / "seg.dcm"), tmp_path / "dcmqi")
    back = _on_grid(images["Liver"], _phantom_image(phantom, liver))
    kept = [k for k in range(liver.shape[0]) if k not in gaps]
    np.testing.assert_array_equal(back[kept], liver[kept])
    assert nearest_source_slice(series.frame_refs, 24) in (23, 25)
    with pytest.raises(ValueError, match="interpolated"):
        build_key_image(series.datasets, series.frame_refs, 24, liver[24], liver[24], _measurement())


@needs_dciodvfy
@needs_dsrdump
def test_writers_on_a_measured_phantom_are_consistent(tmp_path: Path, phantom: Phantom) -> None:
    series = _load(phantom, tmp_path / "ct", feet_first=True)
    hu = sitk.GetArrayFromImage(series.image)
    liver = phantom.masks["liver"]
    measurement, roi = measure(hu, liver, phantom.spacing, spleen=phantom.masks["spleen"])
    seg = build_seg(series.datasets, series.frame_refs, {"liver": liver, "roi": roi, "spleen": phantom.masks["spleen"]})
    sr = build_sr(series.datasets, seg, measurement)
    k = measurement.roi_slices[1]
    key = build_key_image(series.datasets, series.frame_refs, k, roi[k], liver[k], measurement)
    for name, ds in (("seg", seg), ("sr", sr), ("key", key)):
        errors, warnings = run_dciodvfy(write_dataset(ds, tmp_path / f"{name}.dcm"))
        assert errors == [], (name, warnings)
        assert ds.StudyInstanceUID == series.study_instance_uid
        assert ds.PatientID == series.datasets[0].PatientID
    dump = _dsrdump(tmp_path / "sr.dcm")
    assert f'Attenuation Coefficient")="{round(measurement.dl_parenchymal_hu, 2)}"' in dump
    read = hd.sr.srread(tmp_path / "sr.dcm")
    groups = {g.tracking_identifier: g for g in read.content.get_volumetric_roi_measurement_groups()}
    (mean,) = [
        m for m in groups["DL-parenchymal ROI"].get_measurements()
        if m.derivation is not None and m.derivation.value == "373098007" and m.method.value == "DLPAR"
    ]
    assert mean.value == pytest.approx(measurement.dl_parenchymal_hu, abs=0.005)
    assert groups["DL-parenchymal ROI"].referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert groups["DL-parenchymal ROI"].referenced_segment.referenced_segment_numbers == [2]
    middle = series.datasets[len(series.datasets) // 2].SOPInstanceUID
    assert _library(read) == [middle]  # no region drawn: the middle image
    evidence_uids = {
        item.ReferencedSOPInstanceUID
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert {ds.SOPInstanceUID for ds in series.datasets} | {seg.SOPInstanceUID} == evidence_uids
    # with ROI disks and outlines: the images they are drawn on, disks first, each once
    disks = [RoiDisk(index=series.frame_refs[k][0], frame=series.frame_refs[k][1], centre=(30.0, 30.0), radius=4.0,
                     mean_hu=50.0, pixels=49, label=f"slice {k}") for k in measurement.roi_slices]
    outline = Outline(index=series.frame_refs[k][0], frame=series.frame_refs[k][1],
                      points=((20.0, 20.0), (40.0, 20.0), (40.0, 40.0)))
    drawn = build_sr(series.datasets, seg, measurement, roi_disks=disks, outlines={"liver": outline})
    path = write_dataset(drawn, tmp_path / "sr-drawn.dcm")
    assert run_dciodvfy(path)[0] == []
    roi_images = [series.datasets[series.frame_refs[k][0]].SOPInstanceUID for k in measurement.roi_slices]
    assert len(roi_images) == 3 and _library(hd.sr.srread(path)) == roi_images  # the outline's image is a disk's
    regions = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in hd.sr.utils.find_content_items(drawn.ContentSequence[-2], recursive=True)
        if item.ValueType == "IMAGE" and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID != seg.SOPInstanceUID
    }
    assert regions == set(roi_images)


def _library(sr: Dataset) -> list[str]:
    """The SOP Instance UIDs of an SR's TID 1600 image library, in order."""
    (library,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in hd.sr.utils.find_content_items(library, recursive=True)
        if item.ValueType == "IMAGE"
    ]


def test_seg_is_binary_uncompressed_aligned_with_source_instances() -> None:
    series = make_ct_datasets(n_slices=10, size=48, feet_first=True)
    seg = build_seg(series.datasets, series.frame_refs, _masks(series), omit_empty_frames=False)
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    assert seg.SeriesDescription == "AI liver segmentation (lpm-node)"
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in by_uid[source].ImagePositionPatient])
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Liver", "DL-parenchymal ROI"]
    liver = seg.SegmentSequence[0]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # CID 7150 Anatomical Structure
    assert seg.ContentCreatorName == "lpm-node^^^^"
    assert seg.SeriesDate and seg.SeriesTime
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    assert liver.SegmentAlgorithmName == "lpm-node DL-parenchymal"
    read = hd.seg.Segmentation.from_dataset(seg)
    uids = [series.datasets[i].SOPInstanceUID for i, _ in series.frame_refs]
    pixels = read.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[..., 0], series.liver)
    np.testing.assert_array_equal(pixels[..., 1], series.roi)


def test_seg_and_key_image_on_a_multiframe_enhanced_ct(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom-data's eCT_Supplemental.dcm not available")
    ect = pydicom.dcmread(path)
    rows, cols = ect.Rows, ect.Columns
    liver = np.zeros((2, rows, cols), np.uint8)
    liver[0, 100:200, 120:300] = 1  # k = 0 is source frame 2 (frame_refs in reverse order)
    roi = np.zeros_like(liver)
    roi[0, 140:150, 150:160] = 1
    seg = build_seg([ect], [(0, 1), (0, 0)], {"liver": liver, "roi": roi})
    assert seg.NumberOfFrames == 2  # one frame per segment on the only non-empty source frame
    read = hd.seg.Segmentation.from_dataset(seg)
    pixels = read.get_pixels_by_source_frame(ect.SOPInstanceUID, [1, 2], segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[1, ..., 0], liver[0])
    np.testing.assert_array_equal(pixels[1, ..., 1], roi[0])
    assert not pixels[0].any()
    key = build_key_image([ect], [(0, 1), (0, 0)], 0, roi[0], liver[0], _measurement())
    assert key.SourceImageSequence[0].ReferencedFrameNumber == 2
    if shutil.which("dciodvfy"):
        for name, ds in (("seg", seg), ("key", key)):
            errors, warnings = run_dciodvfy(write_dataset(ds, tmp_path / f"{name}.dcm"))
            assert errors == [], (name, warnings)


def test_seg_rejects_masks_that_do_not_fit() -> None:
    series = make_ct_datasets(n_slices=6, size=32)
    with pytest.raises(ValueError):
        build_seg(series.datasets, series.frame_refs, {"liver": series.liver[:5]})
    with pytest.raises(ValueError):
        build_seg(series.datasets, series.frame_refs, {"roi": series.roi})
    with pytest.raises(ValueError):
        build_seg(series.datasets, [(0, 0), (0, 0)], {"liver": series.liver[:2]})


# --- SR -------------------------------------------------------------------------------------------------------------


def _dsrdump(path: Path) -> str:
    proc = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout


@needs_dciodvfy
@needs_dsrdump
def test_sr_validates_and_carries_the_measurement(tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=8, size=48)
    seg = build_seg(series.datasets, series.frame_refs, _masks(series, spleen=True))
    measurement = _measurement()
    sr = build_sr(series.datasets, seg, measurement)
    path = write_dataset(sr, tmp_path / "sr.dcm")
    errors, _ = run_dciodvfy(path)
    assert errors == []
    dump = _dsrdump(path)
    for value in ("31.75", "36.25", "1534.5", "33.5", "48.5", "-16.75"):
        assert f'="{value}"' in dump, value
    assert "Moderate-to-severe hepatic steatosis" in dump
    assert "< 40 HU" in dump
    assert '"Steatosis of liver")=(371924009,SCT,"Moderate to Severe")' in dump
    assert flag_sentence("liver_cut_inferior") in dump  # the flag's sentence, never its name
    assert "liver_cut_inferior" not in dump.replace("(liver_cut_inferior,99LPM", "")
    assert '(370129005,SCT,"Measurement Method")' not in dump  # dsrdump: concept names only
    assert "<has concept mod CODE:(,,\"Measurement Method\")" in dump
    assert "<contains CODE:(,,\"Measurement Method\")" not in dump

    read = hd.sr.srread(path)
    assert read.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    groups = {g.tracking_identifier: g for g in read.content.get_volumetric_roi_measurement_groups()}
    roi_group = groups["DL-parenchymal ROI"]
    assert roi_group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert roi_group.referenced_segment.referenced_segment_numbers == [segment_number(seg, "roi")]
    means = {
        name: [m.value for m in g.get_measurements(name=hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient"))]
        for name, g in groups.items()
    }
    assert means["DL-parenchymal ROI"][0] == pytest.approx(measurement.dl_parenchymal_hu)
    assert means["Whole liver (DL-volumetric)"] == [pytest.approx(measurement.dl_volumetric_hu)]
    assert means["Liver parenchyma, robust estimate"] == [pytest.approx(measurement.robust_parenchymal_hu)]
    assert means["Spleen"] == [pytest.approx(measurement.spleen_hu)]
    volume = groups["Whole liver (DL-volumetric)"].get_measurements(
        name=hd.sr.CodedConcept("118565006", "SCT", "Volume")
    )
    assert volume[0].value == pytest.approx(measurement.liver_volume_ml) and volume[0].unit.value == "ml"
    assert groups["Whole liver (DL-volumetric)"].referenced_segment.referenced_segment_numbers == [1]
    evaluations = {q.name.meaning: q.value for q in roi_group.get_qualitative_evaluations()}
    assert evaluations["Steatosis of liver"].value == "371924009"  # CID 3716 Moderate to severe
    evidence = {
        item.SeriesInstanceUID for item in read.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert evidence == {series.datasets[0].SeriesInstanceUID, seg.SeriesInstanceUID}


@needs_dciodvfy
@needs_dsrdump
def test_sr_not_assessable_has_no_attenuation_values(tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=8, size=48)
    seg = build_seg(series.datasets, series.frame_refs, {"liver": np.zeros_like(series.liver)})
    measurement = _measurement(
        dl_parenchymal_hu=None,
        dl_volumetric_hu=None,
        liver_volume_ml=0.0,
        category=Category.NOT_ASSESSABLE,
        roi_sd_hu=None,
        robust_parenchymal_hu=None,
        spleen_hu=None,
        liver_minus_spleen_hu=None,
        qc_flags=["no_liver"],
        not_assessable_reasons=["no_liver"],
    )
    sr = build_sr(series.datasets, seg, measurement)
    path = write_dataset(sr, tmp_path / "sr.dcm")
    errors, _ = run_dciodvfy(path)
    assert errors == []
    dump = _dsrdump(path)
    assert "hnsf" not in dump and "NUM:" not in dump.split("Imaging Measurements")[1]
    assert '"Steatosis of liver")=(373068000,SCT,"Undetermined")' in dump
    assert "Not assessable. No liver was found in the scan." in dump
    assert '"Reason not assessable")=(no_liver,99LPM,"No liver was found in the scan")' in dump
    read = hd.sr.srread(path)
    (group,) = read.content.get_volumetric_roi_measurement_groups()
    assert group.get_measurements() == []


@needs_dciodvfy
def test_sr_without_an_roi_draws_its_result_on_the_key_image(tmp_path: Path) -> None:
    """No liver, no ROI disk: the DL-parenchymal group's planar partner (a viewer that merges groups by tracking UID
    needs one) frames the result statement burnt into the key image, and neither carries a Finding Site (a viewer
    prints it as a bare code beside the frame); the key image is then evidence of the report."""
    series = make_ct_datasets(n_slices=6, size=96)
    empty = np.zeros_like(series.liver)
    seg = build_seg(series.datasets, series.frame_refs, {"liver": empty})
    measurement = _measurement(
        dl_parenchymal_hu=None, dl_volumetric_hu=None, liver_volume_ml=0.0, category=Category.NOT_ASSESSABLE,
        roi_sd_hu=None, robust_parenchymal_hu=None, spleen_hu=None, liver_minus_spleen_hu=None,
        qc_flags=["no_liver"], not_assessable_reasons=["no_liver"],
    )
    key = build_key_image(series.datasets, series.frame_refs, 2, empty[2], empty[2], measurement)
    sr = build_sr(series.datasets, seg, measurement, key_image=key)
    errors, _ = run_dciodvfy(write_dataset(sr, tmp_path / "sr.dcm"))
    assert errors == []
    read = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (volumetric,) = read.content.get_volumetric_roi_measurement_groups()
    (partner,) = read.content.get_planar_roi_measurement_groups()
    assert partner.tracking_uid == volumetric.tracking_uid
    assert volumetric.finding_sites == [] and partner.finding_sites == []
    (category,) = [e for e in volumetric.get_qualitative_evaluations() if e.name.value == "197321007"]
    assert category.value.value == "373068000"  # undetermined
    reference = partner.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == key.SOPInstanceUID and "ReferencedFrameNumber" not in reference
    points = np.asarray(partner.roi.value)
    assert partner.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE and np.array_equal(points[0], points[-1])
    left, top, right, bottom = result_text(key.Rows, key.Columns, measurement).box()
    assert points[:, 0].min() < left and points[:, 1].min() < top
    assert right < points[:, 0].max() <= key.Columns and bottom < points[:, 1].max() <= key.Rows
    rgb = key.pixel_array
    yellow = (rgb[..., 0] > 150) & (rgb[..., 1] > 100) & (rgb[..., 2] < 80)  # the not-assessable text
    inside = np.zeros_like(yellow)
    inside[int(points[:, 1].min()):int(points[:, 1].max()) + 1, int(points[:, 0].min()):int(points[:, 0].max()) + 1] = 1
    assert yellow[inside].sum() > 20 and not yellow[~inside].any()
    evidence = {
        item.SeriesInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert evidence == {series.datasets[0].SeriesInstanceUID, seg.SeriesInstanceUID, key.SeriesInstanceUID}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_sr_below_threshold_is_not_coded_as_absent_steatosis() -> None:
    series = make_ct_datasets(n_slices=6, size=32)
    seg = build_seg(series.datasets, series.frame_refs, _masks(series))
    measurement = _measurement(dl_parenchymal_hu=55.0, category=Category.NO_STEATOSIS, spleen_hu=None)
    sr = build_sr(series.datasets, seg, measurement)
    read = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = {g.tracking_identifier: g for g in read.content.get_volumetric_roi_measurement_groups()}
    assert "Spleen" not in groups
    evaluations = {q.name.meaning: q.value.meaning for q in groups["DL-parenchymal ROI"].get_qualitative_evaluations()}
    # below the threshold is not "absent": mild stays possible
    assert evaluations["Steatosis of liver"] == "Not moderate to severe"


# --- key image ------------------------------------------------------------------------------------------------------


@needs_dciodvfy
def test_key_image_validates_in_the_source_study_with_outlines(tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=8, size=128, feet_first=True)
    k = 4
    measurement = _measurement()
    image = build_key_image(series.datasets, series.frame_refs, k, series.roi[k], series.liver[k], measurement)
    path = write_dataset(image, tmp_path / "key.dcm")
    errors, _ = run_dciodvfy(path)
    assert errors == []
    read = pydicom.dcmread(path)
    source = series.datasets[series.frame_refs[k][0]]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "AccessionNumber",
    ):
        assert read[keyword].value == source[keyword].value, keyword
    assert list(read.ImageType) == ["DERIVED", "SECONDARY"]
    assert read.BurnedInAnnotation == "YES"
    assert read.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    rgb = read.pixel_array
    assert rgb.shape == (128, 128, 3)
    assert np.any(np.all(rgb == ROI_COLOUR, axis=-1)) and np.any(np.all(rgb == LIVER_COLOUR, axis=-1))
    not_grey = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    assert not_grey[:20].sum() > 50  # the burnt-in text at the top


# --- determinism and files ------------------------------------------------------------------------------------------


def test_outputs_have_deterministic_uids() -> None:
    series = make_ct_datasets(n_slices=6, size=32)
    k = 3

    def build(version: str) -> list[str]:
        seg = build_seg(series.datasets, series.frame_refs, _masks(series), algorithm_version=version)
        sr = build_sr(series.datasets, seg, _measurement(), algorithm_version=version)
        key = build_key_image(
            series.datasets,
            series.frame_refs,
            k,
            series.roi[k],
            series.liver[k],
            _measurement(),
            algorithm_version=version,
        )
        return [uid for ds in (seg, sr, key) for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)]

    first, again, other = build("1.0.0"), build("1.0.0"), build("1.0.1")
    assert first == again
    assert len(set(first)) == 6 and not set(first) & set(other)


def test_write_dataset_is_atomic_and_readable(tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=4, size=32)
    seg = build_seg(series.datasets, series.frame_refs, _masks(series))
    path = write_dataset(seg, tmp_path / "out" / "seg.dcm")
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["seg.dcm"]
    assert pydicom.dcmread(path).SOPInstanceUID == seg.SOPInstanceUID


def test_key_image_series_description_says_the_category_in_64_characters() -> None:
    for overrides, verdict in (
        ({"category": Category.STEATOSIS}, "moderate-to-severe steatosis"),
        ({"category": Category.NO_STEATOSIS, "dl_parenchymal_hu": 55.0}, "no moderate-to-severe steatosis"),
        ({"category": Category.NOT_ASSESSABLE}, "not assessable"),
        ({"dl_parenchymal_hu": None}, "not assessable"),  # no value: never a category
    ):
        text = series_description(_measurement(**overrides))
        assert text == f"AI liver fat key image: {verdict}" and len(text) <= 64


@needs_dciodvfy
def test_key_image_not_assessable_validates_and_says_so(tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=6, size=96)
    empty = np.zeros((96, 96), np.uint8)
    measurement = _measurement(dl_parenchymal_hu=None, category=Category.NOT_ASSESSABLE, qc_flags=["no_liver"])
    image = build_key_image(series.datasets, series.frame_refs, 2, empty, empty, measurement)
    errors, _ = run_dciodvfy(write_dataset(image, tmp_path / "key.dcm"))
    assert errors == []
    rgb = image.pixel_array
    yellowish = (rgb[..., 0] > 150) & (rgb[..., 1] > 100) & (rgb[..., 2] < 80)  # the not-assessable text colour
    assert yellowish[:40].sum() > 20 and not np.any(np.all(rgb == ROI_COLOUR, axis=-1))


def test_seg_omission_matches_highdicoms_own(tmp_path: Path, phantom: Phantom) -> None:
    """Slices without any segment are left out before highdicom runs; the result equals highdicom's omission."""
    series = _load(phantom, tmp_path / "ct", feet_first=False)
    liver = phantom.masks["liver"]
    roi, _, _ = dl_parenchymal_roi(liver)
    seg = build_seg(series.datasets, series.frame_refs, {"liver": liver, "roi": roi})
    sources = [series.datasets[i] for i, _ in series.frame_refs]
    plain = hd.seg.Segmentation(
        sources,
        np.stack([liver, roi], axis=-1),
        "BINARY",
        [
            hd.seg.SegmentDescription(n, label, ANATOMICAL_STRUCTURE, LIVER, "MANUAL")
            for n, label in ((1, "Liver"), (2, "ROI"))
        ],
        hd.UID(), 1, hd.UID(), 1, "x", "x", "1", "1",
    )  # fmt: skip
    assert seg.PixelData == plain.PixelData

    def frames(ds: pydicom.Dataset) -> list[tuple]:
        return [
            (
                item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
                item.SegmentIdentificationSequence[0].ReferencedSegmentNumber,
                tuple(item.FrameContentSequence[0].DimensionIndexValues),
            )
            for item in ds.PerFrameFunctionalGroupsSequence
        ]

    def referenced(ds: pydicom.Dataset) -> set[str]:
        return {i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}

    assert frames(seg) == frames(plain)
    assert referenced(seg) == referenced(plain) == {ds.SOPInstanceUID for ds in series.datasets}
    assert {i.ReferencedSOPInstanceUID for i in seg.SourceImageSequence} == referenced(plain)
    assert seg.SegmentsOverlap == plain.SegmentsOverlap == "YES"


@pytest.mark.parametrize("overlap", [True, False])
def test_the_segment_overlap_check_agrees_with_highdicoms(overlap: bool) -> None:
    rng = np.random.default_rng(5)
    block = np.zeros((3, 4, 16, 16), dtype=np.uint8)
    block[0, :, :8] = 1
    block[1, :, 8:] = rng.integers(0, 2, (4, 8, 16))
    block[1, 2, 12, 3] = 0
    block[2, 2, 3 if overlap else 12, 3] = 1  # inside segment 1 (overlap), or where no other segment is
    pixels = block.transpose(1, 2, 3, 0)
    numbers = np.array([1, 2, 3])
    ours = BinarySegmentation._check_and_cast_pixel_array(pixels, numbers, hd.seg.SegmentationTypeValues.BINARY,
                                                          np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(
        np.ascontiguousarray(pixels), numbers, hd.seg.SegmentationTypeValues.BINARY, np.uint8)
    assert ours[1] == theirs[1] == (hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO)
    with pytest.raises(ValueError):
        BinarySegmentation._check_and_cast_pixel_array(pixels * 2, numbers, hd.seg.SegmentationTypeValues.BINARY,
                                                        np.uint8)


def test_warm_writers_loads_highdicoms_tables_of_the_standard() -> None:
    """The worker warms the writers when it loads its model: highdicom's tables are then loaded (a renamed loader
    in a new highdicom would make the warm-up silently do nothing; this says so)."""
    from highdicom import _standard_utils

    assert warm_writers() >= 0.0
    for name in HIGHDICOM_TABLE_LOADERS:
        assert getattr(_standard_utils, name).cache_info().currsize == 1

"""The node's answer by the standard: SEG, SR, key image and KOS from head-first, feet-first, Legacy Converted
Enhanced and Enhanced CT sources (and, for the validators, a not-assessable answer to a series where the model
finds no liver), checked with dciodvfy and pixelmed's validators, and read back for what a viewer and a PACS need
(image regions, references, codes, version attributes, series date)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from lpm_node.answer.build import write_answer
from lpm_node.answer.geometry import roi_disks
from lpm_node.answer.uids import DEVICE_OBSERVER_UID
from lpm_node.answer.wording import honest_decimals, hu_text
from lpm_node.core.config import Settings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.segmentation import load_segmenter
from lpm_node.node.pipeline import analyse_series
from tests.support_segmentation import FindsNoLiver
from tests.support_sources import write_multiframe
from tests.support_validators import dciodvfy_errors, have_pixelmed, pixelmed_errors, pixelmed_reports

pytestmark = pytest.mark.timeout(1200)

SOURCES = ("head_first", "feet_first", "legacy_enhanced", "enhanced")


BUNDLED_NAME = json.loads((bundled_model_folder() / "dataset.json").read_text())["name"]  # the model's own name


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each source kind processed by the pipeline with the bundled model: {source: {kind: path}}."""
    root = tmp_path_factory.mktemp("conformance")
    phantom = make_phantom(36.0, n_slices=64, size=256, pixel_spacing=1.4, seed=31)
    overrides = {"PatientAge": "054Y"}
    files = {
        "head_first": write_ct_series(phantom, root / "hf", overrides=overrides),
        "feet_first": write_ct_series(phantom, root / "ff", feet_first=True, series_number=3, overrides=overrides),
        "legacy_enhanced": [write_multiframe(phantom, root / "lce", enhanced=False)],
        "enhanced": [write_multiframe(phantom, root / "ect", enhanced=True)],
    }
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    segmenter = load_segmenter(settings.model)
    out: dict[str, dict[str, Path]] = {}
    for name, paths in files.items():
        result = analyse_series(paths, settings, segmenter)
        written = write_answer(result, settings, root / "answer" / name)
        out[name] = {obj.kind: obj.path for obj in written}
        out[name]["source"] = Path(paths[0])
        assert [k for k, _ in roi_disks(result)], name
    # not assessable before any ROI exists: the model finds no liver
    result = analyse_series(write_ct_series(phantom, root / "nl", overrides=overrides), settings,
                            FindsNoLiver(segmenter))
    assert result.measurement.not_assessable_reasons == ["no_liver"] and roi_disks(result) == []
    out["no_liver"] = {obj.kind: obj.path for obj in write_answer(result, settings, root / "answer" / "no_liver")}
    return out


def test_every_source_gives_all_four_objects(answers) -> None:
    for name in SOURCES:
        assert {"SEG", "SR", "KEY", "KOS"} <= set(answers[name]), name


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_finds_no_error(answers) -> None:
    for name in (*SOURCES, "no_liver"):
        for kind in ("SEG", "SR", "KEY", "KOS"):
            assert dciodvfy_errors(answers[name][kind]) == [], (name, kind)


@pytest.mark.skipif(not have_pixelmed(), reason="pixelmed-apps (java) not installed")
def test_pixelmed_validators_find_no_error_but_documented_limits(answers) -> None:
    paths = [answers[name][kind] for name in (*SOURCES, "no_liver") for kind in ("SEG", "SR", "KEY", "KOS")]
    errors = pixelmed_errors(paths)
    assert {path: e for path, e in errors.items() if e} == {}
    reports = pixelmed_reports([answers["enhanced"]["SR"], answers["enhanced"]["KOS"], answers["no_liver"]["SR"]])
    for lines in reports.values():  # the templates were checked, not skipped
        assert "Root Template Validation Complete" in lines and "IOD validation complete" in lines, lines[-5:]


def _read(answers, name: str, kind: str) -> pydicom.Dataset:
    return pydicom.dcmread(answers[name][kind])


def test_sr_draws_the_three_roi_disks_on_the_source_images(answers) -> None:
    for name in SOURCES:
        sr = hd.sr.srread(answers[name]["SR"])
        seg = pydicom.dcmread(answers[name]["SEG"], stop_before_pixels=True)
        source = pydicom.dcmread(answers[name]["source"], stop_before_pixels=True)
        groups = sr.content.get_planar_roi_measurement_groups()

        def on(group) -> str:  # noqa: ANN001
            return group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID

        planar = [g for g in groups if on(g) != seg.SOPInstanceUID]
        assert len(planar) == 3 and all(g.roi.graphic_type == hd.sr.GraphicTypeValues.CIRCLE for g in planar), name
        assert groups[0] is planar[0] and "(slice k)" in planar[0].tracking_identifier  # opened first
        # every volumetric group has a planar partner with the same tracking UID (OHIF merges them by it), on the SEG
        # frame it was measured from, so its values are not drawn on the CT beside the disks
        volumetric = {g.tracking_identifier: g.tracking_uid for g in sr.content.get_volumetric_roi_measurement_groups()}
        partners = [g for g in groups if on(g) == seg.SOPInstanceUID]
        assert {g.tracking_identifier: g.tracking_uid for g in partners} == volumetric, name
        assert not {g.tracking_uid for g in planar} & set(volumetric.values())
        for partner in partners:
            assert partner.get_measurements() == []
            frame = int(partner.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber)
            assert 1 <= frame <= int(seg.NumberOfFrames)
            if partner.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE:
                points = np.asarray(partner.roi.value)
                assert len(points) >= 4 and np.array_equal(points[0], points[-1])  # closed
        for group in planar:
            region = group.roi
            reference = region.ContentSequence[0].ReferencedSOPSequence[0]
            if name in ("legacy_enhanced", "enhanced"):
                assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
                assert int(reference.ReferencedFrameNumber) >= 1
            assert group.tracking_identifier.startswith("DL-parenchymal ROI")
            # one value each, named for what it is (a viewer labels the disk with it)
            (mean,) = group.get_measurements()
            assert mean.method.value in ("DLPARDISK", "DLPAR")
            assert mean.name.meaning.startswith("DL-parenchymal")
            assert 20.0 < mean.value < 50.0 and mean.unit.value == "[hnsf'U]"
            centre, edge = np.asarray(region.value)
            radius_mm = np.hypot(*(edge - centre)) * 1.4
            assert radius_mm == pytest.approx(np.sqrt(401 * 0.49 / np.pi), rel=0.02)  # the 401-pixel disk's area
        # the index slice k disk carries the pooled DL-parenchymal value, findable by its method code
        pooled = [m for g in planar for m in g.get_measurements() if m.method.value == "DLPAR"]
        assert len(pooled) == 1 and pooled[0].name.meaning == "DL-parenchymal ROI"
        assert planar[0].get_measurements() == pooled


def test_key_image_shows_the_index_slice_and_sr_and_kos_reference_it(answers) -> None:
    for name in SOURCES:
        sr, key, kos = (_read(answers, name, kind) for kind in ("SR", "KEY", "KOS"))
        middle = hd.sr.srread(answers[name]["SR"]).content.get_planar_roi_measurement_groups()[0]  # slice k's disk
        assert "(slice k)" in middle.tracking_identifier
        region_ref = middle.roi.ContentSequence[0].ReferencedSOPSequence[0]
        key_ref = key.SourceImageSequence[0]
        assert key_ref.ReferencedSOPInstanceUID == region_ref.ReferencedSOPInstanceUID, name
        assert key_ref.get("ReferencedFrameNumber") == region_ref.get("ReferencedFrameNumber"), name
        assert key.ConversionType == "WSD"
        other = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert other.ReferencedSOPInstanceUID == key.SOPInstanceUID
        selected = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
                    if item.ValueType in ("IMAGE", "COMPOSITE")}
        assert selected == {key.SOPInstanceUID, sr.SOPInstanceUID, _read(answers, name, "SEG").SOPInstanceUID}
        assert kos.StudyInstanceUID == key.StudyInstanceUID == sr.StudyInstanceUID


def test_every_object_has_series_date_study_description_and_age(answers) -> None:
    source = pydicom.dcmread(answers["head_first"]["source"], stop_before_pixels=True)
    for kind in ("SEG", "SR", "KEY", "KOS"):
        ds = _read(answers, "head_first", kind)
        assert ds.SeriesDate and ds.SeriesTime, kind
        assert ds.StudyDescription == source.StudyDescription, kind
        assert ds.PatientAge == "054Y", kind
        assert ds.SeriesDescription.startswith("AI liver"), kind
        assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID


def test_versions_model_and_one_device_observer(answers) -> None:
    observers = set()
    for name in SOURCES:
        sr = _read(answers, name, "SR")
        assert sr.SoftwareVersions and sr.ManufacturerModelName == "lpm-node DL-parenchymal"
        items = hd.sr.utils.find_content_items(sr, name=pydicom.sr.codedict.codes.DCM.DeviceObserverUID,
                                               recursive=True)
        observers |= {item.UID for item in items}
        text = " ".join(item.TextValue for item in hd.sr.utils.find_content_items(sr, recursive=True)
                        if item.ValueType == "TEXT")
        assert "TEST MODEL, NOT FOR CLINICAL USE" in text  # the bundled model made it
        assert BUNDLED_NAME in text
        seg = _read(answers, name, "SEG")
        assert seg.ContentCreatorName
        parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        assert BUNDLED_NAME in parameters and "TEST MODEL" in parameters
    assert observers == {DEVICE_OBSERVER_UID}


def test_honest_rounding_never_reads_as_the_threshold() -> None:
    assert hu_text(39.96, 40.0) == "39.96"
    assert hu_text(39.9996, 40.0) == "39.9996"
    assert hu_text(40.04, 40.0) == "40.0"
    assert hu_text(39.94, 40.0) == "39.9"
    assert hu_text(40.0, 40.0) == "40.0"
    assert honest_decimals(-0.04, 0.0) == 2

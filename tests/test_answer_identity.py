"""Output UIDs from content identity: same inputs -> same UIDs; threshold, model, version or settings changed ->
new UIDs and a predecessor reference; what the report and key image say in words."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest

from lpm_node.answer import ContentIdentity, build_key_image, build_kos, build_seg, build_sr
from lpm_node.answer.build import result_settings
from lpm_node.answer.keyimage import result_lines
from lpm_node.answer.sr import category_text, report_sentences
from lpm_node.answer.uids import instances_digest
from lpm_node.core.config import Settings
from lpm_node.imaging.measurement import Category, Measurement, flag_sentence
from lpm_node.imaging.model_identity import ModelIdentity
from tests.support_writers import make_ct_datasets

SERIES = make_ct_datasets(n_slices=6, size=32)
MODEL = ModelIdentity("Dataset001_Liver", "nnU-Net v2 3d_fullres fold 0", "ab" * 32)
TEST_MODEL = ModelIdentity("phantom_liver", "nnU-Net v2 3d_fullres fold 0", "cd" * 32, test_model=True)


def _measurement(**overrides) -> Measurement:
    values = dict(dl_parenchymal_hu=31.75, dl_volumetric_hu=36.25, liver_volume_ml=1534.5, category=Category.STEATOSIS,
                  threshold_hu=40.0, roi_sd_hu=7.5, qc_flags=["liver_cut_inferior"])
    values.update(overrides)
    return Measurement(**values)


MEASURED = [(str(ds.SOPInstanceUID), f"{i:064x}") for i, ds in enumerate(SERIES.datasets)]


def _identity(settings: Settings | None = None, model: ModelIdentity = MODEL, version: str = "1.0.0",
              instances: list[tuple[str, str]] = MEASURED):
    uid = str(SERIES.datasets[0].SeriesInstanceUID)
    return ContentIdentity(uid, version, model, result_settings(settings or Settings()), instances_digest(instances))


def _answer(identity: ContentIdentity, predecessor: pydicom.Dataset | None = None) -> list[pydicom.Dataset]:
    masks = {"liver": SERIES.liver, "roi": SERIES.roi}
    seg = build_seg(SERIES.datasets, SERIES.frame_refs, masks, identity=identity)
    key = build_key_image(SERIES.datasets, SERIES.frame_refs, 3, SERIES.roi[3], SERIES.liver[3], _measurement(),
                          identity=identity)
    sr = build_sr(SERIES.datasets, seg, _measurement(), identity=identity, key_image=key, predecessor=predecessor)
    kos = build_kos([key, sr, seg], identity, SERIES.datasets[0])
    return [seg, key, sr, kos]


def _uids(objects: list[pydicom.Dataset]) -> list[str]:
    return [uid for ds in objects for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)]


def _with(section: str, **values) -> Settings:
    settings = Settings()
    setattr(settings, section, dataclasses.replace(getattr(settings, section), **values))
    return settings


def test_same_inputs_give_the_same_uids() -> None:
    first, again = _uids(_answer(_identity())), _uids(_answer(_identity()))
    assert first == again and len(set(first)) == 8


@pytest.mark.parametrize(
    "changed",
    [
        _identity(_with("measurement", threshold_hu=41.0)),
        _identity(_with("measurement", max_roi_sd_hu=25.0)),
        _identity(_with("output", omit_empty_frames=False)),
        _identity(model=dataclasses.replace(MODEL, weights_sha256="ef" * 32)),
        _identity(model=TEST_MODEL),
        _identity(version="1.0.1"),
        _identity(instances=MEASURED[:4]),
        _identity(instances=[*MEASURED[:-1], (MEASURED[-1][0], "ff" * 32)]),
    ],
    ids=["threshold", "qc-threshold", "omit-empty-frames", "weights", "test-model", "version", "fewer-instances",
         "instance-changed"],
)
def test_any_change_gives_new_uids_and_the_sr_references_its_predecessor(changed: ContentIdentity) -> None:
    first = _answer(_identity())
    second = _answer(changed, predecessor=first[2])
    assert not set(_uids(first)) & set(_uids(second))
    (study,) = second[2].PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first[2].SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[2].SOPInstanceUID


def test_a_resend_of_the_same_content_has_no_predecessor() -> None:
    first = _answer(_identity())
    again = _answer(_identity(), predecessor=first[2])
    assert "PredecessorDocumentsSequence" not in again[2]


def test_the_instances_digest_does_not_depend_on_their_order() -> None:
    assert instances_digest(MEASURED) == instances_digest(reversed(MEASURED)) != instances_digest(MEASURED[1:])


def test_device_settings_do_not_change_the_uids() -> None:
    assert _uids(_answer(_identity(_with("model", device="cpu", threads=3)))) == _uids(_answer(_identity()))


def test_texts_show_sentences_honest_rounding_and_the_test_model() -> None:
    close = _measurement(dl_parenchymal_hu=39.96)
    assert "39.96 HU < 40 HU" in category_text(close)
    assert "40.0" not in category_text(close)
    lines = result_lines(close, TEST_MODEL)
    assert lines[0] == "TEST MODEL, NOT FOR CLINICAL USE"
    assert any("39.96 < 40 HU" in line for line in lines)
    assert any(flag_sentence("liver_cut_inferior") in line for line in lines)
    assert not any("liver_cut_inferior" in line for line in lines)
    assert any("phantom_liver" in line for line in lines)
    above = _measurement(dl_parenchymal_hu=40.04, category=Category.NO_STEATOSIS)
    assert "40.0 HU >= 40 HU" in category_text(above)
    texts = [text for _, text in report_sentences(close, _identity(model=TEST_MODEL))]
    assert any("not for clinical use" in text for text in texts)


def test_not_assessable_says_so_and_why_in_words() -> None:
    measurement = _measurement(category=Category.NOT_ASSESSABLE, qc_flags=["roi_outside_liver", "roi_noisy"],
                               not_assessable_reasons=["roi_outside_liver", "roi_noisy"])
    lines = result_lines(measurement, MODEL)
    assert lines[0] == "Not assessable"
    assert "- Part of the measurement region lies outside the segmented liver." in lines
    assert not any("_" in line for line in lines if not line.startswith("Model:"))
    text = category_text(measurement)
    assert text.startswith("Not assessable. Part of the measurement region lies outside the segmented liver.")
    assert "31.8 HU" in text and "not used for a category" in text
    # the reasons are coded in the SR
    seg = build_seg(SERIES.datasets, SERIES.frame_refs, {"liver": SERIES.liver, "roi": SERIES.roi})
    sr = build_sr(SERIES.datasets, seg, measurement)
    read = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (group,) = [g for g in read.content.get_volumetric_roi_measurement_groups()
                if g.tracking_identifier == "DL-parenchymal ROI"]
    values = [q.value.value for q in group.get_qualitative_evaluations() if q.name.value == "NAREASON"]
    assert values == ["roi_outside_liver", "roi_noisy"]
    image = build_key_image(SERIES.datasets, SERIES.frame_refs, 3, SERIES.roi[3], SERIES.liver[3], measurement)
    assert np.asarray(image.pixel_array).shape == (32, 32, 3)

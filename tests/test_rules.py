"""Eligibility rules and the one-series-per-study choice, on headers of generated CT series."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lpm_node.core.audit import Job, Series, SeriesDecision, utcnow
from lpm_node.core.config import RuleSettings
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.intake.headers import classify_kernel, read_series_facts
from lpm_node.intake.rules import RuleEngine, eligibility, find_keyword, strip_negated_contrast
from lpm_node.intake.spool import Spool

RULES = RuleSettings()


@pytest.fixture(scope="module")
def small_phantom():
    # 64 slices of 2.5 mm = 160 mm of coverage; a small matrix keeps header tests fast
    return make_phantom(n_slices=64, size=64, pixel_spacing=5.6)


def _facts(phantom, tmp: Path, **kwargs):
    paths = write_ct_series(phantom, tmp, **kwargs)
    return read_series_facts(paths)


def test_plain_chest_series_is_eligible(small_phantom, tmp_path):
    facts = _facts(small_phantom, tmp_path)
    ok, reason = eligibility(facts, RULES)
    assert ok, reason
    assert facts.slices == 64
    assert facts.slice_thickness_mm == pytest.approx(2.5)
    assert facts.z_coverage_mm == pytest.approx(160.0)
    assert facts.kernel_class == "soft"
    assert reason.startswith("eligible")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"overrides": {"ContrastBolusAgent": "IOHEXOL"}}, "contrast-enhanced: ContrastBolusAgent=IOHEXOL"),
        ({"series_description": "CHEST C+ ARTERIAL"}, "contrast-enhanced: SeriesDescription"),
        ({"series_description": "Thorax portal-venous"}, "contrast-enhanced"),
        ({"body_part": "ABDOMEN", "study_description": "CT ABD"}, "abdominal study: BodyPartExamined=ABDOMEN"),
        ({"study_description": "CT CHEST ABD PELVIS"}, "abdominal study: StudyDescription"),
        ({"overrides": {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}}, "localizer: ImageType contains LOCALIZER"),
        ({"overrides": {"ImageType": ["DERIVED", "SECONDARY", "MPR"]}}, "ImageType contains DERIVED"),
        ({"overrides": {"Modality": "MR"}}, "modality MR not in CT"),
        ({"overrides": {"SliceThickness": "10"}}, "slice thickness 10 mm outside 0.5-5 mm"),
        ({"body_part": "HEAD", "study_description": "CT HEAD", "series_description": "HEAD 2.5"},
         "not identified as chest CT"),
    ],
)
def test_rejections_name_their_reason(small_phantom, tmp_path, kwargs, expected):
    ok, reason = eligibility(_facts(small_phantom, tmp_path, **kwargs), RULES)
    assert not ok
    assert expected in reason


def test_slice_count_and_coverage_bounds(tmp_path):
    few = make_phantom(n_slices=12, size=32, pixel_spacing=11.2)
    ok, reason = eligibility(read_series_facts(write_ct_series(few, tmp_path / "few")), RULES)
    assert not ok and reason == "too few slices: 12 < 40"
    short = make_phantom(n_slices=48, size=32, pixel_spacing=11.2, slice_spacing=1.25)
    paths = write_ct_series(short, tmp_path / "short", overrides={"SliceThickness": "1.25"})
    ok, reason = eligibility(read_series_facts(paths), RULES)
    assert not ok and reason == "z-coverage 60 mm < 150 mm"


def test_keywords_whole_word_and_negation():
    assert find_keyword("CT abdication protocol", ["abd"]) is None
    assert find_keyword("CT ABD/PELVIS", ["abd"]) == "abd"
    assert find_keyword("CHEST_ABDOMEN", ["abdomen"]) == "abdomen"
    assert find_keyword("CTAB 3", ["CTA"]) is None
    assert find_keyword("Angiography chest", ["angio"]) == "angio"
    assert find_keyword("CHEST C+", ["C+"]) == "C+"
    assert find_keyword("ABC+ test", ["C+"]) is None
    contrast = RULES.contrast_keywords
    negations = ("CHEST WO CONTRAST 2.5mm", "Chest w/o contrast", "non-contrast chest",
                 "CT thorax without IV contrast", "unenhanced chest")
    for negated in negations:
        assert find_keyword(strip_negated_contrast(negated), contrast) is None, negated
    assert find_keyword(strip_negated_contrast("CHEST W CONTRAST"), contrast) == "contrast"


@pytest.mark.parametrize(
    ("kernel", "cls"),
    [("B30f", "soft"), ("Br40d", "soft"), ("B70f", "sharp"), ("Bl57d", "sharp"), ("STANDARD", "soft"),
     ("LUNG", "sharp"), ("BONEPLUS", "sharp"), ("FC03", "soft"), ("FC52", "sharp"), ("YC", "sharp"), ("", "unknown"),
     ("XYZ", "unknown")],
)
def test_kernel_classes(kernel, cls):
    assert classify_kernel(kernel) == cls


def _spool_series(spool: Spool, sessions, paths, status="complete"):
    """Put generated files in the spool and a series row, as the listener and assembler would."""
    from pydicom import dcmread

    ds = dcmread(paths[0], stop_before_pixels=True)
    folder = spool.series_dir(ds.StudyInstanceUID, ds.SeriesInstanceUID)
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (folder / f"{dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm").write_bytes(Path(p).read_bytes())
    with sessions() as session:
        session.add(Series(series_instance_uid=ds.SeriesInstanceUID, study_instance_uid=ds.StudyInstanceUID,
                           modality="CT", instance_count=len(paths), status=status, last_received_at=utcnow()))
        session.commit()
    return ds.SeriesInstanceUID


def test_one_series_per_study_prefers_soft_kernel_and_waits_for_siblings(small_phantom, tmp_path, audit_sessions):
    sessions = audit_sessions
    spool = Spool(tmp_path / "spool")
    study = "1.2.3.4.5.6.7"
    lung = _spool_series(spool, sessions, write_ct_series(
        small_phantom, tmp_path / "lung", study_uid=study, series_uid="1.2.3.4.5.6.7.1",
        series_description="CHEST LUNG 1mm", overrides={"ConvolutionKernel": "B70f", "SliceThickness": "1"}))
    soft = _spool_series(spool, sessions, write_ct_series(
        small_phantom, tmp_path / "soft", study_uid=study, series_uid="1.2.3.4.5.6.7.2"), status="receiving")
    engine = RuleEngine(sessions, spool, RULES)

    assert engine.run_once() == []  # the soft-kernel series is still being received: no choice yet
    with sessions() as s:
        assert s.scalars(select(Series.status).where(Series.series_instance_uid == lung)).one() == "eligible"
        assert s.scalars(select(Job)).all() == []

    with sessions() as s:
        s.scalars(select(Series).where(Series.series_instance_uid == soft)).one().status = "complete"
        s.commit()
    assert engine.run_once() == [soft]
    with sessions() as s:
        rows = {r.series_instance_uid: r for r in s.scalars(select(Series))}
        assert rows[soft].status == "queued" and rows[soft].reason.startswith("selected: soft kernel B30f")
        assert rows[lung].status == "not_selected" and soft in rows[lung].reason
        jobs = s.scalars(select(Job)).all()
        assert [(j.series_instance_uid, j.status) for j in jobs] == [(soft, "queued")]
        history = s.scalars(select(SeriesDecision.status).where(SeriesDecision.series_instance_uid == lung)).all()
        assert history == ["eligible", "not_selected"]

    assert engine.run_once() == []  # nothing new: never queued twice
    with sessions() as s:
        assert len(s.scalars(select(Job)).all()) == 1


def test_every_job_queued_in_one_round_is_handed_on(small_phantom, tmp_path, audit_sessions):
    """Several studies completing together: each new job reaches ``on_queued`` (the job engine defers it there),
    not only the last one (each study's queries flush the jobs queued before)."""
    sessions = audit_sessions
    spool = Spool(tmp_path / "spool")
    uids = [_spool_series(spool, sessions, write_ct_series(small_phantom, tmp_path / f"s{i}", patient_id=f"P{i}",
                                                           study_uid=f"1.2.3.4.5.6.8.{i}")) for i in range(3)]
    handed: list[str] = []
    engine = RuleEngine(sessions, spool, RULES, on_queued=lambda _session, job: handed.append(job.series_instance_uid))
    assert sorted(engine.run_once()) == sorted(uids)
    assert sorted(handed) == sorted(uids)
    with sessions() as s:
        assert sorted(s.scalars(select(Job.series_instance_uid))) == sorted(uids)


def test_better_series_replaces_a_queued_job(small_phantom, tmp_path, audit_sessions):
    sessions = audit_sessions
    spool = Spool(tmp_path / "spool")
    study = "1.2.3.4.5.6.8"
    lung = _spool_series(spool, sessions, write_ct_series(
        small_phantom, tmp_path / "lung", study_uid=study, series_uid="1.2.3.4.5.6.8.1",
        overrides={"ConvolutionKernel": "LUNG"}))
    engine = RuleEngine(sessions, spool, RULES)
    assert engine.run_once() == [lung]
    soft = _spool_series(spool, sessions, write_ct_series(
        small_phantom, tmp_path / "soft", study_uid=study, series_uid="1.2.3.4.5.6.8.2",
        overrides={"ConvolutionKernel": "STANDARD"}))
    assert engine.run_once() == [soft]
    with sessions() as s:
        jobs = {j.series_instance_uid: j.status for j in s.scalars(select(Job))}
        assert jobs == {lung: "cancelled", soft: "queued"}
        row = s.scalars(select(Series).where(Series.series_instance_uid == lung)).one()
        assert row.status == "not_selected" and "replaced by series" in row.reason

    # once the worker has started, a later series does not replace it
    with sessions() as s:
        s.scalars(select(Job).where(Job.series_instance_uid == soft)).one().status = "running"
        s.commit()
    third = _spool_series(spool, sessions, write_ct_series(
        small_phantom, tmp_path / "third", study_uid=study, series_uid="1.2.3.4.5.6.8.3"))
    assert engine.run_once() == []
    with sessions() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == third)).one()
        assert row.status == "not_selected" and "already measured" in row.reason


@pytest.mark.parametrize(
    "description",
    ["CHEST LDCT 1.25 (enhanced conversion)", "Enhanced CT chest", "Legacy Converted Enhanced CT thorax",
     "LUNG SCREENING enhanced multi-frame", "Thorax ENHANCED_CT_IMAGE_STORAGE", "unenhanced chest"],
)
def test_sop_class_vocabulary_is_not_contrast(small_phantom, tmp_path, description):
    facts = _facts(small_phantom, tmp_path, series_description=description)
    ok, reason = eligibility(facts, RULES)
    assert ok, reason


@pytest.mark.parametrize(
    "description",
    ["CHEST C+", "Chest arterial phase", "Thorax portal venous", "CT chest contrast enhanced (enhanced conversion)",
     "Enhanced chest", "CHEST ENHANCED", "CTA chest", "Enhanced CT chest delayed", "Chest w contrast"],
)
def test_real_contrast_descriptions_are_still_refused(small_phantom, tmp_path, description):
    facts = _facts(small_phantom, tmp_path, series_description=description)
    ok, reason = eligibility(facts, RULES)
    assert not ok and reason.startswith("contrast-enhanced"), reason

"""Eligibility on DICOM headers, and the choice of one series per study.

:func:`evaluate_series` reads the headers of a complete series (no pixel data) and decides
``rejected`` (with a human-readable reason) or ``eligible``. :func:`select_for_studies` then
picks one eligible series per study, once none of the study's series is still being received,
and queues it in the ``jobs`` table for the measurement worker.

Selection rule (HU accuracy first): soft-tissue reconstruction kernel over unknown over
lung/bone/sharp kernels (sharp kernels add noise and edge overshoot to attenuation values);
then the thinner slices (within the configured bounds); then the longer z-coverage (more of the
liver in view); then more slices; then the earliest received.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Job, Series, utcnow
from lpm_node.core.config import RuleSettings
from lpm_node.core.states import JobStatus, SeriesStatus
from lpm_node.intake.headers import SeriesFacts, read_series_facts
from lpm_node.intake.series import record_decision
from lpm_node.intake.spool import Spool

LOG = logging.getLogger(__name__)

STARTED_JOB_STATUSES = (JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED)

_EMPTY_CONTRAST_VALUES = {"", "NONE", "NO", "N/A", "NA", "0", "0.0", "NIL", "WITHOUT", "NO CONTRAST", "-"}
# "w/o contrast", "non-contrast", "without IV contrast", "no contrast", "sin contraste", "ohne KM"...
_NEGATED_CONTRAST = re.compile(
    r"(?<![a-z0-9])(w/o|wo|without|no|non|sin|ohne|sans|nc)[\s\-_/]*(iv[\s\-_]*|i\.v\.[\s\-_]*)?"
    r"(contrast|contraste|kontrast|km|enhanced|enhancement|con)(?![a-z0-9])",
    re.IGNORECASE,
)
# DICOM object vocabulary that says nothing about contrast: "Enhanced CT (Image Storage)", "Legacy Converted
# Enhanced CT", "(enhanced conversion)", "Enhanced Multi-frame": the multi-frame object, not an enhanced scan.
_SOP_CLASS_VOCABULARY = re.compile(
    r"(?<![a-z0-9])(?:(?:legacy[\s\-_]*)?converted[\s\-_]*)?enhanced[\s\-_]*"
    r"(?:(?:ct|mr|pet|us|xa)(?:[\s\-_]*image)?(?:[\s\-_]*storage)?|conversion|multi[\s\-_]*frame)(?![a-z0-9])",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------------------
# Keyword matching
# ---------------------------------------------------------------------------------------------
def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Case-insensitive pattern for a keyword at the start of a word.

    Keywords of up to 4 characters must be whole words ("abd" does not match "abdication", "CTA"
    not "CTAB"); longer ones may start a word ("angio" matches "angiography", "urogra" matches
    "urography"). Words are separated by anything that is not a letter or a digit.
    """
    body = re.escape(keyword.strip())
    tail = r"(?![a-z0-9])" if len(keyword.strip()) <= 4 and keyword.strip()[-1:].isalnum() else ""
    return re.compile(rf"(?<![a-z0-9]){body}{tail}", re.IGNORECASE)


def find_keyword(text: str, keywords: Iterable[str]) -> str | None:
    """The first keyword found in ``text`` (see :func:`keyword_pattern`), or None."""
    for kw in keywords:
        if kw.strip() and keyword_pattern(kw).search(text or ""):
            return kw
    return None


def strip_negated_contrast(text: str) -> str:
    """``text`` without negated contrast phrases such as "WO CONTRAST" or "non-contrast"."""
    return _NEGATED_CONTRAST.sub(" ", text or "")


def strip_sop_class_vocabulary(text: str) -> str:
    """``text`` without DICOM object words that contain "enhanced" but mean no contrast ("Enhanced CT",
    "(enhanced conversion)", "Legacy Converted Enhanced CT", "enhanced multi-frame")."""
    return _SOP_CLASS_VOCABULARY.sub(" ", text or "")


# ---------------------------------------------------------------------------------------------
# Eligibility
# ---------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class Verdict:
    """The rules' decision on a series: ``rule`` names the first rule that failed (or ``eligible``) in fixed words
    that may be logged; ``reason`` may quote header text (descriptions, contrast values): audit only."""

    ok: bool
    rule: str
    reason: str


def eligibility(facts: SeriesFacts, rules: RuleSettings) -> tuple[bool, str]:
    """(eligible, reason) for one series; the reason names the first rule that failed, or what passed."""
    verdict = judge(facts, rules)
    return verdict.ok, verdict.reason


def judge(facts: SeriesFacts, rules: RuleSettings) -> Verdict:
    """The :class:`Verdict` on one series: the first rule that failed, or what passed."""
    if facts.slices == 0:
        return Verdict(False, "no-headers", "no readable DICOM headers in the series")
    allowed = [m.upper() for m in rules.modalities]
    if facts.modality not in allowed:
        return Verdict(False, "modality", f"modality {facts.modality or '(none)'} not in {', '.join(allowed)}")
    excluded = [w.upper() for w in rules.excluded_image_type_words]
    for word in facts.image_type:
        if word in excluded:
            kind = {"LOCALIZER": "localizer", "PROJECTION": "localizer", "DERIVED": "derived image",
                    "SECONDARY": "derived image", "MPR": "reformat", "REFORMATTED": "reformat",
                    "MIP": "reformat"}.get(word, "excluded image type")
            return Verdict(False, "excluded-image-type", f"{kind}: ImageType contains {word}")
    if facts.image_type and facts.image_type[0] != "ORIGINAL":
        return Verdict(False, "not-original", f"not an original image: ImageType={'/'.join(facts.image_type)}")
    if facts.axial is False:
        return Verdict(False, "not-axial", "not axial: ImageOrientationPatient is not transverse")
    for key, value in facts.contrast.items():
        if value.strip().upper() not in _EMPTY_CONTRAST_VALUES:
            return Verdict(False, "contrast-attribute", f"contrast-enhanced: {key}={value}")
    for key, text in facts.descriptions.items():
        kw = find_keyword(strip_negated_contrast(strip_sop_class_vocabulary(text)), rules.contrast_keywords)
        if kw:
            return Verdict(False, "contrast-description", f"contrast-enhanced: {key} {text!r} contains {kw!r}")
    places = {"BodyPartExamined": facts.body_part, **facts.descriptions}
    for key, text in places.items():
        kw = find_keyword(text, rules.abdomen_keywords)
        if kw:
            return Verdict(False, "abdomen", f"abdominal study: {key}={text}" if key == "BodyPartExamined"
                           else f"abdominal study: {key} {text!r} contains {kw!r}")
    if not any(find_keyword(text, rules.chest_keywords) for text in places.values()):
        return Verdict(False, "not-chest", "not identified as chest CT: no chest keyword in BodyPartExamined or the "
                       "descriptions")
    if facts.slices < rules.min_slices:
        return Verdict(False, "min-slices", f"too few slices: {facts.slices} < {rules.min_slices}")
    t = facts.slice_thickness_mm
    if t is None:
        return Verdict(False, "thickness-unknown", "slice thickness unknown (no SliceThickness and no positions)")
    if not rules.min_slice_thickness_mm <= t <= rules.max_slice_thickness_mm:
        return Verdict(False, "slice-thickness", f"slice thickness {_fmt(t)} mm outside "
                       f"{_fmt(rules.min_slice_thickness_mm)}-{_fmt(rules.max_slice_thickness_mm)} mm")
    if facts.z_coverage_mm is None:
        return Verdict(False, "z-coverage-unknown", "z-coverage unknown (no ImagePositionPatient)")
    if facts.z_coverage_mm < rules.min_z_coverage_mm:
        return Verdict(False, "min-z-coverage",
                       f"z-coverage {facts.z_coverage_mm:.0f} mm < {_fmt(rules.min_z_coverage_mm)} mm")
    return Verdict(True, "eligible", f"eligible: unenhanced chest CT, {facts.slices} slices of {_fmt(round(t, 3))} "
                   f"mm, {facts.z_coverage_mm:.0f} mm z-coverage, kernel {facts.kernel or '(none)'} "
                   f"({facts.kernel_class})")


KnownFacts = Callable[[str, Sequence[Path]], SeriesFacts | None]


def evaluate_series(session: Session, row: Series, spool: Spool, rules: RuleSettings,
                    known_facts: KnownFacts | None = None) -> bool:
    """Decide on one complete series (``rejected`` or ``eligible``), storing facts and reason; True if eligible.

    ``known_facts`` (series UID, its files) gives the facts already read from exactly those files, if any."""
    paths = spool.series_files(row.study_instance_uid, row.series_instance_uid)
    facts = known_facts(row.series_instance_uid, paths) if known_facts is not None else None
    if facts is None:
        facts = read_series_facts(paths)
    verdict = judge(facts, rules)
    row.facts = facts.to_dict()
    status = SeriesStatus.ELIGIBLE if verdict.ok else SeriesStatus.REJECTED
    record_decision(session, row, status, verdict.reason)
    # the reason may quote header text (patient data): the log names the rule and the series only
    LOG.info("series %s (audit id %s) %s by rule %s; the reason is in the audit", row.series_instance_uid, row.id,
             status, verdict.rule)
    return verdict.ok


# ---------------------------------------------------------------------------------------------
# One series per study
# ---------------------------------------------------------------------------------------------
_KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}


def selection_key(row: Series) -> tuple:
    """Sort key: the best series for measurement sorts first."""
    f = row.facts or {}
    return (
        _KERNEL_RANK.get(f.get("kernel_class", "unknown"), 1),
        f.get("slice_thickness_mm") or 99.0,
        -(f.get("z_coverage_mm") or 0.0),
        -(f.get("slices") or 0),
        str(row.first_received_at),
        row.series_instance_uid,
    )


def _describe(row: Series) -> str:
    f = row.facts or {}
    parts = [f"{f.get('kernel_class', 'unknown')} kernel {f.get('kernel') or '(none)'}"]
    if f.get("slice_thickness_mm"):
        parts.append(f"{_fmt(round(f['slice_thickness_mm'], 3))} mm slices")
    if f.get("z_coverage_mm"):
        parts.append(f"{f['z_coverage_mm']:.0f} mm coverage")
    parts.append(f"{f.get('slices', 0)} slices")
    return ", ".join(parts)


RULE_TEXT = "soft-tissue kernel > thinner slices > longer z-coverage > more slices"


def select_for_study(session: Session, study_uid: str) -> str | None:
    """Choose and queue one series of a study, if the study is ready; returns the queued series UID."""
    rows = list(session.scalars(select(Series).where(Series.study_instance_uid == study_uid)))
    pending = [r for r in rows if r.status in (SeriesStatus.RECEIVING, SeriesStatus.COMPLETE)]
    eligible = [r for r in rows if r.status == SeriesStatus.ELIGIBLE]
    if not eligible:
        return None
    if pending:
        for r in eligible:
            if "waiting" not in r.reason:
                r.reason = f"{r.reason}; waiting for {len(pending)} other series of the study to complete"
        return None
    jobs = list(session.scalars(select(Job).where(Job.study_instance_uid == study_uid)))
    reopened = {r.series_instance_uid for r in eligible}  # a measured series with new instances is measured again
    started = [j for j in jobs if j.status in STARTED_JOB_STATUSES and j.series_instance_uid not in reopened]
    if started:
        ref = started[-1]
        for r in eligible:
            record_decision(session, r, SeriesStatus.NOT_SELECTED,
                            f"not selected: the study is already measured on series {ref.series_instance_uid} "
                            f"(job {ref.id} {ref.status})")
        return None
    queued_rows = [r for r in rows if r.status == SeriesStatus.QUEUED]
    candidates = sorted(eligible + queued_rows, key=selection_key)
    best = candidates[0]
    others = len(candidates) - 1
    if best.status != SeriesStatus.QUEUED:
        for r in queued_rows:  # a better series arrived while the study's job was still waiting
            for job in jobs:
                if job.series_instance_uid == r.series_instance_uid and job.status == JobStatus.QUEUED:
                    job.status = JobStatus.CANCELLED
                    job.error = f"replaced by series {best.series_instance_uid}"
            record_decision(session, r, SeriesStatus.NOT_SELECTED,
                            f"not selected: replaced by series {best.series_instance_uid} ({_describe(best)}); "
                            f"rule: {RULE_TEXT}")
        record_decision(session, best, SeriesStatus.QUEUED,
                        f"selected: {_describe(best)}; best of {others + 1} eligible series; rule: {RULE_TEXT}")
        waiting = [j for j in jobs
                   if j.series_instance_uid == best.series_instance_uid and j.status == JobStatus.QUEUED]
        if not waiting:  # a job still running measures the instances it started with: a new one is made
            session.add(Job(series_instance_uid=best.series_instance_uid, study_instance_uid=study_uid,
                            status=JobStatus.QUEUED, created_at=utcnow()))
        LOG.info("series %s selected for measurement (study %s)", best.series_instance_uid, study_uid)
    for r in eligible:
        if r is not best:
            record_decision(session, r, SeriesStatus.NOT_SELECTED,
                            f"not selected: series {best.series_instance_uid} is measured instead "
                            f"({_describe(best)}); rule: {RULE_TEXT}")
    return best.series_instance_uid if best.status == SeriesStatus.QUEUED else None


class RuleEngine:
    """Evaluates complete series and queues one per study."""

    def __init__(self, sessions: sessionmaker, spool: Spool, rules: RuleSettings,
                 on_queued: Callable[[Session, Job], object] | None = None, known_facts: KnownFacts | None = None,
                 ) -> None:
        self.sessions = sessions
        self.spool = spool
        self.rules = rules
        self.on_queued = on_queued  # called for each new job inside the transaction that queues it
        self.known_facts = known_facts  # the facts the series assembler read while completing a series

    def run_once(self) -> list[str]:
        """Evaluate every complete series, then select per study; returns the newly queued series UIDs."""
        queued: list[str] = []
        with self.sessions() as session:
            new_jobs: list[Job] = []  # noted as they are added: each study's queries flush the ones before

            @event.listens_for(session, "transient_to_pending")
            def note_job(_session: Session, row: object) -> None:
                if isinstance(row, Job):
                    new_jobs.append(row)

            complete = list(session.scalars(select(Series).where(Series.status == SeriesStatus.COMPLETE)))
            studies = set()
            for row in complete:
                try:
                    evaluate_series(session, row, self.spool, self.rules, self.known_facts)
                except Exception as exc:  # a broken header must not stop the node
                    LOG.exception("rules failed on series %s", row.series_instance_uid)
                    record_decision(session, row, SeriesStatus.REJECTED,
                                    f"header evaluation failed: {type(exc).__name__}: {exc}")
                studies.add(row.study_instance_uid)
            session.flush()
            waiting = session.scalars(select(Series.study_instance_uid).where(Series.status == SeriesStatus.ELIGIBLE))
            studies.update(waiting)
            for study_uid in sorted(studies):
                uid = select_for_study(session, study_uid)
                if uid:
                    queued.append(uid)
            session.flush()
            if self.on_queued is not None:
                for job in new_jobs:
                    self.on_queued(session, job)
            session.commit()
        return queued

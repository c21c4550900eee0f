"""What the console reads from the audit: a series' story as one timeline, the queues, and the refusals."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lpm_node.core.audit import (
    Association,
    Delivery,
    DeliveryAttempt,
    Instance,
    Job,
    OperatorAction,
    Series,
    SeriesDecision,
    SeriesLookup,
    as_utc,
    measuring_suspended,
)
from lpm_node.core.states import AssociationOutcome, DeliveryStatus, JobStatus, SeriesStatus
from lpm_node.imaging.measurement import flag_sentence

CATEGORY_WORDS = {
    "moderate_to_severe_steatosis": "Moderate-to-severe steatosis",
    "no_moderate_to_severe_steatosis": "Not moderate-to-severe steatosis",
    "not_assessable": "Not assessable",
}


def category_words(category: str | None) -> str:
    """A category as a radiologist reads it."""
    return CATEGORY_WORDS.get(category or "", (category or "").replace("_", " "))


def iso_date(yyyymmdd: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD (anything else as it is)."""
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:8]}" if len(yyyymmdd) == 8 else yyyymmdd


def _iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat(timespec="seconds") if value else None


@dataclass
class Event:
    """One line of a series' timeline."""

    at: str | None
    kind: str  # association | instances | decision | job | delivery | action
    title: str
    details: list[str] = field(default_factory=list)
    status: str = ""


def _job_dict(job: Job) -> dict[str, Any]:
    flags = list(job.qc_flags or [])
    return {
        "id": job.id, "status": job.status, "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "attempts": job.attempts, "error": job.error, "device": job.device,
        "model": {"name": job.model_name, "version": job.model_version, "weights_sha256": job.model_weights_sha256,
                  "test_model": bool(job.model_test)},
        "timings": dict(job.timings or {}), "dl_parenchymal_hu": job.dl_parenchymal_hu,
        "dl_volumetric_hu": job.dl_volumetric_hu, "category": job.category or None,
        "category_words": category_words(job.category) if job.category else "",
        "qc_flags": flags, "qc_sentences": [flag_sentence(f) for f in flags],
        "liver_volume_ml": (job.result or {}).get("liver_volume_ml"),
    }


def _delivery_dict(session: Session, d: Delivery) -> dict[str, Any]:
    attempts = list(session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == d.id)
                                    .order_by(DeliveryAttempt.id)))
    return {
        "id": d.id, "job_id": d.job_id, "object": d.object_kind, "destination": d.destination, "status": d.status,
        "attempts": d.attempts, "last_error": d.last_error, "sent_at": _iso(d.sent_at),
        "queued_at": _iso(d.queued_at or d.created_at),
        "attempt_log": [{"at": _iso(a.at), "ok": a.ok, "status": a.status, "error": a.error} for a in attempts],
    }


def series_story(session: Session, series: Series, lookup: SeriesLookup, viewer_url: str = "") -> dict[str, Any]:
    """Everything the audit knows of one series: header values, jobs, deliveries and one timeline of it all."""
    uid = series.series_instance_uid
    events: list[Event] = []
    assoc_ids = select(Instance.association_id).where(Instance.series_instance_uid == uid).distinct()
    associations = list(session.scalars(select(Association).where(Association.id.in_(assoc_ids))
                                        .order_by(Association.id)))
    for a in associations:
        tls = ", DICOM TLS" if a.tls else ""
        events.append(Event(_iso(a.started_at), "association",
                            f"Association from {a.calling_ae or '(no AE title)'} at {a.peer_address}:{a.peer_port}"
                            f"{tls}",
                            [f"called {a.called_ae}; {a.outcome}" + (f" at {_iso(a.ended_at)}" if a.ended_at else "")
                             + f"; {a.instances_received} instance(s) received, {a.instances_refused} refused"]
                            + ([a.reason] if a.reason else []), a.outcome))
    count, size, first, last = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0),
               func.min(Instance.received_at), func.max(Instance.received_at))
        .where(Instance.series_instance_uid == uid)).one()
    if count:
        events.append(Event(_iso(first), "instances", f"{count} instance(s) received ({size / 2**20:.1f} MB)",
                            [f"first at {_iso(first)}, last at {_iso(last)}"]))
    for d in session.scalars(select(SeriesDecision).where(SeriesDecision.series_instance_uid == uid)
                             .order_by(SeriesDecision.id)):
        events.append(Event(_iso(d.at), "decision", f"Series {d.status.replace('_', ' ')}",
                            [d.reason] if d.reason else [], d.status))
    jobs = list(session.scalars(select(Job).where(Job.series_instance_uid == uid).order_by(Job.id)))
    job_dicts = [_job_dict(j) for j in jobs]
    for j in job_dicts:
        details = []
        if j["timings"]:
            details.append("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in j["timings"].items()))
        if j["device"] or j["model"]["name"]:
            test = " (TEST MODEL, not for clinical use)" if j["model"]["test_model"] else ""
            details.append(f"model {j['model']['name']} ({j['model']['version']}, weights "
                           f"{j['model']['weights_sha256'][:12]}){test} on {j['device'] or '?'}")
        if j["dl_parenchymal_hu"] is not None:
            details.append(f"DL-parenchymal {j['dl_parenchymal_hu']:.2f} HU"
                           + (f", whole liver {j['dl_volumetric_hu']:.2f} HU" if j["dl_volumetric_hu"] is not None
                              else ""))
        if j["category"]:
            details.append(j["category_words"])
        details += j["qc_sentences"]
        if j["error"]:
            details.append(j["error"])
        events.append(Event(j["finished_at"] or j["started_at"] or j["created_at"], "job",
                            f"Job {j['id']} {j['status']} (start {j['attempts']})", details, j["status"]))
    deliveries = [_delivery_dict(session, d) for d in session.scalars(
        select(Delivery).where(Delivery.series_instance_uid == uid).order_by(Delivery.id))]
    for d in deliveries:
        last = d["attempt_log"][-1] if d["attempt_log"] else None
        details = [f"{d['attempts']} attempt(s)"
                   + (f", last C-STORE status {last['status']}" if last else "")
                   + (f": {d['last_error']}" if d["last_error"] else "")]
        events.append(Event(d["sent_at"] or (last["at"] if last else d["queued_at"]), "delivery",
                            f"{d['object']} to {d['destination']}: {d['status']}", details, d["status"]))
    actions = [{"at": _iso(a.at), "user": a.user, "command": a.command, "outcome": a.outcome}
               for a in session.scalars(select(OperatorAction).where(OperatorAction.target.contains(uid))
                                        .order_by(OperatorAction.id))]
    for a in actions:
        events.append(Event(a["at"], "action", f"{a['user']}: {a['command']}", [a["outcome"]]))
    events.sort(key=lambda e: e.at or "")
    latest = job_dicts[-1] if job_dicts else None
    done = [j for j in job_dicts if j["status"] == JobStatus.DONE]
    link = viewer_url.replace("{study_uid}", series.study_instance_uid) if viewer_url else ""
    return {
        "id": lookup.public_id,
        "accession_number": lookup.accession_number, "patient_id": lookup.patient_id,
        "patient_name": lookup.patient_name, "study_date": iso_date(lookup.study_date),
        "study_description": lookup.study_description, "series_description": series.series_description,
        "modality": series.modality, "status": series.status, "reason": series.reason,
        "instances": series.instance_count, "calling_ae": series.calling_ae,
        "study_instance_uid": series.study_instance_uid, "series_instance_uid": uid,
        "latest_job": latest, "previous_results": done[:-1] if done else [],
        "jobs": job_dicts, "deliveries": deliveries, "operator_actions": actions,
        "timeline": [e.__dict__ for e in events], "viewer_link": link,
        "rerunnable": series.status not in (SeriesStatus.RECEIVING, SeriesStatus.COMPLETE, SeriesStatus.QUEUED,
                                            SeriesStatus.PROCESSING),
    }


def key_image_path(session: Session, series_uid: str, outbox: Path) -> Path | None:
    """The newest key image written for a series (from the outbox rows, else the outbox folder)."""
    paths = [Path(p) for p in session.scalars(select(Delivery.path).where(
        Delivery.series_instance_uid == series_uid, Delivery.object_kind == "KEY").order_by(Delivery.id.desc()))]
    folder = outbox / series_uid
    if folder.is_dir() and folder.resolve().parent == outbox.resolve():
        paths += sorted(folder.glob("KEY_*.dcm"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in paths if p.is_file()), None)


def _age_s(value: dt.datetime | None, now: dt.datetime) -> float | None:
    value = as_utc(value)
    return max(0.0, (now - value).total_seconds()) if value else None


def queues(session: Session, now: dt.datetime) -> dict[str, Any]:
    """What waits: series receiving, jobs queued and running (with the oldest's age), deliveries per destination."""
    receiving = list(session.scalars(select(Series).where(Series.status == SeriesStatus.RECEIVING)
                                     .order_by(Series.first_received_at)))
    jobs: dict[str, Any] = {}
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        count, oldest = session.execute(select(func.count(Job.id), func.min(
            Job.created_at if status == JobStatus.QUEUED else Job.started_at)).where(Job.status == status)).one()
        jobs[status.value] = {"count": int(count), "oldest_age_s": _age_s(oldest, now)}
    per_destination: dict[str, dict[str, int]] = {}
    for destination, status, count in session.execute(
            select(Delivery.destination, Delivery.status, func.count(Delivery.id))
            .group_by(Delivery.destination, Delivery.status)):
        per_destination.setdefault(destination, {})[status] = int(count)
    dead = [_delivery_dict(session, d) | {"series_instance_uid": d.series_instance_uid}
            for d in session.scalars(select(Delivery).where(Delivery.status == DeliveryStatus.DEAD)
                                     .order_by(Delivery.id).limit(500))]
    failed = [{"series_instance_uid": s.series_instance_uid, "reason": s.reason, "decided_at": _iso(s.decided_at)}
              for s in session.scalars(select(Series).where(Series.status == SeriesStatus.FAILED)
                                       .order_by(Series.decided_at.desc()).limit(200))]
    return {
        "receiving": [{"series_instance_uid": s.series_instance_uid, "instances": s.instance_count,
                       "since": _iso(s.first_received_at), "age_s": _age_s(s.first_received_at, now)}
                      for s in receiving],
        "jobs": jobs, "deliveries": per_destination, "dead": dead, "failed_series": failed,
        "measuring_suspended": measuring_suspended(session),
    }


def refusals(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Rejected and aborted associations and those with refused instances, newest first, with callers and reasons."""
    query = (select(Association)
             .where(Association.outcome.in_([AssociationOutcome.REJECTED, AssociationOutcome.ABORTED])
                    | (Association.instances_refused > 0))
             .order_by(Association.started_at.desc(), Association.id.desc()).limit(limit))
    return [{"at": _iso(a.started_at), "peer": f"{a.peer_address}:{a.peer_port}", "calling_ae": a.calling_ae,
             "called_ae": a.called_ae, "outcome": a.outcome, "instances_received": a.instances_received,
             "instances_refused": a.instances_refused, "tls": bool(a.tls), "reason": a.reason}
            for a in session.scalars(query)]


def rejected_series(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Series the rules refused, with the reason, newest first."""
    return [{"series_instance_uid": s.series_instance_uid, "series_description": s.series_description,
             "calling_ae": s.calling_ae, "decided_at": _iso(s.decided_at), "reason": s.reason}
            for s in session.scalars(select(Series).where(Series.status == SeriesStatus.REJECTED)
                                     .order_by(Series.decided_at.desc()).limit(limit))]

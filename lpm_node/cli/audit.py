"""``lpm-node audit``: what the node received, decided, measured and sent, from the audit DB."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, TextIO

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
    as_utc,
    session_factory,
)
from lpm_node.core.config import Settings
from lpm_node.core.states import AssociationOutcome, DeliveryStatus

COLUMNS = [
    "study_instance_uid", "series_instance_uid", "modality", "series_description", "status", "reason", "instances",
    "calling_ae", "first_received_at", "last_received_at", "decided_at", "job_status", "dl_parenchymal_hu",
    "category", "delivery_status",
]


def _iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat(timespec="seconds") if value else None


def _delivery_status(deliveries: list[Delivery]) -> str | None:
    """One word for a series' deliveries: none, pending, sent, dead or partial (some of each)."""
    if not deliveries:
        return None
    statuses = {d.status for d in deliveries}
    if statuses == {DeliveryStatus.SENT}:
        return DeliveryStatus.SENT
    if DeliveryStatus.DEAD in statuses:
        return DeliveryStatus.DEAD if statuses == {DeliveryStatus.DEAD} else "partial"
    return DeliveryStatus.PENDING


def _latest_job(session: Session, series_uid: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.series_instance_uid == series_uid).order_by(Job.created_at.desc(), Job.id.desc())
    ).first()


def series_summary(session: Session, row: Series) -> dict[str, Any]:
    """One series as a flat dict (the JSON/CSV row)."""
    job = _latest_job(session, row.series_instance_uid)
    deliveries = (
        list(session.scalars(select(Delivery).where(Delivery.job_id == job.id))) if job is not None else []
    )
    return {
        "study_instance_uid": row.study_instance_uid,
        "series_instance_uid": row.series_instance_uid,
        "modality": row.modality,
        "series_description": row.series_description,
        "status": row.status,
        "reason": row.reason,
        "instances": row.instance_count,
        "calling_ae": row.calling_ae,
        "first_received_at": _iso(row.first_received_at),
        "last_received_at": _iso(row.last_received_at),
        "decided_at": _iso(row.decided_at),
        "job_status": job.status if job else None,
        "dl_parenchymal_hu": job.dl_parenchymal_hu if job else None,
        "category": (job.category or None) if job else None,
        "delivery_status": _delivery_status(deliveries),
    }


def list_series(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently received series, newest first."""
    rows = session.scalars(select(Series).order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit))
    return [series_summary(session, r) for r in rows]


def series_detail(session: Session, series_uid: str) -> dict[str, Any] | None:
    """Everything about one series: summary, instances, associations, decisions, jobs, deliveries."""
    row = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
    if row is None:
        return None
    detail = series_summary(session, row)
    detail["facts"] = row.facts
    count, size = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0)).where(
            Instance.series_instance_uid == series_uid
        )
    ).one()
    detail["instances_indexed"] = int(count)
    detail["bytes"] = int(size)
    assoc_ids = select(Instance.association_id).where(Instance.series_instance_uid == series_uid).distinct()
    detail["associations"] = [
        {"id": a.id, "calling_ae": a.calling_ae, "peer": f"{a.peer_address}:{a.peer_port}", "outcome": a.outcome,
         "reason": a.reason, "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at),
         "instances_received": a.instances_received}
        for a in session.scalars(select(Association).where(Association.id.in_(assoc_ids)).order_by(Association.id))
    ]
    detail["decisions"] = [
        {"at": _iso(d.at), "status": d.status, "reason": d.reason}
        for d in session.scalars(
            select(SeriesDecision).where(SeriesDecision.series_instance_uid == series_uid).order_by(SeriesDecision.id)
        )
    ]
    jobs = list(session.scalars(select(Job).where(Job.series_instance_uid == series_uid).order_by(Job.id)))
    detail["jobs"] = [
        {"id": j.id, "status": j.status, "created_at": _iso(j.created_at), "started_at": _iso(j.started_at),
         "finished_at": _iso(j.finished_at), "attempts": j.attempts, "error": j.error, "device": j.device,
         "model": j.model, "timings": j.timings, "dl_parenchymal_hu": j.dl_parenchymal_hu,
         "dl_volumetric_hu": j.dl_volumetric_hu, "category": j.category, "qc_flags": j.qc_flags,
         "model_identity": {"name": j.model_name, "version": j.model_version,
                            "weights_sha256": j.model_weights_sha256, "test_model": bool(j.model_test)}}
        for j in jobs
    ]
    detail["operator_actions"] = [
        action_dict(a) for a in session.scalars(
            select(OperatorAction).where(OperatorAction.target.contains(series_uid)).order_by(OperatorAction.id))
    ]
    deliveries = list(session.scalars(select(Delivery).where(Delivery.series_instance_uid == series_uid)))
    detail["deliveries"] = [
        {"id": d.id, "job_id": d.job_id, "destination": d.destination, "object": d.object_kind,
         "sop_instance_uid": d.sop_instance_uid, "status": d.status, "attempts": d.attempts,
         "last_error": d.last_error, "sent_at": _iso(d.sent_at),
         "attempt_log": [
             {"at": _iso(a.at), "ok": a.ok, "status": a.status, "error": a.error}
             for a in session.scalars(
                 select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == d.id).order_by(DeliveryAttempt.id)
             )
         ]}
        for d in deliveries
    ]
    return detail


def action_dict(a: OperatorAction) -> dict[str, Any]:
    """One operator action as plain values."""
    return {"id": a.id, "at": _iso(a.at), "user": a.user, "command": a.command, "target": a.target,
            "outcome": a.outcome}


def list_actions(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent operator actions, newest first."""
    rows = session.scalars(select(OperatorAction).order_by(OperatorAction.id.desc()).limit(limit))
    return [action_dict(a) for a in rows]


def format_actions(rows: list[dict[str, Any]]) -> str:
    """Operator actions as text lines."""
    if not rows:
        return "no operator actions recorded"
    return "\n".join(f"{r['at']} {r['user']}: {r['command']} -> {r['outcome']}" for r in rows)


def list_refusals(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Rejected associations, aborts (also of connections that never associated) and associations with refused
    instances, newest first."""
    query = (select(Association)
             .where((Association.outcome.in_([AssociationOutcome.REJECTED, AssociationOutcome.ABORTED]))
                    | (Association.instances_refused > 0))
             .order_by(Association.started_at.desc(), Association.id.desc()).limit(limit))
    return [
        {"at": _iso(a.started_at), "peer": f"{a.peer_address}:{a.peer_port}", "calling_ae": a.calling_ae,
         "outcome": a.outcome, "instances_received": a.instances_received,
         "instances_refused": a.instances_refused, "tls": bool(a.tls), "reason": a.reason}
        for a in session.scalars(query)
    ]


def format_refusals(rows: list[dict[str, Any]]) -> str:
    """Refusals and aborts as a table."""
    if not rows:
        return "no refused or aborted connections"
    header = f"{'at (UTC)':<20} {'peer':<22} {'calling AE':<16} {'outcome':<9} {'refused':>7}  reason"
    lines = [header, "-" * len(header)]
    for r in rows:
        when = (r["at"] or "")[:19].replace("T", " ")
        lines.append(f"{when:<20} {_clip(r['peer'], 22):<22} {_clip(r['calling_ae'], 16):<16} "
                     f"{r['outcome']:<9} {r['instances_refused']:>7}  {_clip(r['reason'], 120)}")
    return "\n".join(lines)


def _short(uid: str | None, width: int = 24) -> str:
    uid = uid or ""
    return uid if len(uid) <= width else "…" + uid[-(width - 1):]


def _clip(text: Any, width: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A readable fixed-width table of series summaries."""
    if not rows:
        return "no series received yet"
    header = f"{'last received (UTC)':<20} {'study':<24} {'series':<24} {'n':>5} {'status':<12} {'HU':>6}  reason"
    lines = [header, "-" * len(header)]
    for r in rows:
        hu = f"{r['dl_parenchymal_hu']:.1f}" if r.get("dl_parenchymal_hu") is not None else ""
        when = (r.get("last_received_at") or "")[:19].replace("T", " ")
        lines.append(
            f"{when:<20} {_short(r['study_instance_uid']):<24} {_short(r['series_instance_uid']):<24} "
            f"{r['instances']:>5} {_clip(r['status'], 12):<12} {hu:>6}  {_clip(r['reason'], 100)}"
        )
    return "\n".join(lines)


def format_detail(d: dict[str, Any]) -> str:
    """One series in full, as text."""
    out = [f"series   {d['series_instance_uid']}", f"study    {d['study_instance_uid']}",
           f"modality {d['modality']}   description: {d['series_description']}",
           f"status   {d['status']}: {d['reason']}",
           f"instances {d['instances']} ({d['instances_indexed']} indexed, {d['bytes'] / 2**20:.1f} MB), "
           f"first {d['first_received_at']}, last {d['last_received_at']}, decided {d['decided_at']}"]
    if d.get("facts"):
        f = d["facts"]
        cover = f"{f['z_coverage_mm']:.0f}" if f.get("z_coverage_mm") is not None else "?"
        out.append(f"headers  kernel {f.get('kernel')} ({f.get('kernel_class')}), "
                   f"thickness {f.get('slice_thickness_mm')} mm, coverage {cover} mm, slices {f.get('slices')}, "
                   f"body part {f.get('body_part')}")
    out.append("associations:")
    for a in d["associations"] or [{"id": "-"}]:
        if a["id"] == "-":
            out.append("  (none recorded)")
            continue
        out.append(f"  #{a['id']} {a['calling_ae']} from {a['peer']} {a['outcome']} {a['reason']} "
                   f"{a['started_at']} -> {a['ended_at']}, {a['instances_received']} instance(s)")
    out.append("decisions:")
    out += [f"  {x['at']} {x['status']}: {x['reason']}" for x in d["decisions"]] or ["  (none)"]
    if d["jobs"]:
        out.append("jobs:")
        for j in d["jobs"]:
            out.append(f"  #{j['id']} {j['status']} created {j['created_at']} finished {j['finished_at']} "
                       f"{('error: ' + j['error']) if j['error'] else ''}".rstrip())
            if j["category"]:
                hu, vol = j["dl_parenchymal_hu"], j["dl_volumetric_hu"]
                out.append(f"     DL-parenchymal {_hu(hu)}, whole liver {_hu(vol)}, {j['category']}; "
                           f"QC flags: {', '.join(j['qc_flags'] or []) or 'none'}")
            if j["timings"]:
                stages = ", ".join(f"{k} {v:.1f} s" for k, v in j["timings"].items())
                out.append(f"     {stages} on {j['device'] or '?'} ({j['model']})")
            identity = j["model_identity"]
            if identity["name"]:
                test = ", TEST MODEL, not for clinical use" if identity["test_model"] else ""
                out.append(f"     model {identity['name']} ({identity['version']}, weights "
                           f"{identity['weights_sha256'][:12]}{test})")
    if d.get("operator_actions"):
        out.append("operator actions:")
        out += [f"  {a['at']} {a['user']}: {a['command']} -> {a['outcome']}" for a in d["operator_actions"]]
    if d["deliveries"]:
        out.append("deliveries:")
        for x in d["deliveries"]:
            out.append(f"  #{x['id']} {x['object']} -> {x['destination']} {x['status']} after {x['attempts']} "
                       f"attempt(s) {x['last_error']}".rstrip())
    return "\n".join(out)


def _hu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} HU"


def write_csv(rows: list[dict[str, Any]], target: str) -> None:
    """Write series summaries as CSV to a file, or to stdout for ``-``."""
    def emit(fh: TextIO) -> None:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    if target == "-":
        emit(sys.stdout)
    else:
        with open(Path(target), "w", newline="", encoding="utf-8") as fh:
            emit(fh)


def audit_command(settings: Settings, args: argparse.Namespace) -> int:
    """Handler of ``lpm-node audit``."""
    db_file = settings.db_url.removeprefix("sqlite:///") if settings.db_url.startswith("sqlite:///") else None
    if db_file is not None and not Path(db_file).exists():
        raise FileNotFoundError(f"no audit database at {db_file} (check --data-dir)")
    sessions = session_factory(settings.db_url)
    try:
        with sessions() as session:
            if getattr(args, "actions", False):
                actions = list_actions(session, int(getattr(args, "limit", 50) or 50))
                print(json.dumps(actions, indent=2) if args.json else format_actions(actions))
                return 0
            if getattr(args, "series", None):
                detail = series_detail(session, args.series)
                if detail is None:
                    print(f"lpm-node audit: no series {args.series}", file=sys.stderr)
                    return 1
                print(json.dumps(detail, indent=2) if args.json else format_detail(detail))
                return 0
            if getattr(args, "refusals", False):
                refusals = list_refusals(session, int(getattr(args, "limit", 50) or 50))
                print(json.dumps(refusals, indent=2) if args.json else format_refusals(refusals))
                return 0
            rows = list_series(session, int(getattr(args, "limit", 50) or 50))
            recent_refusals = list_refusals(session, int(getattr(args, "limit", 50) or 50) if args.json else 10)
    finally:
        sessions.kw["bind"].dispose()
    if getattr(args, "csv", None):
        write_csv(rows, args.csv)
        if args.csv == "-":
            return 0
    if args.json:  # the series and, beside them, the latest refused and aborted connections
        print(json.dumps({"series": rows, "refusals": recent_refusals}, indent=2))
    elif not getattr(args, "csv", None):
        print(format_table(rows))
        print()
        print("refused and aborted connections (latest 10; all: --refusals):")
        print(format_refusals(recent_refusals))
    return 0

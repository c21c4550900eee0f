"""Throughput: per-day counts and p50/p95 time to result, and their charts drawn as SVG on the server."""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from lpm_node.core.audit import Delivery, Job, Series, as_utc
from lpm_node.core.states import DeliveryStatus, JobStatus


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def daily(session: Session, today: dt.date, days: int = 14) -> list[dict[str, Any]]:
    """For each of the last ``days`` days: series received, jobs measured and failed, and the p50/p95 seconds from
    the last instance received to the last result delivered (to the job's end when nothing was sent)."""
    start = dt.datetime.combine(today - dt.timedelta(days=days - 1), dt.time(), dt.UTC)
    rows = {(today - dt.timedelta(days=days - 1 - i)).isoformat(): {"received": 0, "measured": 0, "failed": 0,
                                                                   "seconds": []} for i in range(days)}
    for (at,) in session.execute(select(Series.first_received_at).where(Series.first_received_at >= start)):
        key = as_utc(at).date().isoformat()
        if key in rows:
            rows[key]["received"] += 1
    sent = dict(session.execute(select(Delivery.job_id, func.max(Delivery.sent_at))
                                .where(Delivery.status == DeliveryStatus.SENT).group_by(Delivery.job_id)).all())
    query = (select(Job, Series.last_received_at).join(Series, Series.series_instance_uid == Job.series_instance_uid)
             .where(Job.finished_at >= start, Job.status.in_([JobStatus.DONE, JobStatus.FAILED])))
    for job, received in session.execute(query):
        key = as_utc(job.finished_at).date().isoformat()
        if key not in rows:
            continue
        if job.status == JobStatus.FAILED:
            rows[key]["failed"] += 1
            continue
        rows[key]["measured"] += 1
        end = as_utc(sent.get(job.id)) or as_utc(job.finished_at)
        rows[key]["seconds"].append(max(0.0, (end - as_utc(received)).total_seconds()))
    out = []
    for day, row in rows.items():
        seconds = row.pop("seconds")
        out.append({"day": day, **row, "p50_s": _percentile(seconds, 0.5), "p95_s": _percentile(seconds, 0.95)})
    return out


def bar_chart(rows: list[dict[str, Any]], keys: list[tuple[str, str]], title: str, unit: str = "",
              width: int = 640, height: int = 220) -> str:
    """Grouped bars per day as an SVG string (values and labels escaped)."""
    left, bottom, top = 44, 34, 26
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max([float(r[k] or 0) for r in rows for k, _ in keys] + [1.0])
    group = plot_w / max(1, len(rows))
    bar = max(2.0, (group - 4) / len(keys))
    colours = ["#2f6db5", "#3aa36b", "#c9483c", "#8a5fb5"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}" class="chart">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for i in range(5):
        value = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:.3g}</text>')
    for index, row in enumerate(rows):
        x0 = left + index * group + 2
        for j, (key, label) in enumerate(keys):
            value = float(row[key] or 0)
            h = plot_h * value / peak
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 1:.1f}" '
                         f'height="{h:.1f}" fill="{colours[j % len(colours)]}"><title>{escape(row["day"])} '
                         f'{escape(label)}: {value:.4g}{escape(unit)}</title></rect>')
        if index % 2 == 0 or len(rows) <= 7:
            parts.append(f'<text x="{x0 + group / 2:.1f}" y="{height - bottom + 14}" font-size="10" '
                         f'text-anchor="middle">{escape(row["day"][5:])}</text>')
    for j, (_, label) in enumerate(keys):
        x = left + 150 + j * 120
        parts.append(f'<rect x="{x}" y="7" width="10" height="10" fill="{colours[j % len(colours)]}"/>'
                     f'<text x="{x + 14}" y="16" font-size="11">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)

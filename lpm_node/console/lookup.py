"""Finding series: the search index of identifying header values (read once per series from the spool) and the
search itself, by accession, patient, study date, status, category or UID, a page at a time."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import pydicom
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lpm_node.console.story import iso_date
from lpm_node.core.audit import Instance, Job, Series, SeriesLookup, as_utc, utcnow

HEADER_TAGS = ["AccessionNumber", "PatientID", "PatientName", "StudyDate", "StudyDescription"]
MAX_TEXT = {"accession_number": 64, "patient_id": 128, "patient_name": 256, "study_date": 8}


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - a value that does not decode is not searchable, nothing more
        return ""


def _header_values(paths: list[str]) -> dict[str, str]:
    """The identifying values of the first readable instance (empty strings when none can be read)."""
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception:  # noqa: BLE001 - damaged or gone: try the next instance
            continue
        values = {
            "accession_number": _text(ds, "AccessionNumber"),
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName"),
            "study_date": re.sub(r"\D", "", _text(ds, "StudyDate")),
            "study_description": _text(ds, "StudyDescription"),
        }
        return {k: v[: MAX_TEXT.get(k, 1024)] for k, v in values.items()}
    return {k: "" for k in ("accession_number", "patient_id", "patient_name", "study_date", "study_description")}


def index_new_series(session: Session, limit: int = 500) -> int:
    """Give each series without a search-index row one (opaque id, header values); returns how many were added."""
    missing = list(session.scalars(
        select(Series).where(~exists().where(SeriesLookup.series_id == Series.id)).order_by(Series.id).limit(limit)
    ))
    for row in missing:
        paths = list(session.scalars(select(Instance.path).where(
            Instance.series_instance_uid == row.series_instance_uid).order_by(Instance.id).limit(3)))
        session.add(SeriesLookup(series_id=row.id, public_id=secrets.token_hex(12), indexed_at=utcnow(),
                                 **_header_values(paths)))
    try:
        session.commit()
    except IntegrityError:  # another request indexed them at the same moment
        session.rollback()
        return 0
    return len(missing)


@dataclass
class SearchFilters:
    """What a search asks for; every field optional (empty: any)."""

    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    since: str = ""  # study date, YYYY-MM-DD
    until: str = ""
    status: str = ""
    category: str = ""
    uid: str = ""  # study or series instance UID
    page: int = 1

    @classmethod
    def from_mapping(cls, data: Any) -> SearchFilters:
        """From a form or a JSON object; unknown keys are ignored, bad dates and pages refused (ValueError)."""
        values = {name: str(data.get(name) or "").strip()[:256] for name in
                  ("accession", "patient_id", "patient_name", "since", "until", "status", "category", "uid")}
        for key in ("since", "until"):
            if values[key]:
                dt.date.fromisoformat(values[key])  # ValueError for anything but YYYY-MM-DD
        page = int(str(data.get("page") or 1))
        if page < 1:
            raise ValueError("page must be 1 or more")
        return cls(**values, page=page)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class SearchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    page: int = 1
    pages: int = 1


def _latest_jobs():  # noqa: ANN202 - a subquery
    return (select(Job.series_instance_uid, func.max(Job.id).label("job_id"))
            .group_by(Job.series_instance_uid).subquery())


def _query(filters: SearchFilters):  # noqa: ANN202 - a select
    latest = _latest_jobs()
    query = (select(Series, SeriesLookup, Job)
             .join(SeriesLookup, SeriesLookup.series_id == Series.id)
             .outerjoin(latest, latest.c.series_instance_uid == Series.series_instance_uid)
             .outerjoin(Job, Job.id == latest.c.job_id))
    conditions = []
    if filters.accession:
        conditions.append(SeriesLookup.accession_number == filters.accession)
    if filters.patient_id:
        conditions.append(SeriesLookup.patient_id == filters.patient_id)
    for word in re.split(r"[\s^,]+", filters.patient_name):
        if word:
            escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conditions.append(SeriesLookup.patient_name.ilike(f"%{escaped}%", escape="\\"))
    if filters.since:
        conditions.append(SeriesLookup.study_date >= filters.since.replace("-", ""))
    if filters.until:
        until = filters.until.replace("-", "")
        conditions.append(and_(SeriesLookup.study_date != "", SeriesLookup.study_date <= until))
    if filters.status:
        conditions.append(Series.status == filters.status)
    if filters.category:
        conditions.append(Job.category == filters.category)
    if filters.uid:
        conditions.append(or_(Series.series_instance_uid == filters.uid, Series.study_instance_uid == filters.uid))
    return query.where(*conditions)


def _iso(value: dt.datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat(timespec="seconds") if value else None


def row_dict(series: Series, lookup: SeriesLookup, job: Job | None) -> dict[str, Any]:
    """One found series as plain values (a result row, a CSV line, the API's JSON)."""
    return {
        "id": lookup.public_id,
        "accession_number": lookup.accession_number,
        "patient_id": lookup.patient_id,
        "patient_name": lookup.patient_name,
        "study_date": iso_date(lookup.study_date),
        "study_description": lookup.study_description,
        "series_description": series.series_description,
        "modality": series.modality,
        "instances": series.instance_count,
        "status": series.status,
        "reason": series.reason,
        "received_at": _iso(series.last_received_at),
        "dl_parenchymal_hu": job.dl_parenchymal_hu if job else None,
        "category": (job.category or None) if job else None,
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
    }


def search(session: Session, filters: SearchFilters, page_size: int, *, everything: bool = False) -> SearchResult:
    """The series that match, newest first: one page of them (``everything``: all, for the CSV export)."""
    index_new_series(session)
    query = _query(filters)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    query = query.order_by(Series.last_received_at.desc(), Series.id.desc())
    pages = max(1, -(-total // page_size))
    page = min(filters.page, pages)
    if not everything:
        query = query.offset((page - 1) * page_size).limit(page_size)
    rows = [row_dict(s, lk, j) for s, lk, j in session.execute(query)]
    return SearchResult(rows=rows, total=int(total), page=page, pages=pages)


def find_by_public_id(session: Session, public_id: str) -> tuple[Series, SeriesLookup] | None:
    """The series named by an opaque id (None when there is none)."""
    if not re.fullmatch(r"[0-9a-f]{24}", public_id or ""):
        return None
    found = session.execute(select(Series, SeriesLookup).join(SeriesLookup, SeriesLookup.series_id == Series.id)
                            .where(SeriesLookup.public_id == public_id)).first()
    return (found[0], found[1]) if found else None


def public_ids(session: Session, series_uids: list[str]) -> dict[str, str]:
    """Series UID -> opaque id, for links from the queue and refusal pages."""
    if not series_uids:
        return {}
    index_new_series(session)
    rows = session.execute(select(Series.series_instance_uid, SeriesLookup.public_id)
                           .join(SeriesLookup, SeriesLookup.series_id == Series.id)
                           .where(Series.series_instance_uid.in_(series_uids)))
    return {uid: pid for uid, pid in rows}

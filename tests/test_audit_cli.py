"""``lpm-node audit``: table, one series in full, CSV and JSON, with jobs and deliveries when present
(on SQLite and on PostgreSQL)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
from functools import partial
from pathlib import Path

import pytest

from lpm_node.core.audit import Association, Delivery, Instance, Job, Series, SeriesDecision, utcnow
from tests.support_net import run_cli

MEASURED = "1.2.840.1.2.1"
REJECTED = "1.2.840.1.2.2"
STUDY = "1.2.840.1.1"


def _audit(data_dir: Path, *args: str, database_url: str = "") -> subprocess.CompletedProcess:
    database = ["--database-url", database_url] if database_url else []
    return run_cli("audit", "--data-dir", str(data_dir), *database, *args, timeout=60)


@pytest.fixture()
def data_dir(tmp_path, audit_sessions) -> Path:
    sessions = audit_sessions
    t0 = utcnow() - dt.timedelta(minutes=5)
    with sessions() as s:
        assoc = Association(calling_ae="PACS", called_ae="LPM_NODE", peer_address="127.0.0.1", peer_port=4242,
                            started_at=t0, ended_at=t0, outcome="released", instances_received=3)
        s.add(assoc)
        s.flush()
        s.add(Series(series_instance_uid=MEASURED, study_instance_uid=STUDY, modality="CT",
                     series_description="CHEST 2.5", instance_count=3, status="done", reason="selected: soft kernel",
                     first_received_at=t0, last_received_at=t0, calling_ae="PACS"))
        s.add(Series(series_instance_uid=REJECTED, study_instance_uid=STUDY, modality="CT",
                     series_description="CHEST C+", instance_count=2, status="rejected",
                     reason="contrast-enhanced: ContrastBolusAgent=IOHEXOL",
                     first_received_at=t0 + dt.timedelta(seconds=1), last_received_at=t0 + dt.timedelta(seconds=1)))
        for i in range(3):
            s.add(Instance(sop_instance_uid=f"{MEASURED}.{i}", series_instance_uid=MEASURED, path=f"/x/{i}.dcm",
                           size_bytes=1000, association_id=assoc.id))
        s.add(SeriesDecision(series_instance_uid=MEASURED, status="queued", reason="selected: soft kernel"))
        job = Job(series_instance_uid=MEASURED, study_instance_uid=STUDY, status="done", dl_parenchymal_hu=35.2,
                  category="moderate-to-severe steatosis", finished_at=utcnow())
        s.add(job)
        s.flush()
        s.add(Delivery(job_id=job.id, series_instance_uid=MEASURED, destination="PACS@127.0.0.1:104",
                       object_kind="SEG", sop_instance_uid="1.2.3.9", path="/o/seg.dcm", status="sent", attempts=1))
        s.add(Delivery(job_id=job.id, series_instance_uid=MEASURED, destination="PACS@127.0.0.1:104",
                       object_kind="SR", sop_instance_uid="1.2.3.10", path="/o/sr.dcm", status="sent", attempts=2))
        s.commit()
    sessions.kw["bind"].dispose()
    return tmp_path


def test_json_lists_series_with_job_and_delivery(data_dir, database_url):
    out = _audit(data_dir, "--json", database_url=database_url)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert listing["refusals"] == []  # nothing was refused in this data set
    rows = {r["series_instance_uid"]: r for r in listing["series"]}
    measured, rejected = rows[MEASURED], rows[REJECTED]
    assert measured["study_instance_uid"] == STUDY and measured["instances"] == 3
    assert measured["dl_parenchymal_hu"] == pytest.approx(35.2)
    assert measured["category"] == "moderate-to-severe steatosis"
    assert measured["job_status"] == "done" and measured["delivery_status"] == "sent"
    assert rejected["status"] == "rejected" and rejected["reason"] == "contrast-enhanced: ContrastBolusAgent=IOHEXOL"
    assert rejected["dl_parenchymal_hu"] is None and rejected["job_status"] is None
    assert list(rows) == [REJECTED, MEASURED]  # newest first


def test_table_detail_and_csv(data_dir, tmp_path, database_url):
    audit = partial(_audit, database_url=database_url)
    table = audit(data_dir)
    assert table.returncode == 0
    assert "contrast-enhanced: ContrastBolusAgent=IOHEXOL" in table.stdout and "35.2" in table.stdout

    detail = audit(data_dir, "--series", MEASURED)
    assert detail.returncode == 0, detail.stderr
    for expected in ("status   done", "instances 3 (3 indexed", "#1 PACS from 127.0.0.1:4242 released",
                     "queued: selected: soft kernel", "DL-parenchymal 35.2 HU", "SEG -> PACS@127.0.0.1:104 sent"):
        assert expected in detail.stdout, (expected, detail.stdout)
    as_json = json.loads(audit(data_dir, "--series", MEASURED, "--json").stdout)
    assert [d["object"] for d in as_json["deliveries"]] == ["SEG", "SR"]
    assert as_json["associations"][0]["calling_ae"] == "PACS"

    target = tmp_path / "series.csv"
    assert audit(data_dir, "--csv", str(target)).returncode == 0
    with open(target, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["series_instance_uid"] for r in rows} == {MEASURED, REJECTED}
    assert next(r for r in rows if r["series_instance_uid"] == MEASURED)["dl_parenchymal_hu"] == "35.2"
    stdout_csv = audit(data_dir, "--csv", "-")
    assert stdout_csv.stdout.splitlines()[0].startswith("study_instance_uid,series_instance_uid")

    missing = audit(data_dir, "--series", "1.2.999")
    assert missing.returncode == 1


def test_missing_database_is_an_error(tmp_path):
    out = _audit(tmp_path / "nowhere", "--json")
    assert out.returncode == 2 and "no audit database" in out.stderr

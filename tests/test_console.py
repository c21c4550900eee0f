"""The console's pages and JSON API, through Starlette's test client, on a real audit database: a SQLite file, then
a database on the test PostgreSQL server.

The rows are those a node writes (series, instances pointing at real DICOM files, a finished job, deliveries);
the end-to-end test with a real node, storescu, Orthanc and chromium is tests/test_console_browser.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from starlette.routing import Route
from starlette.testclient import TestClient

from lpm_node.console.app import build_app
from lpm_node.console.security import check_exposure
from lpm_node.core.audit import (
    Association,
    Delivery,
    Instance,
    Job,
    OperatorAction,
    RoleHeartbeat,
    Series,
    SeriesDecision,
    session_factory,
    utcnow,
)
from lpm_node.core.config import load_settings
from lpm_node.node.worker import Worker
from tests.support_net import REPO, free_port
from tests.support_phantom import small_phantom, write_series

PAYLOAD_NAME = '<script>window.pwned=1</script>^Doe'
PAYLOAD_DESCRIPTION = '<img src=x onerror="window.pwned=2"> CHEST'
PAYLOAD_REASON = "contrast-enhanced: SeriesDescription '<b onmouseover=alert(3)>ARTERIAL</b>' contains 'arterial'"
ADMIN_PASSWORD = "correct horse battery staple"
VIEWER_PASSWORD = "viewer password"


@pytest.fixture
def node_data(tmp_path: Path, database_url: str) -> dict:
    """An audit database as a node leaves it (SQLite, then PostgreSQL): a measured series with a dead delivery, and
    a refused one."""
    data = tmp_path / "data"
    data.mkdir()
    sessions = session_factory(database_url)
    files = write_series(small_phantom(30.0, n_slices=8), tmp_path / "ct", patient_name=PAYLOAD_NAME,
                         patient_id="PID-7", series_description=PAYLOAD_DESCRIPTION,
                         overrides={"AccessionNumber": "ACC-1", "StudyDate": "20261130"})
    refused = write_series(small_phantom(30.0, n_slices=2, seed=3), tmp_path / "refused", patient_id="PID-8",
                           study_description="=HYPERLINK(1) CT",
                           overrides={"AccessionNumber": "ACC-2", "StudyDate": "20260101"}, series_number=5)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    other = pydicom.dcmread(refused[0], stop_before_pixels=True)
    now = utcnow()
    with sessions() as session:
        assoc = Association(calling_ae="CT_SCANNER", called_ae="LPM_NODE", peer_address="127.0.0.1", peer_port=4000,
                            outcome="released", instances_received=len(files), started_at=now, ended_at=now)
        bad = Association(calling_ae="INTRUDER", called_ae="LPM_NODE", peer_address="10.0.0.9", peer_port=5000,
                          outcome="rejected", reason="calling AE title not recognised: <i>INTRUDER</i>",
                          started_at=now)
        session.add_all([assoc, bad])
        session.flush()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            session.add(Instance(sop_instance_uid=ds.SOPInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                                 sop_class_uid=ds.SOPClassUID, path=str(path), size_bytes=path.stat().st_size,
                                 association_id=assoc.id, received_at=now))
        session.add(Instance(sop_instance_uid=other.SOPInstanceUID, series_instance_uid=other.SeriesInstanceUID,
                             path=str(refused[0]), association_id=assoc.id, received_at=now))
        series = Series(series_instance_uid=first.SeriesInstanceUID, study_instance_uid=first.StudyInstanceUID,
                        modality="CT", series_description=PAYLOAD_DESCRIPTION, calling_ae="CT_SCANNER",
                        instance_count=len(files), status="done", reason="measured", decided_at=now,
                        first_received_at=now - dt.timedelta(seconds=90),
                        last_received_at=now - dt.timedelta(seconds=80))
        session.add(series)
        session.add(Series(series_instance_uid=other.SeriesInstanceUID, study_instance_uid=other.StudyInstanceUID,
                           modality="CT", series_description="ARTERIAL", status="rejected", reason=PAYLOAD_REASON,
                           decided_at=now, instance_count=1))
        session.add(SeriesDecision(series_instance_uid=series.series_instance_uid, status="done", reason="measured",
                                   at=now))
        job = Job(series_instance_uid=series.series_instance_uid, study_instance_uid=series.study_instance_uid,
                  status="done", created_at=now - dt.timedelta(seconds=70), started_at=now - dt.timedelta(seconds=60),
                  finished_at=now - dt.timedelta(seconds=10), attempts=1, device="cpu", model_name="phantom_liver",
                  model_version="test", model_weights_sha256="ab" * 32, model_test=True,
                  timings={"load": 0.4, "segment": 12.5, "measure": 0.2}, dl_parenchymal_hu=31.27,
                  dl_volumetric_hu=33.0, category="moderate_to_severe_steatosis",
                  qc_flags=["liver_cut_inferior"], result={"liver_volume_ml": 1400.0})
        session.add(job)
        session.flush()
        session.add(Delivery(job_id=job.id, series_instance_uid=series.series_instance_uid,
                             destination="PACS@127.0.0.1:9", object_kind="SR", sop_instance_uid="1.2.3.4",
                             path=str(files[0]), status="dead", attempts=5, last_error="connection refused"))
        session.commit()
        ids = {"series_uid": series.series_instance_uid, "study_uid": series.study_instance_uid}
    sessions.kw["bind"].dispose()
    return {"data": data, "database_url": database_url, **ids}


def _settings(node: dict, host: str = "127.0.0.1", users: bool = True, **console) -> object:
    """Settings of a console on ``node``'s data folder and audit database."""
    hasher = PasswordHasher()
    import bcrypt

    section: dict = {"host": host, "viewer_url": "http://viewer.test/view?StudyInstanceUIDs={study_uid}",
                     **console}
    if users:
        section["users"] = [
            {"name": "ana", "password_hash": hasher.hash(ADMIN_PASSWORD), "role": "admin"},
            {"name": "vic", "password_hash": bcrypt.hashpw(VIEWER_PASSWORD.encode(), bcrypt.gensalt(4)).decode(),
             "role": "viewer"},
        ]
    return load_settings(None, {"node": {"data_dir": str(node["data"]), "database_url": node["database_url"]},
                                "console": section})


def _client(settings) -> TestClient:  # noqa: ANN001
    return TestClient(build_app(settings), base_url="http://127.0.0.1:8480", follow_redirects=False)


def _csrf(client: TestClient) -> str:
    page = client.get("/find")
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def _login(client: TestClient, name: str, password: str) -> None:
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    answer = client.post("/login", data={"name": name, "password": password, "csrf_token": token})
    assert answer.status_code == 303, answer.text


def _public_id(client: TestClient, **filters: str) -> str:
    found = client.post("/api/series/search", json=filters).json()
    assert found["total"] == 1, found
    return found["series"][0]["id"]


def test_search_by_accession_patient_and_date_finds_the_series_and_its_story(node_data) -> None:
    with _client(_settings(node_data, users=False)) as client:
        by_accession = client.post("/api/series/search", json={"accession": "ACC-1"}).json()
        assert by_accession["total"] == 1
        row = by_accession["series"][0]
        assert row["patient_name"] == PAYLOAD_NAME and row["patient_id"] == "PID-7"
        assert row["dl_parenchymal_hu"] == pytest.approx(31.27) and row["category"] == "moderate_to_severe_steatosis"
        assert re.fullmatch(r"[0-9a-f]{24}", row["id"])
        assert client.post("/api/series/search", json={"patient_name": "doe"}).json()["total"] == 1
        assert client.post("/api/series/search", json={"patient_id": "PID-8"}).json()["total"] == 1
        assert client.post("/api/series/search", json={"since": "2026-11-01", "until": "2026-12-31"}).json()[
            "total"] == 1
        assert client.post("/api/series/search", json={"until": "2026-06-30"}).json()["total"] == 1
        assert client.post("/api/series/search", json={"status": "rejected"}).json()["total"] == 1
        assert client.post("/api/series/search", json={"category": "not_assessable"}).json()["total"] == 0
        assert client.post("/api/series/search", json={"uid": node_data["study_uid"]}).json()["total"] == 1
        assert client.post("/api/series/search", json={"accession": "nope"}).json()["total"] == 0
        assert client.post("/api/series/search", json={"since": "30/11/2026"}).status_code == 400

        story = client.get(f"/api/series/{row['id']}").json()
        assert story["latest_job"]["dl_parenchymal_hu"] == pytest.approx(31.27)
        assert story["latest_job"]["category_words"] == "Moderate-to-severe steatosis"
        assert story["latest_job"]["qc_sentences"] and "liver_cut_inferior" not in story["latest_job"]["qc_sentences"]
        assert story["viewer_link"] == f"http://viewer.test/view?StudyInstanceUIDs={node_data['study_uid']}"
        kinds = {e["kind"] for e in story["timeline"]}
        assert {"association", "instances", "decision", "job", "delivery"} <= kinds
        assert client.get("/api/series/" + "0" * 24).status_code == 404


def test_pages_show_header_text_as_text(node_data) -> None:
    with _client(_settings(node_data, users=False)) as client:
        results = client.post("/find", data={"csrf_token": _csrf(client), "accession": "ACC-1"}).text
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in results and "<script>window.pwned" not in results
        public_id = _public_id(client, accession="ACC-1")
        page = client.get(f"/series/{public_id}").text
        assert "<script>window.pwned" not in page and '<img src=x onerror' not in page
        assert "&lt;img src=x onerror=" in page
        refusals = client.get("/refusals").text
        assert "<b onmouseover" not in refusals and "&lt;b onmouseover=alert(3)&gt;" in refusals
        assert "<i>INTRUDER</i>" not in refusals and "&lt;i&gt;INTRUDER&lt;/i&gt;" in refusals
        assert page.count("<script") == 1  # htmx, from /static only
        headers = client.get("/find").headers
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"


def test_csv_export_has_every_match_and_no_formula_cells(node_data) -> None:
    with _client(_settings(node_data, users=False)) as client:
        answer = client.post("/find.csv", data={"csrf_token": _csrf(client)})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        lines = answer.text.strip().splitlines()
        assert len(lines) == 3 and lines[0].startswith("id,accession_number")
        assert "ACC-1" in answer.text and "ACC-2" in answer.text
        assert "'=HYPERLINK(1) CT" in answer.text and ",=HYPERLINK" not in answer.text
        assert client.post("/find.csv", data={}).status_code == 403  # a form from elsewhere
        assert client.post("/find", data={"accession": "ACC-1"}).status_code in (303, 403)


def test_off_loopback_every_page_and_api_needs_a_login(node_data) -> None:
    with pytest.raises(ValueError, match="not loopback"):
        check_exposure(_settings(node_data, host="0.0.0.0", users=False).console)
    settings = _settings(node_data, host="0.0.0.0")
    app = build_app(settings)
    open_paths = {"/health/live", "/health/ready", "/login"}
    with TestClient(app, base_url="http://node.example:8480", follow_redirects=False) as client:
        checked = 0
        for route in app.routes:
            if not isinstance(route, Route) or route.path in open_paths:
                continue
            path = route.path.replace("{public_id}", "0" * 24).replace("{action}", "retry")
            for method in sorted(route.methods - {"HEAD"}):
                answer = client.request(method, path)
                if path.startswith("/api/") or path == "/metrics":
                    assert answer.status_code == 401, (method, path)
                else:
                    assert answer.status_code == 303 and answer.headers["location"] == "/login", (method, path)
                checked += 1
        assert checked >= 20
        assert client.get("/health/live").status_code == 200
        assert client.get("/static/htmx-2.0.11.min.js").status_code == 200
        _login(client, "vic", VIEWER_PASSWORD)
        assert client.get("/queues").status_code == 200
        cookie = next(c for c in client.cookies.jar if c.name == "lpm_console")
        assert cookie.has_nonstandard_attr("HttpOnly") or "httponly" in str(cookie._rest).lower()


def test_scripts_sign_in_with_basic_auth_and_metrics_parse(node_data) -> None:
    with _client(_settings(node_data)) as client:
        assert client.get("/metrics").status_code == 401
        answer = client.get("/metrics", auth=("vic", VIEWER_PASSWORD))
        assert answer.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        received = {s.labels["outcome"]: s.value for s in families["lpm_instances"].samples
                    if s.name == "lpm_instances_total"}
        assert received["received"] == 8
        series = {s.labels["status"]: s.value for s in families["lpm_series"].samples}
        assert series["done"] == 1 and series["rejected"] == 1
        stages = {s.labels["stage"] for s in families["lpm_job_stage_duration_seconds"].samples}
        assert stages == {"load", "segment", "measure"}
        deliveries = {s.labels["status"]: s.value for s in families["lpm_deliveries"].samples}
        assert deliveries["dead"] == 1
        assert client.post("/api/series/search", json={}, auth=("vic", "wrong")).status_code == 401


def test_only_admins_act_with_a_csrf_token_and_each_action_is_audited(node_data) -> None:
    settings = _settings(node_data)
    with _client(settings) as client:
        _login(client, "vic", VIEWER_PASSWORD)
        public_id = _public_id(client, accession="ACC-1")
        page = client.get(f"/series/{public_id}").text
        assert 'id="measure-again"' not in page
        token = _csrf(client)
        denied = client.post(f"/series/{public_id}/measure-again", data={"csrf_token": token},
                             headers={"HX-Request": "true"})
        assert denied.status_code == 403 and "viewer" in denied.text
    with _client(settings) as client:
        _login(client, "ana", ADMIN_PASSWORD)
        public_id = _public_id(client, accession="ACC-1")
        assert 'id="measure-again"' in client.get(f"/series/{public_id}").text
        no_token = client.post(f"/series/{public_id}/measure-again", data={}, headers={"HX-Request": "true"})
        assert no_token.status_code == 403 and "CSRF" in no_token.text
        done = client.post(f"/series/{public_id}/measure-again", data={"csrf_token": _csrf(client)},
                           headers={"HX-Request": "true"})
        assert done.status_code == 200 and "re-queued" in done.text
        retried = client.post("/queues/retry", data={"csrf_token": _csrf(client), "destination": "",
                                                     "delivery_id": ""}, headers={"HX-Request": "true"})
        assert "requeued 1" in retried.text
        assert "suspended" in client.post("/queues/suspend", data={"csrf_token": _csrf(client)},
                                          headers={"HX-Request": "true"}).text
    sessions = session_factory(settings.db_url)
    with sessions() as session:
        actions = list(session.scalars(select(OperatorAction).order_by(OperatorAction.id)))
        assert [a.user for a in actions] == ["ana", "ana", "ana"]
        assert [a.command for a in actions] == ["console: measure again", "console: retry all dead letters",
                                                "console: suspend measuring"]
        assert session.scalars(select(Series.status).where(
            Series.series_instance_uid == node_data["series_uid"])).one() == "complete"
        assert session.scalars(select(Delivery.status)).one() == "pending"
        # the worker takes no job while measuring is suspended
        session.add(Job(series_instance_uid=node_data["series_uid"], status="queued"))
        session.commit()
    worker = Worker(settings, sessions, spool=None)  # type: ignore[arg-type]
    assert worker._claim() is None
    sessions.kw["bind"].dispose()


def test_login_attempts_are_rate_limited(node_data) -> None:
    with _client(_settings(node_data, login_attempts_per_minute=3)) as client:
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
        codes = [client.post("/login", data={"name": "ana", "password": "guess", "csrf_token": token}).status_code
                 for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        right = client.post("/login", data={"name": "ana", "password": ADMIN_PASSWORD, "csrf_token": token})
        assert right.status_code == 429  # still refused within the minute, even with the right password


def test_health_lists_each_role_with_its_heartbeat(node_data) -> None:
    settings = _settings(node_data, users=False)
    sessions = session_factory(settings.db_url)
    now = utcnow()
    with sessions() as session:
        session.add_all([
            RoleHeartbeat(role="receiver", host="node-a", pid=11, started_at=now, last_seen_at=now),
            RoleHeartbeat(role="worker", host="gpu-b", pid=22, started_at=now,
                          last_seen_at=now - dt.timedelta(minutes=5)),
            RoleHeartbeat(role="sender", host="node-a", pid=33, started_at=now, last_seen_at=now, stopped_at=now),
        ])
        session.commit()
    sessions.kw["bind"].dispose()
    with _client(settings) as client:
        listed = {(r["role"], r["ok"]) for r in client.get("/api/health").json()["roles"]}
        assert listed == {("receiver", True), ("worker", False), ("console", True)}  # the stopped sender is gone
        assert "gpu-b pid 22" in client.get("/health").text


def test_a_console_on_loopback_refuses_other_host_names(node_data) -> None:
    app = build_app(_settings(node_data, users=False))
    with TestClient(app, base_url="http://rebound.example:8480") as client:
        assert client.get("/find").status_code == 421


def test_lpm_node_console_serves_on_loopback_and_refuses_to_be_exposed_without_users(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    refused = subprocess.run([sys.executable, "-m", "lpm_node.cli", "console", "--data-dir", str(data),
                              "--console-host", "0.0.0.0", "--console-port", str(port)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not loopback" in refused.stderr
    process = subprocess.Popen([sys.executable, "-m", "lpm_node.cli", "console", "--data-dir", str(data),
                                "--console-port", str(port)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as answer:
                    assert json.loads(answer.read())["status"] == "ready"
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/find", timeout=5) as answer:
            assert "Find a series" in answer.read().decode()
    finally:
        process.terminate()
        assert process.wait(20) == 0


def test_api_actions_take_json_and_admins_only(node_data) -> None:
    with _client(_settings(node_data, users=False)) as client:  # loopback, no users: the local operator
        assert client.post("/api/actions/suspend", data={"x": "1"}).status_code == 415  # no cross-site form
        assert client.post("/api/actions/suspend", json={}).json()["message"].startswith("measuring suspended")
        assert client.post("/api/actions/resume", json={}).status_code == 200
        public_id = _public_id(client, accession="ACC-1")
        assert "re-queued" in client.post("/api/actions/measure-again", json={"id": public_id}).json()["message"]
        assert client.post("/api/actions/retry", json={"destination": "not a destination"}).status_code == 400
    with _client(_settings(node_data)) as client:
        assert client.post("/api/actions/suspend", json={}, auth=("vic", VIEWER_PASSWORD)).status_code == 403
        answer = client.post("/api/actions/retry", json={"delivery_ids": [1]}, auth=("ana", ADMIN_PASSWORD))
        assert answer.status_code == 200 and "requeued 1" in answer.json()["message"]
        _login(client, "ana", ADMIN_PASSWORD)  # a browser session: the token is needed as well
        assert client.post("/api/actions/resume", json={}).status_code == 403
        assert client.post("/api/actions/resume", json={}, headers={"X-CSRF-Token": _csrf(client)}).status_code == 200

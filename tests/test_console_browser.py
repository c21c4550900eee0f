"""The console in Debian's chromium (Playwright), against a node that really received and measured a series, on
SQLite and on PostgreSQL.

storescu sends a phantom chest CT whose patient name and series description carry script and HTML payloads to
``lpm-node serve --console`` (bundled test model); the results go to Orthanc and to a second destination that is
down, so they become dead letters there. A second series is refused by the rules with a payload in its reason.
An admin finds the series by accession, reads its story (value, category, flags, key image), retries the dead
letters once that destination is up, measures the series again and suspends measuring; a viewer cannot act;
without a login every page and API call is refused; ``/metrics`` is parsed by prometheus_client's parser.
Screenshots go to test-artifacts/console/.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.conftest import DATABASES
from tests.support_net import REPO, NodeProcess, dcmtk_env, free_port, have_dcmtk, storescu
from tests.support_viewer import CHROMIUM

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed"),
    pytest.mark.timeout(1200),
]

ARTIFACTS = REPO / "test-artifacts" / "console"
BROWSER_ARGS = ["--no-sandbox"]
PATIENT_NAME = "<script>window.pwned=1</script>^Doe"
DESCRIPTION = '<img src=x onerror="window.pwned=2"> CHEST WO CONTRAST 2.5mm'
REFUSED_DESCRIPTION = "<b onmouseover=window.pwned=3>ARTERIAL</b> CHEST"
ACCESSION = "ACC-CONSOLE-1"
ADMIN, ADMIN_PASSWORD = "ana", "correct horse battery staple"
VIEWER, VIEWER_PASSWORD = "vic", "only looking"


def _wait(check, timeout: float, what: str, node: NodeProcess):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{what} after {timeout} s\n{node.log()[-4000:]}")


@pytest.fixture(scope="module", params=DATABASES)
def node(request, tmp_path_factory):  # noqa: ANN001, ANN201
    """A measuring node with its console (on SQLite, then on PostgreSQL), a measured series, a refused one and dead
    letters; yields a dict."""
    database_url = "" if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()
    root = tmp_path_factory.mktemp("console")
    orthanc = Orthanc(root / "orthanc")
    orthanc.start()
    down_port = free_port()
    console_port = free_port()
    users = [
        {"name": ADMIN, "password_hash": PasswordHasher().hash(ADMIN_PASSWORD), "role": "admin"},
        {"name": VIEWER, "password_hash": bcrypt.hashpw(VIEWER_PASSWORD.encode(), bcrypt.gensalt(4)).decode(),
         "role": "viewer"},
    ]
    config = root / "node.toml"
    config.write_text(
        "[output]\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\nmax_attempts = 2\n"
        f'destinations = ["{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "ARCHIVE@127.0.0.1:{down_port}"]\n'
        f'[console]\nport = {console_port}\necho_interval_s = 2.0\n'
        'viewer_url = "http://viewer.invalid/viewer?StudyInstanceUIDs={study_uid}"\n'
        "users = " + json.dumps(users).replace('":', '" =') + "\n")  # JSON objects as TOML inline tables
    chest = write_ct_series(make_phantom(30.0, n_slices=64, size=256, pixel_spacing=1.4, seed=21),
                            root / "chest", patient_name=PATIENT_NAME, patient_id="PID-CONSOLE",
                            series_description=DESCRIPTION, overrides={"AccessionNumber": ACCESSION})
    refused = write_ct_series(make_phantom(30.0, n_slices=8, size=64, pixel_spacing=5.6, seed=5), root / "refused",
                              patient_id="PID-REFUSED", series_number=7, series_description=REFUSED_DESCRIPTION,
                              overrides={"AccessionNumber": "ACC-REFUSED"})
    process = NodeProcess(root / "node", measure=True, stable_seconds=1, config=config, extra=["--console"],
                          database_url=database_url)
    try:
        process.start()
        assert storescu(process.port, chest).returncode == 0
        assert storescu(process.port, refused).returncode == 0
        series_uid = str(dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
        _wait(lambda: len(process.query("SELECT * FROM deliveries WHERE status = 'dead'")) == 4, 600,
              "the archive's deliveries not dead", process)
        _wait(lambda: len(process.query("SELECT * FROM deliveries WHERE status = 'sent'")) == 4, 120,
              "Orthanc's deliveries not sent", process)
        yield {"node": process, "orthanc": orthanc, "base": f"http://127.0.0.1:{console_port}",
               "series_uid": series_uid, "down_port": down_port, "root": root,
               "study_uid": str(dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID)}
    finally:
        process.__exit__(None, None, None)
        orthanc.stop(graceful=False)


def _storescp(aet: str, port: int, folder: Path) -> subprocess.Popen:
    """dcmtk's storescp as an archive on 127.0.0.1:port, writing what it receives to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["storescp", "-aet", aet, "--output-directory", str(folder), str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], env=dcmtk_env(),
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and process.poll() is None, "storescp did not start"
        time.sleep(0.2)
    return process


def _login(page, base: str, name: str, password: str) -> None:  # noqa: ANN001
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/find")


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None


def test_without_a_login_every_page_and_api_call_is_refused(node) -> None:
    base = node["base"]
    for path in ["/find", "/queues", "/refusals", "/health", "/throughput", "/series/" + "0" * 24]:
        status, _ = _request(base + path)
        assert status == 303, path
    for path in ["/api/queues", "/api/health", "/api/refusals", "/api/throughput", "/metrics",
                 "/api/series/" + "0" * 24]:
        assert _request(base + path)[0] == 401, path
    assert _request(base + "/api/series/search", b"{}", {"Content-Type": "application/json"})[0] == 401
    assert _request(base + "/queues/retry", b"csrf_token=x", {"Content-Type": "application/x-www-form-urlencoded"}
                    )[0] == 303
    assert _request(base + "/health/live")[0] == 200


def test_metrics_parse_with_prometheus_client(node) -> None:
    auth = {"Authorization": "Basic " + b64encode(f"{VIEWER}:{VIEWER_PASSWORD}".encode()).decode()}
    status, text = _request(node["base"] + "/metrics", headers=auth)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    received = {s.labels["outcome"]: s.value for s in families["lpm_instances"].samples
                if s.name == "lpm_instances_total"}
    assert received["received"] == 72
    series = {s.labels["status"]: s.value for s in families["lpm_series"].samples}
    assert series["rejected"] == 1 and series["done"] == 1
    stages = {s.labels["stage"] for s in families["lpm_job_stage_duration_seconds"].samples}
    assert {"load", "resample", "segment", "measure", "write"} <= stages, stages


def test_admin_finds_reads_retries_measures_again_and_suspends(node) -> None:
    base, process = node["base"], node["node"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            dialogs: list[str] = []

            def on_dialog(dialog) -> None:  # noqa: ANN001
                dialogs.append(dialog.message)
                dialog.accept()

            page.on("dialog", on_dialog)
            _login(page, base, ADMIN, ADMIN_PASSWORD)

            # find by accession (POSTed: nothing of it in the URL)
            page.fill("input[name=accession]", ACCESSION)
            page.click("#search-button")
            playwright.expect(page.locator("#results tbody tr")).to_have_count(1)  # the whole list, filtered
            assert ACCESSION not in page.url and page.locator("#results td a", has_text=ACCESSION).count() == 1
            assert page.locator("#results").inner_text().count(PATIENT_NAME) == 1  # the payload, as text
            page.screenshot(path=str(ARTIFACTS / "1-find.png"), full_page=True)

            # its story: value, category, flags in words, key image, viewer link
            page.locator("#results td a", has_text=ACCESSION).click()
            page.wait_for_selector("#timeline")
            assert "/series/" in page.url and "PID" not in page.url and ACCESSION not in page.url
            value = process.query("SELECT dl_parenchymal_hu, category FROM jobs WHERE status = 'done'")[0]
            assert page.inner_text("#value") == f"{value['dl_parenchymal_hu']:.2f} HU"
            assert page.inner_text("#category") == {"moderate_to_severe_steatosis": "Moderate-to-severe steatosis",
                                                    "no_moderate_to_severe_steatosis":
                                                        "Not moderate-to-severe steatosis",
                                                    "not_assessable": "Not assessable"}[value["category"]]
            flags = page.inner_text("#flags")
            assert flags and "_" not in flags  # sentences, never the snake_case names
            assert page.inner_text("#patient-name") == PATIENT_NAME
            assert page.locator("h1").inner_text() == DESCRIPTION
            key = page.locator("#key-image")
            key.wait_for()
            page.wait_for_function("document.querySelector('#key-image').naturalWidth > 0")
            assert page.get_attribute("#viewer-link", "href").endswith(node["study_uid"])
            timeline = page.inner_text("#timeline")
            for expected in ("Association from STORESCU", "instance(s) received", "Series queued", "Series done",
                             "Job 1 done", "to ORTHANC@", "ARCHIVE@", "dead"):
                assert expected in timeline, expected
            page.screenshot(path=str(ARTIFACTS / "2-story.png"), full_page=True)

            # one dead letter, ticked, to another archive; then the first archive comes up and the rest go to it
            second_port = free_port()
            archives = [_storescp("SECOND", second_port, node["root"] / "second-in"),
                        _storescp("ARCHIVE", node["down_port"], node["root"] / "archive-in")]
            try:
                page.goto(f"{base}/queues")
                assert page.locator("#dead tbody tr").count() == 4
                page.screenshot(path=str(ARTIFACTS / "3-queues.png"), full_page=True)
                ticked = page.locator("#dead tbody input[type=checkbox]").first
                ticked_id = ticked.get_attribute("value")
                ticked.check()
                page.fill("#other-destination", f"SECOND@127.0.0.1:{second_port}")
                page.click("#retry-all")
                page.locator("#message .ok").wait_for()
                assert f"delivery {ticked_id} redirected to SECOND@127.0.0.1:{second_port}" in page.inner_text(
                    "#message")
                _wait(lambda: len(list((node["root"] / "second-in").iterdir())) == 1, 60,
                      "the redirected dead letter not at the second archive", process)
                page.goto(f"{base}/queues")
                assert page.locator("#dead tbody tr").count() == 3
                page.click("#retry-all")
                page.locator("#message .ok").wait_for()
                assert "requeued 3" in page.inner_text("#message")
                _wait(lambda: len(process.query("SELECT * FROM deliveries WHERE status = 'sent'")) == 8, 120,
                      "the retried dead letters not sent", process)
                assert len(list((node["root"] / "archive-in").iterdir())) == 3
            finally:
                for archive in archives:
                    archive.terminate()
                    archive.wait(10)

            # measure again: a second job, and the earlier result among the previous results
            page.goto(f"{base}/find")
            page.fill("input[name=accession]", ACCESSION)
            page.click("#search-button")
            playwright.expect(page.locator("#results tbody tr")).to_have_count(1)
            page.locator("#results td a", has_text=ACCESSION).click()
            page.click("#measure-again")
            page.locator("#message .ok").wait_for()
            assert "re-queued" in page.inner_text("#message")
            story_url = page.url
            _wait(lambda: len(process.query("SELECT * FROM jobs WHERE status = 'done'")) == 2, 600,
                  "the second measurement", process)
            page.goto(story_url)
            assert page.locator("#previous tbody tr").count() == 1
            assert "re-run requested by the operator ana" in page.inner_text("#timeline")

            # suspend and resume measuring
            page.goto(f"{base}/queues")
            page.click("#suspend")
            page.locator("#message .ok").wait_for()
            page.goto(f"{base}/queues")
            assert page.inner_text("#measuring") == "suspended"
            page.click("#resume")
            page.locator("#message .ok").wait_for()

            # refusals: the reason with its payload, as text
            page.goto(f"{base}/refusals")
            refused = page.inner_text("#refused-series")
            assert "<b onmouseover=window.pwned=3>ARTERIAL</b>" in refused
            page.screenshot(path=str(ARTIFACTS / "4-refusals.png"), full_page=True)
            page.goto(f"{base}/health")
            page.wait_for_function("document.querySelector('#parts').innerText.includes('C-ECHO')")
            page.screenshot(path=str(ARTIFACTS / "5-health.png"), full_page=True)
            page.goto(f"{base}/throughput")
            assert page.locator("svg.chart").count() == 2
            page.screenshot(path=str(ARTIFACTS / "6-throughput.png"), full_page=True)

            assert page.evaluate("window.pwned === undefined")
            assert all("pwned" not in d for d in dialogs)
            assert len(dialogs) == 5  # 2 retries, measure again, suspend, resume: each asked for confirmation
        finally:
            browser.close()
    # "user" quoted: a keyword in PostgreSQL (the current role's name)
    actions = process.query('SELECT "user", command FROM operator_actions ORDER BY id')
    assert [(a["user"], a["command"]) for a in actions] == [
        (ADMIN, f"console: retry deliveries {ticked_id} to SECOND@127.0.0.1:{second_port}"),
        (ADMIN, "console: retry all dead letters"), (ADMIN, "console: measure again"),
        (ADMIN, "console: suspend measuring"), (ADMIN, "console: resume measuring")]
    log = process.log()  # the node's and the console's (uvicorn's access lines name opaque ids only)
    assert "/series/" in log and all(text not in log for text in (PATIENT_NAME, "PID-CONSOLE", ACCESSION))


def test_a_viewer_reads_but_cannot_act(node) -> None:
    base = node["base"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            context = browser.new_context()
            page = context.new_page()
            _login(page, base, VIEWER, VIEWER_PASSWORD)
            found = context.request.post(f"{base}/api/series/search", data=json.dumps({"accession": ACCESSION}),
                                         headers={"Content-Type": "application/json"}).json()
            public_id = found["series"][0]["id"]
            page.goto(f"{base}/series/{public_id}")
            assert page.locator("#measure-again").count() == 0
            page.goto(f"{base}/queues")
            assert page.locator("#suspend, #resume, #retry-all").count() == 0
            token = page.get_attribute("form[action='/logout'] input[name=csrf_token]", "value")
            before = len(node["node"].query("SELECT * FROM operator_actions"))
            for path in (f"/series/{public_id}/measure-again", "/queues/retry", "/queues/suspend"):
                answer = context.request.post(base + path, form={"csrf_token": token},
                                              headers={"HX-Request": "true"})
                assert answer.status == 403 and "only admins act" in answer.text(), path
            answer = context.request.post(f"{base}/api/actions/suspend", data="{}",
                                          headers={"Content-Type": "application/json", "X-CSRF-Token": token})
            assert answer.status == 403
            assert len(node["node"].query("SELECT * FROM operator_actions")) == before
        finally:
            browser.close()

"""Outbox and sender against real peers: Orthanc (up, down, frozen, full, checking its AE title) and LocalStore;
the outbox on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from lpm_node.answer import build_key_image, build_seg, build_sr, write_dataset
from lpm_node.answer.outbox import enqueue_results, retry_deliveries, series_delivery_status
from lpm_node.answer.sender import Sender, backoff_delay
from lpm_node.answer.transport import store_outcome
from lpm_node.cli import main as cli_main
from lpm_node.core.audit import Delivery, DeliveryAttempt, utcnow
from lpm_node.core.config import OutputSettings, load_settings
from lpm_node.core.destinations import Destination, result_destinations
from lpm_node.demo.local_store import LocalStore
from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.imaging.measurement import Category, Measurement
from tests.support_net import dcmtk_env, free_port, have_dcmtk, wait_for_port
from tests.support_sending import ResultFiles, write_ct, write_results
from tests.support_writers import make_ct_datasets

INITIAL_S = 10.0
MAX_S = 40.0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> ResultFiles:
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def sessions(audit_sessions: sessionmaker) -> sessionmaker:
    """The outbox on SQLite, then on PostgreSQL (the commands are given the same ``--database-url``)."""
    return audit_sessions


def output(max_attempts: int = 10) -> OutputSettings:
    return OutputSettings(max_attempts=max_attempts, backoff_initial_s=INITIAL_S, backoff_max_s=MAX_S)


def to_orthanc(server: Orthanc, aet: str | None = None) -> Destination:
    return Destination(aet or server.aet, server.host, server.dicom_port)


def enqueue(sessions: sessionmaker, results: ResultFiles, *destinations: Destination) -> list[int]:
    with sessions() as session, session.begin():
        rows = enqueue_results(
            session, job_id=None, series_instance_uid=results.series_uid, objects=results.objects,
            destinations=list(destinations),
        )
        return [row.id for row in rows]


def deliveries(sessions: sessionmaker) -> list[Delivery]:
    with sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def attempts(sessions: sessionmaker, delivery_id: int | None = None) -> list[DeliveryAttempt]:
    query = select(DeliveryAttempt).order_by(DeliveryAttempt.id)
    if delivery_id is not None:
        query = query.where(DeliveryAttempt.delivery_id == delivery_id)
    with sessions() as session:
        return list(session.scalars(query))


def aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def test_delivers_seg_sr_and_key_image_to_orthanc(orthanc: Orthanc, sessions, results: ResultFiles) -> None:
    enqueue(sessions, results, to_orthanc(orthanc))
    sender = Sender(sessions, output(), "LPM_NODE", timeout_s=10)

    assert sender.run_once() == 3

    stored = {}
    for kind, _path, uid in results.objects:
        found = orthanc.find_by_sop_uid(uid)
        assert len(found) == 1, kind
        stored[kind] = orthanc.instance_tags(found[0])
    assert stored["SEG"]["Modality"] == "SEG"
    assert stored["SR"]["Modality"] == "SR"
    assert {tags["StudyInstanceUID"] for tags in stored.values()} == {results.study_uid}
    assert len(orthanc.studies()) == 1
    rows = deliveries(sessions)
    assert [r.status for r in rows] == ["sent"] * 3
    assert all(r.sent_at is not None and r.attempts == 1 and r.last_error == "" for r in rows)
    log = attempts(sessions)
    assert [(a.ok, a.status) for a in log] == [(True, "0x0000")] * 3
    with sessions() as session:
        assert series_delivery_status(session, results.series_uid) == {"sent": 3}

    assert sender.run_once() == 0  # nothing left to send, nothing re-sent
    assert len(attempts(sessions)) == 3
    assert len(orthanc.instances()) == 3


def test_node_writer_outputs_arrive_in_the_source_study(orthanc: Orthanc, sessions, tmp_path: Path) -> None:
    series = make_ct_datasets(n_slices=8, size=32)
    for i, ds in enumerate(series.datasets):
        orthanc.post("/instances", write_dataset(ds, tmp_path / "ct" / f"{i}.dcm").read_bytes())
    k = 4
    measurement = Measurement(
        dl_parenchymal_hu=31.75, dl_volumetric_hu=36.25, liver_volume_ml=1534.5, category=Category.STEATOSIS,
        threshold_hu=40.0, roi_slices=[k - 2, k, k + 2], roi_centres=[[k - 2, 16, 12], [k, 16, 12], [k + 2, 16, 12]],
        roi_pixels=[36, 36, 36], roi_sd_hu=7.5, robust_parenchymal_hu=33.5, roi_in_liver_fraction=1.0,
        qc_flags=[], spleen_hu=None, liver_minus_spleen_hu=None,
    )
    seg = build_seg(series.datasets, series.frame_refs, {"liver": series.liver, "roi": series.roi})
    sr = build_sr(series.datasets, seg, measurement)
    key = build_key_image(series.datasets, series.frame_refs, k, series.roi[k], series.liver[k], measurement)
    objects = [
        (kind, write_dataset(ds, tmp_path / "out" / f"{kind}.dcm"), str(ds.SOPInstanceUID))
        for kind, ds in (("SEG", seg), ("SR", sr), ("KEY", key))
    ]
    source_uid = str(series.datasets[0].SeriesInstanceUID)
    with sessions() as session, session.begin():
        enqueue_results(
            session, job_id=None, series_instance_uid=source_uid, objects=objects, destinations=[to_orthanc(orthanc)]
        )
    assert Sender(sessions, output(), "LPM_NODE", timeout_s=10).run_once() == 3
    assert len(orthanc.studies()) == 1  # same study as the CT
    assert len(orthanc.series()) == 4
    for kind, _, uid in objects:
        (found,) = orthanc.find_by_sop_uid(uid)
        tags = orthanc.instance_tags(found)
        assert tags["StudyInstanceUID"] == series.datasets[0].StudyInstanceUID, kind
        assert tags["PatientID"] == series.datasets[0].PatientID, kind


def test_pacs_down_keeps_results_queued_with_backoff_then_delivers_once(
    orthanc: Orthanc, sessions, results: ResultFiles
) -> None:
    enqueue(sessions, results, to_orthanc(orthanc))
    sender = Sender(sessions, output(), "LPM_NODE", timeout_s=5)
    orthanc.stop()
    t0 = utcnow()

    assert sender.run_once(now=t0) == 0
    rows = deliveries(sessions)
    assert [(r.status, r.attempts) for r in rows] == [("pending", 1)] * 3
    for row in rows:
        assert row.last_error.startswith("ConnectionRefused")
        wait = (aware(row.next_attempt_at) - t0).total_seconds()
        assert 0.9 * INITIAL_S - 1e-3 <= wait <= INITIAL_S + 1e-3
    assert len({r.next_attempt_at for r in rows}) == 1  # failed together, due together: one association per retry
    assert {(a.ok, a.status) for a in attempts(sessions)} == {(False, "ConnectionRefused")}

    # not due yet: no attempt at all
    assert sender.run_once(now=t0 + dt.timedelta(seconds=0.5 * INITIAL_S)) == 0
    assert len(attempts(sessions)) == 3

    t1 = t0 + dt.timedelta(seconds=INITIAL_S)
    assert sender.run_once(now=t1) == 0
    for row in deliveries(sessions):
        assert row.attempts == 2 and row.status == "pending"
        wait = (aware(row.next_attempt_at) - t1).total_seconds()
        assert 1.8 * INITIAL_S - 1e-3 <= wait <= 2 * INITIAL_S + 1e-3  # doubled

    orthanc.start()  # same ports, same storage
    assert sender.run_once(now=t1 + dt.timedelta(seconds=2 * INITIAL_S)) == 3
    assert [r.status for r in deliveries(sessions)] == ["sent"] * 3
    for uid in results.uids():
        assert len(orthanc.find_by_sop_uid(uid)) == 1
    assert len(orthanc.instances()) == 3

    # an administrator re-sends everything: the PACS still holds one instance per SOP Instance UID
    with sessions() as session, session.begin():
        retry_deliveries(session, [r.id for r in deliveries(sessions)])
    assert sender.run_once() == 3
    assert len(orthanc.instances()) == 3


def test_dead_letter_listed_and_retried_from_the_command_line(
    orthanc: Orthanc, sessions, data_dir: Path, database_url: str, results: ResultFiles,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = ["--data-dir", str(data_dir), "--database-url", database_url]
    enqueue(sessions, results, to_orthanc(orthanc))
    sender = Sender(sessions, output(max_attempts=2), "LPM_NODE", timeout_s=5)
    orthanc.stop()
    t0 = utcnow()
    sender.run_once(now=t0)
    sender.run_once(now=t0 + dt.timedelta(seconds=INITIAL_S))
    sender.run_once(now=t0 + dt.timedelta(seconds=10 * MAX_S))  # dead rows are never tried again
    assert len(attempts(sessions)) == 6

    capsys.readouterr()
    assert cli_main(["outbox", "list", "--json", *where]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["status"], d["attempts"], d["kind"]) for d in listed] == [
        ("dead", 2, "SEG"), ("dead", 2, "SR"), ("dead", 2, "KEY")
    ]
    assert all(d["destination"] == str(to_orthanc(orthanc)) for d in listed)
    assert all(d["last_error"].startswith("ConnectionRefused") for d in listed)
    assert all(d["next_attempt_at"] is None for d in listed)

    assert cli_main(["outbox", "list", *where]) == 0
    table = capsys.readouterr().out
    assert table.count("dead") == 3 and "ConnectionRefused" in table

    assert cli_main(["outbox", "retry", "--id", "999", *where]) == 1
    assert "999" in capsys.readouterr().out
    assert [r.status for r in deliveries(sessions)] == ["dead"] * 3

    orthanc.start()
    assert cli_main(["outbox", "retry", *where]) == 0
    assert "requeued 3" in capsys.readouterr().out
    assert [(r.status, r.attempts) for r in deliveries(sessions)] == [("pending", 0)] * 3

    assert sender.run_once() == 3
    assert [r.status for r in deliveries(sessions)] == ["sent"] * 3
    for uid in results.uids():
        assert len(orthanc.find_by_sop_uid(uid)) == 1


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_association_rejected_for_wrong_called_ae(tmp_path: Path, sessions, results: ResultFiles) -> None:
    with Orthanc(tmp_path / "strict", aet="PACS", check_called_aet=True) as strict:
        enqueue(sessions, results, to_orthanc(strict, aet="NOT_PACS"))
        assert Sender(sessions, output(), "LPM_NODE", timeout_s=5).run_once() == 0
        assert strict.instances() == []
    log = attempts(sessions)
    assert len(log) == 3
    assert {a.status for a in log} == {"AssociationRejected"}
    assert all("Called AE title not recognised" in a.error for a in log)
    assert all(r.status == "pending" and r.attempts == 1 for r in deliveries(sessions))


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed")
def test_failure_status_from_a_full_pacs_is_audited(tmp_path: Path, sessions, results: ResultFiles) -> None:
    with Orthanc(tmp_path / "full", extra_config={"MaximumPatientCount": 1}) as full:
        other = write_ct(tmp_path / "other", patient_id="SOMEONE-ELSE", slices=1)
        full.post("/instances", other[0].read_bytes())
        (patient,) = full.get("/patients")
        full.put(f"/patients/{patient}/protected", "1")  # cannot be recycled: the storage is full

        enqueue(sessions, results, to_orthanc(full))
        assert Sender(sessions, output(), "LPM_NODE", timeout_s=10).run_once() == 0
        assert len(full.instances()) == 1
    log = attempts(sessions)
    assert [(a.ok, a.status) for a in log] == [(False, "0xA700")] * 3
    assert all("Failure" in a.error for a in log)
    assert all(r.last_error.startswith("0xA700") and r.status == "pending" for r in deliveries(sessions))


def test_peer_that_does_not_answer_times_out(orthanc: Orthanc, sessions, results: ResultFiles) -> None:
    enqueue(sessions, results, to_orthanc(orthanc))
    orthanc.freeze()
    try:
        started = time.monotonic()
        assert Sender(sessions, output(), "LPM_NODE", timeout_s=1).run_once() == 0
        assert time.monotonic() - started < 10
    finally:
        orthanc.thaw()
    log = attempts(sessions)
    assert {(a.ok, a.status) for a in log} == {(False, "Timeout")}
    assert all("within 1 s" in a.error for a in log)
    assert [r.status for r in deliveries(sessions)] == ["pending"] * 3


@pytest.fixture
def storescp(tmp_path: Path):
    """Start dcmtk's storescp with extra options; yields its Destination; stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> Destination:
        port = free_port()
        out = tmp_path / f"storescp-{port}"
        out.mkdir()
        proc = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "-od", str(out), *options, str(port)],
            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        wait_for_port(port, timeout=30, proc=proc)
        return Destination("STORESCP", "127.0.0.1", port)

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_peer_aborting_or_stalling_mid_association_is_audited(storescp, sessions, results: ResultFiles) -> None:
    aborting = storescp("--abort-after")
    stalling = storescp("--sleep-during", "5")
    enqueue(sessions, results, aborting, stalling)
    started = time.monotonic()
    assert Sender(sessions, output(), "LPM_NODE", timeout_s=1).run_once() == 0
    assert time.monotonic() - started < 15
    by_id = {r.id: r for r in deliveries(sessions)}
    seen: dict[tuple[str, str], str] = {}
    for attempt in attempts(sessions):
        row = by_id[attempt.delivery_id]
        seen[(str(row.destination), row.object_kind)] = attempt.status
    assert seen[(str(aborting), "SEG")] == "AssociationAborted"
    assert seen[(str(stalling), "SEG")] == "Timeout"
    for dest in (aborting, stalling):  # the association is gone: the others are failed attempts too
        assert seen[(str(dest), "SR")] == seen[(str(dest), "KEY")] == "AssociationAborted"
    assert all(r.status == "pending" and r.attempts == 1 for r in by_id.values())


def test_store_without_the_sop_classes_refuses_them(tmp_path: Path, sessions, results: ResultFiles) -> None:
    ct_only = LocalStore(tmp_path / "ct_only", ae_title="CT_ONLY", sop_classes=[CTImageStorage])
    seg_only = LocalStore(tmp_path / "seg_only", ae_title="SEG_ONLY", sop_classes=[SegmentationStorage])
    with ct_only, seg_only:
        enqueue(
            sessions, results,
            Destination("CT_ONLY", "127.0.0.1", ct_only.port), Destination("SEG_ONLY", "127.0.0.1", seg_only.port),
        )
        assert Sender(sessions, output(), "LPM_NODE", timeout_s=5).run_once() == 1
        assert ct_only.received() == []
        assert [p.name for p in seg_only.received()] == [f"{results.objects[0][2]}.dcm"]
    by_id = {r.id: r for r in deliveries(sessions)}
    outcome = {}
    for attempt in attempts(sessions):
        row = by_id[attempt.delivery_id]
        outcome[(row.destination.split("@")[0], row.object_kind)] = attempt
    for kind in ("SEG", "SR", "KEY"):
        assert outcome[("CT_ONLY", kind)].status == "NoAcceptedContexts"
        assert "Segmentation Storage" in outcome[("CT_ONLY", kind)].error
    assert outcome[("SEG_ONLY", "SEG")].ok
    assert outcome[("SEG_ONLY", "SR")].status == "NoPresentationContext"
    assert outcome[("SEG_ONLY", "KEY")].status == "NoPresentationContext"


def test_missing_file_ends_dead_until_written_again(tmp_path: Path, sessions, results: ResultFiles) -> None:
    gone = tmp_path / "gone.dcm"
    shutil.copy(results.objects[0][1], gone)
    with LocalStore(tmp_path / "store") as store:
        with sessions() as session, session.begin():
            enqueue_results(
                session, job_id=None, series_instance_uid=results.series_uid,
                objects=[("SEG", gone, results.objects[0][2])],
                destinations=[Destination(store.ae_title, "127.0.0.1", store.port)],
            )
        gone.unlink()
        sender = Sender(sessions, output(max_attempts=1), "LPM_NODE", timeout_s=5)
        assert sender.run_once() == 0
        assert store.received() == []
        (row,) = deliveries(sessions)
        assert row.status == "dead" and row.last_error.startswith("FileError")

        # the job is re-run and writes the object again: the dead delivery is queued again and goes out
        shutil.copy(results.objects[0][1], gone)
        with sessions() as session, session.begin():
            (again,) = enqueue_results(
                session, job_id=None, series_instance_uid=results.series_uid,
                objects=[("SEG", gone, results.objects[0][2])],
                destinations=[Destination(store.ae_title, "127.0.0.1", store.port)],
            )
            assert (again.id, again.status, again.attempts) == (row.id, "pending", 0)
        assert sender.run_once() == 1
        assert len(store.received()) == 1


def test_unusable_destination_is_audited_not_raised(sessions, results: ResultFiles) -> None:
    enqueue(sessions, results, Destination("AN_AE_TITLE_TOO_LONG_FOR_DICOM", "127.0.0.1", 104))
    assert Sender(sessions, output(max_attempts=1), "LPM_NODE").run_once() == 0
    assert {(r.status, r.last_error.split(":")[0]) for r in deliveries(sessions)} == {("dead", "BadDestination")}
    with pytest.raises(ValueError):
        Sender(sessions, output(), "")


def test_enqueue_is_idempotent_and_reprocessing_requeues(tmp_path: Path, sessions, results: ResultFiles) -> None:
    with LocalStore(tmp_path / "store") as store:
        dest = Destination(store.ae_title, "127.0.0.1", store.port)
        first = enqueue(sessions, results, dest)
        assert enqueue(sessions, results, dest) == first  # same rows, nothing queued twice
        assert len(deliveries(sessions)) == 3

        sender = Sender(sessions, output(), "LPM_NODE", timeout_s=5)
        assert sender.run_once() == 3
        assert enqueue(sessions, results, dest) == first  # same files again: stays sent
        assert [r.status for r in deliveries(sessions)] == ["sent"] * 3
        assert sender.run_once() == 0

        # re-processing: same deterministic UIDs, new files
        rerun = tmp_path / "rerun"
        rerun.mkdir()
        objects = []
        for kind, path, uid in results.objects:
            objects.append((kind, shutil.copy(path, rerun / path.name), uid))
        with sessions() as session, session.begin():
            rows = enqueue_results(
                session, job_id=None, series_instance_uid=results.series_uid, objects=objects, destinations=[dest]
            )
            assert [r.id for r in rows] == first
        rows = deliveries(sessions)
        assert [(r.status, r.attempts, Path(r.path).parent) for r in rows] == [("pending", 0, rerun.resolve())] * 3

        assert sender.run_once() == 3
        # rewritten in place (same path, newer file) also counts as re-processed
        future = time.time() + 3600
        os.utime(objects[0][1], (future, future))
        enqueue_results_rows = enqueue(sessions, ResultFiles(results.study_uid, results.series_uid, [], objects), dest)
        assert enqueue_results_rows == first
        assert [r.status for r in deliveries(sessions)] == ["pending", "sent", "sent"]
        assert sender.run_once() == 1
        assert len(store.received()) == 3
    assert len(attempts(sessions)) == 7


def test_the_serving_loop_delivers_when_woken_and_stops(tmp_path: Path, sessions, results: ResultFiles) -> None:
    from lpm_node.node.service import Loop

    with LocalStore(tmp_path / "store") as store:
        sender = Sender(sessions, output(), "LPM_NODE", timeout_s=5)
        stop = threading.Event()
        loop = Loop("sender", sender.run_once, 30.0, wait=sender.wait_for_work)  # as `lpm-node serve` runs it
        worker = threading.Thread(target=loop.run, args=(stop,), daemon=True)
        worker.start()
        enqueue(sessions, results, Destination(store.ae_title, "127.0.0.1", store.port))
        sender.wake()
        assert store.wait_for(3, timeout_s=30)
        stop.set()
        sender.wake()
        worker.join(timeout=10)
        assert not worker.is_alive()
    assert [r.status for r in deliveries(sessions)] == ["sent"] * 3


def test_backoff_grows_exponentially_and_is_capped() -> None:
    for failures, expected in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 60.0), (100, 60.0), (10_000, 60.0)):
        delay = backoff_delay(failures, 5.0, 60.0)
        assert 0.9 * expected <= delay <= expected, (failures, delay)
        assert backoff_delay(failures, 5.0, 60.0, jitter=0.0) == expected
        assert backoff_delay(failures, 5.0, 60.0, jitter=0.5) == pytest.approx(0.95 * expected)


def test_dimse_status_categories() -> None:
    def status(code: int, comment: str = "") -> Dataset:
        ds = Dataset()
        ds.Status = code
        if comment:
            ds.ErrorComment = comment
        return ds

    assert store_outcome(status(0x0000), False, 1).ok
    warning = store_outcome(status(0xB000, "coercion"), False, 1)
    assert warning.ok and warning.status == "0xB000" and "Warning" in warning.error
    assert store_outcome(status(0xB007), False, 1).ok
    failure = store_outcome(status(0xA700), False, 1)
    assert not failure.ok and failure.status == "0xA700"
    assert not store_outcome(status(0xC000, "cannot understand"), False, 1).ok
    assert store_outcome(Dataset(), True, 1).status == "AssociationAborted"
    assert store_outcome(Dataset(), False, 1).status == "Timeout"


def test_result_destinations_add_the_sender_when_configured() -> None:
    settings = load_settings(overrides={"output": {"destinations": ["PACS@10.0.0.5:104"], "reply_port": 11113}})
    assert [str(d) for d in result_destinations(settings, calling_ae="CT1", calling_address="10.0.0.7")] == [
        "PACS@10.0.0.5:104"
    ]
    settings.output.reply_to_sender = True
    assert [str(d) for d in result_destinations(settings, calling_ae="CT1", calling_address="10.0.0.7")] == [
        "PACS@10.0.0.5:104", "CT1@10.0.0.7:11113"
    ]


def test_default_policy_keeps_trying_through_a_day_long_outage(sessions, results: ResultFiles) -> None:
    defaults = OutputSettings()
    assert defaults.retry_hours >= 24 and defaults.max_attempts == 0
    enqueue(sessions, results, Destination("PACS", "127.0.0.1", free_port()))  # nothing listens there
    sender = Sender(sessions, defaults, "LPM_NODE", timeout_s=5)
    t0 = utcnow()
    now = t0
    while now < t0 + dt.timedelta(hours=23.9):
        sender.run_once(now=now)
        rows = deliveries(sessions)
        assert all(r.status == "pending" for r in rows)
        waits = {(aware(r.next_attempt_at) - now).total_seconds() for r in rows}
        assert max(waits) <= defaults.backoff_max_s  # capped backoff
        now = aware(rows[0].next_attempt_at)
        if now > t0 + dt.timedelta(hours=1):
            now = t0 + dt.timedelta(hours=23.9)  # jump: one more try near the end of the day
    sender.run_once(now=t0 + dt.timedelta(hours=defaults.retry_hours, seconds=1))
    assert [r.status for r in deliveries(sessions)] == ["dead"] * 3


def test_retry_to_an_explicit_destination_redirects_dead_letters(sessions, results: ResultFiles) -> None:
    old, new = Destination("OLD", "127.0.0.1", 4242), Destination("NEW", "127.0.0.1", 4343)
    enqueue(sessions, results, old)
    with sessions() as session, session.begin():
        for row in session.scalars(select(Delivery)):
            row.status = "dead"
    with sessions() as session, session.begin():
        done = retry_deliveries(session, destinations=[new])
    assert done.requeued == [] and sorted(done.redirected) == [1, 2, 3]
    rows = deliveries(sessions)
    assert [(r.destination, r.status) for r in rows] == [(str(old), "redirected")] * 3 + [(str(new), "pending")] * 3
    with sessions() as session, session.begin():  # the same destination again: queued again, nothing redirected
        for row in session.scalars(select(Delivery).where(Delivery.destination == str(new))):
            row.status = "dead"
        done = retry_deliveries(session, destinations=[new])
    assert done.requeued == [4, 5, 6] and done.redirected == {}

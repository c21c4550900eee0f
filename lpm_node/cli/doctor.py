"""``lpm-node doctor``: is this node ready to serve? Device, model, destinations, disk space, database, and the
data folder shared with the node's other processes."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from lpm_node.answer.transport import echo
from lpm_node.core.config import Settings
from lpm_node.core.states import DeliveryStatus, JobStatus


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'OK     ' if self.ok else 'PROBLEM'}  {self.name:<12} {self.detail}"


def check_device(settings: Settings) -> Check:
    """The inference device the model settings ask for, and whether it is there."""
    import torch

    wanted = settings.model.device
    cuda = torch.cuda.is_available()
    if cuda:
        gpu = f"CUDA {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    else:
        gpu = f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
    if wanted == "cuda" and not cuda:
        return Check("device", False, f"device = cuda is configured but there is {gpu}")
    used = "cuda" if wanted == "cuda" or (wanted == "auto" and cuda) else "cpu"
    threads = settings.model.threads or torch.get_num_threads()
    return Check("device", True, f"{used}: {gpu}" + ("" if used == "cuda" else f", {threads} CPU threads"))


def check_model(settings: Settings) -> Check:
    """The configured model folder loads, with the labels the measurement needs."""
    from lpm_node.imaging.segmentation import NO_MODEL_MESSAGE, SegmentationError, verify_model_folder

    folder = settings.model.folder
    if not folder:
        return Check("model", False, NO_MODEL_MESSAGE)
    try:
        info = verify_model_folder(
            folder, settings.model.profile or None, folds=list(settings.model.folds) or None,
            checkpoint=settings.model.checkpoint,
        )
    except SegmentationError as exc:
        return Check("model", False, str(exc))
    labels = ", ".join(f"{k}={v}" for k, v in info.labels.items())
    note = " (a test model trained on synthetic phantoms: never for clinical use)" if info.test_model else ""
    return Check("model", True, f"{info.folder}: {info.configuration}, folds {','.join(info.folds)}, {labels}{note}")


HEALTHCHECK_AE = "HEALTHCHECK"  # calling AE title of the liveness check when any caller is allowed


def check_listener(settings: Settings, timeout_s: float = 10.0) -> Check:
    """Does the node's own DICOM listener answer? (``doctor --liveness``, the container health check)

    A C-ECHO from this machine, calling as the first allowed AE title (``HEALTHCHECK`` when any caller is
    allowed). An association rejected by the allow-lists (``allowed_hosts`` without this address) still proves
    that the listener reads and answers requests: alive. No connection, no answer or an abort is not.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = settings.node
    host = "127.0.0.1" if node.host in ("", "0.0.0.0") else "::1" if node.host == "::" else node.host
    calling = node.allowed_ae_titles[0] if node.allowed_ae_titles else HEALTHCHECK_AE
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    where = f"{node.ae_title}@{host}:{node.port} as {calling}"
    assoc = ae.associate(host, node.port, ae_title=node.ae_title)
    if assoc.is_rejected:
        return Check("listener", True, f"{where}: association rejected by the node's allow-lists, so it answers")
    if not assoc.is_established:
        return Check("listener", False, f"{where}: no association (nothing listening, no answer, or aborted)")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        return Check("listener", False, f"{where}: C-ECHO status {code if code is not None else 'none (timeout)'}")
    return Check("listener", True, f"{where}: C-ECHO OK")


def check_destinations(settings: Settings) -> list[Check]:
    """A C-ECHO to every configured destination."""
    if not settings.destinations:
        detail = "none configured: results stay in the outbox folder"
        if settings.output.reply_to_sender:
            detail = "none configured; results go back to each sending AE (reply_to_sender)"
        return [Check("destination", settings.output.reply_to_sender, detail)]
    checks = []
    for dest in settings.destinations:
        problem = echo(dest, settings.node.ae_title)
        checks.append(Check("destination", problem is None, f"{dest}: " + (problem or "C-ECHO OK")))
    return checks


def check_disk(settings: Settings) -> Check:
    """Free space where the spool lives, against the configured minimum."""
    path = settings.data_path
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    need = settings.node.min_free_disk_mb
    ok = free_mb >= need * 2
    state = "" if ok else f" (C-STORE is refused below {need} MB: free space or lower min_free_disk_mb)"
    return Check("disk", ok, f"{path}: {free_mb:,.0f} MB free, minimum {need} MB{state}")


def check_database(settings: Settings) -> Check:
    """The audit database opens, is consistent, and what waits in it."""
    from sqlalchemy import func, select, text

    from lpm_node.core.audit import Delivery, Job, open_engine

    try:
        engine = open_engine(settings.db_url)
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                integrity = conn.execute(text("PRAGMA integrity_check")).scalar()
                mode = conn.execute(text("PRAGMA journal_mode")).scalar()
                if integrity != "ok":
                    return Check("database", False, f"{engine.url}: integrity check says {integrity}")
            else:
                conn.execute(text("SELECT 1"))
                mode = engine.dialect.name
            queued = conn.execute(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)).scalar()
            failed = conn.execute(select(func.count()).select_from(Job).where(Job.status == JobStatus.FAILED)).scalar()
            pending = conn.execute(
                select(func.count()).select_from(Delivery).where(Delivery.status == DeliveryStatus.PENDING)).scalar()
            dead = conn.execute(
                select(func.count()).select_from(Delivery).where(Delivery.status == DeliveryStatus.DEAD)).scalar()
        try:
            write_probe(engine)
        except Exception as exc:  # noqa: BLE001 - the node answers C-STORE 0xA700 while this fails
            engine.dispose()
            return Check("database", False, f"{engine.url}: cannot be written ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); C-STORE is answered 0xA700 until it can")
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any database error is the report
        return Check("database", False, f"{shown_url(settings.db_url)}: {type(exc).__name__}: {exc}")
    detail = (f"{engine.url} ({mode}): {queued} jobs queued, {failed} failed, "
              f"{pending} deliveries pending, {dead} dead")
    return Check("database", dead == 0, detail + ("" if dead == 0 else " (see `lpm-node outbox list`)"))


def check_data_folder(settings: Settings) -> Check:
    """This machine sees the same data folder as the node's running processes (the marker of the first start)."""
    from lpm_node.core.audit import session_factory
    from lpm_node.node.roles import live_processes, read_data_marker

    marker = read_data_marker(settings.data_path)
    sessions = session_factory(settings.db_url)
    try:
        with sessions() as session:
            live = live_processes(session, within_s=3 * settings.node.heartbeat_seconds + 5)
    finally:
        sessions.kw["bind"].dispose()
    names = ", ".join(f"{p.role}@{p.host}:{p.pid}" for p in live)
    others = {p.data_marker for p in live}
    if not live:
        state = f"marker {marker}" if marker else "no marker yet (the first start writes it)"
        return Check("data folder", True, f"{settings.data_path}: {state}; no running process")
    if not marker:
        return Check("data folder", False, f"{settings.data_path} has no marker, but {len(live)} processes run "
                     f"({names}): this machine does not see their data folder (mount it here)")
    if others != {marker}:
        return Check("data folder", False, f"{settings.data_path}: marker {marker}, the running processes see "
                     f"{', '.join(sorted(others))} ({names}): another folder")
    return Check("data folder", True, f"{settings.data_path}: marker {marker}, the same as {len(live)} "
                 f"process{'es' if len(live) != 1 else ''} ({names})")


def shown_url(url: str) -> str:
    """A database URL fit for a report: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands: shown without what follows the scheme
        return url.split("://", 1)[0] + "://..."


def write_probe(engine) -> None:  # noqa: ANN001
    """A real write to the audit database (a row written and removed in one committed transaction)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS doctor_write_probe (at VARCHAR(40))"))
        conn.execute(text("INSERT INTO doctor_write_probe (at) VALUES (CURRENT_TIMESTAMP)"))
        conn.execute(text("DELETE FROM doctor_write_probe"))


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order a PACS administrator reads them."""
    checks: list[Check] = []
    steps: list[Callable[[Settings], Check | list[Check]]] = [
        check_device, check_model, check_destinations, check_disk, check_database, check_data_folder,
    ]
    for step in steps:
        try:
            found = step(settings)
        except Exception as exc:  # noqa: BLE001 - a crashing check is itself a problem to report
            found = Check(step.__name__.removeprefix("check_"), False, f"{type(exc).__name__}: {exc}")
        checks.extend(found if isinstance(found, list) else [found])
    return checks


def doctor(settings: Settings, args: argparse.Namespace) -> int:
    """Print one line per check; exit 0 when all are OK, 1 otherwise (``--liveness``: the listener only)."""
    checks = [check_listener(settings)] if getattr(args, "liveness", False) else run_checks(settings)
    for check in checks:
        print(check, flush=True)
    problems = sum(not c.ok for c in checks)
    print(f"{len(checks) - problems} OK, {problems} problem(s)")
    return 1 if problems else 0

"""The DICOM front door: a pynetdicom C-STORE / C-ECHO SCP writing to the spool and the audit DB.

Each received dataset is written to the spool as it arrived on the wire (no pixel decoding),
durably, before the success status is returned. Only a few header elements are parsed. Audit
rows (associations, instances, series) are written by one background thread in batches, so
the database never sits between the peer and its C-STORE response; the spool is the source of
truth and :func:`lpm_node.series.reconcile_spool` restores any row lost in a crash.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import queue
import select as select_module
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association as _Association
from pynetdicom.dul import DULServiceProvider as _DUL
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.audit import Association, Instance, Job, Series, SeriesDecision, as_utc, utcnow
from lpm_node.config import Settings
from lpm_node.spool import Spool, SpoolFull, file_meta_bytes, is_valid_uid

LOG = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
MAX_PDU_BYTES = 1024 * 1024
# pynetdicom's reactor threads poll: the association loop sleeps 1 ms between looks at its DIMSE
# queue, the DUL loop 1 ms whenever its socket is quiet. That adds up to ~2 ms (plus a thread
# wake-up on a busy machine) to every C-STORE round trip. tune_pynetdicom() makes both waits
# wake on the event itself (a queued message, readable socket data), polling at POLL_S at most.
POLL_S = 0.0002
TCP_NODELAY = True

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

# Elements the listener reads from each received dataset (all before the pixel data).
HEADER_TAGS: list[BaseTag] = [
    Tag(k)
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesDescription",
        "SpecificCharacterSet",
    )
]
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
# Series that get new instances after these decisions are assembled and evaluated again.
REOPENABLE_STATUSES = ("complete", "rejected", "not_selected", "eligible", "queued")


@dataclass(frozen=True)
class Header:
    """What the listener needs from one received dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str

    @classmethod
    def from_values(cls, values: dict[str, str]) -> Header:
        """The header from :func:`header_values`; raises CannotUnderstand when a UID is missing or invalid."""
        for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not values[key]:
                raise CannotUnderstand(f"missing {key}")
            if not is_valid_uid(values[key]):
                raise CannotUnderstand(f"invalid {key}")
        return cls(
            sop_class_uid=values["SOPClassUID"],
            sop_instance_uid=values["SOPInstanceUID"],
            study_instance_uid=values["StudyInstanceUID"],
            series_instance_uid=values["SeriesInstanceUID"],
            modality=values["Modality"][:16],
            series_description=values["SeriesDescription"][:256],
        )


_HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    "SeriesDescription")


def header_values(ds: Dataset) -> dict[str, str]:
    """The header elements of a dataset as stripped strings ("" when absent)."""
    return {k: str(ds.get(k, "") or "").strip() for k in _HEADER_KEYWORDS}


class CannotUnderstand(ValueError):
    """A dataset that does not parse or lacks required UIDs (answered 0xC000)."""


def _stop_at_pixels(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return tag >= _PIXEL_DATA


def parse_header(encoded: bytes | memoryview, transfer_syntax: str) -> Header:
    """Read the UIDs, modality and series description from an encoded dataset (no pixel data)."""
    ts = UID(transfer_syntax)
    data: bytes | memoryview = encoded
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(encoded))
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated dataset does not inflate: {exc}") from exc
    try:
        ds = read_dataset(
            BytesIO(data),
            is_implicit_VR=ts == ImplicitVRLittleEndian,
            is_little_endian=True,
            stop_when=_stop_at_pixels,
            specific_tags=HEADER_TAGS,
        )
        values = header_values(ds)
    except Exception as exc:  # any decoding failure of peer data
        raise CannotUnderstand(f"dataset does not parse: {type(exc).__name__}") from exc
    return Header.from_values(values)


# ---------------------------------------------------------------------------------------------
# Audit recording (one background thread, batched commits)
# ---------------------------------------------------------------------------------------------
@dataclass
class _AssocOpened:
    key: int
    calling_ae: str
    called_ae: str
    address: str
    port: int
    at: dt.datetime


@dataclass
class _AssocEnded:
    key: int
    outcome: str
    reason: str
    at: dt.datetime


@dataclass
class _AssocRejected:
    calling_ae: str
    called_ae: str
    address: str
    port: int
    reason: str
    at: dt.datetime


@dataclass
class _InstanceStored:
    assoc_key: int
    header: Header
    transfer_syntax: str
    path: str
    size_bytes: int
    calling_ae: str
    address: str
    at: dt.datetime
    duplicate: bool = False


@dataclass
class _InstanceRefused:
    assoc_key: int
    status: int
    reason: str
    sop_instance_uid: str
    at: dt.datetime


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_Event = _AssocOpened | _AssocEnded | _AssocRejected | _InstanceStored | _InstanceRefused | _Flush


class AuditRecorder:
    """Writes listener events to the audit DB from one thread, committing in batches."""

    def __init__(self, sessions: sessionmaker, *, max_batch: int = 500, max_delay_s: float = 0.1) -> None:
        self._sessions = sessions
        self._queue: queue.Queue[_Event | None] = queue.Queue()
        self._assoc_ids: dict[int, int] = {}
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._thread = threading.Thread(target=self._run, name="audit-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout=30)

    def put(self, item: _Event) -> None:
        self._queue.put(item)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[_Event] = []
            if item is None:
                stopping = True
            else:
                batch.append(item)
            deadline = utcnow().timestamp() + self._max_delay_s
            while not stopping and len(batch) < self._max_batch:
                remaining = deadline - utcnow().timestamp()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            if stopping:  # drain whatever is left
                while True:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not None:
                        batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[_Event]) -> None:
        flushes = [e for e in batch if isinstance(e, _Flush)]
        events = [e for e in batch if not isinstance(e, _Flush)]
        if events:
            for attempt in range(3):
                try:
                    with self._sessions() as session:
                        self._apply(session, events)
                        session.commit()
                    break
                except Exception:  # keep the listener running; the spool is the source of truth
                    LOG.exception("audit write failed (attempt %d of 3)", attempt + 1)
        for f in flushes:
            f.done.set()

    def _apply(self, session: Session, events: list[_Event]) -> None:
        sops = [e.header.sop_instance_uid for e in events if isinstance(e, _InstanceStored)]
        known: set[str] = set()
        for chunk_start in range(0, len(sops), 500):
            chunk = sops[chunk_start : chunk_start + 500]
            known.update(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))))
        series_cache: dict[str, Series] = {}
        assoc_rows: dict[int, Association] = {}

        def assoc_row(key: int) -> Association | None:
            if key in assoc_rows:
                return assoc_rows[key]
            row_id = self._assoc_ids.get(key)
            row = session.get(Association, row_id) if row_id is not None else None
            if row is not None:
                assoc_rows[key] = row
            return row

        for e in events:
            if isinstance(e, _AssocOpened):
                row = Association(
                    calling_ae=e.calling_ae,
                    called_ae=e.called_ae,
                    peer_address=e.address,
                    peer_port=e.port,
                    started_at=e.at,
                    outcome="open",
                )
                session.add(row)
                session.flush()
                self._assoc_ids[e.key] = row.id
                assoc_rows[e.key] = row
            elif isinstance(e, _AssocEnded):
                row = assoc_row(e.key)
                if row is not None:
                    row.ended_at = e.at
                    if row.outcome == "open":
                        row.outcome = e.outcome
                        if e.reason:
                            row.reason = f"{row.reason}; {e.reason}" if row.reason else e.reason
                self._assoc_ids.pop(e.key, None)
            elif isinstance(e, _AssocRejected):
                session.add(
                    Association(
                        calling_ae=e.calling_ae,
                        called_ae=e.called_ae,
                        peer_address=e.address,
                        peer_port=e.port,
                        started_at=e.at,
                        ended_at=e.at,
                        outcome="rejected",
                        reason=e.reason,
                    )
                )
            elif isinstance(e, _InstanceRefused):
                arow = assoc_row(e.assoc_key)
                if arow is not None:
                    arow.instances_refused = (arow.instances_refused or 0) + 1
                    uid = f" (last: {e.sop_instance_uid})" if e.sop_instance_uid else ""
                    arow.reason = (f"{arow.instances_refused} instance(s) refused with 0x{e.status:04X}: "
                                   f"{e.reason}{uid}")
            elif isinstance(e, _InstanceStored):
                arow = assoc_row(e.assoc_key)
                if arow is not None:
                    arow.instances_received += 1
                if e.duplicate or e.header.sop_instance_uid in known:
                    continue
                known.add(e.header.sop_instance_uid)
                session.add(
                    Instance(
                        sop_instance_uid=e.header.sop_instance_uid,
                        series_instance_uid=e.header.series_instance_uid,
                        sop_class_uid=e.header.sop_class_uid,
                        transfer_syntax_uid=e.transfer_syntax,
                        path=e.path,
                        size_bytes=e.size_bytes,
                        received_at=e.at,
                        association_id=arow.id if arow is not None else None,
                    )
                )
                srow = series_cache.get(e.header.series_instance_uid)
                if srow is None:
                    srow = session.scalars(
                        select(Series).where(Series.series_instance_uid == e.header.series_instance_uid)
                    ).first()
                    if srow is None:
                        srow = Series(
                            series_instance_uid=e.header.series_instance_uid,
                            study_instance_uid=e.header.study_instance_uid,
                            modality=e.header.modality,
                            series_description=e.header.series_description,
                            calling_ae=e.calling_ae,
                            calling_address=e.address,
                            first_received_at=e.at,
                            last_received_at=e.at,
                            instance_count=0,
                            status="receiving",
                        )
                        session.add(srow)
                    series_cache[e.header.series_instance_uid] = srow
                note_instance_on_series(session, srow, e.at)


def note_instance_on_series(session: Session, row: Series, at: dt.datetime) -> None:
    """Count one new instance on a series row; reopen a decided series so that it is evaluated again."""
    row.instance_count = (row.instance_count or 0) + 1
    last = as_utc(row.last_received_at)
    if last is None or at > last:
        row.last_received_at = at
    if row.status in REOPENABLE_STATUSES:
        previous = f"{row.status}: {row.reason}" if row.reason else row.status
        if row.status == "queued":
            for job in session.scalars(
                select(Job).where(Job.series_instance_uid == row.series_instance_uid, Job.status == "queued")
            ):
                job.status = "cancelled"
                job.error = "more instances arrived; the series is evaluated again"
        row.status = "receiving"
        row.reason = f"more instances arrived after the decision ({previous})"
        row.decided_at = None
        session.add(SeriesDecision(series_instance_uid=row.series_instance_uid, at=at, status="receiving",
                                   reason=row.reason))


# ---------------------------------------------------------------------------------------------
# The SCP
# ---------------------------------------------------------------------------------------------
class _EventWaitTime:
    """Stands in for the ``time`` module inside pynetdicom's ``association`` and ``dul`` modules.

    Only the reactors' idle sleeps change: an association thread sleeping between looks at its
    DIMSE message queue waits on that queue instead (woken by the next message), and a DUL thread
    sleeping on a quiet socket waits in ``select`` on the socket (woken by the next bytes).
    Every other call is the real ``time`` module.
    """

    def __init__(self, poll_s: float, max_wait_s: float = 0.005) -> None:
        self._poll_s = poll_s
        self._max_wait_s = max_wait_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, _Association) and seconds == 0.001:
            msg_queue = getattr(getattr(thread, "dimse", None), "msg_queue", None)
            if isinstance(msg_queue, queue.Queue):
                with msg_queue.not_empty:
                    if not msg_queue.queue:  # the mutex is held: no qsize() here
                        msg_queue.not_empty.wait(self._max_wait_s)
                return
        elif isinstance(thread, _DUL) and seconds == getattr(thread, "_run_loop_delay", None):
            sock = getattr(getattr(thread, "socket", None), "socket", None)
            if sock is not None and thread.to_provider_queue.empty():
                try:
                    select_module.select([sock], [], [], self._poll_s)
                    return
                except (OSError, ValueError):  # closed socket: fall back to a plain sleep
                    pass
            time.sleep(min(seconds, self._poll_s))
            return
        time.sleep(seconds)


def tune_pynetdicom(poll_s: float = POLL_S) -> None:
    """Make pynetdicom's reactor threads wait on events instead of 1 ms sleeps (process-wide, idempotent)."""
    import pynetdicom.association as association_module
    import pynetdicom.dul as dul_module

    for module in (association_module, dul_module):
        if not isinstance(module.time, _EventWaitTime):
            module.time = _EventWaitTime(poll_s)  # type: ignore[assignment]


@dataclass
class _AssocInfo:
    key: int
    calling_ae: str
    address: str
    stored: int = 0
    bytes_stored: int = 0
    handler_s: float = 0.0  # time in the C-STORE handler (parse, write, sync)
    sync_s: float = 0.0  # of which making files durable


class Listener:
    """The node's storage SCP: accepts CT, writes the spool, records the audit."""

    def __init__(self, settings: Settings, sessions: sessionmaker, spool: Spool | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        node = settings.node
        self.spool = spool or Spool(
            settings.spool_path, quota_mb=node.spool_quota_mb, min_free_disk_mb=node.min_free_disk_mb
        )
        self.recorder = AuditRecorder(sessions)
        self.allowed_ae_titles = {t.strip() for t in node.allowed_ae_titles if t.strip()}
        self.allowed_hosts = {h.strip() for h in node.allowed_hosts if h.strip()}
        self._keys = itertools.count(1)
        self._assocs: dict[int, _AssocInfo] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.on_instance: Callable[[Header], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def build_ae(self) -> AE:
        """The configured pynetdicom application entity."""
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom would log identifiers (patient names)
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_RECV_CHUNKED_DATASET = False  # keep datasets in memory, written once by the spool
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = max(1, int(node.max_associations))
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        tune_pynetdicom()
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def start(self) -> tuple[str, int]:
        """Start accepting associations in background threads; returns the bound (host, port)."""
        self.recorder.start()
        node = self.settings.node
        ae = self.build_ae()
        self._server = ae.start_server((node.host, int(node.port)), block=False, evt_handlers=self.handlers())
        host, port = self._server.server_address[:2]
        LOG.info("listening on %s:%d as AE title %s", host, port, node.ae_title)
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, end open associations, and write the remaining audit rows."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.recorder.stop()

    # -- handlers -------------------------------------------------------------------------------
    def _info(self, assoc: Any) -> _AssocInfo | None:
        with self._lock:
            return self._assocs.get(id(assoc))

    def _on_conn_open(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = POLL_S  # the DUL idle wait, see tune_pynetdicom
        raw = getattr(event.assoc.dul.socket, "socket", None)
        if TCP_NODELAY and raw is not None:  # small C-STORE responses go out at once (no Nagle delay)
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _on_requested(self, event: evt.Event) -> None:
        rq = event.assoc.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        address, port = event.assoc.requestor.address, int(event.assoc.requestor.port or 0)
        reason = ""
        if self.allowed_ae_titles and calling not in self.allowed_ae_titles:
            reason = f"calling AE title {calling!r} is not in allowed_ae_titles"
        elif self.allowed_hosts and address not in self.allowed_hosts:
            reason = f"peer address {address} is not in allowed_hosts"
        if not reason:
            return
        LOG.warning("association from %s:%d rejected: %s", address, port, reason)
        self.recorder.put(_AssocRejected(calling, called, address, port, reason, utcnow()))
        # permanent, by the service user, calling AE title not recognised
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.kill()  # returns once the A-ASSOCIATE-RJ is sent and the peer closed (or ARTIM expired)

    def _on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        key = next(self._keys)
        calling = str(assoc.requestor.ae_title or "").strip()
        info = _AssocInfo(key=key, calling_ae=calling, address=assoc.requestor.address)
        with self._lock:
            self._assocs[id(assoc)] = info
        called = str(assoc.acceptor.ae_title or "").strip()
        self.recorder.put(
            _AssocOpened(key, calling, called, info.address, int(assoc.requestor.port or 0), utcnow())
        )
        LOG.info("association %d from %s (%s) established", key, calling, info.address)

    def _end(self, event: evt.Event, outcome: str, reason: str = "") -> None:
        with self._lock:
            info = self._assocs.pop(id(event.assoc), None)
        if info is None:
            return
        self.recorder.put(_AssocEnded(info.key, outcome, reason, utcnow()))
        LOG.info(
            "association %d %s after %d instance(s), %.1f MB; C-STORE handler %.3f s, of which fsync %.3f s",
            info.key, outcome, info.stored, info.bytes_stored / 2**20, info.handler_s, info.sync_s,
        )

    def _on_released(self, event: evt.Event) -> None:
        self._end(event, "released")

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event, "aborted", "A-ABORT")

    def _on_conn_close(self, event: evt.Event) -> None:
        # The peer may close its end before the association thread has marked the release done,
        # so the outcome is settled a moment later (EVT_RELEASED / EVT_ABORTED usually settle it first).
        timer = threading.Timer(1.0, self._settle, args=(event,))
        timer.daemon = True
        timer.start()

    def _settle(self, event: evt.Event) -> None:
        assoc = event.assoc
        if assoc.is_released:
            self._end(event, "released")
        elif assoc.is_aborted:
            self._end(event, "aborted", "A-ABORT")
        else:
            self._end(event, "aborted", "connection closed without release")

    def _on_echo(self, _event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _refuse(self, info: _AssocInfo | None, status: int, reason: str, header: Header | None) -> Dataset:
        sop = header.sop_instance_uid if header else ""
        LOG.warning("C-STORE %s refused with 0x%04X: %s", sop or "(unparsed)", status, reason)
        self.recorder.put(_InstanceRefused(info.key if info else 0, status, reason, sop, utcnow()))
        return _status(status, reason)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        info = self._info(event.assoc)
        try:
            return self._store(event, info)
        finally:
            if info is not None:
                info.handler_s += time.perf_counter() - started

    def _store(self, event: evt.Event, info: _AssocInfo | None) -> int | Dataset:
        ts = str(event.context.transfer_syntax)
        raw_ds = event.request.DataSet
        view: memoryview | None = None
        header: Header | None = None
        try:
            if isinstance(raw_ds, BytesIO):
                view = raw_ds.getbuffer()
                encoded: bytes | memoryview = view
            else:
                encoded = event.encoded_dataset(include_meta=False)
            header = parse_header(encoded, ts)
            meta = file_meta_bytes(
                header.sop_class_uid or str(event.request.AffectedSOPClassUID),
                header.sop_instance_uid,
                ts,
                info.calling_ae if info else "",
            )
            stored = self.spool.store(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, [meta, encoded]
            )
        except CannotUnderstand as exc:
            return self._refuse(info, STATUS_CANNOT_UNDERSTAND, f"cannot understand: {exc}", header)
        except SpoolFull as exc:
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"out of resources: {exc}", header)
        except OSError as exc:
            return self._refuse(info, STATUS_OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}", header)
        except Exception as exc:  # never let one dataset break the association or the listener
            LOG.exception("C-STORE processing failed")
            return self._refuse(info, STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}", header)
        finally:
            if view is not None:
                view.release()
        if info is not None:
            info.stored += 1
            info.bytes_stored += stored.size_bytes if not stored.duplicate else 0
            info.sync_s += stored.sync_s
        self.recorder.put(
            _InstanceStored(
                assoc_key=info.key if info else 0,
                header=header,
                transfer_syntax=ts,
                path=str(stored.path),
                size_bytes=stored.size_bytes,
                calling_ae=info.calling_ae if info else "",
                address=info.address if info else "",
                at=utcnow(),
                duplicate=stored.duplicate,
            )
        )
        if stored.duplicate:
            LOG.debug("duplicate instance %s accepted again", header.sop_instance_uid)
        elif self.on_instance is not None:
            self.on_instance(header)
        return STATUS_SUCCESS


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an error comment (at most 64 characters, as the VR allows)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds

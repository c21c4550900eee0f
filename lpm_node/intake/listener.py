"""The DICOM front door: a C-STORE / C-ECHO SCP writing to the spool and the audit DB.

The DICOM upper layer is :mod:`lpm_node.intake.upper_layer`; this module decides what to accept and
keeps the records. Each received dataset is written to the spool as it arrived on the wire (no
pixel decoding), durably (synced to the spool's journal), before the success status is returned.
Only a few header elements are parsed. Audit rows (associations, instances, series) are written
by one background thread in batches, so the database never sits between the peer and its
C-STORE response; the spool is the source of truth and :func:`lpm_node.intake.series.reconcile_spool`
restores any row lost in a crash.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
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
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lpm_node.core.audit import Association, Instance, Series, utcnow
from lpm_node.core.config import Settings
from lpm_node.core.states import AssociationOutcome, SeriesStatus
from lpm_node.intake.series import note_instance_on_series
from lpm_node.intake.spool import Spool, SpoolFull, file_meta_bytes, is_valid_uid
from lpm_node.intake.upper_layer import Association as PeerAssociation
from lpm_node.intake.upper_layer import AssociationServer, ServerOptions, StoreRequest

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

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

# Elements the listener reads from each received dataset (groups 0008 and 0020, before the pixel data).
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


_LAST_HEADER_TAG = int(max(HEADER_TAGS))
_KEYWORD_OF_TAG = {tag: keyword_for_tag(tag) for tag in HEADER_TAGS}


class _PastHeader:
    """``stop_when`` for pydicom's element generator: true after the last wanted element.

    Data set elements come in ascending tag order, so nothing wanted follows; ``fired`` tells
    that the walk ended there (and not at the end of the bytes it was given).
    """

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, tag: BaseTag, _vr: str | None, _length: int) -> bool:
        if int.__gt__(tag, _LAST_HEADER_TAG):
            self.fired = True
        return self.fired


def parse_header(encoded: bytes | memoryview, transfer_syntax: str) -> Header:
    """Read the UIDs, modality and series description from an encoded data set (no pixel data).

    pydicom's element generator walks the data set up to the last wanted element and hands over
    only the wanted ones, still encoded; they are decoded here (the character set applied to the
    series description), which costs a fraction of building a pydicom Dataset.
    """
    header = _parse(encoded, str(transfer_syntax), complete=True)
    assert header is not None
    return header


def parse_header_fragments(fragments: list[memoryview], transfer_syntax: str) -> Header:
    """:func:`parse_header` of a data set received in fragments, reading the first one alone when it suffices."""
    ts = str(transfer_syntax)
    if len(fragments) > 1 and ts != DeflatedExplicitVRLittleEndian:
        header = _parse(fragments[0], ts, complete=False)
        if header is not None:
            return header
    return _parse(fragments[0] if len(fragments) == 1 else b"".join(fragments), ts, complete=True)  # type: ignore[return-value]


def _parse(data: bytes | memoryview, ts: str, *, complete: bool) -> Header | None:
    """The header; None when ``data`` is only the start of a data set and may end before the wanted elements."""
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data))
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated dataset does not inflate: {exc}") from exc
    raw: dict[str, bytes] = {}
    stop = _PastHeader()
    try:
        for elem in data_element_generator(BytesIO(data), ts == ImplicitVRLittleEndian, True, stop_when=stop,
                                           specific_tags=HEADER_TAGS):
            if isinstance(elem.value, bytes):
                raw[_KEYWORD_OF_TAG[elem.tag]] = elem.value
        if not complete and not stop.fired:
            return None
        charsets = raw.get("SpecificCharacterSet", b"").decode("ascii", "replace").split("\\")
        encodings = convert_encodings([c.strip() for c in charsets] if any(c.strip() for c in charsets) else None)
        values = {k: raw.get(k, b"").decode("ascii", "replace").strip("\0 ") for k in _HEADER_KEYWORDS}
        values["SeriesDescription"] = decode_bytes(raw.get("SeriesDescription", b""), encodings, set()).strip("\0 ")
    except Exception as exc:  # any decoding failure of peer data
        if not complete:
            return None
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
    """Writes listener events to the audit DB from one thread, committing in batches.

    A burst of events (a series arriving) is written once it pauses for ``quiet_s``, or when the
    oldest waiting event is ``max_age_s`` old, so the database work stays out of the way of the
    transfer itself. :meth:`flush` writes at once.
    """

    def __init__(self, sessions: sessionmaker, *, max_batch: int = 5000, quiet_s: float = 0.15,
                 max_age_s: float = 2.0) -> None:
        self._sessions = sessions
        self._items: deque[_Event] = deque()
        self._signal = threading.Event()  # set when the queue becomes non-empty, and by flush() / stop()
        self._urgent = False
        self._stopping = False
        self._assoc_ids: dict[int, int] = {}
        self._max_batch = max_batch
        self._quiet_s = quiet_s
        self._max_age_s = max_age_s
        self._thread = threading.Thread(target=self._run, name="audit-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._signal.set()
        self._thread.join(timeout=30)

    def put(self, item: _Event) -> None:
        self._items.append(item)
        if len(self._items) == 1:  # wake an idle recorder; during a burst it looks by itself
            self._signal.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed."""
        marker = _Flush()
        self._items.append(marker)
        self._urgent = True
        self._signal.set()
        return marker.done.wait(timeout)

    def _run(self) -> None:
        while True:
            self._signal.wait()
            started = time.monotonic()
            seen = -1
            while not (self._urgent or self._stopping):  # let a burst finish first
                count = len(self._items)
                if count >= self._max_batch or count == seen or time.monotonic() - started >= self._max_age_s:
                    break
                seen = count
                self._signal.clear()
                self._signal.wait(self._quiet_s)
            self._signal.clear()
            self._urgent = False
            batch: list[_Event] = []
            while self._items:
                batch.append(self._items.popleft())
            if batch:
                self._write(batch)
            if self._stopping and not self._items:
                return

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
                    outcome=AssociationOutcome.OPEN,
                )
                session.add(row)
                session.flush()
                self._assoc_ids[e.key] = row.id
                assoc_rows[e.key] = row
            elif isinstance(e, _AssocEnded):
                row = assoc_row(e.key)
                if row is not None:
                    row.ended_at = e.at
                    if row.outcome == AssociationOutcome.OPEN:
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
                        outcome=AssociationOutcome.REJECTED,
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
                            status=SeriesStatus.RECEIVING,
                        )
                        session.add(srow)
                    series_cache[e.header.series_instance_uid] = srow
                note_instance_on_series(session, srow, e.at)


# ---------------------------------------------------------------------------------------------
# The SCP
# ---------------------------------------------------------------------------------------------
@dataclass
class _AssocInfo:
    key: int
    calling_ae: str
    address: str
    stored: int = 0
    bytes_stored: int = 0
    handler_s: float = 0.0  # time in the C-STORE handler (parse, write, sync)
    sync_s: float = 0.0  # of which making instances durable


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
        self._server: AssociationServer | None = None
        self.on_instance: Callable[[Header], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def server_options(self) -> ServerOptions:
        """Address, presentation contexts and limits of the SCP (any called AE title is accepted)."""
        node = self.settings.node
        contexts: dict[UID, list[UID]] = {Verification: [ImplicitVRLittleEndian, ExplicitVRLittleEndian]}
        for sop_class in STORAGE_SOP_CLASSES:
            contexts[sop_class] = list(TRANSFER_SYNTAXES)
        return ServerOptions(host=node.host, port=int(node.port), contexts=contexts, max_pdu=MAX_PDU_BYTES,
                             max_associations=max(1, int(node.max_associations)))

    def start(self) -> tuple[str, int]:
        """Start accepting associations in background threads; returns the bound (host, port)."""
        self.recorder.start()
        self._server = AssociationServer(self.server_options(), self)
        host, port = self._server.start()
        LOG.info("listening on %s:%d as AE title %s", host, port, self.settings.node.ae_title)
        return host, port

    def stop(self) -> None:
        """Stop accepting, end open associations, and write the remaining audit rows."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.recorder.stop()

    # -- association events (the upper layer calls these) ---------------------------------------------
    def on_request(self, assoc: PeerAssociation) -> str | None:
        """Reject callers outside the allowlists."""
        if self.allowed_ae_titles and assoc.calling_ae not in self.allowed_ae_titles:
            return f"calling AE title {assoc.calling_ae!r} is not in allowed_ae_titles"
        if self.allowed_hosts and assoc.address not in self.allowed_hosts:
            return f"peer address {assoc.address} is not in allowed_hosts"
        return None

    def on_rejected(self, assoc: PeerAssociation, reason: str) -> None:
        self.recorder.put(_AssocRejected(assoc.calling_ae, assoc.called_ae, assoc.address, assoc.port, reason,
                                         utcnow()))

    def on_established(self, assoc: PeerAssociation) -> None:
        info = _AssocInfo(key=next(self._keys), calling_ae=assoc.calling_ae, address=assoc.address)
        assoc.data["info"] = info
        self.recorder.put(_AssocOpened(info.key, assoc.calling_ae, assoc.called_ae, assoc.address, assoc.port,
                                       utcnow()))
        LOG.info("association %d from %s (%s) established", info.key, assoc.calling_ae, assoc.address)

    def on_end(self, assoc: PeerAssociation, outcome: str, reason: str) -> None:
        info = assoc.data.get("info")
        if not isinstance(info, _AssocInfo):
            return
        self.recorder.put(_AssocEnded(info.key, outcome, reason, utcnow()))
        LOG.info(
            "association %d %s after %d instance(s), %.1f MB; C-STORE handler %.3f s, of which syncing %.3f s",
            info.key, outcome, info.stored, info.bytes_stored / 2**20, info.handler_s, info.sync_s,
        )

    def _refuse(self, info: _AssocInfo | None, status: int, reason: str, header: Header | None) -> tuple[int, str]:
        sop = header.sop_instance_uid if header else ""
        LOG.warning("C-STORE %s refused with 0x%04X: %s", sop or "(unparsed)", status, reason)
        self.recorder.put(_InstanceRefused(info.key if info else 0, status, reason, sop, utcnow()))
        return status, reason

    def on_store(self, assoc: PeerAssociation, request: StoreRequest) -> tuple[int, str]:
        """Parse the header, write the instance durably, record it; returns (status, error comment)."""
        started = time.perf_counter()
        info = assoc.data.get("info")
        info = info if isinstance(info, _AssocInfo) else None
        try:
            return self._store(request, info)
        finally:
            if info is not None:
                info.handler_s += time.perf_counter() - started

    def _store(self, request: StoreRequest, info: _AssocInfo | None) -> tuple[int, str]:
        ts = str(request.transfer_syntax)
        fragments = request.fragments
        header: Header | None = None
        try:
            header = parse_header_fragments(fragments, ts)
            meta = file_meta_bytes(
                header.sop_class_uid or request.sop_class_uid,
                header.sop_instance_uid,
                ts,
                info.calling_ae if info else "",
            )
            stored = self.spool.store(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, [meta, *fragments]
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
        return STATUS_SUCCESS, ""

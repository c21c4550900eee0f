"""The on-disk spool: received instances, written atomically and durably, under validated UIDs.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every path
component is a UID that passed :func:`is_valid_uid`; nothing a peer sent is used unchecked.
Once :meth:`Spool.store` returns, the instance survives a crash. With a journal (the serving
node), the instance is appended to the write-ahead journal (:mod:`lpm_node.intake.journal`) and synced;
a background thread then writes the spool files and syncs them in batches. Without one (or when
the journal has no room), a file is written to a temporary name in its final folder, flushed and
fsync'ed, then renamed, and the folder is fsync'ed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from lpm_node.intake.journal import Journal, JournalFull, JournalRecord, fsync_dir

LOG = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
TMP_SUFFIX = ".tmp"
WRITER_IDLE_S = 0.25  # the journal writer starts once no instance arrived for this long
DICOM_SUFFIX = ".dcm"
IMPLEMENTATION_VERSION_NAME = "LPM_NODE_01"


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, <= 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


class SpoolFull(Exception):
    """Not enough disk space, or the spool quota is reached (answered 0xA700 out of resources)."""


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance landed, and whether it was already there (a duplicate)."""

    path: Path
    size_bytes: int
    duplicate: bool
    sync_s: float = 0.0  # time spent making it durable (fdatasync + folder fsync)


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (short form: 2-byte length; OB: 4-byte length)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = "") -> bytes:
    """The 128-byte preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1), encoded directly.

    All values are validated UIDs or an AE title, so the few bytes are built here rather than
    through a pydicom Dataset (which costs more than the rest of the per-instance CPU work).
    """
    ae = "".join(c for c in source_ae if 32 <= ord(c) < 127 and c != "\\").strip()[:16]
    body = b"".join(
        [
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _element(0x0002, 0x0012, b"UI", _padded(PYDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        ]
        + ([_element(0x0002, 0x0016, b"AE", _padded(ae, b" "))] if ae else [])
    )
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


class Spool:
    """Durable storage of received instances, with free-space and quota checks."""

    def __init__(
        self,
        root: Path,
        *,
        quota_mb: int = 0,
        min_free_disk_mb: int = 0,
        journal_dir: Path | None = None,
        journal_mb: int = 256,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = int(quota_mb) * 1024 * 1024
        self.min_free_bytes = int(min_free_disk_mb) * 1024 * 1024
        self._lock = threading.Lock()
        self._known_dirs: set[Path] = set()
        self.remove_stale_temporaries()
        self._used = self.measure_usage()
        self._measured_at = time.monotonic()
        self.journal: Journal | None = None
        self._pending: dict[Path, JournalRecord] = {}  # journalled, spool file not yet written
        self._queue: list[JournalRecord] = []
        self._wake = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._waiters = 0  # threads waiting for spool files (the writer does not hold back then)
        self._last_append = 0.0
        self._queued_bytes = 0
        if journal_dir is not None and journal_mb > 0:
            self._open_journal(Path(journal_dir), journal_mb)

    # -- the journal --------------------------------------------------------------------------------
    def _open_journal(self, folder: Path, journal_mb: int) -> None:
        segments = 4
        journal = Journal(folder, segment_bytes=max(1, journal_mb // segments) << 20, segments=segments)
        recovered = journal.recover()
        if recovered:
            LOG.info("writing %d journalled instance(s) to the spool after a restart", len(recovered))
            self._used += sum(r.length for r in recovered if not (self.root / r.relpath).exists())
            try:
                self._write_from_journal(journal, recovered)
            except OSError as exc:  # kept in the journal; the writer thread tries again
                LOG.error("journalled instances not yet written to the spool: %s", exc.strerror or exc)
                for rec in recovered:
                    self._pending[self.root / rec.relpath] = rec
                    self._queued_bytes += rec.length
                self._queue.extend(recovered)
        journal.prepare(background=True)
        self.journal = journal
        self._writer = threading.Thread(target=self._run_writer, args=(journal,), name="spool-writer", daemon=True)
        self._writer.start()

    def _writer_due(self) -> float:
        """0 when the writer should copy records out now, else how long it may still wait.

        The writer keeps out of the way of a transfer in progress (its file-system syncs would slow
        the journal's): it starts once arrivals pause, when the journal is half full, or when
        someone waits for the files.
        """
        if self._stopping or self._waiters or self.journal is None:
            return 0.0
        if self._queued_bytes >= self.journal.capacity_bytes // 2:
            return 0.0
        return max(0.0, self._last_append + WRITER_IDLE_S - time.monotonic())

    def _next_batch(self) -> list[JournalRecord]:
        """The next records to write out (the lock is held); [] when the spool is closing."""
        while not self._stopping:
            if not self._queue:
                self._wake.wait()
                continue
            wait = self._writer_due()
            if wait <= 0:
                return self._queue[:64]
            self._wake.wait(wait)
        return []

    def _run_writer(self, journal: Journal) -> None:
        failures = 0
        while True:
            with self._wake:
                batch = self._next_batch()
            if not batch:
                return
            try:
                self._write_from_journal(journal, batch)
            except OSError as exc:  # the records stay journalled; try again a little later
                failures += 1
                delay = min(0.5 * 2 ** (failures - 1), 30.0)
                LOG.error("%d instance(s) not yet written from the journal to the spool (%s); retrying in %.1f s",
                          len(self._queue), exc.strerror or exc, delay)
                deadline = time.monotonic() + delay
                with self._wake:
                    while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                        self._wake.wait(remaining)
                continue
            failures = 0
            with self._wake:
                del self._queue[: len(batch)]
                for rec in batch:
                    self._pending.pop(self.root / rec.relpath, None)
                    self._queued_bytes -= rec.length
                self._wake.notify_all()

    def _write_from_journal(self, journal: Journal, records: list[JournalRecord]) -> None:
        """Write journalled instances as spool files, sync them, then checkpoint the journal."""
        written: list[tuple[int, Path, Path]] = []
        try:
            for rec in records:
                final = self.root / rec.relpath
                if final.exists():
                    continue
                fd, tmp = self._create_temporary(final.parent, f".{final.stem}.j{rec.seq}{TMP_SUFFIX}")
                written.append((fd, tmp, final))
                journal.copy_payload(rec, fd)
            for fd, _tmp, _final in written:  # the first sync commits them all
                os.fdatasync(fd)
        except BaseException:
            for fd, tmp, _final in written:
                os.close(fd)
                tmp.unlink(missing_ok=True)
            raise
        folders = set()
        for fd, tmp, final in written:
            os.close(fd)
            os.rename(tmp, final)
            folders.add(final.parent)
        for folder in folders:
            fsync_dir(folder)
        journal.checkpoint(records[-1].seq)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every journalled instance is in the spool as a file; False on timeout."""
        return self._wait_for_writer(lambda: bool(self._pending), timeout)

    def _wait_for_folder(self, folder: Path, timeout: float = 60.0) -> None:
        if not self._wait_for_writer(lambda: any(p.parent == folder for p in self._pending), timeout):
            LOG.warning("instances of %s are still being written from the journal", folder.name)

    def _wait_for_writer(self, busy: Callable[[], bool], timeout: float) -> bool:
        """Wait while ``busy()`` (checked under the lock); the writer starts at once meanwhile. False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._waiters += 1
            self._wake.notify_all()
            try:
                while busy():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._wake.wait(remaining)
            finally:
                self._waiters -= 1
        return True

    def close(self, timeout: float = 120.0) -> None:
        """Write what the journal holds to the spool, then stop the writer and close the journal."""
        if self.journal is None:
            return
        if not self.flush(timeout):
            LOG.warning("%d instance(s) stay in the journal; they are written to the spool at the next start",
                        len(self._pending))
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._writer is not None:
            self._writer.join(30)
        self.journal.close()
        self.journal = None

    # -- paths ----------------------------------------------------------------------------------
    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Folder of one series (both UIDs must be valid)."""
        for uid in (study_uid, series_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of one instance (all UIDs must be valid)."""
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid UID {sop_uid!r}")
        return self.series_dir(study_uid, series_uid) / f"{sop_uid}{DICOM_SUFFIX}"

    def series_files(self, study_uid: str, series_uid: str) -> list[Path]:
        """The spooled files of a series, sorted by name."""
        folder = self.series_dir(study_uid, series_uid)
        if self._pending:
            self._wait_for_folder(folder)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == DICOM_SUFFIX)

    def iter_instances(self) -> Iterator[tuple[str, str, Path]]:
        """Every spooled instance as (study UID, series UID, path); folders with invalid names are skipped."""
        for study in sorted(self.root.iterdir()):
            if not (study.is_dir() and is_valid_uid(study.name)):
                continue
            for series in sorted(study.iterdir()):
                if not (series.is_dir() and is_valid_uid(series.name)):
                    continue
                for path in sorted(series.iterdir()):
                    if path.suffix == DICOM_SUFFIX and is_valid_uid(path.stem):
                        yield study.name, series.name, path

    # -- space ----------------------------------------------------------------------------------
    def measure_usage(self) -> int:
        """Bytes currently held in the spool (walks the folder)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    def refresh_usage(self) -> int:
        """Re-measure the spool size (after files were removed by others); returns it."""
        used = self.measure_usage()
        with self._lock:
            self._used = used
        return used

    def _remeasure_if_stale(self, max_age_s: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._measured_at >= max_age_s:
            self._measured_at = now
            self.refresh_usage()

    @property
    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        """Free space on the spool's file system, for an unprivileged writer."""
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int) -> None:
        """Raise :class:`SpoolFull` when storing ``incoming_bytes`` would break the free-space floor or the quota."""
        if self.min_free_bytes:
            free = self.free_bytes()
            if free - incoming_bytes < self.min_free_bytes:
                raise SpoolFull(
                    f"free disk space {free // 2**20} MB minus {incoming_bytes // 1024} kB incoming is below "
                    f"min_free_disk_mb={self.min_free_bytes // 2**20}"
                )
        if self.quota_bytes and self._used + incoming_bytes > self.quota_bytes:
            self._remeasure_if_stale()  # files may have been removed since the last measurement
        if self.quota_bytes and self._used + incoming_bytes > self.quota_bytes:
            raise SpoolFull(
                f"spool quota reached: {self._used // 1024} kB used + {incoming_bytes // 1024} kB incoming > "
                f"spool_quota_mb={self.quota_bytes // 2**20}"
            )

    # -- writing --------------------------------------------------------------------------------
    def _create_temporary(self, folder: Path, name: str) -> tuple[int, Path]:
        """Create a new temporary file in ``folder`` (made, durably, when missing); returns (fd, path)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._ensure_dir(folder)
        tmp = folder / name
        try:
            return os.open(tmp, flags, 0o644), tmp
        except FileNotFoundError:  # the folder was removed since it was made: make it again
            self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            return os.open(tmp, flags, 0o644), tmp

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        created: list[Path] = []
        probe = folder
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        # make the new folder entries themselves durable
        for path in reversed(created):
            fsync_dir(path.parent)
        self._known_dirs.add(folder)

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        chunks: list[bytes | bytearray | memoryview],
    ) -> StoredInstance:
        """Write ``chunks`` (preamble + meta + dataset) durably as the instance's file.

        An instance already in the spool is not written again (``duplicate=True``).
        Raises :class:`SpoolFull` before writing anything when space or quota is short.
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        pending = self._pending.get(final)
        if pending is not None:
            return StoredInstance(final, pending.length, True)
        if final.exists():
            return StoredInstance(final, final.stat().st_size, True)
        size = sum(len(c) for c in chunks)
        self.check_space(size)
        if self.journal is not None:
            def queue_record(record: JournalRecord) -> None:
                with self._wake:
                    self._used += size
                    self._pending[final] = record
                    self._queue.append(record)
                    self._queued_bytes += record.length
                    self._last_append = time.monotonic()
                    if len(self._queue) == 1 or self._waiters:  # else the writer wakes by itself when due
                        self._wake.notify_all()

            try:
                _record, sync_s = self.journal.append(f"{study_uid}/{series_uid}/{sop_uid}{DICOM_SUFFIX}", chunks,
                                                      queue_record)
            except JournalFull:
                pass  # written directly below
            else:
                return StoredInstance(final, size, False, sync_s)
        folder = final.parent
        fd, tmp = self._create_temporary(folder, f".{sop_uid}.{threading.get_ident()}{TMP_SUFFIX}")
        try:
            written = os.writev(fd, chunks)
            if written != size:  # short write: start again with a plain loop
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            t_sync = time.perf_counter()
            os.fdatasync(fd)
            sync_s = time.perf_counter() - t_sync
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, final)
        t_sync = time.perf_counter()
        fsync_dir(folder)
        sync_s += time.perf_counter() - t_sync
        with self._lock:
            self._used += size
        return StoredInstance(final, size, False, sync_s)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by an interrupted write; returns how many."""
        count = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        count += 1
                    except OSError:
                        pass
        if count:
            LOG.info("removed %d incomplete temporary file(s) from the spool", count)
        return count

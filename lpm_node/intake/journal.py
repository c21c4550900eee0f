"""The spool's write-ahead journal: a received instance is durable once its record is in the journal.

Creating, renaming and syncing a new file costs a file-system journal commit (about 1 ms per
instance on an ext4 disk); appending to a preallocated, already written file and ``fdatasync``-ing
it does not (about 0.25 ms). So the listener appends each instance to a journal segment, syncs,
and only then answers success; :class:`lpm_node.intake.spool.Spool` writes the spool files from the
journal in the background, syncs them in batches and then records a durable checkpoint: the last
sequence number whose file is safely in the spool. On start, records after the checkpoint are
written to the spool again, so an instance acknowledged before a crash is never lost.

A record is a header (magic, version, path length, sequence number, payload length, XXH3-64
checksum of everything else), the spool-relative path (ASCII, built from validated UIDs) and the
payload (the instance file's bytes), padded with zeros to whole pages. Records are appended in
sequence order, each synced before the next is written, so only the last record of a segment can
be torn by a crash; a scan stops at the first record that does not check out.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

LOG = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sHHQQQ")  # magic, version, path length, sequence, payload length, checksum
_MAGIC = b"LPMJ"
_VERSION = 1
_CHECKPOINT = struct.Struct("<4sQQ")  # magic, sequence, checksum
_CHECKPOINT_MAGIC = b"LPMC"
_CHECKPOINT_SLOT = 512  # two slots, written alternately: a torn write leaves the other one valid
_FILL_CHUNK = 1 << 20
_PAGE = 4096  # records start on page boundaries and fill whole pages: no page is read before it is written
_PAGE_OF_ZEROS = bytes(_PAGE)

Chunk = bytes | bytearray | memoryview


class JournalFull(Exception):
    """No prepared segment has room for the record (the caller writes the file directly)."""


class JournalInUse(RuntimeError):
    """Another process holds the journal (two nodes on one data folder)."""


@dataclass(frozen=True)
class JournalRecord:
    """One instance in the journal: where its payload lies and where its spool file belongs."""

    seq: int
    segment: int
    offset: int  # of the payload in the segment file
    length: int
    relpath: str


@dataclass
class _Segment:
    index: int
    path: Path
    fd: int = -1
    offset: int = 0  # where the next record goes
    last_seq: int = 0  # highest sequence number written in the current use
    ready: bool = False
    kept: bool = False  # holds records of another segment size: neither recreated nor written this run


def _checksum(fields: bytes, path: bytes, chunks: Sequence[Chunk]) -> int:
    """XXH3-64 of a record (fast enough to sit on the C-STORE path: about 20 GB/s)."""
    digest = xxhash.xxh3_64(fields)
    digest.update(path)
    for chunk in chunks:
        digest.update(chunk)
    return digest.intdigest()


class Journal:
    """Preallocated segment files, a checkpoint file and a lock, under one folder."""

    def __init__(self, folder: Path, *, segment_bytes: int = 64 << 20, segments: int = 4) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = int(segment_bytes)
        self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise JournalInUse(f"{self.folder} is in use by another lpm-node process") from exc
        self._lock = threading.Lock()
        self._segments = [_Segment(i, self.folder / f"segment-{i}.wal") for i in range(max(2, int(segments)))]
        self._active: int | None = None  # the segment being appended to; None: pick a free one
        self._next_seq = 1
        self._checkpoint_fd = os.open(self.folder / "checkpoint", os.O_RDWR | os.O_CREAT, 0o644)
        self._checkpoint_writes = 0
        self.checkpointed = self._read_checkpoint()
        self._preparer: threading.Thread | None = None
        self._want_more = threading.Condition(self._lock)
        self._wanted = 0  # segments the preparer should have created
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        """Bytes the segments hold together."""
        return self.segment_bytes * len(self._segments)

    # -- recovery ---------------------------------------------------------------------------------
    def recover(self) -> list[JournalRecord]:
        """Records written after the checkpoint (acknowledged, maybe not yet in the spool), in order."""
        found: list[JournalRecord] = []
        highest = self.checkpointed
        for seg in self._segments:
            if not seg.path.exists():
                continue
            with open(seg.path, "rb") as f:  # its own size: journal_mb may have changed since it was written
                for rec in self._scan(f, seg.index, seg.path.stat().st_size):
                    highest = max(highest, rec.seq)
                    if rec.seq > self.checkpointed:
                        found.append(rec)
                        seg.last_seq = max(seg.last_seq, rec.seq)  # not reused before it is checkpointed
        self._next_seq = highest + 1
        found.sort(key=lambda r: r.seq)
        return found

    def _scan(self, f, index: int, size: int) -> list[JournalRecord]:  # noqa: ANN001 - a binary file
        records: list[JournalRecord] = []
        offset = 0
        while offset + _HEADER.size <= size:
            f.seek(offset)
            raw = f.read(_HEADER.size)
            magic, version, path_len, seq, length, checksum = _HEADER.unpack(raw)
            end = offset + _HEADER.size + path_len + length
            if magic != _MAGIC or version != _VERSION or seq == 0 or end > size:
                break
            if seq <= self.checkpointed:  # already in the spool: skipped without reading it
                offset = _aligned(end)
                continue
            path = f.read(path_len)
            digest = xxhash.xxh3_64(raw[: _HEADER.size - 8])
            digest.update(path)
            remaining = length
            while remaining:
                block = f.read(min(remaining, _FILL_CHUNK))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
            if remaining or digest.intdigest() != checksum:
                break  # the torn last record of this segment
            try:
                relpath = path.decode("ascii")
            except UnicodeDecodeError:
                break
            records.append(JournalRecord(seq, index, offset + _HEADER.size + path_len, length, relpath))
            offset = _aligned(end)
        return records

    # -- segments ---------------------------------------------------------------------------------
    def prepare(self, *, background: bool = True) -> None:
        """Open the existing segments and create the missing ones, a segment ahead of need.

        A segment is created zero-filled (so later syncs touch no file-system metadata) by a
        background thread, the first two at once and each further one when the segment before it
        is taken into use. Until a segment is ready, the spool writes files directly.
        """
        for seg in self._segments:
            if seg.path.exists() and seg.path.stat().st_size == self.segment_bytes:
                self._open(seg)
            elif seg.path.exists() and seg.last_seq > self.checkpointed:
                LOG.warning("journal segment %s has another size and records not yet in the spool: kept unused",
                            seg.path.name)
                seg.kept = True
        self._wanted = 2
        if all(seg.ready for seg in self._segments):
            return
        if background:
            self._preparer = threading.Thread(target=self._create_missing, name="journal-prepare", daemon=True)
            self._preparer.start()
        else:
            self._wanted = len(self._segments)
            self._create_missing()

    def _create_missing(self) -> None:
        for seg in self._segments:
            with self._lock:
                while not self._closed and seg.index >= self._wanted:
                    self._want_more.wait()
                if self._closed:
                    return
            if seg.ready or seg.kept:
                continue
            try:
                self._create(seg)
            except OSError as exc:  # e.g. a full disk: the spool writes files directly instead
                LOG.warning("journal segment %s not created (%s); instances are written directly", seg.path,
                            exc.strerror or exc)
                return
            with self._lock:
                if self._closed:
                    return
                self._open(seg)
            LOG.info("journal segment %d of %d ready (%d MB)", seg.index + 1, len(self._segments),
                     self.segment_bytes >> 20)

    def _create(self, seg: _Segment) -> None:
        tmp = seg.path.with_suffix(".tmp")
        zeros = bytes(_FILL_CHUNK)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = 0
            while written < self.segment_bytes:
                written += os.write(fd, zeros[: min(_FILL_CHUNK, self.segment_bytes - written)])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, seg.path)
        fsync_dir(self.folder)

    def _open(self, seg: _Segment) -> None:
        if seg.fd < 0:
            seg.fd = os.open(seg.path, os.O_RDWR)
        seg.ready = True

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Create every segment now and wait until they are ready (tests, benchmarks)."""
        with self._lock:
            self._wanted = len(self._segments)
            self._want_more.notify_all()
        if self._preparer is not None:
            self._preparer.join(timeout)
        return all(seg.ready for seg in self._segments)

    def _room_for(self, total: int) -> _Segment:
        if self._active is not None:
            seg = self._segments[self._active]
            if seg.ready and seg.offset + total <= self.segment_bytes:
                return seg
        start = -1 if self._active is None else self._active
        for step in range(1, len(self._segments) + 1):
            candidate = self._segments[(start + step) % len(self._segments)]
            if candidate.ready and candidate.last_seq <= self.checkpointed and total <= self.segment_bytes:
                candidate.offset = 0
                candidate.last_seq = 0
                self._active = candidate.index
                if candidate.index + 2 > self._wanted:  # keep one segment prepared ahead
                    self._wanted = candidate.index + 2
                    self._want_more.notify_all()
                return candidate
        raise JournalFull("no journal segment has room")

    # -- writing ----------------------------------------------------------------------------------
    def append(
        self, relpath: str, chunks: Sequence[Chunk], on_written: Callable[[JournalRecord], None] | None = None
    ) -> tuple[JournalRecord, float]:
        """Write one record and sync it; returns the record and the seconds spent syncing.

        ``on_written`` is called with the synced record before the next record is written, so
        callers see records in sequence order. Raises :class:`JournalFull` when no segment has
        room (nothing is written then).
        """
        path = relpath.encode("ascii")
        length = sum(len(c) for c in chunks)
        end = _HEADER.size + len(path) + length
        total = _aligned(end)
        with self._lock:
            if self._closed:
                raise JournalFull("journal closed")
            seg = self._room_for(total)
            seq = self._next_seq
            fields = _HEADER.pack(_MAGIC, _VERSION, len(path), seq, length, 0)[:-8]
            header = fields + struct.pack("<Q", _checksum(fields, path, chunks))
            buffers: list[Chunk] = [header, path, *chunks, _PAGE_OF_ZEROS[: total - end]]
            written = os.pwritev(seg.fd, buffers, seg.offset)
            if written != total:  # a short write: finish it piece by piece
                _pwrite_all(seg.fd, b"".join(bytes(b) for b in buffers)[written:], seg.offset + written)
            started = time.perf_counter()
            os.fdatasync(seg.fd)
            sync_s = time.perf_counter() - started
            record = JournalRecord(seq, seg.index, seg.offset + _HEADER.size + len(path), length, relpath)
            seg.offset += total
            seg.last_seq = seq
            self._next_seq = seq + 1
            if on_written is not None:
                on_written(record)
        return record, sync_s

    def copy_payload(self, record: JournalRecord, out_fd: int) -> None:
        """Copy a record's payload into ``out_fd`` (from its current position), in the kernel when possible."""
        seg = self._segments[record.segment]
        own = seg.fd < 0  # during recovery, before the segments are opened for writing
        src = os.open(seg.path, os.O_RDONLY) if own else seg.fd
        offset, remaining = record.offset, record.length
        try:
            try:
                while remaining:
                    n = os.copy_file_range(src, out_fd, remaining, offset)
                    if n == 0:
                        break
                    offset += n
                    remaining -= n
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            while remaining:  # no in-kernel copy here: through user space
                block = os.pread(src, min(remaining, _FILL_CHUNK), offset)
                if not block:
                    raise OSError(f"journal segment {record.segment} ends inside record {record.seq}")
                _pwrite_all(out_fd, block, -1)
                offset += len(block)
                remaining -= len(block)
        finally:
            if own:
                os.close(src)

    # -- checkpoint -------------------------------------------------------------------------------
    def checkpoint(self, seq: int) -> None:
        """Durably record that every record up to ``seq`` is in the spool."""
        if seq <= self.checkpointed:
            return
        fields = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, seq, 0)[:-8]
        slot = fields + struct.pack("<Q", xxhash.xxh3_64_intdigest(fields))
        self._checkpoint_writes += 1
        os.pwrite(self._checkpoint_fd, slot, (self._checkpoint_writes % 2) * _CHECKPOINT_SLOT)
        os.fdatasync(self._checkpoint_fd)
        with self._lock:
            self.checkpointed = seq

    def _read_checkpoint(self) -> int:
        best = 0
        for slot in range(2):
            raw = os.pread(self._checkpoint_fd, _CHECKPOINT.size, slot * _CHECKPOINT_SLOT)
            if len(raw) < _CHECKPOINT.size:
                continue
            magic, seq, checksum = _CHECKPOINT.unpack(raw)
            if magic == _CHECKPOINT_MAGIC and checksum == xxhash.xxh3_64_intdigest(raw[:-8]):
                best = max(best, seq)
        return best

    def close(self) -> None:
        """Close the files and release the lock (records stay for the next start)."""
        with self._lock:
            self._closed = True
            self._want_more.notify_all()
        if self._preparer is not None:
            self._preparer.join(30)
        for seg in self._segments:
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1
            seg.ready = False
        os.close(self._checkpoint_fd)
        os.close(self._lock_fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aligned(offset: int) -> int:
    """``offset`` rounded up to a page boundary."""
    return -(-offset // _PAGE) * _PAGE


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (or at the file position when ``offset`` is -1)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset < 0 else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset >= 0:
            offset += n

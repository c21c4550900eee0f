"""The on-disk spool: received instances, written atomically and durably, under validated UIDs.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every path
component is a UID that passed :func:`is_valid_uid`; nothing a peer sent is used unchecked.
Transfers in progress are written to ``<spool>/.incoming`` (same file system); :meth:`Spool.adopt`
then syncs the file, renames it to its final name and syncs the folder. Once it returns, the
instance survives a crash. Each instance's SHA-256 is returned so that it can be recorded at
receipt and checked against the bytes the measurement read (:mod:`lpm_node.intake.integrity`).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lpm_node.core.files import checksum_and_sync, file_checksum, fsync_folder
from lpm_node.core.processes import process_gone
from lpm_node.intake.header import is_valid_uid

LOG = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
STALE_TEMPORARY_SECONDS = 120.0  # a temporary untouched this long belongs to no transfer in progress (another
# machine's; those of this machine's ended processes are removed at once)
INCOMING_DIR = ".incoming"  # where transfers in progress are written (same file system as the spool)
DICOM_SUFFIX = ".dcm"


class ChecksumMismatch(Exception):
    """A spooled file no longer has the checksum recorded when it was received."""


def _writer_gone(folder: Path, incoming: Path) -> bool:
    """Whether ``folder`` is the incoming folder of a process of this machine that no longer runs (its
    temporaries are left over by a crash; those of other machines' processes age out instead)."""
    if folder.parent != incoming:
        return False
    host, _, pid = folder.name.rpartition("-")
    return pid.isdigit() and process_gone(host, int(pid))


class SpoolFull(Exception):
    """Not enough disk space, or the spool quota is reached (answered 0xA700 out of resources)."""


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance landed, and whether it was already there (a duplicate)."""

    path: Path
    size_bytes: int
    duplicate: bool
    sync_s: float = 0.0  # time spent making it durable (fdatasync + folder fsync)
    checksum: str = ""  # SHA-256 of the file, hex


class Spool:
    """Durable storage of received instances, with free-space and quota checks."""

    def __init__(
        self,
        root: Path,
        *,
        quota_mb: int = 0,
        min_free_disk_mb: int = 0,
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

    @property
    def incoming(self) -> Path:
        """Folder for this process's transfers in progress (one per process: the data folder may be shared)."""
        folder = self.root / INCOMING_DIR / f"{socket.gethostname()}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def check_writable(self) -> None:
        """Raise OSError when the spool folder is gone or cannot be written (a deleted or read-only data folder)."""
        if not self.root.is_dir():
            raise FileNotFoundError(2, f"spool folder {self.root} is missing (deleted while the node runs?)")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(13, f"spool folder {self.root} is not writable")

    def close(self) -> None:
        """Nothing is buffered: every stored instance is already durable."""

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
            fsync_folder(path.parent)
        self._known_dirs.add(folder)

    def adopt(self, received: Path, study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
        """Make a fully received file (in :attr:`incoming`) the instance's durable spool file.

        The file is synced and checksummed, renamed to its final name, and the folder is synced. An
        instance already in the spool is kept as it is (``duplicate=True``; ``received`` is left alone).
        Raises :class:`SpoolFull` before moving anything when space or quota is short.
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        if final.exists():
            return StoredInstance(final, final.stat().st_size, True, checksum=file_checksum(final))
        size = received.stat().st_size
        self.check_space(size)
        checksum, sync_s = checksum_and_sync(received)
        self._ensure_dir(final.parent)
        try:
            os.rename(received, final)
        except FileNotFoundError:  # the series folder was removed since it was made
            self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            os.rename(received, final)
        t_sync = time.perf_counter()
        fsync_folder(final.parent)
        sync_s += time.perf_counter() - t_sync
        with self._lock:
            self._used += size
        return StoredInstance(final, size, False, sync_s, checksum)

    def remove_stale_temporaries(self, untouched_s: float = STALE_TEMPORARY_SECONDS) -> int:
        """Delete temporary files left by an interrupted write (untouched for ``untouched_s`` seconds: the data folder
        may be shared, and another process's transfers in progress are written there now); returns how many."""
        count = 0
        now = time.time()
        incoming = self.root / INCOMING_DIR
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                folder = Path(dirpath)
                if name.endswith(TMP_SUFFIX) or folder == incoming or folder.parent == incoming:
                    path = os.path.join(dirpath, name)
                    try:
                        if not _writer_gone(folder, incoming) and now - os.stat(path).st_mtime < untouched_s:
                            continue
                        os.unlink(path)
                        count += 1
                    except OSError:
                        pass
        for folder in incoming.iterdir() if incoming.is_dir() else []:
            if folder.is_dir() and _writer_gone(folder, incoming):
                shutil.rmtree(folder, ignore_errors=True)
        if count:
            LOG.info("removed %d incomplete temporary file(s) from the spool", count)
        return count

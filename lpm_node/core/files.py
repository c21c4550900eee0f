"""Durable files: the one atomic write the node uses everywhere (temporary file, fsync, rename, folder fsync), and
the one file checksum (SHA-256)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO


def _hash_into(digest: hashlib._Hash, fd: int) -> None:
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)


def bytes_checksum(data: bytes) -> str:
    """SHA-256 (hex) of bytes already in memory: the same as :func:`file_checksum` of a file holding them."""
    return hashlib.sha256(data).hexdigest()


def file_checksum(*paths: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, or of several files' bytes in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            _hash_into(digest, fd)
        finally:
            os.close(fd)
    return digest.hexdigest()


def checksum_and_sync(path: str | Path) -> tuple[str, float]:
    """SHA-256 (hex) of a file, and its data made durable (fdatasync) through the same open file; with the
    seconds the sync took."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        _hash_into(digest, fd)
        started = time.perf_counter()
        os.fdatasync(fd)
        return digest.hexdigest(), time.perf_counter() - started
    finally:
        os.close(fd)


def fsync_folder(folder: str | Path) -> None:
    """Make the names in ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    data: bytes | Iterable[bytes | memoryview] | Callable[[BinaryIO], object],
    *,
    make_parents: bool = True,
) -> Path:
    """Write ``path`` so that it is either absent or complete and durable, never half-written.

    ``data`` is bytes, an iterable of byte chunks, or a function that writes to the open binary file. The data
    go to a temporary file in the same folder, which is fsynced, renamed over ``path``, and the folder is
    fsynced. On any error the temporary file is removed and the error raised; ``path`` is untouched.
    """
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            elif isinstance(data, (bytes, bytearray, memoryview)):
                handle.write(data)
            else:
                for chunk in data:
                    handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)
    return target

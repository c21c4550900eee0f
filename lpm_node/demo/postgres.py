"""A local PostgreSQL server for the tests and benchmarks: Debian's binaries, a cluster in a temporary folder,
127.0.0.1 only.

PostgreSQL refuses to run as root; the tests (and CI) may run as root, so the cluster then belongs to the
``postgres`` user that Debian's package creates and its programs run as that user. The folder lies directly under
the system's temporary folder (pytest's own folders are private to the user running the tests).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from lpm_node.demo.orthanc import free_port


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's program folder (Debian: /usr/lib/postgresql/N/bin), else None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    """One PostgreSQL cluster: ``start()``, ``new_database()`` per test, ``stop()`` removes it all."""

    bin_dir: Path
    port: int = 0
    folder: Path | None = None
    user: str | None = None  # the OS user the server runs as (None: the current one)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], user=self.user, capture_output=True,
                              text=True, timeout=120, check=True)

    def start(self) -> PostgresServer:
        self.user = "postgres" if os.geteuid() == 0 else None
        self.folder = Path(tempfile.mkdtemp(prefix="lpm-node-postgres-"))
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
            user=self.user, stdout=subprocess.DEVNULL, stderr=open(self.folder / "server.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.url("postgres", driver=False), connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "server.log").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {log[-2000:]}") from None
                time.sleep(0.1)
        return self

    def url(self, database: str, *, driver: bool = True) -> str:
        """The SQLAlchemy URL (``driver``) or the libpq URL of ``database``."""
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        name = f"audit_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres", driver=False), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown: clients are disconnected
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

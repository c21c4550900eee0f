"""Network helpers for tests: free ports, dcmtk peers, an ``lpm-node serve`` subprocess (fixtures: conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

REPO = Path(__file__).resolve().parents[1]
NODE_AET = "LPM_NODE"
DATABASE_ERRORS = (sqlite3.OperationalError, psycopg.Error)


class Row(tuple):
    """A result row read by position or by column name (as sqlite3.Row); ``dict(row)`` gives the columns."""

    names: tuple[str, ...] = ()

    def __new__(cls, values: Sequence[Any], names: Sequence[str]) -> Row:
        row = super().__new__(cls, values)
        row.names = tuple(names)
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self.names.index(key) if isinstance(key, str) else key)

    def keys(self) -> tuple[str, ...]:
        return self.names


def query_postgres(url: str, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """Rows of ``sql`` (``?`` placeholders) on the PostgreSQL database at SQLAlchemy ``url``, with plain psycopg."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as connection:
        cursor = connection.execute(sql.replace("?", "%s"), tuple(params))
        if cursor.description is None:
            return []
        names = [column.name for column in cursor.description]
        return [Row(values, names) for values in cursor.fetchall()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m lpm_node.cli ARGS`` in the repository, output captured as text."""
    return subprocess.run([sys.executable, "-m", "lpm_node.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def associate_rq(
    calling_ae: str,
    abstract_syntax: str = "1.2.840.10008.1.1",
    *,
    contexts: Sequence[tuple[int, str]] | None = None,
    transfer_syntaxes: Sequence[str] | None = None,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU for raw-socket peers: ``contexts`` as (context ID, abstract syntax) pairs
    (default: ID 1 with ``abstract_syntax``), each with ``transfer_syntaxes`` (default: pynetdicom's)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = NODE_AET
    proposed = []
    for context_id, abstract in contexts if contexts is not None else [(1, abstract_syntax)]:
        cx = build_context(abstract, list(transfer_syntaxes) if transfer_syntaxes else None)
        cx.context_id = context_id
        proposed.append(cx)
    primitive.presentation_context_definition_list = proposed
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return rq.encode()


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU (header and body) from ``sock``; b"" when the peer closed first."""
    data = b""
    while len(data) < 6 or len(data) < 6 + int.from_bytes(data[2:6], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            return b""
        data += chunk
    return data


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools (TCP_NODELAY=1: no 40 ms Nagle delay per C-STORE)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def have_dcmtk() -> bool:
    return all(shutil.which(t) for t in ("storescu", "echoscu", "storescp"))


def echoscu(
    port: int, *, calling: str = "ECHOSCU", called: str = NODE_AET, timeout: float = 10, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """Run ``echoscu`` against 127.0.0.1:port (``extra``: more options, e.g. TLS)."""
    return subprocess.run(
        ["echoscu", "-to", "5", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=timeout,
    )


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    calling: str = "STORESCU",
    called: str = NODE_AET,
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Send ``files`` with ``storescu`` (one association) to 127.0.0.1:port."""
    cmd = ["storescu", "-to", "10", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port)]
    cmd += [str(f) for f in files]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def wait_for_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None, *, echo: bool = True,
    echo_extra: Sequence[str] = (),
) -> None:
    """Wait until a DICOM C-ECHO to 127.0.0.1:port succeeds (``echo=False``: until it accepts connections)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.1)
            continue
        if not echo or echoscu(port, extra=echo_extra).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answers C-ECHO on port {port} after {timeout} s")


@dataclass
class NodeProcess:
    """An ``lpm-node serve`` subprocess on 127.0.0.1."""

    data_dir: Path
    port: int = 0
    stable_seconds: float = 1.0
    allow_ae: Sequence[str] = ()
    config: Path | None = None
    extra: Sequence[str] = ()
    measure: bool = False  # front-door tests: receive, decide and queue only
    ready_by_echo: bool = True  # False: ready once it accepts connections (allow-lists that refuse ECHOSCU here)
    echo_extra: Sequence[str] = ()  # echoscu options to reach the node (e.g. TLS)
    database_url: str = ""  # empty: the SQLite file in data_dir
    module: str = "lpm_node.cli"  # tests.support_fault_node: the same node with one fault injected
    env: dict[str, str] | None = None  # added to the environment of the node process
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.port = self.port or free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", self.module, "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--stable-seconds", str(self.stable_seconds)]
        for title in self.allow_ae:
            cmd += ["--allow-ae", title]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        if not self.measure:
            cmd.append("--no-measure")
        elif "--model" not in self.extra:
            cmd.append("--demo-model")  # the tests measure with the bundled test model, asked for explicitly
        cmd += list(self.extra)
        self.log_path = self.data_dir / f"node-{self.port}-{int(time.time() * 1000)}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            wait_for_port(self.port, timeout, self.proc, echo=self.ready_by_echo, echo_extra=self.echo_extra)
            self.wait_ready(timeout)  # on a shared port the answer may have come from another process
        except BaseException:
            self.kill()  # a node that never became ready must not outlive the test
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for this process's own "lpm-node ready" line; raise if it exits first."""
        deadline = time.monotonic() + timeout
        while "lpm-node ready" not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not ready after {timeout} s")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait (clean shutdown); returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass

    # -- reading the audit DB (read-only, plain sqlite3 or psycopg: independent of the code under test) ----
    @property
    def db_path(self) -> Path:
        if self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return self.data_dir / "audit.sqlite"

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of ``sql`` (``?`` placeholders); each row is read by column name or position, like sqlite3.Row."""
        if self.database_url.startswith("postgresql"):
            return query_postgres(self.database_url, sql, params)
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return list(con.execute(sql, params))
        finally:
            con.close()

    def _database_there(self) -> bool:
        return self.database_url.startswith("postgresql") or self.db_path.exists()

    def wait_rows(
        self, sql: str, params: Sequence[Any] = (), *, until: Any = bool, timeout: float = 15.0
    ) -> list[Any]:
        """Run ``sql`` until ``until(rows)`` holds (audit rows are written shortly after the event)."""
        deadline = time.monotonic() + timeout
        rows: list[Any] = []
        while time.monotonic() < deadline:
            try:
                rows = self.query(sql, params)
            except DATABASE_ERRORS:
                rows = []
            if until(rows):
                return rows
            time.sleep(0.2)
        return rows

    def series(self, uid: str) -> Any:
        rows = self.query("SELECT * FROM series WHERE series_instance_uid = ?", (uid,))
        return rows[0] if rows else None

    def wait_series_status(self, uid: str, statuses: Sequence[str], timeout: float = 30.0) -> Any:
        """Wait until the series row has one of ``statuses``; returns the row."""
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            if self._database_there():
                try:
                    row = self.series(uid)
                except DATABASE_ERRORS:
                    row = None
                if row is not None and row["status"] in statuses:
                    return row
            time.sleep(0.2)
        raise TimeoutError(f"series {uid} not in {statuses} after {timeout} s (last: {dict(row) if row else None})")

    def cli_database(self) -> list[str]:
        """The options that point a command at this node's audit database."""
        return ["--data-dir", str(self.data_dir)] + (["--database-url", self.database_url] if self.database_url else [])

    def audit_json(self) -> list[dict[str, Any]]:
        """``lpm-node audit --data-dir ... --json``, parsed."""
        out = subprocess.run(
            [sys.executable, "-m", "lpm_node.cli", "audit", *self.cli_database(), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )
        return json.loads(out.stdout)["series"]

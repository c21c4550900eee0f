"""Fixtures shared by the tests: free ports, dcmtk, a real Orthanc, ``lpm-node serve`` and phantom series.

Helpers that are plain functions (``free_port``, ``storescu``, ``NodeProcess`` ...) live in ``tests/support_*.py``
and are imported from there; nothing here is imported by the package or the scripts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from lpm_node.core.audit import session_factory
from lpm_node.demo.orthanc import ORTHANC_BIN, Orthanc, orthanc_available
from lpm_node.demo.postgres import PostgresServer, postgres_bin_dir
from tests.support_net import NodeProcess, dcmtk_env, free_port, have_dcmtk
from tests.support_phantom import small_phantom, write_series

DATABASES = ("sqlite", "postgresql")


@pytest.fixture
def port() -> int:
    """A TCP port on 127.0.0.1 that is free when the test starts."""
    return free_port()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 for the whole test run (Debian's ``postgresql``), stopped at the end."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed (Debian's postgresql package; scripts/dev.sh installs it)")
    server = PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty audit database: a SQLite file, then a database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(params=DATABASES)
def node_database_url(request: pytest.FixtureRequest) -> str:
    """``NodeProcess(database_url=...)``: empty (the node's own SQLite file), then a new PostgreSQL database."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()


@pytest.fixture
def audit_sessions(database_url: str) -> Iterator[sessionmaker]:
    """Sessions on a new audit database (SQLite and PostgreSQL, schema at the newest)."""
    sessions = session_factory(database_url)
    yield sessions
    sessions.kw["bind"].dispose()


@pytest.fixture
def dcmtk() -> dict[str, str]:
    """The environment for dcmtk tools (TCP_NODELAY=1); skips the test when dcmtk is not installed."""
    if not have_dcmtk():
        pytest.skip("dcmtk (storescu, echoscu, storescp) not installed")
    return dcmtk_env()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc (AE ``ORTHANC``, any caller, any called AE), stopped at the end of the test."""
    if not orthanc_available():
        pytest.skip(f"Orthanc not installed ({ORTHANC_BIN})")
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)


@pytest.fixture
def start_node(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[Callable[..., NodeProcess]]:
    """``start_node(**NodeProcess options)``: an ``lpm-node serve`` on 127.0.0.1, stopped after the test."""
    started: list[NodeProcess] = []

    def start(**options: object) -> NodeProcess:
        options.setdefault("data_dir", tmp_path / f"node{len(started)}")
        node = NodeProcess(**options).start()  # type: ignore[arg-type]
        started.append(node)
        return node

    yield start
    for node in started:
        node.__exit__(None, None, None)


@pytest.fixture
def phantom_series(tmp_path: Path) -> Callable[..., list[Path]]:
    """``phantom_series(liver_hu=45.0, n_slices=24, **write options)``: a small phantom CT series on disk."""
    count = 0

    def write(liver_hu: float = 45.0, n_slices: int = 24, **options: object) -> list[Path]:
        nonlocal count
        count += 1
        return write_series(small_phantom(liver_hu, n_slices=n_slices), tmp_path / f"series{count}", **options)

    return write

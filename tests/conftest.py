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
from tests.support_net import NodeProcess, dcmtk_env, free_port, have_dcmtk
from tests.support_phantom import small_phantom, write_series


@pytest.fixture
def port() -> int:
    """A TCP port on 127.0.0.1 that is free when the test starts."""
    return free_port()


@pytest.fixture
def audit_sessions(tmp_path: Path) -> sessionmaker:
    """Sessions on a new audit database (a real SQLite file, ``tmp_path/audit.sqlite``, schema at the newest)."""
    return session_factory(f"sqlite:///{tmp_path / 'audit.sqlite'}")


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

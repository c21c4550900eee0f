"""A real Orthanc on 127.0.0.1 for tests (see lpm_node.demo.orthanc), as a pytest fixture.

Usage::

    from tests.support_orthanc import Orthanc, orthanc  # noqa: F401 - ``orthanc`` is a function-scoped fixture

    def test_something(orthanc: Orthanc) -> None:  # noqa: F811 (or: orthanc = support_orthanc.orthanc)
        ...  # C-STORE to ("127.0.0.1", orthanc.dicom_port), called AE orthanc.aet
        assert orthanc.find_by_sop_uid(uid)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lpm_node.demo.orthanc import ORTHANC_BIN, Orthanc, free_port, orthanc_available

__all__ = ["ORTHANC_BIN", "Orthanc", "free_port", "orthanc", "orthanc_available"]


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

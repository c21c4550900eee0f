"""``lpm-node`` with one fault injected, for tests that must force a failure no real input reaches.

Run as ``python -m tests.support_fault_node ARGS...``: the same command line as ``lpm-node``, except that the
C-STORE handler's header reader raises ``RuntimeError`` for the SOP Instance UID named in
``LPM_NODE_FAULT_SOP_INSTANCE_UID`` (every other instance is read as usual). Only tests run it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lpm_node.cli.main import main
from lpm_node.intake import listener
from lpm_node.intake.header import Header, read_header

FAULT_ENV = "LPM_NODE_FAULT_SOP_INSTANCE_UID"


def _faulty_read_header(path: Path) -> Header:
    header = read_header(path)
    if header.sop_instance_uid == os.environ.get(FAULT_ENV):
        raise RuntimeError("injected fault in the header reader")
    return header


if __name__ == "__main__":
    listener.read_header = _faulty_read_header
    sys.exit(main())

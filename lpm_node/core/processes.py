"""This process and others as the node names them (``host:pid``), and whether one of this machine's has ended."""

from __future__ import annotations

import os
import socket


def this_process() -> str:
    """This process as ``host:pid`` (as associations name their receiver)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_gone(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` surely runs no more (only this machine's processes can be checked)."""
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False

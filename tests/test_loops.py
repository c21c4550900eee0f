"""The node's background loops: an idle loop runs again when woken or when its work is due, and stops at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lpm_node.node.service import Loop


def _wait_for(calls: list[float], count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(calls) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(calls) >= count, f"{len(calls)} call(s), not {count}"


def _started(due_in: Callable[[], float | None]) -> tuple[Loop, list[float], threading.Event, threading.Thread]:
    calls: list[float] = []
    loop = Loop("test", lambda: calls.append(time.monotonic()), 30.0, due_in=due_in)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    _wait_for(calls, 1)
    return loop, calls, stop, thread


def _stops_at_once(loop: Loop, stop: threading.Event, thread: threading.Thread) -> None:
    stopped = time.monotonic()
    stop.set()
    loop.wake()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - stopped < 1.0


def test_an_idle_loop_runs_at_once_when_woken_and_otherwise_waits_its_interval():
    loop, calls, stop, thread = _started(lambda: None)
    woken = time.monotonic()
    loop.wake()  # work handed to the loop: the step runs now, not after its 30 s interval
    _wait_for(calls, 2)
    assert calls[1] - woken < 1.0
    time.sleep(0.6)
    assert len(calls) == 2
    _stops_at_once(loop, stop, thread)


def test_an_idle_loop_runs_when_its_work_is_due_before_its_interval():
    loop, calls, stop, thread = _started(lambda: 0.3)  # the next work is always due in 0.3 s
    _wait_for(calls, 4)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert all(0.25 <= gap < 2.0 for gap in gaps), gaps
    _stops_at_once(loop, stop, thread)

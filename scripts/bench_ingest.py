#!/usr/bin/env python3
"""Ingest benchmark: the same CT series sent by dcmtk ``storescu`` to lpm-node and to dcmtk ``storescp``.

Runs alternate (node, storescp, node, ...), each receiver starting from an empty folder, and the
wall time of each ``storescu`` run is measured (TCP_NODELAY=1 for the dcmtk tools). Prints the median
wall-time ratio node/storescp and instances per second for both. The node makes every instance
durable (synced to its write-ahead journal) before answering; storescp does not sync. The time
until the node has also written every spool file from its journal is printed beside it.

The node's journal is created once (as at installation) and kept from run to run, as a running
node keeps it; each run starts a fresh node with an empty spool and audit database.

    .venv/bin/python scripts/bench_ingest.py [--slices 300] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lpm_node.intake.journal import Journal  # noqa: E402

from lpm_node.core.config import Settings  # noqa: E402
from lpm_node.demo.phantom import make_phantom, write_ct_series  # noqa: E402
from tests.support_net import NodeProcess, dcmtk_env, free_port, wait_for_port  # noqa: E402


def _send(port: int, folder: Path, called: str) -> float:
    """Send every file of ``folder`` in one association; returns the wall time in seconds."""
    files = sorted(str(p) for p in folder.iterdir())
    start = time.perf_counter()
    result = subprocess.run(["storescu", "-aec", called, "127.0.0.1", str(port), *files],
                            env=dcmtk_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


_HANDLER_LOG = re.compile(r"after (\d+) instance\(s\).*C-STORE handler ([\d.]+) s, of which syncing ([\d.]+) s")


def _clean(folder: Path) -> None:
    """Remove a receiver's files and let the disk settle (writeback, discards), so the next run starts even."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    time.sleep(0.2)


def run_node(series: Path, work: Path, n: int) -> tuple[float, float, float, float]:
    """(wall time, time in the C-STORE handler, of which syncing, spool files written) for one run."""
    data = work / f"node-{time.monotonic_ns()}"
    data.mkdir()
    journal = work / "journal"
    journal.rename(data / "journal")
    node = NodeProcess(data, stable_seconds=3600).start()  # rules stay idle during the measurement
    try:
        start = time.perf_counter()
        elapsed = _send(node.port, series, "LPM_NODE")
        deadline = time.monotonic() + 60
        while len(stored := list((data / "spool").rglob("*.dcm"))) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        files_s = time.perf_counter() - start
        if len(stored) != n:
            raise RuntimeError(f"node stored {len(stored)} of {n} instances")
    finally:
        node.stop()
        (data / "journal").rename(journal)
    handler = sync = float("nan")
    for m in _HANDLER_LOG.finditer(node.log()):
        if int(m.group(1)) == n:
            handler, sync = float(m.group(2)), float(m.group(3))
    _clean(data)
    return elapsed, handler, sync, files_s


def run_storescp(series: Path, work: Path, n: int) -> float:
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30, proc)
        elapsed = _send(port, series, "STORESCP")
        if len(list(out.iterdir())) != n:
            raise RuntimeError("storescp did not store every instance")
    finally:
        proc.terminate()
        proc.wait(10)
    _clean(out)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=7, help="runs per receiver (alternating)")
    parser.add_argument("--work", help="working folder (default: a temporary folder on the same disk as /tmp)")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"bench_ingest: {tool} (dcmtk) is not installed", file=sys.stderr)
            return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="lpm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        series = work / "series"
        t0 = time.perf_counter()
        files = write_ct_series(make_phantom(n_slices=args.slices), series)
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {len(files)} instances, 512 x 512 int16, {size_mb:.0f} MB (generated in "
              f"{time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPU(s)")
        journal = Journal(work / "journal", segment_bytes=(Settings().node.journal_mb // 4) << 20, segments=4)
        journal.prepare(background=False)
        journal.close()
        node_t: list[float] = []
        scp_t: list[float] = []
        sync_t: list[float] = []
        files_t: list[float] = []
        for i in range(args.runs):
            wall, handler, sync, files_s = run_node(series, work, len(files))
            node_t.append(wall)
            sync_t.append(sync)
            files_t.append(files_s)
            scp_t.append(run_storescp(series, work, len(files)))
            print(f"run {i + 1}: node {wall:.3f} s (C-STORE handler {handler:.3f} s, of which syncing {sync:.3f} s; "
                  f"spool files written at {files_s:.3f} s), storescp {scp_t[-1]:.3f} s, ratio {wall / scp_t[-1]:.2f}",
                  flush=True)
        n = len(files)
        med_node, med_scp = statistics.median(node_t), statistics.median(scp_t)
        ratios = [a / b for a, b in zip(node_t, scp_t, strict=True)]
        print(f"median wall time: node {med_node:.3f} s ({n / med_node:.0f} instances/s, "
              f"{size_mb / med_node:.0f} MB/s), storescp {med_scp:.3f} s ({n / med_scp:.0f} instances/s, "
              f"{size_mb / med_scp:.0f} MB/s)")
        print(f"median ratio node/storescp: {statistics.median(ratios):.2f} "
              f"(ratio of medians {med_node / med_scp:.2f}; runs from {min(ratios):.2f} to {max(ratios):.2f})")
        med_sync = statistics.median(sync_t)
        print(f"durability: syncing the journal is {100 * med_sync / med_node:.0f} % of the node's wall time "
              f"(median {med_sync:.3f} s)")
        med_files = statistics.median(files_t)
        print(f"every spool file written from the journal: median {med_files:.3f} s after the first instance "
              f"(ratio to storescp {med_files / med_scp:.2f})")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

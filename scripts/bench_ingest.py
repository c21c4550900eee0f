#!/usr/bin/env python3
"""Ingest benchmark: the same CT series sent by dcmtk ``storescu`` to lpm-node and to dcmtk ``storescp``.

1. One association: runs alternate (node, storescp, node, ...), each receiver starting from an empty
   folder; the wall time of each ``storescu`` run is measured (TCP_NODELAY=1 for the dcmtk tools).
   The node makes every instance durable before it answers success (file synced, renamed, folder
   synced, audit row committed); storescp does not sync. Prints the median ratio node/storescp
   (target: <= 4) and the share of the node's wall time spent syncing.
2. Eight concurrent senders (the series in eight parts): the node against ``storescp --fork``,
   in instances per second.
The node's peak resident memory (VmHWM) during each part is printed.

    .venv/bin/python scripts/bench_ingest.py [--slices 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lpm_node.demo.orthanc import free_port  # noqa: E402
from lpm_node.demo.phantom import make_phantom, write_ct_series  # noqa: E402

SENDERS = 8
_SYNC_LOG = re.compile(r"after (\d+) instance\(s\), [\d.]+ MB \(syncing ([\d.]+) s")


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk's tools (TCP_NODELAY: much faster on loopback); bench_roles uses it too."""
    return {**os.environ, "TCP_NODELAY": "1"}


def _wait_for_echo(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        if subprocess.run(["echoscu", "-to", "2", "127.0.0.1", str(port)], env=dcmtk_env(),
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"no C-ECHO answer on port {port}")


def send_groups(port: int, groups: list[list[Path]], called: str) -> float:
    """Send each group of files in its own association, all at once; returns the wall time in seconds (bench_roles
    uses it too)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for files in groups]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - start


def _clean(folder: Path) -> None:
    """Remove a receiver's files and let the disk settle, so that the next run starts even."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    time.sleep(0.2)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_node(groups: list[list[Path]], work: Path, n: int) -> tuple[float, float, float]:
    """(wall time, seconds spent syncing, peak RSS in MB) for one run against a fresh node."""
    data = work / f"node-{time.monotonic_ns()}"
    data.mkdir()
    port = free_port()
    log = data / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lpm_node.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), "--data-dir", str(data), "--stable-seconds", "3600", "--no-measure"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_echo(port, proc)
        elapsed = send_groups(port, groups, "LPM_NODE")
        stored = len(list((data / "spool").rglob("*.dcm")))  # acknowledged means on disk: no waiting
        if stored != n:
            raise RuntimeError(f"node stored {stored} of {n} instances")
        rss = _peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    sync = sum(float(m.group(2)) for m in _SYNC_LOG.finditer(log.read_text(errors="replace")))
    _clean(data)
    return elapsed, sync, rss


def run_storescp(groups: list[list[Path]], work: Path, n: int, fork: bool) -> float:
    """storescp (``--fork``: one process per association) receiving the groups; checks it stored all ``n``
    instances and returns the wall time in seconds (bench_roles uses it too)."""
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", *(["--fork"] if fork else []), "-aet", "STORESCP", "-od", str(out),
                             str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_echo(port, proc)
        elapsed = send_groups(port, groups, "STORESCP")
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
    parser.add_argument("--runs", type=int, default=5, help="runs per receiver and part (alternating)")
    parser.add_argument("--work", help="working folder (default: a temporary folder on the same disk as /tmp)")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"bench_ingest: {tool} (dcmtk) is not installed", file=sys.stderr)
            return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="lpm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        files = sorted(write_ct_series(make_phantom(n_slices=args.slices), work / "series"))
        n = len(files)
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"series: {n} instances, 512 x 512 int16, {size_mb:.0f} MB (generated in "
              f"{time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPU(s)")

        one = [files]
        node_t, scp_t, sync_t, rss_one = [], [], [], []
        for i in range(args.runs):
            wall, sync, rss = run_node(one, work, n)
            node_t.append(wall)
            sync_t.append(sync)
            rss_one.append(rss)
            scp_t.append(run_storescp(one, work, n, fork=False))
            print(f"one association, run {i + 1}: node {wall:.3f} s (syncing {sync:.3f} s, peak RSS {rss:.0f} MB), "
                  f"storescp {scp_t[-1]:.3f} s, ratio {wall / scp_t[-1]:.2f}", flush=True)
        med_node, med_scp = statistics.median(node_t), statistics.median(scp_t)
        ratios = [a / b for a, b in zip(node_t, scp_t, strict=True)]
        print(f"one association, median: node {med_node:.3f} s ({n / med_node:.0f} instances/s, "
              f"{size_mb / med_node:.0f} MB/s), storescp {med_scp:.3f} s ({n / med_scp:.0f} instances/s)")
        print(f"median ratio node/storescp: {statistics.median(ratios):.2f} (target <= 4; runs from "
              f"{min(ratios):.2f} to {max(ratios):.2f}); every instance durable before success")
        print(f"fsync share: {100 * statistics.median(sync_t) / med_node:.0f} % of the node's wall time; "
              f"node peak RSS {max(rss_one):.0f} MB")

        groups = [files[i::SENDERS] for i in range(SENDERS)]
        node_c, scp_c, rss_c = [], [], []
        for i in range(args.runs):
            wall, _sync, rss = run_node(groups, work, n)
            node_c.append(wall)
            rss_c.append(rss)
            scp_c.append(run_storescp(groups, work, n, fork=True))
            print(f"{SENDERS} senders, run {i + 1}: node {n / wall:.0f} instances/s (peak RSS {rss:.0f} MB), "
                  f"storescp --fork {n / scp_c[-1]:.0f} instances/s", flush=True)
        print(f"{SENDERS} concurrent senders, median: node {n / statistics.median(node_c):.0f} instances/s, "
              f"storescp --fork {n / statistics.median(scp_c):.0f} instances/s; node peak RSS {max(rss_c):.0f} MB")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Roles benchmark: the node spread over processes on a local PostgreSQL, against peers measured in the same run.

1. One association (dcmtk ``storescu``): the node on SQLite and the node on PostgreSQL against ``storescp``
   (target: each <= 8x storescp).
2. Eight concurrent senders into 1 and into 2 receiver processes sharing one port (``--reuse-port``), beside
   ``storescp --fork`` (target: 2 receivers >= 1.7x 1 receiver).
3. Measurement jobs per minute with 1 and 2 worker processes (bundled test model, CPU; target: >= 1.7x with 2
   on 2 cores): ``--series`` small series are received first, then the workers start, and the time until every
   job is done is measured. Each worker takes its share of the cores (one alone takes both, so a second one on
   the same 2 cores only fills what the first leaves idle), then every core each, then 1 thread each (the second
   worker brings a core of its own, as a second machine would).

    .venv/bin/python scripts/bench_roles.py [--slices 300] [--series 6] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import dcmtk_env, run_storescp, send_groups  # noqa: E402

from lpm_node.demo.orthanc import free_port  # noqa: E402
from lpm_node.demo.phantom import make_phantom, write_ct_series  # noqa: E402
from lpm_node.demo.postgres import PostgresServer, postgres_bin_dir  # noqa: E402

SENDERS = 8
NODE = [sys.executable, "-m", "lpm_node.cli"]


def _echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the port answers C-ECHO and ``proc`` itself says it is ready (on a shared port another receiver
    may have answered)."""
    deadline = time.monotonic() + timeout
    answered = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        answered = answered or subprocess.run(["echoscu", "-aec", aet, "127.0.0.1", str(port)], env=dcmtk_env(),
                                              capture_output=True).returncode == 0
        if answered and b"lpm-node ready" in proc.log_path.read_bytes():  # type: ignore[attr-defined]
            return
        time.sleep(0.2)
    raise TimeoutError(f"no C-ECHO answer on port {port}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _serve(data: Path, port: int, database_url: str, *extra: str) -> subprocess.Popen:
    data.mkdir(parents=True, exist_ok=True)
    cmd = [*NODE, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
           "--stable-seconds", "3600", *extra]
    if database_url:
        cmd += ["--database-url", database_url]
    log_path = data / f"node-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def node_receive(groups: list[list[Path]], work: Path, database_url: str, receivers: int) -> float:
    """Wall time of sending ``groups`` at once to ``receivers`` node processes sharing one port."""
    data = work / f"node-{time.monotonic_ns()}"
    port = free_port()
    extra = ["--no-measure"] + (["--role", "receiver", "--reuse-port"] if database_url else [])
    procs = [_serve(data, port, database_url, *extra) for _ in range(receivers)]
    try:
        for proc in procs:
            _echo(port, "LPM_NODE", proc)
        elapsed = send_groups(port, groups, "LPM_NODE")
        if any(proc.poll() is not None for proc in procs):  # a receiver that died would make this a run of fewer
            raise RuntimeError(f"a receiver exited during the run (logs in {data})")
        stored = len(list((data / "spool").rglob("*.dcm")))
        expected = sum(len(g) for g in groups)
        if stored != expected:
            raise RuntimeError(f"the node stored {stored} of {expected} instances")
    finally:
        _stop(procs)
    shutil.rmtree(data, ignore_errors=True)
    return elapsed


def jobs_per_minute(series: list[list[Path]], work: Path, database_url: str, workers: int,
                    threads: int = 0) -> tuple[float, float]:
    """Measurement jobs per minute with ``workers`` worker processes on jobs queued beforehand: (from the workers'
    start, model load included; from the first job's start to the last one's end). ``threads``: ``[model] threads``
    (0: each worker takes its share of the cores)."""
    import psycopg

    data = work / f"jobs-{time.monotonic_ns()}"
    config = work / "jobs.toml"
    config.write_text("[rules]\nmin_slices = 10\nmin_z_coverage_mm = 40\n[series]\nrelease_grace_seconds = 0\n"
                      f"[model]\nthreads = {threads}\n")
    port = free_port()
    receiver = _serve(data, port, database_url, "--role", "receiver", "--config", str(config))
    libpq = database_url.replace("postgresql+psycopg://", "postgresql://")
    procs = [receiver]
    try:
        _echo(port, "LPM_NODE", receiver)
        for files in series:
            send_groups(port, [files], "LPM_NODE")
        with psycopg.connect(libpq, autocommit=True) as db:
            deadline = time.monotonic() + 300
            while db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0] < len(series):
                if time.monotonic() > deadline:
                    raise TimeoutError("the series were not all queued")
                time.sleep(0.5)
            start = time.perf_counter()
            for _ in range(workers):
                procs.append(_serve(data, free_port(), database_url, "--role", "worker", "--demo-model",
                                    "--config", str(config)))
            deadline = time.monotonic() + 3600
            while db.execute("SELECT count(*) FROM jobs WHERE status IN ('done', 'failed')").fetchone()[0] \
                    < len(series):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("the workers did not finish")
                time.sleep(0.5)
            elapsed = time.perf_counter() - start
            failed = db.execute("SELECT count(*) FROM jobs WHERE status = 'failed'").fetchone()[0]
            if failed:
                raise RuntimeError(f"{failed} job(s) failed")
            busy = db.execute("SELECT EXTRACT(EPOCH FROM max(finished_at) - min(started_at)) FROM jobs").fetchone()[0]
    finally:
        _stop(procs)
    shutil.rmtree(data, ignore_errors=True)
    return len(series) / elapsed * 60, len(series) / float(busy) * 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the ingest series")
    parser.add_argument("--series", type=int, default=6, help="small series measured by the workers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-jobs", action="store_true", help="ingest parts only")
    parser.add_argument("--skip-ingest", action="store_true", help="measurement jobs only")
    args = parser.parse_args()
    bin_dir = postgres_bin_dir()
    if bin_dir is None or any(shutil.which(t) is None for t in ("storescu", "storescp", "echoscu")):
        print("bench_roles: needs PostgreSQL and dcmtk (bash scripts/dev.sh installs them)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lpm-bench-roles-"))
    postgres = PostgresServer(bin_dir).start()
    try:
        print(f"{os.cpu_count()} CPU(s), PostgreSQL {bin_dir.parent.name}; {_load()}")
        if not args.skip_ingest:
            ingest(args, work, postgres)
        if not args.skip_jobs:
            jobs(args, work, postgres)
    finally:
        postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _load() -> str:
    """The machine's load (other processes share the cores: the ratios are only as good as this is low)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def ingest(args: argparse.Namespace, work: Path, postgres: PostgresServer) -> None:
    """Parts 1 and 2: one association, then eight concurrent senders into 1 and 2 receivers."""
    files = sorted(write_ct_series(make_phantom(n_slices=args.slices), work / "series"))
    n = len(files)
    print(f"series: {n} instances of 512 x 512")

    one = {"sqlite": [], "postgresql": [], "storescp": []}
    for i in range(args.runs):
        one["sqlite"].append(node_receive([files], work, "", 1))
        one["postgresql"].append(node_receive([files], work, postgres.new_database(), 1))
        one["storescp"].append(run_storescp([files], work, len(files), fork=False))
        print(f"one association, run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in one.items()),
              flush=True)
    med = {k: statistics.median(v) for k, v in one.items()}
    print(f"one association, median: node on SQLite {med['sqlite']:.2f} s = {med['sqlite'] / med['storescp']:.1f}x"
          f" storescp, on PostgreSQL {med['postgresql']:.2f} s = {med['postgresql'] / med['storescp']:.1f}x "
          f"storescp ({med['storescp']:.2f} s); target <= 8x")

    groups = [files[i::SENDERS] for i in range(SENDERS)]
    rates: dict[str, list[float]] = {"1 receiver": [], "2 receivers": [], "storescp --fork": []}
    for i in range(args.runs):
        rates["1 receiver"].append(n / node_receive(groups, work, postgres.new_database(), 1))
        rates["2 receivers"].append(n / node_receive(groups, work, postgres.new_database(), 2))
        rates["storescp --fork"].append(n / run_storescp(groups, work, n, fork=True))
        print(f"{SENDERS} senders, run {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()),
              flush=True)
    rate = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{SENDERS} senders, median instances/s: 1 receiver {rate['1 receiver']:.0f}, 2 receivers "
          f"{rate['2 receivers']:.0f} ({rate['2 receivers'] / rate['1 receiver']:.2f}x; target >= 1.7x), "
          f"storescp --fork {rate['storescp --fork']:.0f}; {_load()}")


def jobs(args: argparse.Namespace, work: Path, postgres: PostgresServer) -> None:
    """Part 3: measurement jobs per minute with 1 and 2 workers, each sizing its threads to its share of the cores,
    and as a peer 2 workers that each use every core (``[model] threads`` = the cores)."""
    small = [sorted(write_ct_series(make_phantom(35.0, n_slices=48, size=128, pixel_spacing=2.8, seed=s),
                                    work / f"small{s}", study_uid=f"1.2.826.0.1.3680043.8.498.79{s:03d}"))
             for s in range(args.series)]
    cores = os.cpu_count() or 1
    # a worker sizes its threads to its share of the cores, so one worker alone already uses every core; with one
    # thread each, the second worker's share is a core the first leaves idle, which is what a second machine or GPU
    # adds (the job engine's own part of the scaling)
    runs = {"1 worker": (1, 0), "2 workers": (2, 0), "2 workers, every core each": (2, cores),
            "1 worker, 1 thread": (1, 1), "2 workers, 1 thread each": (2, 1)}
    rates = {name: jobs_per_minute(small, work, postgres.new_database(), w, t) for name, (w, t) in runs.items()}
    print(f"measurement jobs per minute ({args.series} series of 48 x 128 x 128, bundled model, CPU), from the "
          "workers' start / from the first job's start: " + ", ".join(
              f"{name} {total:.1f} / {steady:.1f}" for name, (total, steady) in rates.items()))
    pairs = [("2 workers", "1 worker"), ("2 workers, every core each", "1 worker"),
             ("2 workers, 1 thread each", "1 worker, 1 thread")]
    for name, base in pairs:
        print(f"{name} vs {base}: {rates[name][0] / rates[base][0]:.2f}x from the start, "
              f"{rates[name][1] / rates[base][1]:.2f}x from the first job (target >= 1.7x)")
    print(_load())


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""End-to-end benchmark: storescu -> lpm-node serve -> Orthanc, for a 300-slice phantom chest CT.

Prints the time from the last instance sent to the last result stored at Orthanc, split by stage (waiting for
the series to be quiet for ``stable_seconds``, rules and queue, load, resample, segment, measure, write,
delivery), with the bundled phantom model on the CPU; then the SEG writer timed against a plain highdicom SEG
of the same masks with default options (ratio printed):

    .venv/bin/python scripts/bench_end_to_end.py [--slices 300] [--stable-seconds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lpm_node.answer import build_seg  # noqa: E402
from lpm_node.answer.seg import SEGMENTS  # noqa: E402
from lpm_node.core.config import Settings  # noqa: E402
from lpm_node.demo.model import bundled_model_folder  # noqa: E402
from lpm_node.demo.orthanc import Orthanc, free_port  # noqa: E402
from lpm_node.demo.phantom import make_phantom, write_ct_series  # noqa: E402
from lpm_node.imaging.segmentation import load_segmenter  # noqa: E402
from lpm_node.node.pipeline import analyse_series, source_masks  # noqa: E402


def _ts(value: str | None) -> float:
    if not value:
        return float("nan")
    stamp = dt.datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def _wait_for_node(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}")
        probe = subprocess.run(["echoscu", "-to", "5", "-aec", "LPM_NODE", "127.0.0.1", str(port)],
                               capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the node did not answer C-ECHO")


def end_to_end(files: list[Path], work: Path, stable_seconds: float) -> None:
    """Run the node against Orthanc and print where the time goes."""
    orthanc = Orthanc(work / "orthanc", aet="BENCH_PACS")
    orthanc.start()
    port = free_port()
    data = work / "node"
    cmd = [sys.executable, "-m", "lpm_node.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data), "--stable-seconds", str(stable_seconds),
           "--destination", f"BENCH_PACS@127.0.0.1:{orthanc.dicom_port}"]
    log = open(work / "node.log", "wb")  # noqa: SIM115 - the child's log
    node = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_node(port, node)
        before = len(orthanc.instances())
        t_start = time.time()
        subprocess.run(["storescu", "-aec", "LPM_NODE", "127.0.0.1", str(port), *map(str, files)],
                       check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))
        t_sent = time.time()
        while len(orthanc.instances()) < before + 3:
            if node.poll() is not None:
                raise RuntimeError(f"node exited with {node.returncode}; see {work / 'node.log'}")
            time.sleep(0.05)
        t_stored = time.time()
        time.sleep(0.5)  # let the node commit its last audit rows
        con = sqlite3.connect(data / "audit.sqlite")
        con.row_factory = sqlite3.Row
        series = con.execute("SELECT * FROM series").fetchone()
        job = con.execute("SELECT * FROM jobs").fetchone()
        sent = con.execute("SELECT max(sent_at) AS last FROM deliveries").fetchone()["last"]
        complete = con.execute("SELECT min(at) AS at FROM series_decisions WHERE status != 'receiving'").fetchone()
        timings = json.loads(job["timings"])
        con.close()
    finally:
        node.terminate()
        node.wait(30)
        log.close()
        orthanc.stop()
    t_last = _ts(series["last_received_at"])
    t_complete = _ts(complete["at"]) if complete and complete["at"] else float("nan")
    t_job_start, t_job_end = _ts(job["started_at"]), _ts(job["finished_at"])
    rows = [
        ("series quiet for stable_seconds", t_complete - t_last),
        ("rules, selection, queue", t_job_start - t_complete),
        *[(f"  {k}", v) for k, v in timings.items()],
        ("job bookkeeping", (t_job_end - t_job_start) - sum(timings.values())),
        ("delivery to Orthanc", _ts(sent) - t_job_end),
    ]
    print(f"sent {len(files)} instances in {t_sent - t_start:.1f} s "
          f"({len(files) / (t_sent - t_start):.0f} instances/s)")
    print(f"last instance sent -> last result stored at Orthanc: {t_stored - t_sent:.1f} s "
          f"(stable_seconds = {stable_seconds:g}, job on {job['device']})")
    for name, seconds in rows:
        print(f"  {name:<34}{seconds:8.2f} s")


def seg_writer_ratio(files: list[Path], runs: int = 3) -> None:
    """Our SEG writer against highdicom's Segmentation with default options, same masks."""
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    result = analyse_series(files, settings, load_segmenter(settings.model))
    masks = source_masks(result)
    source = result.source
    specs = [s for s in SEGMENTS if s.key in masks]
    plain_pixels = np.stack([masks[s.key] for s in specs], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="bench", version="1", family=hd.sr.CodedConcept(
        "123110", "DCM", "Artificial Intelligence"))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=s.label, segmented_property_category=s.category,
            segmented_property_type=s.property_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, s in enumerate(specs, start=1)
    ]
    ordered = [source.datasets[i] for i, _ in source.frame_refs]

    def ours() -> float:
        t0 = time.perf_counter()
        build_seg(source.datasets, source.frame_refs, masks)
        return time.perf_counter() - t0

    def plain() -> float:
        t0 = time.perf_counter()
        hd.seg.Segmentation(
            source_images=ordered, pixel_array=plain_pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="bench", manufacturer_model_name="bench", software_versions="1", device_serial_number="1",
        )
        return time.perf_counter() - t0

    node_s = statistics.median(ours() for _ in range(runs))
    plain_s = statistics.median(plain() for _ in range(runs))
    print(f"SEG writer: {node_s:.2f} s; plain highdicom SEG, default options: {plain_s:.2f} s; "
          f"ratio {node_s / plain_s:.2f} (median of {runs})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    args = parser.parse_args()
    for tool in ("storescu", "echoscu", "Orthanc"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (bash scripts/dev.sh installs it)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="lpm-bench-e2e-"))
    try:
        phantom = make_phantom(35.0, n_slices=args.slices, seed=5)
        files = write_ct_series(phantom, work / "ct")
        end_to_end(files, work, args.stable_seconds)
        seg_writer_ratio(files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

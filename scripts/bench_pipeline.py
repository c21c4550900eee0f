#!/usr/bin/env python3
"""Benchmark of the measurement pipeline on a 300-slice 512 x 512 phantom series.

Prints per-stage wall times and peak memory (resident set, above the level after the model was loaded), and
times loading + resampling against dcm2niix converting the same series, alternating, several runs:

    .venv/bin/python scripts/bench_pipeline.py [--slices 300] [--runs 5]

Targets: load + resample within 2x of dcm2niix; peak memory under 4x the volume's in-memory size (float32 HU),
excluding the model.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpm_node.core.config import Settings  # noqa: E402
from lpm_node.demo.model import bundled_model_folder  # noqa: E402
from lpm_node.demo.phantom import make_phantom, write_ct_series  # noqa: E402
from lpm_node.imaging.loading import load_series  # noqa: E402
from lpm_node.imaging.measurement import measure  # noqa: E402
from lpm_node.imaging.resampling import resample_to_method_grid  # noqa: E402
from lpm_node.imaging.segmentation import load_segmenter  # noqa: E402
from lpm_node.node.pipeline import build_answer  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Give freed heap memory back to the system, then reset VmHWM to the current resident set (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")


def time_dcm2niix(folder: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "ct", str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def time_load_resample(files: list[Path]) -> float:
    t0 = time.perf_counter()
    image = resample_to_method_grid(load_series(files, keep_pixel_data=False).image)
    elapsed = time.perf_counter() - t0
    del image
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not shutil.which("dcm2niix"):
        print("dcm2niix is not installed (apt-get install dcm2niix)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lpm-bench-pipeline-"))
    try:
        phantom = make_phantom(35.0, n_slices=args.slices, seed=3)
        files = write_ct_series(phantom, work / "ct")
        volume_mb = phantom.hu.size * 4 / 2**20
        print(f"series: {len(files)} slices of 512 x 512, float32 HU volume {volume_mb:.0f} MB")

        # loading against dcm2niix, alternating (the first of each warms the page cache and is dropped)
        time_dcm2niix(work / "ct", work / "nii")
        time_load_resample(files)
        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(time_dcm2niix(work / "ct", work / "nii"))
            ours.append(time_load_resample(files))
        node_s, peer_s = statistics.median(ours), statistics.median(theirs)
        print(f"load + resample: median {node_s:.3f} s; dcm2niix: median {peer_s:.3f} s; "
              f"ratio {node_s / peer_s:.2f} (target <= 2.0)")

        # stages with peak memory above the model-loaded baseline
        settings = Settings()
        settings.model.folder = str(bundled_model_folder())
        segmenter = load_segmenter(settings.model)
        baseline = rss_mb()
        stages: dict[str, tuple[float, float]] = {}

        def stage(name: str, fn):  # noqa: ANN001, ANN202
            reset_peak()
            t0 = time.perf_counter()
            value = fn()
            stages[name] = (time.perf_counter() - t0, rss_mb("VmHWM") - baseline)
            return value

        source = stage("load", lambda: load_series(files, keep_pixel_data=False))
        image = stage("resample", lambda: resample_to_method_grid(source.image))
        masks = stage("segment", lambda: segmenter.segment(image))
        hu = sitk.GetArrayViewFromImage(image)
        spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
        m, roi = stage("measure", lambda: measure(hu, masks["liver"], spacing, spleen=masks.get("spleen")))
        from lpm_node.node.pipeline import SeriesResult

        result = SeriesResult(source=source, method_image=image, masks=masks, roi=roi, measurement=m,
                              device=segmenter.device, model=segmenter.description,
                              model_identity=segmenter.identity)
        stage("write", lambda: build_answer(result, settings))
        print(f"{'stage':<10}{'seconds':>10}{'peak MB above baseline':>26}{'x volume':>10}")
        for name, (seconds, peak) in stages.items():
            print(f"{name:<10}{seconds:>10.2f}{peak:>26.0f}{peak / volume_mb:>10.2f}")
        worst = max(p for _, p in stages.values())
        print(f"peak memory above the loaded model: {worst:.0f} MB = {worst / volume_mb:.2f}x the volume "
              f"(target < 4x); DL-parenchymal {m.dl_parenchymal_hu:.1f} HU (truth 35), device {segmenter.device}")
        liver_voxels = int(np.count_nonzero(masks["liver"]))
        print(f"total: {sum(s for s, _ in stages.values()):.1f} s; liver voxels {liver_voxels}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

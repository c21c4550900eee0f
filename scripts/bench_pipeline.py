#!/usr/bin/env python3
"""Benchmark of the measurement pipeline on phantom chest CT series of realistic geometry.

For each series shape (``--shape``: on-grid 300 x 512 x 512 at 0.7 x 0.7 x 2.5 mm; thin 600 x 512 x 512 at
0.78 x 0.78 x 1.25 mm; thick 72 x 512 x 512 at 0.68 x 0.68 x 5 mm; all by default) prints load + resample
against dcm2niix converting the same series (alternating, median of ``--runs``), then the per-stage wall time
and peak memory above the level after the model was loaded (resident set from /proc, VmHWM; and, in a second
pass, tracemalloc's peak of Python and NumPy allocations), and the targets with PASS or MISS:

    .venv/bin/python scripts/bench_pipeline.py [--shape all|on-grid|thin|thick] [--runs 3]

Targets, set on the 600-slice thin series, everything but the model: load + resample <= 2x dcm2niix;
measure <= 0.3 s; SEG + SR + key image + KOS (built and written) <= 1.5 s, the median of ``--write-runs`` runs on
the measured series (wall and CPU time; the writers are warmed when the model is loaded, as the worker does:
highdicom loads its tables of the standard once per process, printed apart); peak memory above the loaded model
<= 3x the source volume (float32 HU on the source grid). On a machine shared with other work, compare the CPU
figures too.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_series import (  # noqa: E402
    TARGET_SHAPE,
    BenchSeries,
    reset_peak,
    rss_mb,
    run_dcm2niix,
    shapes_arg,
    verdict,
    write_bench_series,
)

from lpm_node.answer.build import warm_writers, write_answer  # noqa: E402
from lpm_node.core.config import Settings  # noqa: E402
from lpm_node.demo.model import bundled_model_folder  # noqa: E402
from lpm_node.imaging.loading import load_series  # noqa: E402
from lpm_node.imaging.measurement import measure  # noqa: E402
from lpm_node.imaging.resampling import resample_to_method_grid  # noqa: E402
from lpm_node.imaging.result import SeriesResult  # noqa: E402
from lpm_node.imaging.segmentation import Segmenter, load_segmenter  # noqa: E402

LOAD_RATIO, MEASURE_S, WRITE_S, MEMORY_X = 2.0, 0.3, 1.5, 3.0


def time_load_resample(files: list[Path]) -> tuple[float, float, float]:
    """Seconds to load the series and to resample it to the method grid; CPU seconds of both (all threads)."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    source = load_series(files, keep_pixel_data=False)
    t1 = time.perf_counter()
    image = resample_to_method_grid(source.image)
    t2 = time.perf_counter()
    cpu = time.process_time() - c0
    del image, source
    return t1 - t0, t2 - t1, cpu


def versus_dcm2niix(series: BenchSeries, work: Path, runs: int) -> dict[str, float]:
    """Load + resample against dcm2niix, alternating; the first of each warms the page cache and is dropped."""
    run_dcm2niix(series.folder, work / "nii")
    time_load_resample(series.files)
    peer, peer_cpu, load, resample, total, cpu = [], [], [], [], [], []
    for _ in range(runs):
        wall, used = run_dcm2niix(series.folder, work / "nii")
        peer.append(wall)
        peer_cpu.append(used)
        lo, rs, c = time_load_resample(series.files)
        load.append(lo)
        resample.append(rs)
        total.append(lo + rs)
        cpu.append(c)
    shutil.rmtree(work / "nii", ignore_errors=True)
    return {"dcm2niix": statistics.median(peer), "load": statistics.median(load),
            "resample": statistics.median(resample), "load+resample": statistics.median(total),
            "dcm2niix_cpu": statistics.median(peer_cpu), "cpu": statistics.median(cpu)}


def run_stages(series: BenchSeries, settings: Settings, segmenter: Segmenter, out: Path,
               masks: dict[str, np.ndarray] | None = None) -> tuple[dict[str, tuple[float, float]], SeriesResult]:
    """Each stage once: seconds and peak memory above the level before the first stage (MB).

    With ``masks`` the segmentation is not run again (the tracemalloc pass) and the memory is tracemalloc's."""
    traced = tracemalloc.is_tracing()
    gc.collect()
    reset_peak()
    baseline = tracemalloc.get_traced_memory()[0] if traced else rss_mb()
    stages: dict[str, tuple[float, float]] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        if traced:
            tracemalloc.reset_peak()
        else:
            reset_peak()
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20 - baseline / 2**20 if traced else rss_mb("VmHWM") - baseline
        stages[name] = (seconds, peak)
        return value

    source = stage("load", lambda: load_series(series.files, keep_pixel_data=False))
    image = stage("resample", lambda: resample_to_method_grid(source.image))
    if masks is None:
        masks = stage("segment", lambda: segmenter.segment(image))
    hu = sitk.GetArrayViewFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    m, roi = stage("measure", lambda: measure(hu, masks["liver"], spacing, spleen=masks.get("spleen"),
                                              settings=settings.measurement))
    result = SeriesResult(source=source, method_image=image, masks=masks, roi=roi, measurement=m,
                          device=segmenter.device, model=segmenter.description, model_identity=segmenter.identity)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stage("write", lambda: write_answer(result, settings, out))
    return stages, result


def time_writers(result: SeriesResult, settings: Settings, out: Path, runs: int) -> dict[str, float]:
    """SEG + SR + key image + KOS built and written ``runs`` times: median, min and max wall seconds, median CPU."""
    wall, cpu = [], []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        write_answer(result, settings, out)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    shutil.rmtree(out, ignore_errors=True)
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall), "cpu": statistics.median(cpu)}


def bench_shape(series: BenchSeries, settings: Settings, segmenter: Segmenter, work: Path, runs: int,
                write_runs: int = 5) -> dict:
    """Print and return one shape's figures."""
    print(f"\n== {series.describe()}")
    peer = versus_dcm2niix(series, work, runs)
    ratio = peer["load+resample"] / peer["dcm2niix"]
    print(f"load + resample: median {peer['load+resample']:.3f} s (load {peer['load']:.3f} s, resample "
          f"{peer['resample']:.3f} s); dcm2niix: median {peer['dcm2niix']:.3f} s; ratio {ratio:.2f} "
          f"(median of {runs})")
    print(f"  CPU time (all threads): node {peer['cpu']:.3f} s, dcm2niix {peer['dcm2niix_cpu']:.3f} s; ratio "
          f"{peer['cpu'] / peer['dcm2niix_cpu']:.2f} (less sensitive to other load on a shared machine)")

    stages, result = run_stages(series, settings, segmenter, work / "answer")
    writers = time_writers(result, settings, work / "answer", write_runs)
    masks = result.masks
    m = result.measurement
    del result
    tracemalloc.start()
    try:
        traced, _ = run_stages(series, settings, segmenter, work / "answer", masks=masks)
    finally:
        tracemalloc.stop()
    volume = series.volume_mb
    print(f"{'stage':<10}{'seconds':>9}{'RSS peak MB':>13}{'x volume':>10}{'tracemalloc MB':>16}")
    for name, (seconds, peak) in stages.items():
        tm = f"{traced[name][1]:16.0f}" if name in traced else f"{'(model)':>16}"
        print(f"{name:<10}{seconds:>9.2f}{peak:>13.0f}{peak / volume:>10.2f}{tm}")
    worst = max(p for _, p in stages.values())
    worst_no_model = max(p for name, (_, p) in stages.items() if name != "segment")
    measure_s = stages["measure"][0]
    label = "targets" if series.name == TARGET_SHAPE else f"targets (set for {TARGET_SHAPE}; shown for comparison)"
    print(f"{label}:")
    print(f"  load + resample {ratio:.2f}x dcm2niix (<= {LOAD_RATIO:g}x)  {verdict(ratio <= LOAD_RATIO)}")
    print(f"  measure {measure_s:.2f} s (<= {MEASURE_S:g} s)  {verdict(measure_s <= MEASURE_S)}")
    write_s = writers["median"]
    print(f"  SEG + SR + key image + KOS, written: median {write_s:.2f} s of {write_runs} (min {writers['min']:.2f}, "
          f"max {writers['max']:.2f}; CPU {writers['cpu']:.2f} s) (<= {WRITE_S:g} s)  {verdict(write_s <= WRITE_S)}")
    print(f"  peak memory above the loaded model, all stages: {worst:.0f} MB = {worst / volume:.2f}x the "
          f"volume (<= {MEMORY_X:g}x)  {verdict(worst / volume <= MEMORY_X)}")
    print(f"  peak memory above the loaded model, all but segment: {worst_no_model:.0f} MB = "
          f"{worst_no_model / volume:.2f}x the volume (<= {MEMORY_X:g}x)  "
          f"{verdict(worst_no_model / volume <= MEMORY_X)}")
    print(f"  DL-parenchymal {m.dl_parenchymal_hu:.1f} HU (truth 35); liver voxels "
          f"{int(np.count_nonzero(masks['liver']))}; device {segmenter.device}")
    # load and resample in the summary: the medians compared with dcm2niix (the stage run is a single one)
    return {"shape": series.name, "ratio": ratio, **{k: v[0] for k, v in stages.items()}, **peer,
            "write": write_s, "write_cpu": writers["cpu"],
            "peak_x": worst / volume, "peak_x_no_model": worst_no_model / volume,
            "cpu_ratio": peer["cpu"] / peer["dcm2niix_cpu"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="all", help="on-grid, thin, thick (comma-separated) or all")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs against dcm2niix (median)")
    parser.add_argument("--slices", type=int, help="another slice count for every shape (quick checks)")
    parser.add_argument("--write-runs", type=int, default=5, help="runs of the writers on the measured series")
    args = parser.parse_args()
    try:
        shapes = shapes_arg(args.shape)
    except ValueError as exc:
        parser.error(str(exc))
    if not shutil.which("dcm2niix"):
        print("dcm2niix is not installed (apt-get install dcm2niix)", file=sys.stderr)
        return 2
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    segmenter = load_segmenter(settings.model)
    print(f"model loaded: {segmenter.description} on {segmenter.device}; resident set {rss_mb():.0f} MB")
    print(f"writers warmed with the model, as in the worker (highdicom's tables of the standard): "
          f"{warm_writers():.2f} s")
    rows = []
    for shape in shapes:
        work = Path(tempfile.mkdtemp(prefix=f"lpm-bench-pipeline-{shape}-"))
        try:
            series = write_bench_series(shape, work / "ct", n_slices=args.slices)
            gc.collect()
            rows.append(bench_shape(series, settings, segmenter, work, args.runs, args.write_runs))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'shape':<9}{'dcm2niix':>9}{'load':>7}{'resamp':>8}{'ratio':>7}{'cpu ratio':>10}{'segment':>9}"
          f"{'measure':>9}{'write':>7}{'w cpu':>7}{'peak x':>8}{'x w/o seg':>10}")
    for r in rows:
        print(f"{r['shape']:<9}{r['dcm2niix']:>9.2f}{r['load']:>7.2f}{r['resample']:>8.2f}{r['ratio']:>7.2f}"
              f"{r['cpu_ratio']:>10.2f}{r['segment']:>9.2f}{r['measure']:>9.2f}{r['write']:>7.2f}{r['write_cpu']:>7.2f}"
              f"{r['peak_x']:>8.2f}{r['peak_x_no_model']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared parts of the benchmarks: phantom series on named geometries, dcm2niix as the loading peer, memory.

Shapes (``lpm_node.demo.phantom.GEOMETRIES``): ``on-grid`` 300 x 512 x 512 at 0.7 x 0.7 x 2.5 mm (the method
grid: nothing to resample), ``thin`` 600 x 512 x 512 at 0.78 x 0.78 x 1.25 mm and ``thick`` 72 x 512 x 512 at
0.68 x 0.68 x 5 mm (real chest CT, resampled linearly to the method grid).
"""

from __future__ import annotations

import ctypes
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpm_node.demo.phantom import GEOMETRIES, SeriesGeometry, write_ct_series  # noqa: E402

SHAPES = tuple(GEOMETRIES)
TARGET_SHAPE = "thin"  # the targets are set on the 600-slice series


@dataclass
class BenchSeries:
    """A phantom series written as DICOM files for one geometry."""

    geometry: SeriesGeometry
    folder: Path
    files: list[Path]

    @property
    def name(self) -> str:
        return self.geometry.name

    @property
    def volume_mb(self) -> float:
        """In-memory size of the source volume as float32 HU (MB)."""
        g = self.geometry
        return g.n_slices * g.size * g.size * 4 / 2**20

    def describe(self) -> str:
        g = self.geometry
        return (f"{g.name}: {len(self.files)} slices of {g.size} x {g.size}, {g.pixel_spacing:g} x "
                f"{g.pixel_spacing:g} x {g.slice_spacing:g} mm ({g.description}); float32 HU volume "
                f"{self.volume_mb:.0f} MB")


def shapes_arg(value: str) -> list[str]:
    """``all`` or a comma-separated list of shape names."""
    names = list(SHAPES) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in GEOMETRIES]
    if unknown or not names:
        raise ValueError(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)} or all")
    return names


def write_bench_series(shape: str, folder: Path, *, liver_hu: float = 35.0, seed: int = 3,
                       n_slices: int | None = None) -> BenchSeries:
    """The phantom of ``shape`` (optionally with another slice count) written under ``folder``."""
    geometry = GEOMETRIES[shape]
    if n_slices is not None:
        from dataclasses import replace

        geometry = replace(geometry, n_slices=n_slices)
    phantom = geometry.make_phantom(liver_hu, seed=seed)
    files = write_ct_series(phantom, folder, series_description=geometry.series_description)
    del phantom
    return BenchSeries(geometry, folder, files)


def time_dcm2niix(folder: Path, out: Path) -> float:
    """Seconds dcm2niix takes to convert the series in ``folder`` to an uncompressed NIfTI."""
    return run_dcm2niix(folder, out)[0]


def run_dcm2niix(folder: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of dcm2niix converting ``folder`` to an uncompressed NIfTI."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(out), "-f", "ct", str(folder)],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, MB, from /proc."""
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"

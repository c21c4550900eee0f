"""Benchmark of the measure stage alone (three ROI disks, volumetric and robust estimates, QC) on a method-grid
volume the size of a 600-slice 0.78 mm / 1.25 mm chest CT resampled to 0.7 x 0.7 x 2.5 mm (300 x 570 x 570).

Usage: python scripts/bench_measure.py [--repeat 5] [--shape 300 570 570]; target <= 0.3 s (best of the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpm_node.imaging.measurement import measure  # noqa: E402

TARGET_S = 0.3


def synthetic_chest(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 HU (air, body, liver at 55 HU with noise), a uint8 liver mask (1.8 l) and a uint8 spleen mask."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]
    body = ((yy - ny / 2) / (0.36 * ny)) ** 2 + ((xx - nx / 2) / (0.45 * nx)) ** 2 <= 1.0
    hu = np.repeat(np.where(body, 30.0, -1000.0).astype(np.float32), nz, axis=0)
    hu += rng.normal(0.0, 10.0, shape).astype(np.float32)
    # a 1.8 l liver: 140 x 160 x 150 mm (z, y, x)
    liver = (((zz - 0.3 * nz) / 28.0) ** 2 + ((yy - 0.5 * ny) / 114.0) ** 2 + ((xx - 0.33 * nx) / 107.0) ** 2) <= 1.0
    spleen = (((zz - 0.3 * nz) / (0.08 * nz)) ** 2 + ((yy - 0.55 * ny) / (0.1 * ny)) ** 2
              + ((xx - 0.75 * nx) / (0.06 * nx)) ** 2) <= 1.0
    hu[liver] += 25.0
    return hu, liver.astype(np.uint8), spleen.astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 570, 570), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    hu, liver, spleen = synthetic_chest(tuple(args.shape))
    spacing = (2.5, 0.7, 0.7)
    times, cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        result, _ = measure(hu, liver, spacing, spleen=spleen)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    best = min(times)
    print(f"volume {' x '.join(map(str, args.shape))} (method grid), liver {result.liver_volume_ml:.0f} ml")
    print(f"measure: best {best:.3f} s, median {statistics.median(times):.3f} s over {args.repeat} runs "
          f"(target <= {TARGET_S} s): {'OK' if best <= TARGET_S else 'ABOVE TARGET'}; CPU time of the process "
          f"{min(cpu):.3f} s (a busy machine inflates wall time, less so CPU time)")
    print(f"DL-parenchymal {result.dl_parenchymal_hu:.2f} HU, robust {result.robust_parenchymal_hu:.2f} HU, "
          f"flags {result.qc_flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Inference time per series of an nnU-Net v2 liver model on a 120-slice phantom on the method grid.

Times the model load and ``Segmenter.segment`` (resampling to and from the model spacing included) on CPU and,
when torch sees a GPU, on CUDA, and prints the speed-up. Default model: the bundled phantom model.

  python scripts/bench_inference.py [--model FOLDER] [--repeats 3] [--threads 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lpm_node.core.config import ModelSettings  # noqa: E402
from lpm_node.demo.model import bundled_model_folder  # noqa: E402
from lpm_node.demo.phantom import make_phantom  # noqa: E402
from lpm_node.imaging.segmentation import NnUNetSegmenter, load_segmenter  # noqa: E402


def _image(n_slices: int, size: int):  # noqa: ANN202 - SimpleITK image
    import SimpleITK as sitk

    phantom = make_phantom(45.0, n_slices=n_slices, size=size, seed=4242)
    img = sitk.GetImageFromArray(phantom.hu.astype(np.float32))
    img.SetSpacing((phantom.spacing[2], phantom.spacing[1], phantom.spacing[0]))
    img.SetOrigin(phantom.origin)
    return img, phantom.masks["liver"]


def bench(device: str, args: argparse.Namespace, image, truth: np.ndarray) -> dict[str, float | str]:  # noqa: ANN001
    import torch

    t0 = time.perf_counter()
    seg = load_segmenter(ModelSettings(folder=args.model or str(bundled_model_folder()), device=device,
                                       threads=args.threads, resampling=args.resampling, mirroring=args.mirroring))
    load_s = time.perf_counter() - t0
    assert isinstance(seg, NnUNetSegmenter)
    seg.segment(image)  # warm-up (cudnn autotuning, caches)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    masks = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        masks = seg.segment(image)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    liver = masks["liver"] > 0
    dice = 2.0 * float(np.logical_and(liver, truth > 0).sum()) / max(1, int(liver.sum() + (truth > 0).sum()))
    return {
        "device": device,
        "model": seg.description,
        "threads": torch.get_num_threads() if device == "cpu" else 0,
        "load_s": round(load_s, 2),
        "segment_s_median": round(float(np.median(times)), 3),
        "segment_s_min": round(float(np.min(times)), 3),
        "liver_dice": round(dice, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="nnU-Net v2 model folder (default: bundled phantom model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--resampling", choices=["fast", "nnunet"], default="fast")
    p.add_argument("--mirroring", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    import torch

    image, truth = _image(args.slices, args.size)
    result: dict[str, object] = {
        "series": f"{args.slices} x {args.size} x {args.size} phantom, 0.7 x 0.7 x 2.5 mm",
        "cpu_cores": os.cpu_count(),
    }
    rows = [bench("cpu", args, image, truth)]
    if torch.cuda.is_available():
        rows.append(bench("cuda", args, image, truth))
        result["gpu"] = torch.cuda.get_device_name(0)
        result["speedup_gpu_vs_cpu"] = round(float(rows[0]["segment_s_median"]) / float(rows[1]["segment_s_median"]),
                                             2)
    result["runs"] = rows
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"series: {result['series']} ({result['cpu_cores']} CPU cores)")
        for r in rows:
            print(f"{r['device']:>4}: segment {r['segment_s_median']} s/series (min {r['segment_s_min']}), "
                  f"load {r['load_s']} s, threads {r['threads']}, liver Dice {r['liver_dice']}  [{r['model']}]")
        if "speedup_gpu_vs_cpu" in result:
            print(f"GPU ({result['gpu']}) speed-up over CPU: {result['speedup_gpu_vs_cpu']}x")
        else:
            print("no CUDA GPU: CPU only")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lpm-node phantom``: a synthetic chest CT series with its ground truth (tests and demos)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pydicom

from lpm_node.demo.phantom import make_phantom, save_masks_nifti, write_ct_series


def phantom_command(args: argparse.Namespace) -> int:
    """``lpm-node phantom OUT``: write a DICOM series under OUT/dicom and the ground truth under OUT/truth."""
    out = Path(args.out)
    kwargs: dict[str, Any] = {"seed": int(getattr(args, "seed", 0) or 0)}
    if getattr(args, "slices", 0):
        kwargs["n_slices"] = int(args.slices)
    ph = make_phantom(float(args.hu), **kwargs)
    overrides: dict[str, Any] = {}
    description = "CHEST WO CONTRAST 2.5mm"
    if getattr(args, "contrast", False):
        overrides = {"ContrastBolusAgent": "IOHEXOL", "ContrastBolusRoute": "IV", "ContrastBolusVolume": "80"}
        description = "CHEST W CONTRAST VENOUS 2.5mm"
    files = write_ct_series(ph, out / "dicom", feet_first=bool(getattr(args, "feet_first", False)),
                            overrides=overrides, series_description=description)
    truth = save_masks_nifti(ph, out / "truth")
    summary = {
        "dicom_dir": str(out / "dicom"),
        "files": len(files),
        "liver_hu": ph.liver_hu,
        "truth": {k: str(v) for k, v in truth.items()},
        "series_instance_uid": str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID),
    }
    (out / "truth" / "phantom.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0

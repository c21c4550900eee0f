"""The QC's calibration at a glance: every control and hazard of ``lpm_node/demo/qc_cases.py`` through the paths
that measure (the measurement itself, ``lpm-node measure`` on NIfTI, ``lpm-node process`` on DICOM with the bundled
test model), one row each: case, expected, value, category, flags.

A control must get its definite category; a hazard must be ``not_assessable``. Exit status 1 when any row fails.

    .venv/bin/python scripts/qc_controls.py                 # all three paths (process: a few minutes)
    .venv/bin/python scripts/qc_controls.py --paths api cli # without the model
    .venv/bin/python scripts/qc_controls.py --pictures docs # and the README's two pictures
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from lpm_node.cli.measure import measure_command
from lpm_node.cli.process import process_folder
from lpm_node.core.config import Settings, load_settings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.qc_cases import QcCase, all_cases, series_cases, write_dicom
from lpm_node.imaging.measurement import Category, measure
from lpm_node.imaging.segmentation import largest_component

SHORT = {"moderate_to_severe_steatosis": "steatosis", "no_moderate_to_severe_steatosis": "no steatosis",
         "not_assessable": "not assessable"}


def passed(group: str, expected: str, category: str) -> bool:
    return category == expected if group == "control" else category == Category.NOT_ASSESSABLE


def _row(path: str, name: str, group: str, expected: str, item: dict) -> tuple[bool, str]:
    value = item.get("dl_parenchymal_hu")
    category = item.get("category", item.get("status", "?"))
    ok = passed(group, expected, category)
    text = (f"{'ok  ' if ok else 'FAIL'} {path:7s} {group:7s} {name:72s} {SHORT.get(expected, expected):15s} "
            f"{'n/a' if value is None else f'{value:6.1f}':>6s} {SHORT.get(category, category):15s} "
            f"{', '.join(item.get('qc_flags', [])) or '-'}")
    return ok, text


def via_api(case: QcCase, settings: Settings) -> dict:
    """The measurement itself, on the arrays as the header presents them, after the largest-component step."""
    hu, label = case.claimed()
    liver = largest_component(label > 0).view(bool)
    result, _ = measure(hu, liver, (2.5, 0.7, 0.7), settings=settings.measurement)
    return result.to_dict()


def via_cli(case: QcCase, settings: Settings, folder: Path) -> dict:
    """``lpm-node measure --json`` (in this process) on the stored NIfTI files and their header."""
    ct, liver = case.write_nifti(folder)
    args = argparse.Namespace(ct=str(ct), liver_mask=str(liver), spleen_mask=None, roi_out=None, json=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        measure_command(settings, args)
    return json.loads(out.getvalue())


def via_process(settings: Settings, folder: Path) -> list[tuple[str, str, str, dict]]:
    """Every DICOM case in one folder through ``process`` (the bundled test model segments them). A lesion case is
    first processed without its lesion, to place the lesion on the disk the node chooses."""
    cases = series_cases()
    centres: dict[int, list[list[int]]] = {}
    for number, case in enumerate(cases):
        if case.lesion:
            write_dicom(case, folder / "first" / f"case{number:02d}")
            centres[number] = next(iter(process_folder(folder / "first" / f"case{number:02d}", settings)))[
                "roi_centres"]
    names: dict[str, tuple[str, str, str]] = {}
    for number, case in enumerate(cases):
        uid = str(generate_uid())
        write_dicom(case, folder / "batch" / f"case{number:02d}", series_uid=uid, roi_centres=centres.get(number))
        names[uid] = (case.name, case.group, case.expected)
    rows = []
    for item in process_folder(folder / "batch", settings):
        name, group, expected = names[item["series_instance_uid"]]
        rows.append((name, group, expected, item))
    order = list(names.values())
    return sorted(rows, key=lambda r: order.index(r[:3]))


PICTURES = {
    "qc-withheld-mirrored.png": "phantom seed 1, 30 HU, mirrored",
    "qc-measured-tight-fov.png": "phantom seed 1, 38 HU, wall cut 15 mm beyond the liver",
}


def picture(case: QcCase, settings: Settings, path: Path) -> None:
    """The key image of the case's middle ROI slice, with the body's midline (dashed, yellow) and, on each ROI
    row, the tissue between the liver's edge and the edge of the field of view (cyan)."""
    from PIL import Image, ImageDraw, ImageFont

    from lpm_node.answer.keyimage import render_key_image
    from lpm_node.imaging.anatomy import body_midline_x

    hu, label = case.claimed()
    liver = largest_component(label > 0).view(bool)
    result, roi = measure(hu, liver, (2.5, 0.7, 0.7), settings=settings.measurement)
    z = result.roi_slices[len(result.roi_slices) // 2]
    image = Image.fromarray(render_key_image(hu[z], roi[z], liver[z], result))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    present = [int(k) for k in np.flatnonzero(liver.any(axis=(1, 2)))]
    midline = body_midline_x(hu, present[:: max(1, len(present) // 24)], liver)
    if midline is not None:
        for y0 in range(0, hu.shape[1], 12):
            draw.line([(midline, y0), (midline, y0 + 6)], fill=(255, 220, 0), width=2)
        draw.text((midline + 5, hu.shape[1] * 0.78), "body midline", fill=(255, 220, 0), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    for (zc, y, x), tissue in zip(result.roi_centres, result.lateral_tissue_mm, strict=True):
        if zc == z and tissue is not None:
            edge = x - 30
            draw.line([(0, y), (edge, y)], fill=(0, 230, 255), width=3)
            draw.text((4, y + 16), f"{tissue:.0f} mm of tissue beyond the liver's edge,", fill=(0, 230, 255),
                      font=font, stroke_width=2, stroke_fill=(0, 0, 0))
            draw.text((4, y + 34), "then the edge of the field of view", fill=(0, 230, 255), font=font,
                      stroke_width=2, stroke_fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=("api", "cli", "process"), default=["api", "cli", "process"])
    parser.add_argument("--no-reference", action="store_true", help="leave out the published masks")
    parser.add_argument("--pictures", type=Path, help="write the README's pictures of a withheld and a measured "
                        "tight-field-of-view case into this folder, then stop")
    args = parser.parse_args()
    settings = load_settings(None, {"model": {"folder": str(bundled_model_folder())}})
    if args.pictures:
        wanted = {name: file for file, name in PICTURES.items()}
        for case in all_cases(with_reference=False):
            if case.name in wanted:
                picture(case, settings, args.pictures / wanted[case.name])
                print(args.pictures / wanted[case.name])
        return 0
    failures = total = 0
    started = time.perf_counter()
    print(f"{'':4s} {'path':7s} {'group':7s} {'case':72s} {'expected':15s} {'value':>6s} {'category':15s} flags")
    with tempfile.TemporaryDirectory(prefix="qc-controls-") as tmp:
        if "api" in args.paths or "cli" in args.paths:
            for number, case in enumerate(all_cases(with_reference=not args.no_reference)):
                for path in ("api", "cli"):
                    if path not in args.paths:
                        continue
                    item = via_api(case, settings) if path == "api" else via_cli(
                        case, settings, Path(tmp) / f"nifti{number:03d}")
                    ok, text = _row(path, case.name, case.group, case.expected, item)
                    failures += not ok
                    total += 1
                    print(text, flush=True)
        if "process" in args.paths:
            for name, group, expected, item in via_process(settings, Path(tmp) / "dicom"):
                ok, text = _row("process", name, group, expected, item)
                failures += not ok
                total += 1
                print(text, flush=True)
    print(f"\n{total - failures} of {total} rows as expected ({failures} failed) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``lpm-node process``: every CT series in a folder, with a progress bar."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lpm_node.core.config import Settings
from lpm_node.imaging.loading import SeriesLoadError, find_series
from lpm_node.imaging.measurement import Category, flag_sentence
from lpm_node.imaging.segmentation import Segmenter, load_segmenter
from lpm_node.intake.headers import read_series_facts
from lpm_node.intake.rules import eligibility
from lpm_node.node.pipeline import analyse_series, preview_png, save_nifti, write_answer

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------ the CLI


def _safe_name(uid: str) -> str:
    return "".join(c for c in uid if c.isdigit() or c == ".")[:64] or "series"


def _describe(item: dict[str, Any]) -> str:
    uid = item["series_instance_uid"]
    if item["status"] != "measured":
        return f"{uid}: {item['status']}: {item['reason']}"
    hu = item["dl_parenchymal_hu"]
    value = "n/a" if hu is None else f"{hu:.1f} HU"
    flags = ", ".join(item["qc_flags"]) or "none"
    line = (f"{uid}: DL-parenchymal {value}, category {item['category']}, "
            f"liver {item['liver_volume_ml']:.0f} ml, QC flags: {flags}")
    if item["category"] == Category.NOT_ASSESSABLE:
        line += "; not assessable: " + " ".join(flag_sentence(f) for f in item["not_assessable_reasons"])
    return line


def summary_line(items: list[dict[str, Any]]) -> str:
    """One line: how many series were measured (and of those not assessable), refused and failed."""
    status = Counter(item["status"] for item in items)
    not_assessable = sum(1 for i in items if i["status"] == "measured" and i["category"] == Category.NOT_ASSESSABLE)
    return (f"{len(items)} series: {status['measured']} measured ({not_assessable} not assessable), "
            f"{status['rejected']} refused, {status['failed']} failed")


def process_folder(
    folder: str | Path, settings: Settings, *, out: str | Path | None = None, dicom_out: bool = False,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Measure every eligible CT series under ``folder``; yield one JSON-ready dict per series found.

    Refused series come with ``status`` "rejected" and their reason; series the loader cannot use with
    "failed". The model is loaded once, at the first eligible series.
    """
    from tqdm import tqdm

    series = find_series(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM series under {folder}")
    segmenter: Segmenter | None = None
    bar = tqdm(total=len(series), unit="series", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for uid, paths in sorted(series.items()):
            bar.set_postfix_str(f"{uid[-12:]} rules")
            try:
                ok, reason = eligibility(read_series_facts(paths), settings.rules)
            except Exception as exc:  # noqa: BLE001 - one unreadable series never stops the batch
                yield _failed(uid, exc)
                bar.update()
                continue
            if not ok:
                yield {"series_instance_uid": uid, "status": "rejected", "reason": reason}
                bar.update()
                continue
            if segmenter is None:
                bar.set_postfix_str("loading model")
                segmenter = load_segmenter(settings.model)
            bar.set_postfix_str(f"{uid[-12:]} measuring")
            try:
                result = analyse_series(paths, settings, segmenter)
                item = result.summary()
                if out is not None:
                    target = Path(out) / _safe_name(uid)
                    item["files"] = {k: str(v) for k, v in save_nifti(result, target).items()}
                    item["files"]["preview"] = str(preview_png(result, target / "preview.png"))
                    if dicom_out:
                        for obj in write_answer(result, settings, target / "dicom"):
                            item["files"][obj.kind] = str(obj.path)
                        item["timings_s"] = {k: round(v, 3) for k, v in result.timings.items()}
            except SeriesLoadError as exc:
                item = {"series_instance_uid": uid, "status": "failed", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one series that breaks a step never stops the batch
                log.exception("series %s failed", uid)
                item = _failed(uid, exc)
            yield item
            bar.update()
    finally:
        bar.close()


def _failed(uid: str, exc: Exception) -> dict[str, Any]:
    return {"series_instance_uid": uid, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


def process_command(settings: Settings, args: argparse.Namespace) -> int:
    """``lpm-node process DIR [--model F] [--out D] [--dicom-out] [--json]``; exit 1 when a series failed."""
    if args.dicom_out and not args.out:
        raise ValueError("--dicom-out needs --out")
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    done: list[dict[str, Any]] = []
    progress = sys.stderr.isatty()
    items = process_folder(args.input, settings, out=args.out, dicom_out=args.dicom_out, progress=progress)
    with logging_redirect_tqdm():  # log lines and results above the progress bar, not through it
        for item in items:
            done.append(item)
            line = json.dumps(item) if args.json else _describe(item)
            if progress:
                tqdm.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
    print(summary_line(done), file=sys.stderr, flush=True)
    return 1 if any(item["status"] == "failed" for item in done) else 0

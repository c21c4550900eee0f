"""``lpm-node model verify``: is a folder a loadable nnU-Net v2 model or v1 result folder, with which labels."""

from __future__ import annotations

import argparse
import json

from lpm_node.imaging.segmentation import ModelInfo, SegmentationError, verify_model_folder


def verify_command(args: argparse.Namespace) -> int:
    """``lpm-node model verify FOLDER [--profile P] [--json]``: 0 when loadable, 1 with the problem otherwise."""
    try:
        info = verify_model_folder(args.folder, getattr(args, "profile", None) or None)
    except SegmentationError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "folder": str(args.folder), "error": str(exc)}))
        else:
            print(f"model verify: FAILED: {exc}")
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, **info.as_dict()}, indent=2))
    else:
        print(format_model_info(info))
    return 0


def _by_value(item: tuple[str, int]) -> int:
    return item[1]


def format_model_info(info: ModelInfo) -> str:
    """What ``model verify`` prints: folder, nnU-Net version and task, configuration, folds, spacing, patch,
    channels, labels, warnings."""
    lines = [
        f"model folder:   {info.folder}",
        f"nnU-Net:        {info.nnunet_version}" + (f", task {info.task}" if info.task else ""),
        f"configuration:  {info.configuration} (trainer {info.trainer_name}, plans {info.plans_name})",
        f"folds:          {', '.join(info.folds)} ({info.checkpoint}, {info.checkpoint_mb} MB)",
        "expected spacing (z, y, x): " + " x ".join(f"{s:g}" for s in info.spacing_zyx_mm) + " mm",
        "patch size (z, y, x): " + " x ".join(str(s) for s in info.patch_size),
        f"input channels: {', '.join(info.channel_names)}",
        "model labels:   " + ", ".join(f"{k} = {v}" for k, v in sorted(info.model_labels.items(), key=_by_value)),
        f"profile:        {info.profile}",
        "labels used:    " + ", ".join(f"{k} = {v}" for k, v in info.labels.items()),
    ]
    if info.parameters:
        lines.append(f"parameters:     {info.parameters:,}")
    lines += [f"warning: {w}" for w in info.warnings]
    lines.append(f"OK: loadable nnU-Net {info.nnunet_version} model")
    return "\n".join(lines)

"""``lpm-node model verify``: is a folder a loadable nnU-Net v2 model or v1 result folder, with which labels."""

from __future__ import annotations

import argparse
import json

from lpm_node.imaging.segmentation import SegmentationError, _format_info, verify_model_folder


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
        print(_format_info(info))
    return 0

"""Where the published method's reference files are: ``<repo>/../shared`` (or the folder named by the
``LPM_NODE_SHARED`` environment variable). A test that needs them fails (never skips) when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = tuple(
    Path(p) for p in (os.environ.get("LPM_NODE_SHARED", ""), REPO.parent / "shared") if str(p)
)
REFERENCE_SUBDIR = Path("reference") / "dl-parenchymal"
LABEL_NAME = "LIDC-IDRI_0002_3d_liver_seg.nii.gz"
PUBLISHED_ROI_NAME = "LIDC-IDRI_0002_AI_ROI_seg.nii.gz"
NNUNET_MASK_NAME = "LIDC-IDRI_0002_img_nnunet_to_seg_top1mask.nii.gz"
REFERENCE_FILES = (LABEL_NAME, PUBLISHED_ROI_NAME, NNUNET_MASK_NAME)


def reference_dir() -> Path:
    """The folder holding every reference file; pytest.fail when there is none."""
    for shared in SHARED_CANDIDATES:
        folder = shared / REFERENCE_SUBDIR
        if all((folder / name).is_file() for name in REFERENCE_FILES):
            return folder
    pytest.fail(f"reference files of the published method {list(REFERENCE_FILES)} not found in any of "
                f"{[str(s / REFERENCE_SUBDIR) for s in SHARED_CANDIDATES]}")

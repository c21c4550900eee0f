"""scripts/train_liver_model.py end to end on tiny phantom datasets (CPU, a few iterations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lpm_node.core.config import ModelSettings
from lpm_node.demo.phantom import make_phantom
from lpm_node.imaging.segmentation import load_segmenter, verify_model_folder
from tests.support_segmentation import phantom_image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_liver_model.py"
TINY = ["--features", "small", "--target-spacing", "10", "5.6", "5.6", "--patch-size", "16", "32", "32",
        "--epochs", "2", "--iterations-per-epoch", "3", "--val-iterations", "1", "--device", "cpu",
        "--processes", "1"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "nnUNet_n_proc_DA": "1", "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_model(out: Path, labels: dict[str, int]) -> None:
    info = verify_model_folder(out)
    assert info.labels == labels
    assert info.spacing_zyx_mm == [10.0, 5.6, 5.6]
    assert info.trainer_name == "nnUNetTrainer"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    assert (out / "fold_0" / "checkpoint_final.pth").stat().st_size < 10e6
    segmenter = load_segmenter(ModelSettings(folder=str(out), device="cpu"))
    phantom = make_phantom(40.0, n_slices=30, size=64, pixel_spacing=5.6, slice_spacing=10.0, seed=99)
    masks = segmenter.segment(phantom_image(phantom))
    assert masks["liver"].shape == phantom.hu.shape and masks["liver"].dtype == np.uint8


def test_train_on_phantoms(tmp_path: Path) -> None:
    out = tmp_path / "model"
    summary = tmp_path / "summary.json"
    _run("--phantoms", "5", "--method-grid-every", "0", "--phantom-grid", "5.6", "10", "--out", str(out),
         "--summary", str(summary), *TINY, cwd=tmp_path)
    _check_model(out, {"liver": 1, "spleen": 2})
    figures = json.loads(summary.read_text())
    assert figures["cases"] == 5
    assert len(figures["train_loss"]) == 2 and len(figures["pseudo_dice"]) == 2
    assert figures["device"] == "cpu"
    assert not list((tmp_path / "tmp").glob("lpm-train-*"))  # the temporary nnU-Net folders are gone


def test_train_on_published_dataset_layout(tmp_path: Path) -> None:
    """CT + liver mask pairs named like the published method's curated dataset (<case>_3d_liver_seg.nii.gz)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        phantom = make_phantom(20.0 + 10 * i, n_slices=30, size=64, pixel_spacing=5.6, slice_spacing=10.0, seed=i)
        ct = phantom_image(phantom)
        mask = sitk.GetImageFromArray((phantom.masks["liver"] * 255).astype(np.uint8))  # 0/255 masks are fine
        mask.CopyInformation(ct)
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(data / f"LIDC-IDRI_{i:04d}.nii.gz"))
        sitk.WriteImage(mask, str(data / f"LIDC-IDRI_{i:04d}_3d_liver_seg.nii.gz"))
    out = tmp_path / "model"
    work = tmp_path / "work"
    proc = _run("--data", str(data), "--out", str(out), "--work", str(work), *TINY, cwd=tmp_path)
    assert "5 cases from" in proc.stdout
    _check_model(out, {"liver": 1})
    raw = json.loads((work / "raw" / "Dataset501_LpmLiver" / "dataset.json").read_text())
    assert raw["channel_names"] == {"0": "CT"} and raw["labels"] == {"background": 0, "liver": 1}
    assert len(list((work / "raw" / "Dataset501_LpmLiver" / "imagesTr").glob("*_0000.nii.gz"))) == 5

"""`lpm-node model verify`, label profiles, and a model folder laid out like a downloaded third-party model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lpm_node.cli import main
from lpm_node.core.config import ModelSettings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.imaging.segmentation import (
    SegmentationError,
    infer_profile,
    load_profile,
    load_segmenter,
    verify_model_folder,
)
from tests.support_segmentation import dice, method_grid_phantom, third_party_copy

THIRD_PARTY_NUMBERS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(bundled_model_folder(), dest)
    return dest


def _verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["model", "verify", *argv])
    return rc, capsys.readouterr().out


def test_cli_verify_bundled_model() -> None:
    """The installed console entry, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "lpm_node.cli", "model", "verify", str(bundled_model_folder())],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "configuration:  3d_fullres" in out
    assert "liver = 1" in out
    assert "expected spacing (z, y, x):" in out
    assert "profile:        lpm" in out
    assert "OK: loadable nnU-Net v2 model" in out


def test_verify_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _verify(capsys, str(bundled_model_folder()), "--json")
    assert rc == 0
    info = json.loads(out)
    plans = json.loads((bundled_model_folder() / "plans.json").read_text())
    assert info["ok"] is True
    assert info["labels"]["liver"] == 1
    assert info["configuration"] == "3d_fullres"
    assert info["spacing_zyx_mm"] == plans["configurations"]["3d_fullres"]["spacing"]
    assert info["folds"] == ["0"]
    assert info["parameters"] > 0


def test_checkpoint_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tmp_path)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    rc, out = _verify(capsys, str(model))
    assert rc == 1
    assert "FAILED" in out and "checkpoint_final.pth" in out
    with pytest.raises(SegmentationError, match="no checkpoint file checkpoint_final.pth"):
        verify_model_folder(model, folds=["0"])


def test_dataset_json_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tmp_path)
    (model / "dataset.json").unlink()
    rc, out = _verify(capsys, str(model))
    assert rc == 1 and "dataset.json not found" in out


def test_dataset_json_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tmp_path)
    dataset = json.loads((model / "dataset.json").read_text())
    del dataset["labels"]
    (model / "dataset.json").write_text(json.dumps(dataset))
    rc, out = _verify(capsys, str(model), "--json")
    assert rc == 1
    result = json.loads(out)
    assert result["ok"] is False and 'no "labels"' in result["error"]


def test_dataset_json_not_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(tmp_path)
    (model / "dataset.json").write_text("{labels: liver")
    rc, out = _verify(capsys, str(model))
    assert rc == 1 and "dataset.json is not valid JSON" in out


def test_plans_missing_and_fold_missing(tmp_path: Path) -> None:
    model = _copy(tmp_path)
    with pytest.raises(SegmentationError, match="no fold_3"):
        verify_model_folder(model, folds=["3"])
    (model / "plans.json").unlink()
    with pytest.raises(SegmentationError, match="plans.json not found"):
        verify_model_folder(model)


def test_weights_that_do_not_fit_the_plans(tmp_path: Path) -> None:
    model = _copy(tmp_path)
    plans = json.loads((model / "plans.json").read_text())
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [f * 2 for f in kwargs["features_per_stage"]]
    (model / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SegmentationError, match="do not fit the network"):
        verify_model_folder(model)


def test_wrong_profile_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "liver3.toml"
    profile.write_text('name = "liver3"\n[structures.liver]\nlabel = 3\nnames = ["liver"]\nrequired = true\n')
    rc, out = _verify(capsys, str(bundled_model_folder()), "--profile", str(profile))
    assert rc == 1
    assert "expects liver = 3" in out and "liver = 1" in out
    rc, out = _verify(capsys, str(bundled_model_folder()), "--profile", "no-such-profile")
    assert rc == 1 and "unknown label profile" in out


def test_profile_without_required_structure() -> None:
    with pytest.raises(SegmentationError, match="needs a 'liver' label"):
        load_profile("totalsegmentator").resolve({"background": 0, "kidney": 1})


def test_third_party_layout_lookup_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = third_party_copy(tmp_path / "Dataset291_TotalSegmentator_part1_organs", THIRD_PARTY_NUMBERS)
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    assert infer_profile(labels) == "totalsegmentator"

    rc, out = _verify(capsys, str(model), "--profile", "totalsegmentator", "--json")
    assert rc == 0, out
    info = json.loads(out)
    assert info["labels"] == {"liver": 5, "spleen": 1}
    assert info["profile"] == "totalsegmentator"

    # the profile of our own models refuses it, naming the numbers
    rc, out = _verify(capsys, str(model), "--profile", "lpm")
    assert rc == 1 and "expects liver = 1" in out and "liver = 5" in out

    # and the numbers found by name are the right ones: the copy segments like the bundled model
    segmenter = load_segmenter(ModelSettings(folder=str(model), profile="totalsegmentator", device="cpu"))
    assert segmenter.labels == {"liver": 5, "spleen": 1}
    phantom, image = method_grid_phantom(45.0, 7201)
    masks = segmenter.segment(image)
    assert set(masks) == {"liver", "spleen"}
    assert dice(masks["liver"], phantom.masks["liver"]) > 0.9
    assert dice(masks["spleen"], phantom.masks["spleen"]) > 0.6


def test_profiles_shipped() -> None:
    lpm = load_profile("lpm")
    assert lpm.structures["liver"].label == 1 and lpm.structures["spleen"].label == 2
    ts = load_profile("totalsegmentator")
    assert all(rule.label is None for rule in ts.structures.values())  # by name only, no numbers
    assert infer_profile({"background": 0, "liver": 1}) == "lpm"
    assert infer_profile({"background": 0, "liver": 1, "spleen": 2}) == "lpm"
    assert infer_profile({"background": 0, "spleen": 1, "liver": 2}) == "totalsegmentator"


def test_trainer_not_in_nnunetv2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    model = _copy(tmp_path)
    ckpt_path = model / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["trainer_name"] = "MyPrivateTrainer"
    torch.save(ckpt, ckpt_path)
    rc, out = _verify(capsys, str(model))
    assert rc == 1 and "trainer class 'MyPrivateTrainer'" in out

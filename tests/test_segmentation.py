"""The nnU-Net v2 segmentation backend with the bundled phantom model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lpm_node.core.config import ModelSettings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.phantom import make_phantom
from lpm_node.imaging.segmentation import (
    NnUNetSegmenter,
    SegmentationError,
    largest_component,
    load_segmenter,
    model_identity,
    verify_model_folder,
)
from tests.support_segmentation import dice, method_grid_phantom, phantom_image


@pytest.fixture(scope="module")
def segmenter() -> NnUNetSegmenter:
    seg = load_segmenter(ModelSettings(folder=str(bundled_model_folder()), device="cpu"))
    assert isinstance(seg, NnUNetSegmenter)
    return seg


def test_bundled_model_is_small_and_complete() -> None:
    folder = bundled_model_folder()
    for name in ("dataset.json", "plans.json", "fold_0/checkpoint_final.pth"):
        assert (folder / name).is_file(), name
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 10e6
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "optimizer_state" not in ckpt
    assert ckpt["trainer_name"] == "nnUNetTrainer"


@pytest.mark.parametrize(("liver_hu", "seed"), [(-10.0, 7101), (60.0, 7102)])
def test_held_out_phantom_liver_dice(segmenter: NnUNetSegmenter, liver_hu: float, seed: int) -> None:
    phantom, image = method_grid_phantom(liver_hu, seed)
    masks = segmenter.segment(image)
    liver = masks["liver"]
    assert liver.dtype == np.uint8 and liver.shape == phantom.hu.shape
    assert set(np.unique(liver)) <= {0, 1}
    assert dice(liver, phantom.masks["liver"]) > 0.9
    # one connected liver
    assert np.array_equal(largest_component(liver), liver)
    if "spleen" in segmenter.labels:
        assert masks["spleen"].shape == phantom.hu.shape
        assert dice(masks["spleen"], phantom.masks["spleen"]) > 0.6


def test_cut_liver_with_lesion(segmenter: NnUNetSegmenter) -> None:
    phantom, image = method_grid_phantom(30.0, 7103, liver_cut=True, lesion=True)
    assert dice(segmenter.segment(image)["liver"], phantom.masks["liver"]) > 0.85


def test_loaded_once_and_reused(segmenter: NnUNetSegmenter) -> None:
    again = load_segmenter(ModelSettings(folder=str(bundled_model_folder()), device="cpu"))
    assert again is segmenter
    predictor, network = segmenter.predictor, segmenter.predictor.network
    phantom = make_phantom(40.0, n_slices=40, size=128, pixel_spacing=2.8, slice_spacing=5.0, seed=7104)
    image = phantom_image(phantom)
    calls = segmenter.calls
    first = segmenter.segment(image)
    second = segmenter.segment(image)
    assert segmenter.calls == calls + 2
    assert segmenter.predictor is predictor and segmenter.predictor.network is network  # no reload
    assert np.array_equal(first["liver"], second["liver"])
    assert segmenter.description.startswith("nnU-Net v2 3d_fullres fold 0 (phantom_liver)")
    assert segmenter.device == "cpu"
    assert segmenter.labels["liver"] == 1


def test_nnunet_resampling_path_agrees(segmenter: NnUNetSegmenter) -> None:
    """The fast SimpleITK resampling path gives the same liver as nnU-Net's own resampling."""
    slow = load_segmenter(ModelSettings(folder=str(bundled_model_folder()), device="cpu", resampling="nnunet"))
    assert slow is not segmenter and slow.resampling == "nnunet"
    phantom = make_phantom(20.0, n_slices=60, size=256, pixel_spacing=1.4, slice_spacing=5.0, seed=7105)
    image = phantom_image(phantom)
    fast_liver = segmenter.segment(image)["liver"]
    slow_liver = slow.segment(image)["liver"]
    assert dice(fast_liver, slow_liver) > 0.95
    assert dice(slow_liver, phantom.masks["liver"]) > 0.9


def test_largest_component() -> None:
    mask = np.zeros((10, 20, 20), dtype=np.uint8)
    mask[2:6, 2:10, 2:10] = 1  # 256 voxels
    mask[7:9, 14:17, 14:17] = 1  # 18 voxels
    mask[0, 19, 19] = 255
    out = largest_component(mask)
    assert out.dtype == np.uint8
    assert int(out.sum()) == 256
    assert out[3, 5, 5] == 1 and out[8, 15, 15] == 0 and out[0, 19, 19] == 0
    # diagonal neighbours belong to the same component (26-connectivity)
    diag = np.zeros((3, 3, 3), dtype=bool)
    diag[0, 0, 0] = diag[1, 1, 1] = diag[2, 2, 2] = True
    assert int(largest_component(diag).sum()) == 3
    assert not largest_component(np.zeros((4, 4, 4))).any()


def test_cuda_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SegmentationError, match="cuda"):
        load_segmenter(ModelSettings(folder=str(bundled_model_folder()), device="cuda"))


def test_no_model_folder_is_refused_with_how_to_set_one() -> None:
    with pytest.raises(SegmentationError, match=r"\[model\] folder.*--model FOLDER.*--demo-model"):
        load_segmenter(ModelSettings(device="cpu"))


def test_bundled_model_names_itself_a_test_model(segmenter: NnUNetSegmenter, tmp_path) -> None:
    identity = segmenter.identity
    checkpoint = bundled_model_folder() / "fold_0" / "checkpoint_final.pth"
    assert identity.test_model is True
    assert identity.name == "LpmLiver"
    assert identity.weights_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert "3d_fullres" in identity.version and "fold 0" in identity.version
    assert "TEST MODEL, not for clinical use" in identity.short()
    # the same weights without the marker in dataset.json: not a test model (the marker decides, not the path)
    import json
    import shutil

    copy = tmp_path / "Dataset001_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(bundled_model_folder(), copy)
    dataset = json.loads((copy / "dataset.json").read_text())
    del dataset["lpm_node"]
    (copy / "dataset.json").write_text(json.dumps(dataset))
    info = verify_model_folder(copy, load_weights=False)
    other = model_identity(info)
    assert other.test_model is False and other.weights_sha256 == identity.weights_sha256


def test_missing_model_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(SegmentationError, match="model folder not found"):
        load_segmenter(ModelSettings(folder=str(tmp_path / "nowhere"), device="cpu"))


def test_segment_keeps_grid_of_input(segmenter: NnUNetSegmenter) -> None:
    """An image with an origin far from zero and an odd size: masks come back on exactly that grid."""
    phantom = make_phantom(50.0, n_slices=37, size=101, pixel_spacing=3.5, slice_spacing=5.0, seed=7106)
    image = phantom_image(phantom)
    image.SetOrigin((1000.0, -500.0, 250.0))
    masks = segmenter.segment(image)
    assert masks["liver"].shape == sitk.GetArrayViewFromImage(image).shape
    assert dice(masks["liver"], phantom.masks["liver"]) > 0.85

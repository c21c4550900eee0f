"""Helpers for the segmentation tests: phantom images on the method grid, Dice, model folder copies, a segmenter
that finds no liver."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.phantom import Phantom, make_phantom
from lpm_node.demo.phantom import phantom_image as lpm_phantom_image
from lpm_node.imaging.segmentation import Segmenter


def phantom_image(phantom: Phantom) -> sitk.Image:
    """The phantom CT as a float32 SimpleITK image on its own grid (identity direction)."""
    return lpm_phantom_image(phantom, phantom.hu.astype(np.float32))


def method_grid_phantom(liver_hu: float, seed: int, **kwargs: object) -> tuple[Phantom, sitk.Image]:
    """A 120 x 512 x 512 phantom on the 0.7 x 0.7 x 2.5 mm method grid."""
    phantom = make_phantom(liver_hu, seed=seed, **kwargs)  # type: ignore[arg-type]
    return phantom, phantom_image(phantom)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def third_party_copy(dest: Path, numbers: dict[str, int]) -> Path:
    """A copy of the bundled model laid out like a downloaded multi-organ model: more labels, liver and spleen at
    other numbers. The output layers are remapped so the copy predicts exactly what the bundled model does.

    ``numbers`` maps every label name except background to its number (consecutive from 1, as nnU-Net needs).
    """
    src = bundled_model_folder()
    shutil.copytree(src, dest)
    dataset = json.loads((src / "dataset.json").read_text())
    old = dataset["labels"]
    assert sorted(numbers.values()) == list(range(1, len(numbers) + 1))
    dataset["labels"] = {"background": 0, **dict(sorted(numbers.items(), key=lambda kv: kv[1]))}
    dataset["description"] = "test copy in the layout of a third-party multi-organ model"
    (dest / "dataset.json").write_text(json.dumps(dataset, indent=2))
    ckpt_path = dest / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    n_out = len(numbers) + 1
    for key in [k for k in weights if ".seg_layers." in k]:
        w = weights[key]
        new = torch.zeros((n_out, *w.shape[1:]), dtype=w.dtype)
        if key.endswith(".bias"):
            new.fill_(-50.0)  # labels the bundled model does not know are never chosen
        new[0] = w[0]
        for name, number in numbers.items():
            if name in old:
                new[number] = w[old[name]]
        weights[key] = new
    torch.save(ckpt, ckpt_path)
    return dest


class FindsNoLiver:
    """A segmenter that finds no liver: ``inner``'s masks with the liver left empty (its other structures kept)."""

    def __init__(self, inner: Segmenter) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def segment(self, image: sitk.Image) -> dict[str, np.ndarray]:
        masks = self._inner.segment(image)
        return {**masks, "liver": np.zeros_like(masks["liver"])}

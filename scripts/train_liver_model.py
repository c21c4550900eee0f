#!/usr/bin/env python
"""Train an nnU-Net v2 liver model (3d_fullres) and export a trimmed model folder that lpm-node loads.

Input, one of:
  --data DIR      NIfTI CT + liver masks on the method grid (0.7 x 0.7 x 2.5 mm), e.g. the curated public dataset of
                  the published DL-parenchymal method: ``<case>_3d_liver_seg.nii.gz`` next to ``<case>.nii.gz``
                  (also accepted: ``<case>_0000.nii.gz`` / ``<case>_ct.nii.gz`` for the CT, ``*_liver_seg``,
                  ``*_liver``, ``*_seg`` for the mask, or an nnU-Net ``imagesTr``/``labelsTr`` pair of folders);
  --phantoms N    N synthetic chest CT phantoms (lpm_node.demo.phantom) with liver and spleen labels.

Steps: raw dataset (imagesTr/labelsTr, dataset.json with channel "CT") -> fingerprint -> plans (target spacing and
network size as asked) -> preprocessing -> training of one fold -> model folder (dataset.json, plans.json,
fold_N/checkpoint_final.pth without optimizer state) -> optional Dice on held-out phantoms. nnU-Net's folders
(nnUNet_raw, nnUNet_preprocessed, nnUNet_results) live in a working folder (temporary unless --work is given).

The bundled test/demo model lpm_node/demo/models/phantom_liver was made with (see scripts/train_liver_model.md):
  python scripts/train_liver_model.py --phantoms 40 --method-grid-every 5 --phantom-grid 3.5 5.0 \
      --features small --target-spacing 5 3.5 3.5 --patch-size 40 80 80 --batch-size 2 \
      --epochs 70 --iterations-per-epoch 30 --val-iterations 4 --holdout 6 --device cpu \
      --out lpm_node/demo/models/phantom_liver
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_LpmLiver"
METHOD_SPACING_ZYX = (2.5, 0.7, 0.7)
MASK_SUFFIXES = ("_3d_liver_seg", "_liver_seg", "_liver_mask", "_liver", "_seg", "_label", "_mask")
CT_SUFFIXES = ("", "_0000", "_ct", "_CT", "_image", "_img")


def _nii_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def find_pairs(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, CT file, liver mask file) for every case of a dataset folder (see the module docstring)."""
    images, labels = data_dir / "imagesTr", data_dir / "labelsTr"
    pairs: list[tuple[str, Path, Path]] = []
    if images.is_dir() and labels.is_dir():
        for lab in sorted(labels.glob("*.nii*")):
            case = _nii_stem(lab)
            ct = next(iter(sorted(images.glob(f"{case}_0000.nii*"))), None)
            if ct is not None:
                pairs.append((case, ct, lab))
        return pairs
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii")))
    by_stem = {_nii_stem(p): p for p in files}
    for stem, mask in sorted(by_stem.items()):
        suffix = next((s for s in MASK_SUFFIXES if stem.endswith(s)), None)
        if suffix is None:
            continue
        case = stem[: -len(suffix)]
        ct = next((by_stem[case + s] for s in CT_SUFFIXES if case + s in by_stem and case + s != stem), None)
        if ct is not None:
            pairs.append((case, ct, mask))
    return pairs


def _write_case(raw: Path, case: str, ct: sitk.Image, label: sitk.Image) -> None:
    sitk.WriteImage(ct, str(raw / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(label, str(raw / "labelsTr" / f"{case}.nii.gz"), useCompression=True)


def raw_from_folder(data_dir: Path, raw: Path) -> dict[str, int]:
    """Copy CT + liver masks into nnU-Net raw layout (label = mask > 0); returns the dataset labels."""
    pairs = find_pairs(data_dir)
    if not pairs:
        raise SystemExit(f"no CT + liver mask pairs found in {data_dir} (see --help for the accepted names)")
    for i, (case, ct_path, mask_path) in enumerate(pairs):
        ct = sitk.ReadImage(str(ct_path))
        mask = sitk.ReadImage(str(mask_path))
        if ct.GetSize() != mask.GetSize():
            raise SystemExit(f"{case}: CT {ct.GetSize()} and mask {mask.GetSize()} differ in size")
        spacing_zyx = tuple(reversed(ct.GetSpacing()))
        if not np.allclose(spacing_zyx, METHOD_SPACING_ZYX, atol=0.05):
            print(f"note: {case} spacing (z, y, x) {spacing_zyx} is not the method grid {METHOD_SPACING_ZYX}")
        label = sitk.Cast(mask > 0, sitk.sitkUInt8)
        label.CopyInformation(ct)
        _write_case(raw, f"case_{i:04d}", sitk.Cast(ct, sitk.sitkInt16), label)
    print(f"{len(pairs)} cases from {data_dir}")
    return {"background": 0, "liver": 1}


def phantom_params(index: int, seed: int) -> dict[str, Any]:
    """Varied phantom settings for training case ``index``: liver HU -20..70, lesions, cut livers, noise, length."""
    rng = np.random.default_rng([seed, index])
    return {
        "liver_hu": float(rng.uniform(-20.0, 70.0)),
        "spleen_hu": float(rng.uniform(35.0, 60.0)),
        "noise_sd": float(rng.uniform(8.0, 18.0)),
        "lesion": bool(rng.random() < 0.3),
        "liver_cut": bool(rng.random() < 0.25),
        "n_slices": int(rng.integers(100, 141)),
        "flip_z": bool(rng.random() < 0.25),  # the same anatomy stored feet-first (z reversed)
        "seed": int(seed * 1000 + index),
    }


def phantom_images(params: dict[str, Any], *, size: int, pixel_spacing: float,
                   slice_spacing: float, spleen: bool) -> tuple[sitk.Image, sitk.Image]:
    """A phantom CT and its label map (liver 1, spleen 2 when asked) as SimpleITK images."""
    from lpm_node.demo.phantom import make_phantom

    fov_z = params["n_slices"] * 2.5
    ph = make_phantom(
        params["liver_hu"], n_slices=max(8, round(fov_z / slice_spacing)), size=size, pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing, noise_sd=params["noise_sd"], spleen_hu=params["spleen_hu"],
        lesion=params["lesion"], liver_cut=params["liver_cut"], seed=params["seed"],
    )
    label = (ph.masks["liver"] > 0).astype(np.uint8)
    if spleen:
        label[(ph.masks["spleen"] > 0) & (label == 0)] = 2
    hu = ph.hu
    if params.get("flip_z"):
        hu, label = hu[::-1], label[::-1]
    images = []
    for arr in (np.ascontiguousarray(hu, dtype=np.int16), np.ascontiguousarray(label)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in reversed(ph.spacing)))
        img.SetOrigin(tuple(float(o) for o in ph.origin))
        images.append(img)
    return images[0], images[1]


def raw_from_phantoms(n: int, raw: Path, *, seed: int, size: int, spleen: bool,
                      grid_mm: tuple[float, float], method_every: int) -> dict[str, int]:
    """Write ``n`` phantoms: every ``method_every``-th on the method grid (0: none), the others directly on
    ``grid_mm`` (in-plane, z), which is much faster when that is near the model's target spacing."""
    t0 = time.perf_counter()
    for i in range(n):
        params = phantom_params(i, seed)
        if method_every and i % method_every == 0:
            px, sz, n_px = METHOD_SPACING_ZYX[2], METHOD_SPACING_ZYX[0], size
        else:
            px, sz = grid_mm
            n_px = max(16, round(size * METHOD_SPACING_ZYX[2] / px))
        ct, label = phantom_images(params, size=n_px, pixel_spacing=px, slice_spacing=sz, spleen=spleen)
        _write_case(raw, f"phantom_{i:04d}", ct, label)
    print(f"{n} phantoms written in {time.perf_counter() - t0:.1f} s")
    return {"background": 0, "liver": 1, "spleen": 2} if spleen else {"background": 0, "liver": 1}


def write_dataset_json(raw: Path, labels: dict[str, int]) -> None:
    n = len(list((raw / "labelsTr").glob("*.nii.gz")))
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": "LpmLiver",
        "description": "lpm-node liver model training data (scripts/train_liver_model.py)",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def small_architecture(plans: dict[str, Any], config_name: str, patch_size: list[int] | None,
                       max_features: int, base_features: int) -> None:
    """Shrink the network of a configuration: fewer features per stage and, if given, another patch size."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    cfg = plans["configurations"][config_name]
    if patch_size is not None:
        _, pool, conv, patch, _ = get_pool_and_conv_props(cfg["spacing"], patch_size, 4, 999999)
        cfg["patch_size"] = [int(p) for p in patch]
        cfg["architecture"]["arch_kwargs"]["strides"] = pool
        cfg["architecture"]["arch_kwargs"]["kernel_sizes"] = conv
        n = len(pool)
        cfg["architecture"]["arch_kwargs"]["n_stages"] = n
        cfg["architecture"]["arch_kwargs"]["n_conv_per_stage"] = [2] * n
        cfg["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"] = [2] * (n - 1)
    n = cfg["architecture"]["arch_kwargs"]["n_stages"]
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = [
        min(base_features * 2**i, max_features) for i in range(n)
    ]


def plan_and_preprocess(target_spacing: list[float] | None, features: str, patch_size: list[int] | None,
                        batch_size: int | None, processes: int) -> str:
    """Fingerprint, plan (3d_fullres only) and preprocess; returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    extract_fingerprint_dataset(DATASET_ID, num_processes=processes, check_dataset_integrity=True,
                                clean=True, verbose=False, show_progress_bar=False)
    _, plans_id = plan_experiment_dataset(DATASET_ID, overwrite_target_spacing=target_spacing)
    plans_file = Path(nnUNet_preprocessed) / DATASET_NAME / f"{plans_id}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    if features == "small":
        small_architecture(plans, "3d_fullres", patch_size, max_features=64, base_features=8)
    elif patch_size is not None:
        small_architecture(plans, "3d_fullres", patch_size, max_features=320, base_features=32)
    if batch_size:
        plans["configurations"]["3d_fullres"]["batch_size"] = int(batch_size)
    plans_file.write_text(json.dumps(plans, indent=2))
    cfg = plans["configurations"]["3d_fullres"]
    print(f"plan: spacing {cfg['spacing']} patch {cfg['patch_size']} batch {cfg['batch_size']} "
          f"features {cfg['architecture']['arch_kwargs']['features_per_stage']}")
    preprocess_dataset(DATASET_ID, plans_id, configurations=("3d_fullres",), num_processes=[processes],
                       show_progress_bar=False)
    return plans_id


def train(plans_id: str, fold: str, epochs: int, iterations: int, val_iterations: int, device: str,
          lr: float | None) -> tuple[Any, float]:
    """Train one fold with nnU-Net's trainer (schedule changed only); returns the trainer and seconds taken."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch_device = torch.device(device)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    fold_arg: int | str = fold if fold == "all" else int(fold)
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", fold_arg, "nnUNetTrainer", plans_id,
                                    device=torch_device)
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.save_every = max(epochs + 1, 50)
    if lr:
        trainer.initial_lr = lr
    t0 = time.perf_counter()
    trainer.run_training()
    return trainer, time.perf_counter() - t0


def export_model(trainer: Any, out: Path, fold: str) -> Path:
    """Copy dataset.json, plans.json and a trimmed checkpoint_final.pth (no optimizer state) to ``out``."""
    import torch

    src = Path(trainer.output_folder)
    base = Path(trainer.output_folder_base)
    if out.exists():
        shutil.rmtree(out)
    (out / f"fold_{fold}").mkdir(parents=True)
    shutil.copyfile(base / "dataset.json", out / "dataset.json")
    shutil.copyfile(base / "plans.json", out / "plans.json")
    ckpt = torch.load(src / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    init_args = {k: v for k, v in ckpt["init_args"].items() if k in ("configuration", "fold")}
    trimmed = {
        "network_weights": {k: v.detach().float() for k, v in ckpt["network_weights"].items()},
        "init_args": init_args,
        "trainer_name": "nnUNetTrainer",  # only the schedule differed; the architecture comes from plans.json
        "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
        "current_epoch": ckpt.get("current_epoch"),
    }
    torch.save(trimmed, out / f"fold_{fold}" / "checkpoint_final.pth")
    return out


def training_figures(trainer: Any) -> dict[str, Any]:
    """Per-epoch train/val loss and pseudo-Dice from nnU-Net's logger."""
    def get(key: str) -> list[Any]:
        try:
            return list(trainer.logger.get_value(key, step=None))
        except (KeyError, AttributeError):
            return []

    def series(key: str) -> list[Any]:
        return [np.round(np.asarray(v, dtype=float), 4).tolist() for v in get(key)]

    starts, ends = get("epoch_start_timestamps"), get("epoch_end_timestamps")
    return {
        "train_loss": series("train_losses"),
        "val_loss": series("val_losses"),
        "pseudo_dice": series("dice_per_class_or_region"),
        "ema_pseudo_dice": series("ema_fg_dice"),
        "epoch_seconds": [round(e - s, 1) for s, e in zip(starts, ends, strict=False)],
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def evaluate_holdout(model: Path, n: int, *, seed: int, size: int, device: str) -> list[dict[str, Any]]:
    """Dice of the exported model on ``n`` new phantoms on the method grid (liver HU from -10 to 60)."""
    from lpm_node.core.config import ModelSettings
    from lpm_node.imaging.segmentation import load_segmenter

    seg = load_segmenter(ModelSettings(folder=str(model), device=device))
    results = []
    for i in range(n):
        hu = float(np.linspace(-10.0, 60.0, n)[i]) if n > 1 else 30.0
        params = {**phantom_params(10_000 + i, seed + 1), "liver_hu": hu, "flip_z": False, "n_slices": 120}
        ct, label = phantom_images(params, size=size, pixel_spacing=METHOD_SPACING_ZYX[2],
                                   slice_spacing=METHOD_SPACING_ZYX[0], spleen=True)
        t0 = time.perf_counter()
        masks = seg.segment(sitk.Cast(ct, sitk.sitkFloat32))
        seconds = time.perf_counter() - t0
        truth = sitk.GetArrayFromImage(label)
        row = {"liver_hu": round(hu, 1), "liver_dice": round(dice(masks["liver"], truth == 1), 4),
               "seconds": round(seconds, 2), "lesion": params["lesion"], "liver_cut": params["liver_cut"]}
        if "spleen" in masks:
            row["spleen_dice"] = round(dice(masks["spleen"], truth == 2), 4)
        print(f"held-out phantom {i}: {row}")
        results.append(row)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of NIfTI CT + liver masks (method grid)")
    src.add_argument("--phantoms", type=int, help="train on N generated phantoms")
    p.add_argument("--out", type=Path, required=True, help="model folder to write (replaced if present)")
    p.add_argument("--work", type=Path, help="nnU-Net working folder (default: temporary, removed)")
    p.add_argument("--fold", default="0", help="fold to train: 0-4 or 'all' (default 0)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs (nnU-Net default 1000)")
    p.add_argument("--iterations-per-epoch", type=int, default=250, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=0, help="validation iterations per epoch (0: iters/5)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--features", choices=["default", "small"], default="default",
                   help="small: 8..64 features per stage (checkpoint of a few MB)")
    p.add_argument("--target-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="nnU-Net target spacing in mm (default: planned from the data)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="patch size in voxels")
    p.add_argument("--batch-size", type=int, help="batch size (default: planned)")
    p.add_argument("--lr", type=float, help="initial learning rate (nnU-Net default 0.01)")
    p.add_argument("--no-spleen", action="store_true", help="phantoms: liver label only")
    p.add_argument("--phantom-size", type=int, default=512, help="phantom in-plane size on the method grid")
    p.add_argument("--phantom-grid", type=float, nargs=2, default=(2.8, 5.0), metavar=("XY", "Z"),
                   help="mm grid of the phantoms not made on the method grid (default 2.8 5.0)")
    p.add_argument("--method-grid-every", type=int, default=4, metavar="K",
                   help="every K-th phantom on the 0.7 x 0.7 x 2.5 mm method grid (0: none; default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, help="evaluate on N held-out phantoms (method grid)")
    p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for preprocessing and data augmentation")
    p.add_argument("--summary", type=Path, help="write the training figures (JSON) here")
    p.add_argument("--progress-png", type=Path, help="copy nnU-Net's progress.png here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="lpm-train-"))
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / sub)  # read by nnunetv2.paths at import time: set before importing nnunetv2
    os.environ.setdefault("nnUNet_n_proc_DA", str(args.processes))
    os.environ.setdefault("nnUNet_compile", "false")
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    raw = work / "raw" / DATASET_NAME
    if raw.exists():
        shutil.rmtree(raw)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    try:
        if args.data:
            labels = raw_from_folder(args.data, raw)
        else:
            labels = raw_from_phantoms(args.phantoms, raw, seed=args.seed, size=args.phantom_size,
                                       spleen=not args.no_spleen, grid_mm=tuple(args.phantom_grid),
                                       method_every=args.method_grid_every)
        write_dataset_json(raw, labels)
        t_plan = time.perf_counter()
        plans_id = plan_and_preprocess(args.target_spacing, args.features, args.patch_size, args.batch_size,
                                       args.processes)
        t_plan = time.perf_counter() - t_plan
        val_iters = args.val_iterations or max(1, args.iterations_per_epoch // 5)
        trainer, t_train = train(plans_id, str(args.fold), args.epochs, args.iterations_per_epoch, val_iters, device,
                                 args.lr)
        out = export_model(trainer, args.out, str(args.fold))
        figures = training_figures(trainer)
        progress = Path(trainer.output_folder) / "progress.png"
        if args.progress_png and progress.is_file():
            shutil.copyfile(progress, args.progress_png)
        holdout = evaluate_holdout(out, args.holdout, seed=args.seed, size=args.phantom_size, device=device) \
            if args.holdout and args.phantoms else []
        ckpt = out / f"fold_{args.fold}" / "checkpoint_final.pth"
        summary = {
            "command": "python scripts/train_liver_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "cases": len(list((raw / "labelsTr").glob("*.nii.gz"))),
            "labels": labels,
            "plan_preprocess_seconds": round(t_plan, 1),
            "train_seconds": round(t_train, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "checkpoint_mb": round(ckpt.stat().st_size / 1e6, 2),
            "final_train_loss": figures["train_loss"][-1] if figures["train_loss"] else None,
            "final_val_loss": figures["val_loss"][-1] if figures["val_loss"] else None,
            "final_pseudo_dice": figures["pseudo_dice"][-1] if figures["pseudo_dice"] else None,
            "holdout": holdout,
            **figures,
        }
        text = json.dumps(summary, indent=1)
        if args.summary:
            args.summary.write_text(text)
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list) or k == "holdout"}, indent=1))
        print(f"model folder: {out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a small nnU-Net v1 liver model the published method's way and keep its v1 result folder.

The published DL-parenchymal model is an nnU-Net v1 model (``3d_fullres``, ``nnUNetTrainerV2``, plans v2.1). This
script follows the same v1 steps on the project's synthetic phantoms, so that the tests can check lpm-node against
nnU-Net v1's own prediction command without downloads:

  raw task (imagesTr/labelsTr, v1 dataset.json) -> ``nnUNet_plan_and_preprocess`` (v1's own planning, 3d only)
  -> a smaller network in the plans (base features, patch size) -> ``nnUNetTrainerV2`` on one fold with a short
  schedule -> ``RESULTS_FOLDER/nnUNet/3d_fullres/Task521_LpmLiver/nnUNetTrainerV2__nnUNetPlansv2.1``
  (``plans.pkl``, ``fold_0/model_final_checkpoint.model`` and its ``.pkl``), copied to ``--out`` with the task's
  ``dataset.json`` beside ``plans.pkl`` (the label names), marked as a test model.

Needs the optional extra: ``pip install "lpm-node[nnunet-v1]"``. The test model tests/data/nnunet_v1 was made with:
  python scripts/train_liver_model_v1.py --phantoms 16 --epochs 14 --iterations-per-epoch 20 \
      --out tests/data/nnunet_v1
(26 minutes on a busy 2-core machine; liver Dice 0.54-0.80 on method-grid phantoms: a weak model, enough to compare
lpm-node with nnU-Net v1 on, never to judge the method by.)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

TASK_ID = 521
TASK = f"Task{TASK_ID}_LpmLiver"
TRAINER = "nnUNetTrainerV2"
PLANS = "nnUNetPlansv2.1"
GRID_MM = (3.5, 5.0)  # in-plane, z: the phantoms are written near the model's spacing (fast to plan and train)


def write_task(raw_task: Path, n: int, seed: int, size: int) -> None:
    """``n`` phantoms (liver = 1) and a v1 dataset.json (``modality``, ``training`` list)."""
    from train_liver_model import phantom_images, phantom_params

    (raw_task / "imagesTr").mkdir(parents=True)
    (raw_task / "labelsTr").mkdir()
    training = []
    n_px = max(16, round(size * 0.7 / GRID_MM[0]))
    for i in range(n):
        ct, label = phantom_images(phantom_params(i, seed), size=n_px, pixel_spacing=GRID_MM[0],
                                   slice_spacing=GRID_MM[1], spleen=False)
        case = f"phantom_{i:04d}"
        sitk.WriteImage(ct, str(raw_task / "imagesTr" / f"{case}_0000.nii.gz"), useCompression=True)
        sitk.WriteImage(label, str(raw_task / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    dataset = {
        "name": "LpmLiver", "description": "lpm-node phantoms (scripts/train_liver_model_v1.py)",
        "tensorImageSize": "3D", "reference": "", "licence": "Apache-2.0", "release": "0.0",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "numTraining": n, "numTest": 0, "training": training, "test": [],
    }
    (raw_task / "dataset.json").write_text(json.dumps(dataset, indent=2))


def shrink_plans(plans_file: Path, base_features: int, patch_size: list[int]) -> None:
    """A smaller Generic_UNet in the v1 plans: fewer base features and a smaller patch (pooling re-derived)."""
    from nnunet.experiment_planning.common_utils import get_pool_and_conv_props

    plans = pickle.loads(plans_file.read_bytes())
    stage = plans["plans_per_stage"][max(plans["plans_per_stage"])]
    plans["plans_per_stage"] = {0: stage}
    num_pool, pool, conv, patch, _ = get_pool_and_conv_props(stage["current_spacing"], patch_size, 4, 999999)
    stage.update(patch_size=np.array(patch), num_pool_per_axis=num_pool, pool_op_kernel_sizes=pool,
                 conv_kernel_sizes=conv, batch_size=2)
    plans["base_num_features"] = base_features
    plans_file.write_bytes(pickle.dumps(plans))
    print(f"plan: spacing {list(stage['current_spacing'])} patch {list(stage['patch_size'])} "
          f"pools {pool} base features {base_features}")


def write_model_dataset_json(task_dataset: Path, target: Path) -> None:
    """The task's dataset.json beside plans.pkl (v1 keeps label names only there), marked as a test model."""
    dataset = json.loads(task_dataset.read_text())
    dataset = {k: v for k, v in dataset.items() if k not in ("training", "test")}
    dataset["lpm_node"] = {"test_model": True,
                           "note": "trained on synthetic phantoms only; for tests, never for clinical use"}
    (target / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


def train(fold: int, epochs: int, iterations: int, resume: bool = False) -> Path:
    """nnUNetTrainerV2 with its own code; only the schedule is shorter. Returns the trainer's output folder.

    ``resume``: continue from the folder's last checkpoint up to ``epochs`` (``nnUNet_train ... -c``)."""
    import torch
    from nnunet.run.default_configuration import get_default_configuration

    torch.set_num_threads(os.cpu_count() or 1)
    plans_file, output_folder, dataset_dir, batch_dice, stage, trainer_class = get_default_configuration(
        "3d_fullres", TASK, TRAINER, PLANS)
    trainer = trainer_class(plans_file, fold, output_folder=output_folder, dataset_directory=dataset_dir,
                            batch_dice=batch_dice, stage=stage, unpack_data=True, deterministic=False, fp16=False)
    trainer.max_num_epochs = epochs
    trainer.num_batches_per_epoch = iterations
    trainer.num_val_batches_per_epoch = max(2, iterations // 5)
    trainer.save_every = epochs + 1
    trainer.initialize(True)
    if resume:
        # v1 loads its own checkpoint with torch.load's old default (weights_only=False): this script's own file
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        trainer.load_latest_checkpoint()
    trainer.run_training()
    return Path(output_folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--seed", type=int, default=521)
    parser.add_argument("--size", type=int, default=512, help="phantom matrix at 0.7 mm (scaled to the grid)")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--iterations-per-epoch", type=int, default=20)
    parser.add_argument("--base-features", type=int, default=4)
    parser.add_argument("--patch-size", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--work", type=Path, help="nnU-Net's folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, required=True, help="gets the RESULTS_FOLDER tree of the model")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the model in --work up to --epochs (no new data or plans)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lpm-v1-"))
    env = {"nnUNet_raw_data_base": work / "raw", "nnUNet_preprocessed": work / "preprocessed",
           "RESULTS_FOLDER": work / "results"}
    for key, value in env.items():
        value.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(value)
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    t0 = time.perf_counter()
    if args.resume and not args.work:
        raise SystemExit("--resume needs the --work folder of an earlier run")
    if not args.resume:
        write_task(work / "raw" / "nnUNet_raw_data" / TASK, args.phantoms, args.seed, args.size)
        subprocess.run(["nnUNet_plan_and_preprocess", "-t", str(TASK_ID), "-pl2d", "None", "-tl", "1", "-tf", "1"],
                       check=True)
        shrink_plans(work / "preprocessed" / TASK / f"{PLANS}_plans_3D.pkl", args.base_features, args.patch_size)
    output = train(0, args.epochs, args.iterations_per_epoch, resume=args.resume)
    target = args.out / "nnUNet" / "3d_fullres" / TASK / output.name
    if target.exists():
        shutil.rmtree(target)
    (target / "fold_0").mkdir(parents=True)
    shutil.copy2(output / "plans.pkl", target / "plans.pkl")
    for name in ("model_final_checkpoint.model", "model_final_checkpoint.model.pkl"):
        shutil.copy2(output / "fold_0" / name, target / "fold_0" / name)
    write_model_dataset_json(work / "raw" / "nnUNet_raw_data" / TASK / "dataset.json", target)
    print(f"v1 model folder: {target} ({time.perf_counter() - t0:.0f} s)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

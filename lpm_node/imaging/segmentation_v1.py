"""nnU-Net v1 result folders (the published method's own models): recognised, verified and run with nnU-Net v1.

A v1 result folder is what ``nnUNet_train 3d_fullres nnUNetTrainerV2 TaskXXX FOLD`` leaves in
``RESULTS_FOLDER/nnUNet/3d_fullres/TaskXXX_Name/nnUNetTrainerV2__nnUNetPlansv2.1``: ``plans.pkl`` and
``fold_N/model_final_checkpoint.model`` with its ``.model.pkl`` (the trainer, its init arguments and the plans).
The folder itself, ``RESULTS_FOLDER`` or any folder on the way down to it is accepted when it leads to one model.

Running a v1 model needs the optional extra ``pip install "lpm-node[nnunet-v1]"`` (the ``nnunet`` 1.7.1 package):
its own trainer class builds the network (``Generic_UNet``) from the plans, its own preprocessor crops, resamples and
normalizes, its own sliding-window prediction and export run unchanged, so the masks are nnU-Net v1's.

Security: ``plans.pkl``, the ``.model.pkl`` files and the ``.model`` checkpoints are Python pickles, and unpickling
runs code. A model folder is trusted input, chosen by the node's administrator (``[model] folder``); these files are
unpickled only from that folder, never from anything a peer sends. The checkpoints hold numpy values besides the
weights, so ``torch.load`` needs ``weights_only=False`` for them.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lpm_node.core.files import file_checksum
from lpm_node.imaging.model_identity import ModelIdentity
from lpm_node.imaging.segmentation import (
    TEST_MODEL_MARKER,
    ModelInfo,
    NnUNetSegmenter,
    SegmentationError,
    _quiet,
    _read_json,
    infer_profile,
    load_profile,
)

V1_CHECKPOINTS = ("model_final_checkpoint", "model_best", "model_latest")
DEFAULT_V1_CHECKPOINT = "model_final_checkpoint"
INSTALL_HINT = 'nnU-Net v1 model folders need the nnunet package: pip install "lpm-node[nnunet-v1]"'
_CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")


# ------------------------------------------------------------------------------------------------ recognising


def _looks_like_v1(folder: Path) -> bool:
    if (folder / "plans.pkl").is_file():
        return True
    return any(folder.glob("fold_*/*.model.pkl")) or any(folder.glob("all/*.model.pkl"))


def find_v1_model_folder(path: str | Path) -> Path | None:
    """The v1 model folder that ``path`` is or leads to (a RESULTS_FOLDER tree), None when it is not v1.

    A tree with several models is an error that lists them: the administrator names the one to use."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / "plans.json").is_file():
        return None
    if _looks_like_v1(folder):
        return folder
    patterns = ("*__*", "Task*/*__*", "*/Task*/*__*", "nnUNet/*/Task*/*__*")
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_dir() and _looks_like_v1(p)})
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(folder)) for p in found)
        raise SegmentationError(f"{folder} holds {len(found)} nnU-Net v1 models ({listed}): name the one to use")
    return found[0] if found else None


def _layout(folder: Path) -> tuple[str, str, str, str]:
    """(configuration, task, trainer, plans) from ``.../<configuration>/<Task>/<Trainer>__<Plans>``; "" if absent."""
    trainer, _, plans = folder.name.partition("__")
    task = folder.parent.name if folder.parent.name.startswith("Task") else ""
    configuration = folder.parent.parent.name if folder.parent.parent.name in _CONFIGURATIONS else ""
    return configuration, task, trainer, plans


def _checkpoint_name(checkpoint: str) -> str:
    """v1 checkpoint stem; the v2 default name (``checkpoint_final.pth``) means v1's final checkpoint."""
    name = checkpoint.removesuffix(".model")
    if not name or name.endswith(".pth"):
        return DEFAULT_V1_CHECKPOINT
    return name


def _fold_dir(folder: Path, fold: str) -> Path:
    return folder / ("all" if fold == "all" else f"fold_{fold}")


def _detect_folds(folder: Path, checkpoint: str) -> list[str]:
    folds = [p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / f"{checkpoint}.model").is_file()]
    if (folder / "all" / f"{checkpoint}.model").is_file():
        folds.append("all")
    return sorted(folds)


def _unpickle(path: Path, what: str) -> Any:
    """A pickle of the administrator's model folder (trusted input, see the module docstring)."""
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)  # noqa: S301 - trusted model folder only
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many kinds of errors
        raise SegmentationError(f"{what} cannot be read ({path}): {type(exc).__name__}: {exc}") from exc


def load_v1_checkpoint(path: Path) -> dict[str, Any]:
    """A v1 ``.model`` checkpoint of the administrator's model folder (trusted input: ``weights_only=False``)."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)  # trusted model folder only
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable checkpoint
        raise SegmentationError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise SegmentationError(f"checkpoint {path} has no state_dict: not an nnU-Net v1 checkpoint")
    return saved


def _v1_labels(folder: Path, plans: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any], list[str]]:
    """Label name -> number: from a task ``dataset.json`` beside ``plans.pkl`` when there is one (v1 keeps no
    label names in its result folder), else label 1 of a one-class model is the liver (the published model)."""
    classes = [int(c) for c in plans.get("all_classes", [])]
    dataset_file = folder / "dataset.json"
    if dataset_file.is_file():
        dataset = _read_json(dataset_file, "dataset.json")
        raw = dataset.get("labels")
        if not isinstance(raw, dict) or not raw:
            raise SegmentationError(f"dataset.json has no \"labels\" ({dataset_file})")
        try:  # v1: {"0": "background", "1": "liver"}; a v2-style {"liver": 1} is read too
            labels = {str(v): int(k) for k, v in raw.items()} if all(str(k).isdigit() for k in raw) else \
                {str(k): int(v) for k, v in raw.items()}
        except (TypeError, ValueError) as exc:
            raise SegmentationError(f"dataset.json labels are not label numbers ({dataset_file}): {raw}") from exc
        return labels, dataset, []
    if classes == [1]:
        note = ("v1 result folders carry no label names: label 1 is taken as the liver (the published model's "
                "numbering); put the task's dataset.json beside plans.pkl to name the labels")
        return {"background": 0, "liver": 1}, {}, [note]
    raise SegmentationError(
        f"the model has labels {classes} and no label names: put the task's dataset.json (from nnUNet_raw_data) "
        f"beside plans.pkl in {folder}"
    )


def verify_v1_folder(folder: str | Path, profile: str | None = None, *, folds: list[str] | None = None,
                     checkpoint: str = DEFAULT_V1_CHECKPOINT, load_weights: bool = True) -> ModelInfo:
    """Check an nnU-Net v1 result folder (or a RESULTS_FOLDER tree leading to one); raises SegmentationError."""
    start = Path(folder).expanduser()
    path = find_v1_model_folder(start)
    if path is None:
        raise SegmentationError(f"no nnU-Net v1 model folder (plans.pkl, fold_N/*.model) in {start}")
    name = _checkpoint_name(checkpoint)
    plans_file = path / "plans.pkl"
    if not plans_file.is_file():
        raise SegmentationError(f"incomplete nnU-Net v1 model folder: no plans.pkl in {path}")
    folder_plans = _unpickle(plans_file, "plans.pkl")
    if not isinstance(folder_plans, dict) or "plans_per_stage" not in folder_plans:
        raise SegmentationError(f"plans.pkl is not nnU-Net v1 plans (no plans_per_stage): {plans_file}")
    if folds is None:
        folds = _detect_folds(path, name)
        if not folds:
            present = sorted(p.name for p in path.glob("fold_*")) + (["all"] if (path / "all").is_dir() else [])
            raise SegmentationError(
                f"incomplete nnU-Net v1 model folder: no fold_N/{name}.model in {path}"
                + (f" (found {present} without it)" if present else "")
            )
    files: list[Path] = []
    for fold in folds:
        fold_dir = _fold_dir(path, str(fold))
        if not fold_dir.is_dir():
            raise SegmentationError(f"incomplete nnU-Net v1 model folder: no {fold_dir.name} in {path}")
        for suffix in (".model", ".model.pkl"):
            if not (fold_dir / f"{name}{suffix}").is_file():
                raise SegmentationError(f"incomplete nnU-Net v1 model folder: no {name}{suffix} in {fold_dir}")
        files += [fold_dir / f"{name}.model", fold_dir / f"{name}.model.pkl"]
    info_pkl = _unpickle(files[1], f"{name}.model.pkl")
    if not isinstance(info_pkl, dict) or not {"init", "name", "plans"} <= set(info_pkl):
        raise SegmentationError(f"{files[1]} has no init, name and plans: not an nnU-Net v1 model file")
    plans = info_pkl["plans"]
    saved = load_v1_checkpoint(files[0])
    size = sum(p.stat().st_size for p in files[0::2])

    configuration, task, trainer_dir, plans_name = _layout(path)
    trainer_name = str(info_pkl["name"])
    init = tuple(info_pkl["init"])
    stage = int(init[5]) if len(init) > 5 and init[5] is not None else max(plans["plans_per_stage"])
    stage_plans = plans["plans_per_stage"][stage]
    patch = [int(s) for s in stage_plans["patch_size"]]
    if len(patch) != 3:
        raise SegmentationError(f"the v1 model is {len(patch)}D (patch {patch}): lpm-node needs a 3D model")
    if not configuration:
        configuration = "3d_fullres" if stage == max(plans["plans_per_stage"]) else "3d_lowres"
    backward = [int(a) for a in plans.get("transpose_backward") or (0, 1, 2)]
    spacing = [float(s) for s in np.asarray(stage_plans["current_spacing"])[backward]]
    modalities = plans.get("modalities") or {}
    if len(modalities) != 1:
        raise SegmentationError(f"the model expects {len(modalities)} input channels {modalities}; a CT model has one")

    model_labels, dataset, warnings = _v1_labels(path, plans)
    marker = dataset.get(TEST_MODEL_MARKER)
    test_model = isinstance(marker, dict) and marker.get("test_model") is True
    profile_name = profile or infer_profile(model_labels)
    info = ModelInfo(
        folder=str(path.resolve()),
        configuration=configuration,
        trainer_name=trainer_name,
        plans_name=plans_name or str(plans.get("data_identifier", "")),
        folds=[str(f) for f in folds],
        checkpoint=name,
        spacing_zyx_mm=spacing,
        patch_size=patch,
        channel_names=[str(v) for v in modalities.values()],
        model_labels=model_labels,
        profile=profile_name,
        labels=load_profile(profile_name).resolve(model_labels),
        checkpoint_mb=round(size / 1e6, 2),
        warnings=warnings,
        name=task or str(dataset.get("name") or path.name),
        test_model=test_model,
        nnunet_version="v1",
        task=task,
    )
    if trainer_dir and trainer_dir != trainer_name:
        info.warnings.append(f"the folder names trainer {trainer_dir}, its checkpoint {trainer_name}")
    if test_model:
        info.warnings.append("a test model (trained on synthetic phantoms): never for clinical use")
    if str(next(iter(modalities.values()))).upper() != "CT":
        info.warnings.append(f"input channel is {next(iter(modalities.values()))!r}, not 'CT' (CT normalization?)")
    if load_weights:
        trainer = _restore_trainer(path, files[1])
        try:
            trainer.network.load_state_dict(_network_weights(saved["state_dict"]))
        except Exception as exc:  # noqa: BLE001 - shape or key mismatches come in several exception types
            raise SegmentationError(f"the checkpoint weights do not fit the network of the plans: {exc}") from exc
        info.parameters = int(sum(p.numel() for p in trainer.network.parameters()))
    return info


def v1_model_identity(info: ModelInfo) -> ModelIdentity:
    """Name (the task), version (nnU-Net v1, configuration, trainer, plans, folds, checkpoint) and the SHA-256 of
    each fold's checkpoint and its ``.model.pkl`` (which holds the plans that inference uses)."""
    folder = Path(info.folder)
    files = [_fold_dir(folder, fold) / f"{info.checkpoint}{suffix}"
             for fold in info.folds for suffix in (".model", ".model.pkl")]
    version = (f"nnU-Net v1 {info.configuration}, {info.trainer_name}, {info.plans_name}, "
               f"fold {','.join(info.folds)}, {info.checkpoint}")
    return ModelIdentity(name=info.name, version=version, weights_sha256=file_checksum(*files),
                         test_model=info.test_model)


# ------------------------------------------------------------------------------------------- nnU-Net v1 itself


def _import_nnunet_v1() -> None:
    try:
        with _quiet():
            import nnunet.training.model_restore  # noqa: F401 - its import prints notes about unset paths
    except ImportError as exc:
        raise SegmentationError(INSTALL_HINT) from exc


def _network_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """As nnU-Net v1's ``load_checkpoint_ram``: a "module." prefix (saved from DataParallel) removed."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _restore_trainer(folder: Path, pkl_file: Path) -> Any:
    """The v1 trainer ready for inference, built as ``load_model_and_checkpoint_files`` does (no training data);
    ``restore_model`` unpickles ``pkl_file`` of the administrator's model folder (trusted, see above)."""
    _import_nnunet_v1()
    from nnunet.training.model_restore import restore_model

    try:
        with _quiet():
            trainer = restore_model(str(pkl_file), checkpoint=None, train=False, fp16=False)
            trainer.output_folder = trainer.output_folder_base = str(folder)
            trainer.output_folder = str(pkl_file.parent)  # exists: initialize creates nothing
            trainer.initialize(False)
    except Exception as exc:  # noqa: BLE001 - nnU-Net v1 raises RuntimeError, AssertionError, KeyError...
        raise SegmentationError(f"nnU-Net v1 cannot build the model of {folder}: {type(exc).__name__}: {exc}") from exc
    return trainer


class _Heads:
    def __init__(self, n: int) -> None:
        self.num_segmentation_heads = n


class NnUNetV1Predictor:
    """nnU-Net v1's trainer behind the two calls ``NnUNetSegmenter`` makes of a predictor.

    Each call runs v1's own steps as ``nnUNet_predict`` does: the image goes through a temporary NIfTI into the
    trainer's ``preprocess_patient`` (crop, transpose, resample, CT normalization), every fold predicts with
    ``predict_preprocessed_data_return_seg_and_softmax`` (Gaussian sliding window, step 0.5) and the softmax is
    averaged; the segmentation comes from v1's ``save_segmentation_nifti_from_softmax`` (resampling back, argmax,
    uncropping)."""

    def __init__(self, info: ModelInfo, device: str, *, mirroring: bool, tile_step_size: float) -> None:
        import torch

        folder = Path(info.folder)
        fold_dirs = [_fold_dir(folder, fold) for fold in info.folds]
        pkl = fold_dirs[0] / f"{info.checkpoint}.model.pkl"
        self.trainer = _restore_trainer(folder, pkl)
        self.params = [load_v1_checkpoint(d / f"{info.checkpoint}.model") for d in fold_dirs]
        with _quiet():
            self.trainer.load_checkpoint_ram(self.params[0], False)  # one fold: loaded once, kept
        self.device = device
        self.network = self.trainer.network.to(torch.device(device))
        self.network.eval()
        self.mirroring = mirroring
        self.tile_step_size = tile_step_size
        self.label_manager = _Heads(int(self.trainer.num_classes))
        export = self.trainer.plans.get("segmentation_export_params") or {}
        self.export_kwargs = {"force_separate_z": export.get("force_separate_z"),
                              "interpolation_order": export.get("interpolation_order", 1),
                              "interpolation_order_z": export.get("interpolation_order_z", 0)}

    def _softmax(self, image_file: str) -> tuple[np.ndarray, dict[str, Any]]:
        trainer = self.trainer
        data, _, properties = trainer.preprocess_patient([image_file])
        softmax: np.ndarray | None = None
        for params in self.params:
            if len(self.params) > 1:  # folds take turns in the one network, as in nnUNet_predict
                trainer.load_checkpoint_ram(params, False)
                self.network.to(self.device)
            part = trainer.predict_preprocessed_data_return_seg_and_softmax(
                data, do_mirroring=self.mirroring, mirror_axes=trainer.data_aug_params["mirror_axes"],
                use_sliding_window=True, step_size=self.tile_step_size, use_gaussian=True, all_in_gpu=False,
                verbose=False, mixed_precision=self.device == "cuda")[1]
            softmax = part if softmax is None else softmax + part
        assert softmax is not None
        if len(self.params) > 1:
            softmax /= len(self.params)
        backward = trainer.plans.get("transpose_backward")
        if backward is not None:
            softmax = softmax.transpose([0] + [int(i) + 1 for i in backward])
        return softmax, properties

    def predict_single_npy_array(self, array: np.ndarray, properties: dict[str, Any],
                                 save_or_return_probabilities: bool = False) -> Any:
        """The label map (z, y, x) of a (1, z, y, x) CT with ``properties["spacing"]`` (z, y, x), and with
        ``save_or_return_probabilities`` also the class probabilities on the same grid."""
        from nnunet.inference.segmentation_export import save_segmentation_nifti_from_softmax

        image = sitk.GetImageFromArray(np.ascontiguousarray(array[0], dtype=np.float32))
        image.SetSpacing([float(s) for s in reversed(properties["spacing"])])
        captured: list[np.ndarray] = []

        def keep(seg: np.ndarray) -> np.ndarray:
            captured.append(seg)
            return seg

        with tempfile.TemporaryDirectory(prefix="lpm-nnunet-v1-") as tmp, _quiet():
            image_file = os.path.join(tmp, "case_0000.nii")
            sitk.WriteImage(image, image_file)
            softmax, props = self._softmax(image_file)
            if save_or_return_probabilities:
                return self._labels_and_probabilities(softmax, props)
            save_segmentation_nifti_from_softmax(
                softmax, os.path.join(tmp, "seg.nii.gz"), props, self.export_kwargs["interpolation_order"], None,
                keep, (), None, None, self.export_kwargs["force_separate_z"],
                self.export_kwargs["interpolation_order_z"], verbose=False)
        return captured[0]

    @staticmethod
    def _labels_and_probabilities(softmax: np.ndarray, props: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """At the model's own spacing nothing is resampled: the softmax is put back into the uncropped volume
        (background outside v1's crop box), as v1's export does with the label map."""
        shape = [int(s) for s in props["original_size_of_raw_data"]]
        if list(softmax.shape[1:]) != [int(s) for s in props["size_after_cropping"]]:
            raise SegmentationError(f"v1 resampled an image already at the model spacing ({softmax.shape[1:]} vs "
                                    f"{props['size_after_cropping']})")
        probabilities = np.zeros([softmax.shape[0], *shape], dtype=np.float32)
        probabilities[0] = 1.0
        box = tuple(slice(int(lo), int(lo) + n) for (lo, _), n in zip(props["crop_bbox"], softmax.shape[1:],
                                                                       strict=True))
        probabilities[(slice(None), *box)] = softmax
        return probabilities.argmax(0).astype(np.uint8), probabilities


class NnUNetV1Segmenter(NnUNetSegmenter):
    """The segmenter of an nnU-Net v1 result folder: ``NnUNetSegmenter``'s steps with nnU-Net v1 predicting."""

    @staticmethod
    def _identity(info: ModelInfo) -> ModelIdentity:
        return v1_model_identity(info)

    @staticmethod
    def _describe(info: ModelInfo) -> str:
        return f"nnU-Net v1 {info.configuration} fold {','.join(info.folds)} ({info.name})"

    def _load_predictor(self, info: ModelInfo, *, mirroring: bool, tile_step_size: float) -> Any:
        """nnU-Net v1's own trainer with the folder's weights (trusted pickles: see the module docstring)."""
        return NnUNetV1Predictor(info, self.device, mirroring=mirroring, tile_step_size=tile_step_size)

"""Liver (and spleen) segmentation with an nnU-Net v2 model folder, label profiles and model verification.

A model folder is what ``nnUNetv2_train`` leaves in ``nnUNet_results/DatasetXXX/Trainer__Plans__Config``:
``dataset.json``, ``plans.json`` and ``fold_N/<checkpoint>``. A label profile says which label numbers of the
model are the liver and the spleen (``lpm_node/imaging/profiles/*.toml``, or any TOML file of the same form).
nnU-Net v1 result folders (the published method's models) are recognised here and handled in ``segmentation_v1``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from lpm_node.core.config import ModelSettings
from lpm_node.core.files import file_checksum
from lpm_node.imaging.model_identity import ModelIdentity

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).with_name("profiles")


class SegmentationError(RuntimeError):
    """A model folder, profile or device that cannot be used; the message names what is wrong."""


class Segmenter(Protocol):
    """Segments a CT on the method grid (0.7 x 0.7 x 2.5 mm, identity direction)."""

    description: str
    device: str
    labels: dict[str, int]
    identity: ModelIdentity

    def segment(self, image: sitk.Image) -> dict[str, np.ndarray]:
        """uint8 (z, y, x) masks on the image's grid: "liver" (largest component) and "spleen" when available."""
        ...


# --------------------------------------------------------------------------------------------------- helpers


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask, as uint8 (an empty mask stays empty)."""
    import cc3d

    binary = np.ascontiguousarray(mask != 0)
    if not binary.any():
        return np.zeros(mask.shape, dtype=np.uint8)
    return cc3d.largest_k(binary, k=1, connectivity=26).astype(np.uint8)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """nnU-Net prints to stdout; keep stdout clean for ``--json`` output and log it at debug level."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            log.debug("nnU-Net: %s", text)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SegmentationError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SegmentationError(f"{what} is not valid JSON ({path}): {exc}") from exc
    if not isinstance(data, dict):
        raise SegmentationError(f"{what} is not a JSON object: {path}")
    return data


# -------------------------------------------------------------------------------------------------- profiles


@dataclass
class StructureRule:
    """How a profile finds one structure among the model's labels."""

    names: list[str]
    label: int | None = None  # a fixed number the model must use (checked), or None: looked up by name
    required: bool = False


@dataclass
class LabelProfile:
    name: str
    description: str
    structures: dict[str, StructureRule]
    source: str = ""

    def resolve(self, model_labels: dict[str, int]) -> dict[str, int]:
        """Structure name -> label number for a model with these dataset.json labels (raises SegmentationError)."""
        by_name = {k.lower(): v for k, v in model_labels.items()}
        out: dict[str, int] = {}
        problems: list[str] = []
        for structure, rule in self.structures.items():
            found = next((by_name[n.lower()] for n in rule.names if n.lower() in by_name), None)
            if rule.label is not None:
                if found is None and rule.label in model_labels.values():
                    other = next(k for k, v in model_labels.items() if v == rule.label)
                    problems.append(
                        f"profile {self.name!r} expects {structure} = {rule.label}, but label {rule.label} of the "
                        f"model is {other!r}"
                    )
                    continue
                if found is not None and found != rule.label:
                    problems.append(
                        f"profile {self.name!r} expects {structure} = {rule.label}, but the model has "
                        f"{structure} = {found}"
                    )
                    continue
            if found is None:
                if rule.required:
                    problems.append(
                        f"profile {self.name!r} needs a {structure!r} label (names {rule.names}), the model's labels "
                        f"are {sorted(model_labels)}"
                    )
                continue
            out[structure] = int(found)
        if problems:
            raise SegmentationError("; ".join(problems))
        return out


def available_profiles() -> list[str]:
    """Names of the profiles shipped with lpm-node."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> LabelProfile:
    """A shipped profile by name ("lpm", "totalsegmentator") or a TOML file of the same form."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise SegmentationError(
            f"unknown label profile {name_or_path!r} (shipped: {', '.join(available_profiles())}; or a TOML file)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SegmentationError(f"label profile {path} is not valid TOML: {exc}") from exc
    structures: dict[str, StructureRule] = {}
    for structure, spec in (data.get("structures") or {}).items():
        if not isinstance(spec, dict):
            raise SegmentationError(f"label profile {path}: [structures.{structure}] must be a table")
        label = spec.get("label")
        structures[structure] = StructureRule(
            names=[str(n) for n in spec.get("names", [structure])],
            label=int(label) if label is not None else None,
            required=bool(spec.get("required", False)),
        )
    if "liver" not in structures:
        raise SegmentationError(f"label profile {path} has no [structures.liver]")
    return LabelProfile(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        structures=structures,
        source=str(path),
    )


def infer_profile(model_labels: dict[str, int]) -> str:
    """"lpm" for a liver(/spleen) model numbered like ours, otherwise "totalsegmentator" (lookup by name)."""
    names = {k.lower() for k in model_labels} - {"background"}
    lower = {k.lower(): v for k, v in model_labels.items()}
    if "liver" in names and names <= {"liver", "spleen"} and lower["liver"] == 1 and lower.get("spleen", 2) == 2:
        return "lpm"
    return "totalsegmentator"


# ------------------------------------------------------------------------------------------ model verification

TEST_MODEL_MARKER = "lpm_node"  # dataset.json key: {"test_model": true} marks a model never for clinical use
NO_MODEL_MESSAGE = (
    "no segmentation model configured: set [model] folder in the settings file (--config) to an nnU-Net v2 model "
    "folder or an nnU-Net v1 result folder, or pass --model FOLDER; --demo-model uses the bundled phantom-trained "
    "test model, which is never for clinical use"
)


@dataclass
class ModelInfo:
    """What ``verify_model_folder`` found in a model folder."""

    folder: str
    configuration: str
    trainer_name: str
    plans_name: str
    folds: list[str]
    checkpoint: str
    spacing_zyx_mm: list[float]
    patch_size: list[int]
    channel_names: list[str]
    model_labels: dict[str, int]
    profile: str
    labels: dict[str, int]
    parameters: int = 0
    checkpoint_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)
    name: str = ""  # dataset.json "name", else the dataset folder's name
    test_model: bool = False  # dataset.json says {"lpm_node": {"test_model": true}}: never for clinical use
    nnunet_version: str = "v2"  # "v1": an nnU-Net v1 result folder (lpm_node.imaging.segmentation_v1)
    task: str = ""  # v1: the task folder's name (e.g. "Task521_Liver")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_labels(dataset: dict[str, Any], path: Path) -> dict[str, int]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SegmentationError(f"dataset.json has no \"labels\" ({path})")
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SegmentationError(f"dataset.json label {name!r} is a region ({value}): not supported")
        try:
            out[str(name)] = int(value)
        except (TypeError, ValueError) as exc:
            raise SegmentationError(f"dataset.json label {name!r} has a non-integer value {value!r}") from exc
    if 0 not in out.values():
        raise SegmentationError(f"dataset.json labels have no background (0): {out}")
    return out


def _detect_folds(folder: Path, checkpoint: str) -> list[str]:
    return sorted(
        p.name.removeprefix("fold_") for p in folder.glob("fold_*") if p.is_dir() and (p / checkpoint).is_file()
    )


def verify_model_folder(
    folder: str | Path,
    profile: str | None = None,
    *,
    folds: list[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    load_weights: bool = True,
) -> ModelInfo:
    """Check that ``folder`` is a loadable nnU-Net model for a label profile; raises SegmentationError.

    An nnU-Net v1 result folder (or RESULTS_FOLDER tree) is checked by ``segmentation_v1.verify_v1_folder``.
    ``profile`` None or empty: inferred from the labels. ``folds`` None: every ``fold_N`` holding ``checkpoint``.
    With ``load_weights`` the network is built from the plans and the weights are loaded into it (strict).
    """
    import torch

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SegmentationError(f"model folder not found: {path}")
    if not (path / "dataset.json").is_file() or not (path / "plans.json").is_file():
        from lpm_node.imaging.segmentation_v1 import find_v1_model_folder, verify_v1_folder

        if find_v1_model_folder(path) is not None:
            return verify_v1_folder(path, profile, folds=folds, checkpoint=checkpoint, load_weights=load_weights)
    dataset = _read_json(path / "dataset.json", "dataset.json")
    model_labels = _model_labels(dataset, path / "dataset.json")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise SegmentationError(f"dataset.json has no \"channel_names\" ({path / 'dataset.json'})")
    if len(channels) != 1:
        raise SegmentationError(f"the model expects {len(channels)} input channels {channels}; a CT model has one")
    plans = _read_json(path / "plans.json", "plans.json")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations:
        raise SegmentationError(f"plans.json has no \"configurations\" ({path / 'plans.json'})")

    if folds is None:
        folds = _detect_folds(path, checkpoint)
        if not folds:
            present = sorted(p.name for p in path.glob("fold_*"))
            raise SegmentationError(
                f"no fold_N folder with {checkpoint} in {path}" + (f" (found {present} without it)" if present else "")
            )
    first: dict[str, Any] | None = None
    size = 0
    for fold in folds:
        fold_dir = path / f"fold_{fold}"
        if not fold_dir.is_dir():
            raise SegmentationError(f"no fold_{fold} in {path}")
        ckpt = fold_dir / checkpoint
        if not ckpt.is_file():
            raise SegmentationError(f"no checkpoint file {checkpoint} in {fold_dir}")
        size += ckpt.stat().st_size
        if first is None:
            try:
                first = torch.load(ckpt, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable checkpoint
                raise SegmentationError(f"checkpoint {ckpt} cannot be read: {exc}") from exc
            if not isinstance(first, dict) or "network_weights" not in first:
                raise SegmentationError(f"checkpoint {ckpt} has no network_weights")
            for key in ("trainer_name", "init_args"):
                if key not in first:
                    raise SegmentationError(f"checkpoint {ckpt} has no {key}")
    assert first is not None
    configuration = str(first["init_args"].get("configuration", ""))
    if configuration not in configurations:
        raise SegmentationError(
            f"checkpoint configuration {configuration!r} is not in plans.json (has {sorted(configurations)})"
        )
    trainer_name = str(first["trainer_name"])

    marker = dataset.get(TEST_MODEL_MARKER)
    test_model = isinstance(marker, dict) and marker.get("test_model") is True
    profile_name = profile or infer_profile(model_labels)
    resolved = load_profile(profile_name).resolve(model_labels)

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with _quiet():
        plans_manager = PlansManager(plans)
        config = plans_manager.get_configuration(configuration)
    info = ModelInfo(
        folder=str(path.resolve()),
        configuration=configuration,
        trainer_name=trainer_name,
        plans_name=str(plans.get("plans_name", "")),
        folds=[str(f) for f in folds],
        checkpoint=checkpoint,
        spacing_zyx_mm=[float(s) for s in config.spacing],
        patch_size=[int(s) for s in config.patch_size],
        channel_names=[str(v) for v in channels.values()],
        model_labels=model_labels,
        profile=profile_name,
        labels=resolved,
        checkpoint_mb=round(size / 1e6, 2),
        name=str(dataset.get("name") or path.resolve().parent.name or path.name),
        test_model=test_model,
    )
    if test_model:
        info.warnings.append("a test model (trained on synthetic phantoms): never for clinical use")
    if str(next(iter(channels.values()))).upper() != "CT":
        info.warnings.append(f"input channel is {next(iter(channels.values()))!r}, not 'CT' (CT normalization?)")
    if load_weights:
        info.parameters = _check_network(plans_manager, config, dataset, trainer_name, first["network_weights"])
    return info


def model_identity(info: ModelInfo) -> ModelIdentity:
    """Name, version and weights checksum of a verified model folder (the checkpoints of the folds used)."""
    if info.nnunet_version == "v1":
        from lpm_node.imaging.segmentation_v1 import v1_model_identity

        return v1_model_identity(info)
    folder = Path(info.folder)
    checkpoints = [folder / f"fold_{fold}" / info.checkpoint for fold in info.folds]
    version = (f"nnU-Net v2 {info.configuration}, {info.trainer_name}, {info.plans_name}, "
               f"fold {','.join(info.folds)}, {info.checkpoint}")
    return ModelIdentity(name=info.name, version=version, weights_sha256=file_checksum(*checkpoints),
                         test_model=info.test_model)


def _check_network(plans_manager: Any, config: Any, dataset: dict[str, Any], trainer_name: str,
                   weights: dict[str, Any]) -> int:
    """Build the network the way nnUNetPredictor does and load the weights; returns the parameter count."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    try:
        with _quiet():
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except (RuntimeError, AssertionError) as exc:
        raise SegmentationError(
            f"trainer class {trainer_name!r} of the checkpoint is not in nnunetv2 (nnUNet_extTrainer not set?)"
        ) from exc
    n_in = determine_num_input_channels(plans_manager, config, dataset)
    n_out = plans_manager.get_label_manager(dataset).num_segmentation_heads
    try:
        with _quiet():
            network = trainer_class.build_network_architecture(plans_manager, config, n_in, n_out,
                                                               enable_deep_supervision=False)
        network.load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001 - shape or key mismatches come in several exception types
        raise SegmentationError(f"the checkpoint weights do not fit the network of plans.json: {exc}") from exc
    return int(sum(p.numel() for p in network.parameters()))


# ----------------------------------------------------------------------------------------------- the backend


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without a GPU is an error."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SegmentationError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if name not in ("cuda", "cpu"):
        raise SegmentationError(f"unknown device {name!r} (auto, cuda or cpu)")
    return name


class NnUNetSegmenter:
    """nnU-Net v2 inference with ``nnUNetPredictor``; the network is loaded once and kept (on the GPU if used)."""

    def __init__(self, info: ModelInfo, device: str = "auto", threads: int = 0, *, mirroring: bool = False,
                 tile_step_size: float = 0.5, resampling: str = "fast") -> None:
        import torch

        self.info = info
        self.identity = self._identity(info)
        self.device = resolve_device(device)
        self.labels = dict(info.labels)
        if resampling not in ("fast", "nnunet"):
            raise SegmentationError(f"unknown resampling {resampling!r} (fast or nnunet)")
        self.resampling = resampling
        self.description = self._describe(info)
        if self.device == "cpu":
            torch.set_num_threads(threads if threads > 0 else (os.cpu_count() or 1))
        self._lock = threading.Lock()
        self.calls = 0
        t0 = time.perf_counter()
        self.predictor = self._load_predictor(info, mirroring=mirroring, tile_step_size=tile_step_size)
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s on %s in %.1f s", self.description, self.device, self.load_seconds)

    @staticmethod
    def _identity(info: ModelInfo) -> ModelIdentity:
        return model_identity(info)

    @staticmethod
    def _describe(info: ModelInfo) -> str:
        return f"nnU-Net v2 {info.configuration} fold {','.join(info.folds)} ({Path(info.folder).name})"

    def _load_predictor(self, info: ModelInfo, *, mirroring: bool, tile_step_size: float) -> Any:
        """nnU-Net v2's predictor with the folder's weights, its network kept on ``self.device``."""
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with _quiet():
            predictor = nnUNetPredictor(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=mirroring,
                perform_everything_on_device=self.device == "cuda",
                device=torch.device(self.device),
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                predictor.initialize_from_trained_model_folder(
                    info.folder, use_folds=tuple(info.folds), checkpoint_name=info.checkpoint
                )
            except Exception as exc:  # noqa: BLE001 - nnU-Net raises RuntimeError, KeyError, AssertionError...
                raise SegmentationError(f"nnU-Net cannot load the model in {info.folder}: {exc}") from exc
        predictor.network.to(torch.device(self.device))  # kept there between calls
        return predictor

    def segment(self, image: sitk.Image) -> dict[str, np.ndarray]:
        """Masks (uint8, z, y, x) of the profile's structures on the image's own grid; liver: largest component."""
        with self._lock:
            seg = self._fast(image) if self.resampling == "fast" else self._nnunet(image)
        self.calls += 1
        masks: dict[str, np.ndarray] = {}
        for structure, label in self.labels.items():
            mask = (seg == label).astype(np.uint8)
            masks[structure] = largest_component(mask) if structure == "liver" else mask
        return masks

    def _nnunet(self, image: sitk.Image) -> np.ndarray:
        """nnU-Net's own path: it resamples the input (cubic) and the logits back (linear) itself."""
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)[None]
        spacing = [float(s) for s in reversed(image.GetSpacing())]
        with _quiet():
            return np.asarray(self.predictor.predict_single_npy_array(array, {"spacing": spacing}))

    def _fast(self, image: sitk.Image) -> np.ndarray:
        """Resample to the model spacing with SimpleITK (linear), predict there (nnU-Net then resamples nothing),
        bring the class probabilities back linearly and take the argmax: same result, a fraction of the time."""
        model_spacing = self.info.spacing_zyx_mm
        coarse_grid = _grid_like(image, tuple(reversed(model_spacing)))
        coarse = sitk.Resample(image, coarse_grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        array = sitk.GetArrayFromImage(coarse)[None]
        if self.predictor.label_manager.num_segmentation_heads > MAX_PROBABILITY_CHANNELS:
            return self._fast_labels(image, coarse, array)
        with _quiet():
            _, probabilities = self.predictor.predict_single_npy_array(
                array, {"spacing": list(model_spacing)}, save_or_return_probabilities=True
            )
        best: np.ndarray | None = None
        seg = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint8)
        for channel in range(probabilities.shape[0]):  # argmax of the linearly upsampled probabilities
            fine_image = _upsample_probability(probabilities[channel], coarse, image)
            fine = sitk.GetArrayViewFromImage(fine_image)
            if best is None:
                best = np.array(fine)
                continue
            take = fine > best
            seg[take] = channel
            best[take] = fine[take]
            del take, fine, fine_image
        return seg

    def _fast_labels(self, image: sitk.Image, coarse: sitk.Image, array: np.ndarray) -> np.ndarray:
        """Many-label models (e.g. 100+ organs): argmax at the model spacing, then each structure of the profile
        brought back as a linearly interpolated one-hot map thresholded at 0.5 (memory stays small)."""
        with _quiet():
            labels = np.asarray(
                self.predictor.predict_single_npy_array(array, {"spacing": list(self.info.spacing_zyx_mm)})
            )
        seg = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint16)
        for label in self.labels.values():
            seg[_upsample((labels == label).astype(np.float32), coarse, image) >= 0.5] = label
        return seg


MAX_PROBABILITY_CHANNELS = 4


def _upsample_probability(probability: np.ndarray, coarse: sitk.Image, image: sitk.Image) -> sitk.Image:
    """A probability map on the ``coarse`` grid, linearly resampled onto ``image``'s grid as 0..255 (uint8).

    One byte per voxel keeps the full-resolution maps small (a quarter of float32); 1/255 is far finer than
    any decision the argmax makes."""
    scaled = np.clip(probability, 0.0, 1.0, dtype=np.float32) * np.float32(255.0) + np.float32(0.5)  # rounds
    src = sitk.GetImageFromArray(np.ascontiguousarray(scaled, dtype=np.float32))
    src.CopyInformation(coarse)
    return sitk.Resample(src, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8,
                         useNearestNeighborExtrapolator=True)


def _upsample(values: np.ndarray, coarse: sitk.Image, image: sitk.Image) -> np.ndarray:
    """A float map on the ``coarse`` grid, linearly resampled onto ``image``'s grid (edges extended)."""
    src = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    src.CopyInformation(coarse)
    return sitk.GetArrayFromImage(
        sitk.Resample(src, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32,
                      useNearestNeighborExtrapolator=True)
    )


_CACHE: dict[tuple[Any, ...], NnUNetSegmenter] = {}
_CACHE_LOCK = threading.Lock()


def load_segmenter(settings: ModelSettings) -> Segmenter:
    """The segmenter for these settings, loaded on first use and reused afterwards (same object).

    An empty ``settings.folder`` is an error (SegmentationError): there is no default model.
    """
    if not settings.folder:
        raise SegmentationError(NO_MODEL_MESSAGE)
    folder = Path(settings.folder).expanduser()
    device = resolve_device(settings.device)
    mirroring = bool(getattr(settings, "mirroring", False))
    resampling = str(getattr(settings, "resampling", "fast") or "fast")
    key = (str(folder.resolve()), tuple(settings.folds), settings.checkpoint, device, settings.profile,
           settings.threads, mirroring, resampling)
    with _CACHE_LOCK:
        if key not in _CACHE:
            info = verify_model_folder(folder, settings.profile or None, folds=list(settings.folds),
                                       checkpoint=settings.checkpoint, load_weights=False)
            segmenter_class = NnUNetSegmenter
            if info.nnunet_version == "v1":
                from lpm_node.imaging.segmentation_v1 import NnUNetV1Segmenter

                segmenter_class = NnUNetV1Segmenter
            _CACHE[key] = segmenter_class(info, device, settings.threads, mirroring=mirroring, resampling=resampling)
            # The model and its libraries live as long as the process: keep their objects out of every
            # later garbage collection (a full one otherwise costs ~0.3 s in the middle of a series load).
            gc.freeze()
        return _CACHE[key]


def _grid_like(image: sitk.Image, spacing_xyz: tuple[float, ...]) -> sitk.Image:
    """An empty image covering the same physical extent as ``image`` with another spacing."""
    size_in = np.array(image.GetSize(), dtype=float)
    sp_in = np.array(image.GetSpacing(), dtype=float)
    sp_out = np.array(spacing_xyz, dtype=float)
    size_out = np.maximum(1, np.round(size_in * sp_in / sp_out)).astype(int)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    corner = np.array(image.GetOrigin(), dtype=float) - direction @ (0.5 * sp_in)
    grid = sitk.Image([int(v) for v in size_out], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in sp_out])
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin([float(v) for v in corner + direction @ (0.5 * sp_out)])
    return grid

"""nnU-Net v1 result folders, the published method's own kind of model, against nnU-Net v1 itself.

``tests/data/nnunet_v1`` is a RESULTS_FOLDER tree made by ``scripts/train_liver_model_v1.py`` with nnU-Net v1's own
planning and ``nnUNetTrainerV2`` (a short schedule on phantoms): ``nnUNet/3d_fullres/Task521_LpmLiver/
nnUNetTrainerV2__nnUNetPlansv2.1`` with ``plans.pkl``, ``fold_0/model_final_checkpoint.model`` and its ``.pkl``.
The reference masks come from nnU-Net v1's own prediction command, ``nnUNet_predict``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from lpm_node.cli import main
from lpm_node.core.config import ModelSettings
from lpm_node.core.files import file_checksum
from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.model_identity import ModelIdentity
from lpm_node.imaging.segmentation import largest_component, load_segmenter, verify_model_folder
from lpm_node.imaging.segmentation_v1 import NnUNetV1Segmenter
from tests.support_net import NodeProcess, have_dcmtk, run_cli, storescu
from tests.support_segmentation import dice, method_grid_phantom

REPO = Path(__file__).resolve().parents[1]
RESULTS_FOLDER = REPO / "tests" / "data" / "nnunet_v1"
TASK = "Task521_LpmLiver"
MODEL = RESULTS_FOLDER / "nnUNet" / "3d_fullres" / TASK / "nnUNetTrainerV2__nnUNetPlansv2.1"
FOLD = MODEL / "fold_0"
NNUNET_PREDICT = Path(sys.executable).with_name("nnUNet_predict")


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "results"
    shutil.copytree(RESULTS_FOLDER, dest)
    return dest / MODEL.relative_to(RESULTS_FOLDER)


@pytest.fixture
def verify(capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    """``lpm-node model verify ARGS`` in this process: (exit status, output)."""

    def run(*args: str) -> tuple[int, str]:
        code = main(["model", "verify", *args])
        return code, capsys.readouterr().out

    return run


def nnunet_v1_predict(image: sitk.Image, work: Path, *tta: str) -> np.ndarray:
    """nnU-Net v1's own prediction command on ``image`` (label map, z, y, x). Its checkpoints hold numpy values,
    which torch >= 2.6 loads only with weights_only=False: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, for this trusted
    test model only."""
    (work / "in").mkdir(parents=True)
    sitk.WriteImage(image, str(work / "in" / "case_0000.nii.gz"))
    env = dict(os.environ, RESULTS_FOLDER=str(RESULTS_FOLDER), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    result = subprocess.run([str(NNUNET_PREDICT), "-i", str(work / "in"), "-o", str(work / "out"), "-t", "521",
                             "-m", "3d_fullres", "-f", "0", *tta], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(work / "out" / "case.nii.gz")))


# ------------------------------------------------------------------------------------------------ model verify


def test_verify_names_version_task_configuration_trainer_plans_and_folds(verify) -> None:  # noqa: ANN001
    for folder in (MODEL, RESULTS_FOLDER, RESULTS_FOLDER / "nnUNet" / "3d_fullres" / TASK):
        code, out = verify(str(folder))
        assert code == 0, out
        assert f"nnU-Net:        v1, task {TASK}" in out
        assert "configuration:  3d_fullres (trainer nnUNetTrainerV2, plans nnUNetPlansv2.1)" in out
        assert "folds:          0 (model_final_checkpoint" in out
        assert f"model folder:   {MODEL}" in out
        assert "OK: loadable nnU-Net v1 model" in out
    result = run_cli("model", "verify", str(RESULTS_FOLDER), "--json", timeout=300)  # the command itself
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["ok"] and info["nnunet_version"] == "v1" and info["task"] == TASK and info["labels"] == {"liver": 1}
    assert info["spacing_zyx_mm"] == [5.0, 3.5, 3.5] and info["parameters"] > 0 and info["test_model"] is True


def test_v1_folder_without_label_names_takes_label_1_as_the_liver(tmp_path: Path) -> None:
    model = _copy(tmp_path)
    (model / "dataset.json").unlink()
    info = verify_model_folder(model)
    assert info.labels == {"liver": 1} and not info.test_model
    assert any("label 1 is taken as the liver" in w for w in info.warnings)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("plans.pkl", "incomplete nnU-Net v1 model folder: no plans.pkl in"),
        ("fold_0/model_final_checkpoint.model", "incomplete nnU-Net v1 model folder: no fold_N/model_final_checkpoint"
                                                ".model in"),
        ("fold_0/model_final_checkpoint.model.pkl", "incomplete nnU-Net v1 model folder: no model_final_checkpoint"
                                                    ".model.pkl in"),
    ],
)
def test_incomplete_v1_folder(tmp_path: Path, verify, remove: str, message: str) -> None:  # noqa: ANN001
    model = _copy(tmp_path)
    (model / remove).unlink()
    code, out = verify(str(model))
    assert code == 1 and out.startswith("model verify: FAILED: ") and message in out, out


def test_missing_fold_is_named(tmp_path: Path) -> None:
    model = _copy(tmp_path)
    with pytest.raises(Exception, match=r"incomplete nnU-Net v1 model folder: no fold_1 in"):
        verify_model_folder(model, folds=["1"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a pickle at all\n" * 10)


def _other_plans(path: Path) -> None:
    path.write_bytes(pickle.dumps({"something": "else"}))


def _wrong_weights(path: Path) -> None:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    key = next(k for k in saved["state_dict"] if k.endswith("conv.weight"))
    saved["state_dict"][key] = torch.zeros(3, 3, 3)
    torch.save(saved, path)


def _no_state_dict(path: Path) -> None:
    torch.save({"epoch": 3}, path)


@pytest.mark.parametrize(
    ("damaged", "damage", "message"),
    [
        ("fold_0/model_final_checkpoint.model", _truncate, "model_final_checkpoint.model cannot be read"),
        ("fold_0/model_final_checkpoint.model", _no_state_dict, "has no state_dict: not an nnU-Net v1 checkpoint"),
        ("fold_0/model_final_checkpoint.model", _wrong_weights, "the checkpoint weights do not fit the network"),
        ("fold_0/model_final_checkpoint.model.pkl", _garbage, "model_final_checkpoint.model.pkl cannot be read"),
        ("fold_0/model_final_checkpoint.model.pkl", _other_plans, "has no init, name and plans"),
        ("plans.pkl", _truncate, "plans.pkl cannot be read"),
        ("plans.pkl", _other_plans, "plans.pkl is not nnU-Net v1 plans"),
    ],
)
def test_corrupt_v1_folder(tmp_path: Path, verify, damaged: str, damage, message: str) -> None:  # noqa: ANN001
    model = _copy(tmp_path)
    damage(model / damaged)
    code, out = verify(str(model))
    assert code == 1 and out.startswith("model verify: FAILED: ") and message in out, out


def test_a_tree_with_two_models_asks_which(tmp_path: Path, verify) -> None:  # noqa: ANN001
    model = _copy(tmp_path)
    shutil.copytree(model, model.parent / "nnUNetTrainerV2__nnUNetPlans")
    code, out = verify(str(tmp_path / "results"))
    assert code == 1 and "holds 2 nnU-Net v1 models" in out and "name the one to use" in out, out
    assert verify(str(model))[0] == 0


def test_without_the_nnunet_package_the_message_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['nnunet'] = None\n"
        "from lpm_node.imaging.segmentation import verify_model_folder, SegmentationError\n"
        f"try:\n    verify_model_folder({str(MODEL)!r})\n"
        "except SegmentationError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert 'pip install "lpm-node[nnunet-v1]"' in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ masks against nnU-Net v1


@pytest.fixture(scope="module")
def phantom_on_method_grid() -> tuple[object, sitk.Image]:
    return method_grid_phantom(30.0, 7211, n_slices=64)


@pytest.fixture(scope="module")
def reference(phantom_on_method_grid, tmp_path_factory) -> tuple[object, sitk.Image, np.ndarray]:  # noqa: ANN001
    """A method-grid phantom and nnU-Net v1's own prediction of it (no test-time mirroring)."""
    phantom, image = phantom_on_method_grid
    return phantom, image, nnunet_v1_predict(image, tmp_path_factory.mktemp("v1-predict"), "--disable_tta")


def test_liver_mask_identical_to_nnunet_v1_predict(reference) -> None:  # noqa: ANN001
    phantom, image, predicted = reference
    segmenter = load_segmenter(ModelSettings(folder=str(RESULTS_FOLDER), device="cpu", resampling="nnunet"))
    assert isinstance(segmenter, NnUNetV1Segmenter)
    liver = segmenter.segment(image)["liver"]
    expected = largest_component(predicted == 1)
    assert expected.sum() > 10000 and dice(expected, phantom.masks["liver"]) > 0.75  # a short-trained test model
    assert np.array_equal(liver, expected)


@pytest.mark.slow  # eight mirrored passes on the CPU, twice: minutes on 2 cores
def test_mirrored_liver_mask_identical_to_nnunet_v1_predict_default(phantom_on_method_grid, tmp_path) -> None:  # noqa: ANN001
    """``mirroring = true`` is nnUNet_predict's default test-time mirroring (all three axes)."""
    phantom, image = phantom_on_method_grid
    predicted = nnunet_v1_predict(image, tmp_path)
    settings = ModelSettings(folder=str(RESULTS_FOLDER), device="cpu", resampling="nnunet", mirroring=True)
    liver = load_segmenter(settings).segment(image)["liver"]
    assert np.array_equal(liver, largest_component(predicted == 1))


def test_fast_resampling_agrees_with_nnunet_v1(reference) -> None:  # noqa: ANN001
    """The default path (SimpleITK linear resampling to and from the model spacing) is not v1's own (cubic in-plane
    and nearest along z for the image, linear for the softmax): on this weak test model the masks differ along the
    uncertain liver edge (Dice 0.957 measured); ``resampling = "nnunet"`` gives v1's masks exactly (above)."""
    phantom, image, predicted = reference
    segmenter = load_segmenter(ModelSettings(folder=str(RESULTS_FOLDER), device="cpu"))
    liver = segmenter.segment(image)["liver"]
    expected = largest_component(predicted == 1)
    assert dice(liver, expected) >= 0.95
    assert dice(liver, phantom.masks["liver"]) > 0.75


def test_identity_names_v1_its_task_and_checksum() -> None:
    segmenter = load_segmenter(ModelSettings(folder=str(MODEL), device="cpu"))
    identity = segmenter.identity
    assert identity.name == TASK and identity.test_model
    assert identity.version == ("nnU-Net v1 3d_fullres, nnUNetTrainerV2, nnUNetPlansv2.1, fold 0, "
                                "model_final_checkpoint")
    assert identity.weights_sha256 == file_checksum(FOLD / "model_final_checkpoint.model",
                                                  FOLD / "model_final_checkpoint.model.pkl")
    assert segmenter.description == f"nnU-Net v1 3d_fullres fold 0 ({TASK})"


# ------------------------------------------------------------------------------------------------- process


def test_process_measures_with_a_v1_folder_and_names_it_everywhere(tmp_path: Path) -> None:
    truth = 30.0
    phantom = make_phantom(truth, n_slices=64, size=256, pixel_spacing=1.4, seed=2101)
    write_ct_series(phantom, tmp_path / "ct")
    result = run_cli("process", str(tmp_path / "ct"), "--model", str(RESULTS_FOLDER), "--json", "--out",
                     str(tmp_path / "out"), "--dicom-out", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    item = json.loads(result.stdout)
    assert item["status"] == "measured", item
    assert abs(item["dl_parenchymal_hu"] - truth) <= 1.5
    identity = ModelIdentity(**item["model_identity"])
    assert identity.name == TASK and identity.version.startswith("nnU-Net v1 3d_fullres, nnUNetTrainerV2")
    assert identity.weights_sha256 == file_checksum(FOLD / "model_final_checkpoint.model",
                                                  FOLD / "model_final_checkpoint.model.pkl")
    seg = dcmread(item["files"]["SEG"])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    text = str(algorithm.AlgorithmParameters)
    assert TASK in text and identity.version in text and identity.weights_sha256 in text
    dump = subprocess.run(["dsrdump", "+Pl", item["files"]["SR"]], capture_output=True, text=True).stdout
    assert identity.short() in " ".join(dump.split()), dump[-3000:]
    key = dcmread(item["files"]["KEY"])
    assert key.BurnedInAnnotation == "YES" and key.StudyInstanceUID == seg.StudyInstanceUID
# --------------------------------------------------------------------------------------------------- serve


@pytest.mark.slow
@pytest.mark.skipif(not (have_dcmtk() and orthanc_available()), reason="dcmtk or Orthanc not installed")
def test_serve_with_a_v1_folder_answers_the_pacs_and_names_the_model(tmp_path: Path, orthanc: Orthanc) -> None:
    truth = 30.0
    files = write_ct_series(make_phantom(truth, n_slices=64, size=256, pixel_spacing=1.4, seed=2102),
                            tmp_path / "ct")
    source = dcmread(files[0], stop_before_pixels=True)
    series_uid, study_uid = str(source.SeriesInstanceUID), str(source.StudyInstanceUID)
    config = tmp_path / "node.toml"
    config.write_text("[output]\nbackoff_initial_s = 0.5\nbackoff_max_s = 1.0\nmax_attempts = 100\n")
    node = NodeProcess(tmp_path / "node", measure=True, stable_seconds=1, config=config,
                       extra=["--model", str(RESULTS_FOLDER),
                              "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"])
    with node:
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr
        row = node.wait_series_status(series_uid, ["done", "failed"], timeout=300)
        assert row["status"] == "done", row["reason"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            kinds = {r["object_kind"]: r["status"] for r in node.query(
                "SELECT object_kind, status FROM deliveries WHERE series_instance_uid = ?", (series_uid,))}
            if kinds and set(kinds.values()) == {"sent"}:
                break
            time.sleep(0.3)
        assert sorted(kinds) == ["KEY", "KOS", "SEG", "SR"] and set(kinds.values()) == {"sent"}, node.log()[-3000:]
        job = node.query("SELECT model_name, model_version, model_weights_sha256, model_test FROM jobs "
                         "WHERE series_instance_uid = ?", (series_uid,))[0]
        audit = {s["series_instance_uid"]: s for s in node.audit_json()}[series_uid]
    checksum = file_checksum(FOLD / "model_final_checkpoint.model", FOLD / "model_final_checkpoint.model.pkl")
    assert job["model_name"] == TASK and job["model_weights_sha256"] == checksum and job["model_test"] == 1
    assert job["model_version"].startswith("nnU-Net v1 3d_fullres, nnUNetTrainerV2, nnUNetPlansv2.1, fold 0")
    assert abs(audit["dl_parenchymal_hu"] - truth) <= 1.5
    found: dict[str, object] = {}
    for instance in orthanc.instances():
        tags = orthanc.instance_tags(instance)
        if tags.get("StudyInstanceUID") == study_uid and tags.get("Modality") in ("SEG", "SR", "OT"):
            found[tags["Modality"]] = dcmread(DicomBytesIO(orthanc.instance_file(instance)))
    assert sorted(found) == ["OT", "SEG", "SR"]
    algorithm = found["SEG"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert TASK in str(algorithm.AlgorithmParameters) and checksum in str(algorithm.AlgorithmParameters)
    sr_file = tmp_path / "sr.dcm"
    found["SR"].save_as(sr_file)
    dump = subprocess.run(["dsrdump", "+Pl", str(sr_file)], capture_output=True, text=True).stdout
    assert "nnU-Net v1 3d_fullres" in dump and TASK in dump

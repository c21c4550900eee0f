"""A model folder laid out like a downloaded multi-organ nnU-Net v2 model (liver and spleen at other numbers):
`lpm-node process` with its profile reports spleen attenuation and liver-minus-spleen in the JSON and the SR."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import run_cli
from tests.support_segmentation import third_party_copy

REPO = Path(__file__).resolve().parents[1]
LIVER_HU, SPLEEN_HU = 45.0, 52.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=900)


@pytest.fixture(scope="module")
def organ_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "Dataset291_Organs" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.parent.mkdir(parents=True)
    return third_party_copy(folder, {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5})


def test_model_verify_finds_liver_and_spleen_by_name(organ_model):
    result = _cli("model", "verify", str(organ_model), "--profile", "totalsegmentator", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["labels"] == {"liver": 5, "spleen": 1}


def test_process_with_the_organ_profile_reports_liver_minus_spleen(organ_model, tmp_path):
    phantom = make_phantom(LIVER_HU, spleen_hu=SPLEEN_HU, n_slices=64, size=256, pixel_spacing=1.4, seed=41)
    write_ct_series(phantom, tmp_path / "ct")
    config = tmp_path / "organs.toml"
    config.write_text(f'[model]\nfolder = "{organ_model}"\nprofile = "totalsegmentator"\n')
    result = _cli("process", str(tmp_path / "ct"), "--config", str(config), "--json", "--out", str(tmp_path / "out"),
                  "--dicom-out")
    assert result.returncode == 0, result.stderr[-3000:]
    item = json.loads(result.stdout)
    assert item["status"] == "measured" and "no_spleen" not in item["qc_flags"]
    assert abs(item["dl_parenchymal_hu"] - LIVER_HU) <= 1.5
    assert abs(item["spleen_hu"] - SPLEEN_HU) <= 2.0
    assert item["liver_minus_spleen_hu"] == pytest.approx(item["dl_parenchymal_hu"] - item["spleen_hu"], abs=1e-6)

    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(item["files"]["SR"]))
    found = {
        str(group.tracking_identifier): [float(m.value) for m in group.get_measurements()]
        for group in sr.content.get_volumetric_roi_measurement_groups()
    }
    assert found["Spleen"][0] == pytest.approx(item["spleen_hu"], abs=0.01), found
    seg = dcmread(item["files"]["SEG"])
    assert "Spleen" in {s.SegmentLabel for s in seg.SegmentSequence}
    dump = subprocess.run(["dsrdump", "+Pl", item["files"]["SR"]], capture_output=True, text=True).stdout
    assert "Liver minus spleen" in dump
    assert f"{item['liver_minus_spleen_hu']:.2f}"[:5] in dump

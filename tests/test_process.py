"""`lpm-node process` on phantom chest CT: the full pipeline (load, resample, bundled model, measure) is accurate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.measurement import Category

REPO = Path(__file__).resolve().parents[1]
TRUE_HU = (-10.0, 25.0, 39.0, 41.0, 60.0)


def _process(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpm_node.cli", "process", "--demo-model", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> tuple[Path, dict[str, tuple[float, bool]]]:
    """Ten phantom series (five liver attenuations, head-first and feet-first) plus two that must be refused."""
    root = tmp_path_factory.mktemp("process")
    truth: dict[str, tuple[float, bool]] = {}
    for i, hu in enumerate(TRUE_HU):
        phantom = make_phantom(hu, n_slices=64, size=256, pixel_spacing=1.4, seed=100 + i)
        for feet_first in (False, True):
            files = write_ct_series(phantom, root / f"hu{hu:g}_{'ff' if feet_first else 'hf'}", feet_first=feet_first,
                                    series_number=3 if feet_first else 2)
            truth[str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)] = (hu, feet_first)
    small = make_phantom(50.0, n_slices=64, size=128, pixel_spacing=2.8, seed=7)
    write_ct_series(small, root / "contrast", series_number=5, overrides={"ContrastBolusAgent": "IOHEXOL"})
    write_ct_series(small, root / "abdomen", series_number=6, body_part="ABDOMEN",
                    study_description="CT ABDOMEN PELVIS")
    return root, truth


def test_process_measures_phantoms_within_1_5_hu_head_and_feet_first(phantom_folder, tmp_path):
    root, truth = phantom_folder
    result = _process(str(root), "--json", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    items = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    measured = {i["series_instance_uid"]: i for i in items if i["status"] == "measured"}
    refused = [i for i in items if i["status"] == "rejected"]
    assert set(measured) == set(truth)
    assert sorted(r["reason"].split(":")[0] for r in refused) == ["abdominal study", "contrast-enhanced"]
    errors = {}
    for uid, (hu, feet_first) in truth.items():
        item = measured[uid]
        errors[(hu, feet_first)] = round(item["dl_parenchymal_hu"] - hu, 2)
        assert abs(item["dl_parenchymal_hu"] - hu) <= 1.5, (hu, feet_first, item)
        assert item["category"] == (Category.STEATOSIS if hu < 40 else Category.NO_STEATOSIS), item
        assert item["roi_pixels"] == [401, 401, 401] and item["roi_in_liver_fraction"] == 1.0
        assert set(item["timings_s"]) >= {"load", "resample", "segment", "measure"}
        assert Path(item["files"]["preview"]).stat().st_size > 0
    # head-first and feet-first of the same phantom give the same ROI and value
    for hu in TRUE_HU:
        hf, ff = (measured[u] for u, t in sorted(truth.items(), key=lambda kv: kv[1][1]) if t[0] == hu)
        assert hf["roi_centres"] == ff["roi_centres"]
        assert hf["dl_parenchymal_hu"] == pytest.approx(ff["dl_parenchymal_hu"], abs=1e-3)
    print("errors (HU):", errors)


def test_process_refuses_an_empty_folder_with_a_clear_error(tmp_path):
    result = _process(str(tmp_path))
    assert result.returncode == 2 and "no DICOM series" in result.stderr


def test_process_writes_dicom_answer_that_validates(phantom_folder, tmp_path):
    root, truth = phantom_folder
    one = root / "hu25_hf"
    result = _process(str(one), "--json", "--out", str(tmp_path / "out"), "--dicom-out")
    assert result.returncode == 0, result.stderr[-3000:]
    item = json.loads(result.stdout)
    for kind in ("SEG", "SR", "KEY", "KOS"):
        path = Path(item["files"][kind])
        assert dcmread(path).StudyInstanceUID == dcmread(next(one.iterdir())).StudyInstanceUID
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert "Error" not in check.stderr + check.stdout, (kind, check.stderr[-2000:])

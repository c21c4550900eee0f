"""No silent test model: without a model folder the node refuses to measure and says how to point it at one; the
bundled test model only when asked for (--demo-model), and then it says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support_net import free_port

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lpm_node.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_serve_refuses_to_start_without_a_model_folder(tmp_path: Path) -> None:
    result = _cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--data-dir", str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no segmentation model configured" in result.stderr
    assert "[model] folder" in result.stderr and "--model FOLDER" in result.stderr
    assert "--demo-model" in result.stderr


def test_process_without_a_model_folder_says_how_to_set_one(tmp_path: Path) -> None:
    from lpm_node.demo.phantom import make_phantom, write_ct_series

    write_ct_series(make_phantom(50.0, n_slices=64, size=64, pixel_spacing=5.6), tmp_path / "ct")
    result = _cli("process", str(tmp_path))
    assert result.returncode == 2 and "no segmentation model configured" in result.stderr, result.stderr[-2000:]


def test_doctor_reports_the_missing_model_and_names_the_test_model(tmp_path: Path) -> None:
    missing = _cli("doctor", "--data-dir", str(tmp_path / "a"))
    model_line = next(line for line in missing.stdout.splitlines() if line.split()[1:2] == ["model"])
    assert model_line.startswith("PROBLEM") and "no segmentation model configured" in model_line

    demo = _cli("doctor", "--data-dir", str(tmp_path / "b"), "--demo-model")
    model_line = next(line for line in demo.stdout.splitlines() if line.split()[1:2] == ["model"])
    assert model_line.startswith("OK") and "never for clinical use" in model_line


def test_model_and_demo_model_exclude_each_other(tmp_path: Path) -> None:
    result = _cli("doctor", "--data-dir", str(tmp_path), "--demo-model", "--model", str(tmp_path))
    assert result.returncode == 2 and "exclude each other" in result.stderr

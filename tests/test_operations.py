"""What an administrator runs: `lpm-node demo`, `lpm-node doctor`, the container image definition, the README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support_net import REPO, echoscu, free_port, have_dcmtk, run_cli


@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_demo_runs_the_whole_flow_and_stops_everything(tmp_path):
    result = run_cli("demo", "--data-dir", str(tmp_path), "--hu", "30")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    value = float(re.search(r"DL-parenchymal attenuation: (-?[\d.]+) HU", out).group(1))
    assert abs(value - 30) <= 1.5
    assert "moderate_to_severe_steatosis" in out
    assert len(re.findall(r"delivered (SEG|SR |KEY)", out)) == 3
    assert (tmp_path / "key_image.png").stat().st_size > 0
    assert "stopped the node and the PACS" in out
    # nothing it started is left listening
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_doctor_says_ok_for_a_ready_node(tmp_path, orthanc):
    config = tmp_path / "node.toml"
    config.write_text(f'[output]\ndestinations = ["{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]\n')
    result = run_cli("doctor", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--demo-model")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith(("OK", "PROBLEM"))}
    assert set(lines) == {"device", "model", "destination", "disk", "database", "data"}  # data folder
    assert all(line.startswith("OK") for line in lines.values())
    assert "C-ECHO OK" in lines["destination"] and "liver=1" in lines["model"]


def test_doctor_names_each_problem(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nmin_free_disk_mb = 1000000000\n[model]\nfolder = "{tmp_path / "no-model"}"\n'
        f'[output]\ndestinations = ["PACS@127.0.0.1:{free_port()}"]\n'
    )
    result = run_cli("doctor", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert [p.split()[1] for p in problems] == ["model", "destination", "disk"]
    assert "model folder not found" in problems[0]
    assert "no connection" in problems[1] or "rejected" in problems[1]
    assert "3 OK, 3 problem(s)" in result.stdout


def test_readme_and_ci_run_the_same_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/dev.sh test" in readme and "bash scripts/dev.sh test" in ci
    assert "bash scripts/dev.sh demo" in readme


def _liveness(config: Path) -> subprocess.CompletedProcess:
    return run_cli("doctor", "--liveness", "--config", str(config), timeout=60)


def test_liveness_check_works_with_allow_lists(tmp_path, start_node, port):
    """The container health check: a node that only accepts PACS, or only another host, is still seen alive."""
    only_pacs = tmp_path / "only-pacs.toml"
    only_pacs.write_text(f'[node]\nport = {port}\nallowed_ae_titles = ["PACS"]\n')
    node = start_node(port=port, config=only_pacs, allow_ae=["PACS"], ready_by_echo=False)
    assert echoscu(port, calling="HEALTHCHECK").returncode != 0  # what the old health check did: refused
    alive = _liveness(only_pacs)
    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert f"LPM_NODE@127.0.0.1:{port} as PACS: C-ECHO OK" in alive.stdout
    node.stop()
    dead = _liveness(only_pacs)
    assert dead.returncode == 1 and "PROBLEM  listener" in dead.stdout and "no association" in dead.stdout

    other_host = tmp_path / "other-host.toml"
    other_port = free_port()
    other_host.write_text(f'[node]\nport = {other_port}\nallowed_hosts = ["10.9.9.9"]\n')
    start_node(port=other_port, config=other_host, ready_by_echo=False)
    alive = _liveness(other_host)
    assert alive.returncode == 0, alive.stdout + alive.stderr
    assert "association rejected by the node's allow-lists" in alive.stdout

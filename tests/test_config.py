"""Settings: the file documents the code's defaults, and bad values are refused with the file and key named."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from lpm_node.core.config import ConfigError, Settings, load_settings
from lpm_node.core.destinations import Destination
from tests.support_net import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED = REPO / "config" / "lpm-node.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_documented_file_holds_every_key_with_the_code_default() -> None:
    """Generic over the dataclasses: a key added in the code must be added to the file with its default."""
    text = DOCUMENTED.read_text()
    documented = tomllib.loads(text)
    defaults = Settings()
    missing, different = [], []
    for section in dataclasses.fields(defaults):
        values = documented.get(section.name, {})
        for key in dataclasses.fields(getattr(defaults, section.name)):
            default = getattr(getattr(defaults, section.name), key.name)
            if key.name not in values:
                missing.append(f"[{section.name}] {key.name} = {default!r}")
            elif not re.search(rf"^{key.name}\s*=.*#", text, re.M):
                missing.append(f"[{section.name}] {key.name}: no comment that says what it does")
            elif values[key.name] != default or isinstance(values[key.name], bool) != isinstance(default, bool):
                different.append(f"[{section.name}] {key.name}: file {values[key.name]!r}, code {default!r}")
    assert missing == [], "keys missing from config/lpm-node.toml:\n" + "\n".join(missing)
    assert different == [], "config/lpm-node.toml differs from the code's defaults:\n" + "\n".join(different)
    assert load_settings(DOCUMENTED) == defaults  # and no key in the file that the code does not know


def test_docker_settings_load() -> None:
    settings = load_settings(REPO / "config" / "docker.toml")
    assert (settings.node.host, settings.node.data_dir, settings.model.folder) == ("0.0.0.0", "/data", "/models")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[node]\nport = "11112"\n', r"\[node\] port = '11112': Input should be a valid integer"),
        ("[node]\nport = 70000\n", r"\[node\] port = 70000: Input should be less than or equal to 65535"),
        ("[node]\nmeasure = 1\n", r"\[node\] measure = 1: Input should be a valid boolean"),
        ('[node]\nae_title = "A_TITLE_LONGER_THAN_16"\n', r"\[node\] ae_title = .*at most 16 characters"),
        ('[node]\nallowed_ae_titles = "PACS"\n', r"\[node\] allowed_ae_titles = 'PACS': Input should be a valid list"),
        ("[node]\nallowed_hosts = [1]\n", r"\[node\] allowed_hosts = \[1\]: item 0: Input should be a valid string"),
        ("[series]\nstable_seconds = 0\n", r"\[series\] stable_seconds = 0: Input should be greater than 0"),
        ("[output]\nmax_attempts = -1\n", r"\[output\] max_attempts = -1: Input should be greater than or equal to 0"),
        ("[output]\nretry_hours = 0\n", r"\[output\] retry_hours = 0: Input should be greater than 0"),
        ('[model]\ndevice = "gpu"\n', r"\[model\] device = 'gpu': Input should be 'auto', 'cuda' or 'cpu'"),
        ("[node]\ncolour = 3\n", r"unknown setting \[node\] colour \(known: "),
        ("[nodes]\nport = 3\n", r"unknown settings section \[nodes\]"),
        ("node = 3\n", r"node must be a \[node\] section"),
        ("[rules]\nmin_slice_thickness_mm = 6.0\n", r"\[rules\] min_slice_thickness_mm \(6.0\) is above max_slice"),
        ('[output]\ndestinations = ["PACS@host"]\n',
         r"\[output\] destinations = \['PACS@host'\]: item 0: destination 'PACS@host' is not of the form AET@HOST"),
        ("[node\n", r"not valid TOML"),
    ],
)
def test_bad_settings_are_refused_with_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"config file {path}: {expected}" if "TOML" not in expected else expected):
        load_settings(path)


def test_destinations_are_parsed_once_when_the_settings_are_read(tmp_path: Path) -> None:
    text = '[output]\ndestinations = ["PACS@10.0.0.5:104", " ARCHIVE @ ::1 :4242"]\n'
    settings = load_settings(_write(tmp_path, text), overrides={"output": {"reply_to_sender": True}})
    expected = [Destination("PACS", "10.0.0.5", 104), Destination("ARCHIVE", "::1", 4242)]
    assert settings.output.destinations == expected and settings.destinations == expected
    assert [str(d) for d in settings.destinations] == ["PACS@10.0.0.5:104", "ARCHIVE@::1:4242"]
    overridden = load_settings(overrides={"output": {"destinations": ["OTHER@host:11112"]}})
    assert overridden.destinations == [Destination("OTHER", "host", 11112)]


def test_floats_take_integers_and_overrides_are_checked_too(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, "[series]\nstable_seconds = 2\n"))
    assert settings.series.stable_seconds == 2.0 and isinstance(settings.series.stable_seconds, float)
    with pytest.raises(ConfigError, match=r"command line: \[node\] port = 0"):
        load_settings(overrides={"node": {"port": 0}})


def test_command_names_the_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[output]\nbackoff_max_s = -1\n")
    done = run_cli("doctor", "--config", str(path), timeout=120)
    assert done.returncode == 2
    assert f"config file {path}: [output] backoff_max_s = -1: Input should be greater than 0" in done.stderr

"""Dependencies declared = dependencies imported (read from the source with ``ast``, lazy imports included)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# declared, never imported by name: pydicom finds these pixel-data decoders itself, and starlette its session
# signer (itsdangerous) and its form parser (python-multipart)
RUNTIME_PLUGINS = {"pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle", "itsdangerous",
                   "python-multipart"}
# optional features of the package, installed as extras (``lpm-node[nnunet-v1]``); the test extra includes them
FEATURE_EXTRAS = {name: deps for name, deps in PROJECT["optional-dependencies"].items() if name != "test"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()


def _imported_distributions(*folders: str) -> dict[str, set[str]]:
    """distribution -> files importing it, for the third-party imports under ``folders``."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in {"lpm_node", "tests", "__future__"}:
                        continue
                    if (path.parent / f"{top}.py").exists():  # a sibling module (scripts share helpers)
                        continue
                    for dist in owners.get(top, [f"<no installed distribution for {top}>"]):
                        found.setdefault(_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_package_imports_exactly_its_declared_dependencies() -> None:
    declared = {_name(r) for r in PROJECT["dependencies"]}
    declared |= {_name(r) for deps in FEATURE_EXTRAS.values() for r in deps}
    imported = _imported_distributions("lpm_node")
    undeclared = {d: sorted(files)[:3] for d, files in imported.items() if d not in declared}
    assert undeclared == {}, "imported by lpm_node, missing from [project] dependencies"
    unused = sorted(declared - set(imported) - RUNTIME_PLUGINS)
    assert unused == [], "declared in [project] dependencies, imported nowhere in lpm_node"


def test_tests_and_scripts_import_declared_packages_only() -> None:
    declared = {_name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]}
    declared |= {_name(r) for name in FEATURE_EXTRAS if f"lpm-node[{name}]" in PROJECT["optional-dependencies"]["test"]
                 for r in FEATURE_EXTRAS[name]}
    imported = _imported_distributions("tests", "scripts")
    undeclared = {d: sorted(files)[:3] for d, files in imported.items() if d not in declared}
    assert undeclared == {}, "imported by tests or scripts, missing from the dependencies and the test extra"

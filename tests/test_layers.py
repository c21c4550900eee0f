"""The package's folders follow the flow, and imports point down it only.

core <- intake, imaging <- answer <- node <- console (the web console) <- cli; demo (phantoms, local PACS helpers,
the bundled test model) is used by cli and the tests only. Read from the source with ``ast``, so a lazy import
inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lpm_node"

# layer -> the layers its modules may import (besides themselves and the top-level ``lpm_node``)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "intake": {"core"},
    "imaging": {"core"},
    "answer": {"core", "imaging"},
    "node": {"core", "intake", "imaging", "answer"},
    "demo": {"core", "intake", "imaging", "answer", "node"},
    "console": {"core", "intake", "imaging", "answer", "node"},
    "cli": {"core", "intake", "imaging", "answer", "node", "console", "demo"},
}


def _layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "lpm_node" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lpm_node":
                found += [(node.lineno, f"lpm_node.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_module_is_in_a_layer_folder() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the layer folders: {loose}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(ALLOWED)


def test_imports_point_down_the_flow_only() -> None:
    wrong: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0]
        if own not in ALLOWED:
            continue
        for line, module in _imports(path):
            target = _layer_of_module(module)
            if target is None or target == own or target not in ALLOWED:
                continue
            if target not in ALLOWED[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({target})")
    assert wrong == [], "imports against the flow:\n" + "\n".join(wrong)


def test_tests_helpers_do_not_leak_into_the_package_or_scripts() -> None:
    root = PACKAGE.parent
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "scripts").glob("*.py")]:
        for line, module in _imports(path):
            if module == "tests" or module.startswith("tests."):
                offenders.append(f"{path.relative_to(root)}:{line} imports {module}")
    assert offenders == []


def test_tests_take_their_helpers_from_tests() -> None:
    """Ports, dcmtk runners and fixtures are the tests' own (tests/support_*.py, conftest.py), not the demo's."""
    own = {"free_port", "wait_for_port", "dcmtk_env", "have_dcmtk", "storescu", "echoscu", "run_cli"}
    offenders = []
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lpm_node"):
                offenders += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name in own]
    assert offenders == []


# What node/ may import from answer/: the one entry that builds the answer, and the outbox and its sender that
# deliver it.
ANSWER_ENTRIES = {"lpm_node.answer.build", "lpm_node.answer.outbox", "lpm_node.answer.sender"}


def test_node_reaches_the_answer_through_one_entry_and_the_answer_never_calls_back() -> None:
    """node/ builds the answer only through ``answer.build`` (the outbox and its sender aside); answer/ imports
    nothing of node/ or cli/, so nothing it runs can call back up."""
    wrong: list[str] = []
    for path in sorted((PACKAGE / "node").rglob("*.py")):
        for line, module in _imports(path):
            if _layer_of_module(module) == "answer" and module not in ANSWER_ENTRIES:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    for path in sorted((PACKAGE / "answer").rglob("*.py")):
        for line, module in _imports(path):
            if _layer_of_module(module) in {"node", "cli", "demo"}:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert wrong == [], "\n".join(wrong)


def test_the_answer_entry_takes_the_imaging_result() -> None:
    """The pipeline hands answer/ one object, the imaging half's SeriesResult, and the settings."""
    import inspect

    from lpm_node.answer.build import build_answer, write_answer
    from lpm_node.imaging.result import SeriesResult

    for entry in (build_answer, write_answer):
        first = next(iter(inspect.signature(entry, eval_str=True).parameters.values()))
        assert first.annotation is SeriesResult

"""The layout tells the data flow, and a few rules that keep it so: conf -> experiments -> harness
-> engine -> runtime_patch -> TVM (nothing below imports what is above), entry points only in
experiments/, every environment variable read in runtime_patch/settings.py, no file outside the
repository in the README, no sys.path edits in bench/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each package and the packages it may import (besides itself, the standard library and third parties).
LAYERS = {
    "runtime_patch": set(),
    "engine": {"runtime_patch"},
    "harness": {"engine", "runtime_patch"},
    "experiments": {"harness", "engine", "runtime_patch"},
    "profiler": {"harness", "runtime_patch"},
    "bench": {"harness", "engine", "runtime_patch", "bench"},
    "tools": set(),
}


def _python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_nothing_imports_what_is_above_it(package):
    wrong = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) - LAYERS[package] - {package})
             for p in _python_files(package)}
    assert not {k: v for k, v in wrong.items() if v}


def test_experiments_holds_entry_points_only():
    for path in _python_files("experiments"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), path.name


def test_environment_variables_are_read_in_settings_only():
    allowed = {ROOT / "runtime_patch" / "settings.py"}
    pattern = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [str(p.relative_to(ROOT)) for package in LAYERS for p in _python_files(package)
                 if p not in allowed and pattern.search(p.read_text())]
    offenders += [str(p.relative_to(ROOT)) for p in (ROOT / "runtime_patch" / "native").glob("*.c*")
                  if "getenv" in p.read_text()]
    assert not offenders


def test_every_environment_variable_is_documented_in_the_readme():
    from runtime_patch import settings

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in settings.VARIABLES if f"`{name}`" not in readme]
    assert not missing
    with pytest.raises(KeyError, match="not a documented environment variable"):
        settings.raw("LAB_NO_SUCH_VARIABLE")


def test_readme_needs_nothing_outside_the_repository():
    assert "../shared" not in (ROOT / "README.md").read_text()


def test_bench_scripts_run_as_modules():
    assert not [p.name for p in _python_files("bench") if "sys.path" in p.read_text()]

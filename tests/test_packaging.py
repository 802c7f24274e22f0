"""What pyproject.toml declares: every import has its requirement (the base install for the package's own modules,
the runtime extra for load_model and verify, the test extra for tests and scripts), every requirement a floor that
`make test-floors` can pin, one version, and the license file it names."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import precompute_cli

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
sys.path.insert(0, str(ROOT / "scripts"))
import lowest_requirements  # noqa: E402

RUNTIME_MODULES = {"runtime.py", "verify.py", "device.py"}  # import torch/transformers, only with the extra


def _names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group()).lower() for r in requirements}


def _third_party_imports(paths: list[Path], top_level: bool = False) -> set[str]:
    """Modules imported anywhere in `paths` (or only at module level: what importing the module needs)."""
    local = {"precompute_cli"} | {p.stem for folder in ("tests", "scripts") for p in (ROOT / folder).glob("*.py")}
    found = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level else ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return {m for m in found - local if m not in sys.stdlib_module_names and m != "__future__"}


def _distributions(modules: set[str]) -> set[str]:
    known = packages_distributions()
    return {re.sub(r"[-_.]+", "-", known[m][0]).lower() for m in modules}


def test_the_package_imports_only_what_its_base_and_runtime_declare():
    """Module-level imports of the converter's modules come with the base install; anything else imported (in the
    runtime's modules, or inside a function, such as torch for `--device cuda`) with the runtime extra."""
    package = sorted((ROOT / "precompute_cli").rglob("*.py"))
    base = _distributions(_third_party_imports([p for p in package if p.name not in RUNTIME_MODULES], top_level=True))
    anywhere = _distributions(_third_party_imports(package))
    declared_base = _names(PROJECT["dependencies"])
    assert base <= declared_base, base - declared_base
    assert anywhere <= declared_base | _names(PROJECT["optional-dependencies"]["runtime"])
    assert "torch" not in declared_base and "transformers" not in declared_base  # convert needs neither


def test_tests_and_scripts_import_only_what_is_declared():
    used = _distributions(_third_party_imports(sorted((ROOT / "tests").glob("*.py"))
                                               + sorted((ROOT / "scripts").glob("*.py"))))
    extras = PROJECT["optional-dependencies"]
    declared = _names(PROJECT["dependencies"]) | _names(extras["runtime"]) | _names(extras["test"])
    assert used <= declared, used - declared


def test_every_requirement_has_a_floor_and_the_highest_one_is_pinned():
    base = lowest_requirements.lowest([])
    full = lowest_requirements.lowest(["runtime", "test"])
    assert not any(pin.startswith("torch") for pin in base + full)  # its CPU build is installed apart
    assert "safetensors==0.4" in base and "safetensors==0.8" in full  # the runtime's floor is the higher one
    assert {p.split("==")[0] for p in base} == {re.match(r"[A-Za-z0-9._-]+", r).group()
                                                 for r in PROJECT["dependencies"]}
    assert not any("precompute" in p for p in full)  # the test extra's own [runtime] is unfolded, not pinned


def test_a_requirement_without_a_floor_is_refused(tmp_path, monkeypatch):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy"]\n[project.optional-dependencies]\n')
    monkeypatch.setattr(lowest_requirements, "PYPROJECT", pyproject)
    with pytest.raises(SystemExit, match="'numpy' has no >= floor"):
        lowest_requirements.lowest([])


def test_one_version_and_the_license_pyproject_names():
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "precompute_cli.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", precompute_cli.__version__)
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text

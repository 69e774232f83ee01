"""pyproject.toml declares every third-party package the code imports, and constraints-oldest.txt
pins each declared dependency at its floor (what `scripts/test-oldest` installs)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
#: The project's own import names (the worker package imports as `workers` or
#: `eczema_batch_workers`, from the folder workers/).
FIRST_PARTY = {"eczema_batch", "workers", "eczema_batch_workers", "tests", "bench", "migrations"}
#: Extras that `scripts/test-oldest` cannot install here: timm needs torchvision built for the
#: same torch, and only the CPU build of torch 2.13.0 is installable where the floors are tested.
UNTESTED_EXTRAS = {"timm"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return table


@cache
def requirements(*extras: str) -> list[Requirement]:
    """[project] dependencies, then those of the named extras."""
    found = [Requirement(line) for line in project()["dependencies"]]
    for extra in extras:
        found += [Requirement(line) for line in project()["optional-dependencies"][extra]]
    return found


def imported_names(folders: Iterable[str]) -> dict[str, set[str]]:
    """Top-level names of the absolute imports (also `pytest.importorskip("x")`) in the folders'
    Python files, each with the files that import it."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "importorskip" and node.args
                      and isinstance(node.args[0], ast.Constant)
                      and isinstance(node.args[0].value, str)):
                    names = [node.args[0].value]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], set()).add(
                        str(path.relative_to(REPO)))
    return found


def third_party(found: dict[str, set[str]]) -> dict[str, set[str]]:
    return {name: files for name, files in found.items()
            if name not in sys.stdlib_module_names and name not in FIRST_PARTY}


@cache
def installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(import_name: str) -> set[str]:
    """The distributions that provide `import_name` (installed), else the name itself (timm)."""
    return {normalize(d) for d in installed().get(import_name, [import_name])}


def undeclared(folders: Iterable[str], declared: list[Requirement]) -> list[str]:
    names = {normalize(r.name) for r in declared}
    return [f"{name} ({', '.join(sorted(distributions(name)))}; {', '.join(sorted(files))})"
            for name, files in sorted(third_party(imported_names(folders)).items())
            if not distributions(name) & names]


def test_every_runtime_import_is_declared() -> None:
    extras = sorted(project()["optional-dependencies"])
    missing = undeclared(["eczema_batch", "workers", "migrations"], requirements(*extras))
    assert not missing, f"not in pyproject.toml's dependencies (or an optional extra): {missing}"


def test_every_test_and_benchmark_import_is_declared() -> None:
    missing = undeclared(["tests", "bench"], requirements("test"))
    assert not missing, f"not in pyproject.toml's dependencies or its [test] extra: {missing}"


def test_the_import_scan_sees_the_known_imports() -> None:
    runtime = third_party(imported_names(["eczema_batch", "workers", "migrations"]))
    assert {"sqlalchemy", "PIL", "sklearn", "scipy", "huggingface_hub", "kombu"} <= set(runtime)
    assert "yaml" in third_party(imported_names(["tests"]))  # through pytest.importorskip
    assert distributions("PIL") == {"pillow"} and distributions("sklearn") == {"scikit-learn"}


@cache
def oldest_pins() -> dict[str, Requirement]:
    lines = (REPO / "constraints-oldest.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert len({normalize(p.name) for p in pins}) == len(pins), "a package is pinned twice"
    return {normalize(p.name): p for p in pins}


@pytest.mark.parametrize(
    "requirement",
    [pytest.param(r, id=r.name) for r in requirements(*sorted(
        set(project()["optional-dependencies"]) - UNTESTED_EXTRAS))],
)
def test_constraints_oldest_pins_the_floor(requirement: Requirement) -> None:
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: give it one floor (>=)"
    pin = oldest_pins().get(normalize(requirement.name))
    assert pin is not None, f"constraints-oldest.txt does not pin {requirement.name}"
    (spec,) = pin.specifier
    assert spec.operator == "==" and Version(spec.version) == Version(floors[0]), (
        f"constraints-oldest.txt pins {pin}, pyproject.toml's floor is {requirement}")


def test_constraints_oldest_pins_nothing_undeclared() -> None:
    declared = {normalize(r.name) for r in requirements(*sorted(
        set(project()["optional-dependencies"]) - UNTESTED_EXTRAS))}
    stale = sorted(set(oldest_pins()) - declared)
    assert not stale, f"constraints-oldest.txt pins what pyproject.toml does not declare: {stale}"

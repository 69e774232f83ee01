"""pyproject.toml declares every third-party package the code imports."""

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

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
#: The project's own import names (the worker package imports as `workers` or
#: `eczema_batch_workers`, from the folder workers/).
FIRST_PARTY = {"eczema_batch", "workers", "eczema_batch_workers", "tests", "bench", "migrations"}


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

"""The layering the code keeps, read from the import statements of every module (no imports run).

- `pipeline/` computes: it never imports the database layer (SQLAlchemy, the catalogue).
- `catalogue/` stores: it never imports torch or transformers.
- Nothing under `eczema_batch/` but the CLI imports Typer or rich; nothing imports Celery
  (workers live in `workers/`).
- No package imports another package's private (underscore) names.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "eczema_batch"


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in the file, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


MODULES = sorted(ROOT.rglob("*.py"))


def _violations(rule: str) -> list[str]:
    bad = []
    for path in MODULES:
        package = _package(path)
        for module, names, line in _imports(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
            if rule == "pipeline" and package == "pipeline" and (
                top == "sqlalchemy" or module.startswith("eczema_batch.catalogue")
            ):
                bad.append(where)
            if rule == "catalogue" and package == "catalogue" and top in {"torch", "transformers"}:
                bad.append(where)
            if rule == "ui" and package != "cli" and top in {"typer", "rich", "click"}:
                bad.append(where)
            if rule == "ui" and top == "celery":
                bad.append(where)
            if rule == "private" and module.startswith("eczema_batch."):
                target = module.split(".")[1]
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if target != package and private:
                    bad.append(f"{where}: {', '.join(private)}")
    return bad


@pytest.mark.parametrize("rule", ["pipeline", "catalogue", "ui", "private"])
def test_the_layers_import_only_what_they_may(rule: str) -> None:
    assert _violations(rule) == []


def test_the_scan_sees_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rules must be able to fail: a pipeline module that imports SQLAlchemy inside a function.
    fake = tmp_path / "eczema_batch"
    (fake / "pipeline").mkdir(parents=True)
    (fake / "pipeline" / "leak.py").write_text(
        "def f():\n    from sqlalchemy import select\n    return select\n", encoding="utf-8")
    (fake / "report").mkdir()
    (fake / "report" / "peek.py").write_text(
        "from eczema_batch.jobs.plan import _scope\nimport rich\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", sorted(fake.rglob("*.py")))
    assert _violations("pipeline") == ["eczema_batch/pipeline/leak.py:2 imports sqlalchemy"]
    assert _violations("ui") == ["eczema_batch/report/peek.py:2 imports rich"]
    assert _violations("private") == [
        "eczema_batch/report/peek.py:1 imports eczema_batch.jobs.plan: _scope"]

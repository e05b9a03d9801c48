"""The domain package stays below the orchestration layer.

``voiceprint`` is the domain code: stages, models, the CLI. ``tasks`` (what ``dvc.yaml`` runs and the
Prefect tasks) and ``flows`` (Prefect flows and deployments) sit on top of it and may import it,
never the other way round. So nothing under ``voiceprint/`` imports ``flows`` or ``tasks``, nor
Prefect or DVC themselves (DVC runs the stages from outside; Prefect runs DVC), and MLflow is the
business of ``voiceprint/tracking/`` alone. Imports inside functions count the same as top-level
ones, and so do ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "voiceprint"
#: Top-level packages no module of the domain package may import.
FORBIDDEN = ("flows", "tasks", "prefect", "dvc")
#: MLflow is allowed in this subpackage only (runs, registry, the pyfunc model).
MLFLOW_HOME = PACKAGE / "tracking"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module name)`` of every import in ``path``, at any nesting depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if name in ("import_module", "__import__") and literal:
                found.append((node.lineno, first.value))
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: imports {module}"


def test_the_scan_sees_the_package() -> None:
    modules = _modules()
    assert PACKAGE / "cli.py" in modules and PACKAGE / "stages.py" in modules
    assert len(modules) > 20
    # and it finds lazy imports inside functions (the CLI imports its stages that way)
    assert any(module == "voiceprint.stages" for _, module in _imports(PACKAGE / "cli.py"))


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_domain_package_does_not_import(forbidden: str) -> None:
    offenders = [
        _where(path, line, module)
        for path in _modules()
        for line, module in _imports(path)
        if _top(module) == forbidden
    ]
    assert offenders == [], f"voiceprint/ must not import {forbidden}:\n" + "\n".join(offenders)


def test_mlflow_is_imported_only_by_voiceprint_tracking() -> None:
    offenders = [
        _where(path, line, module)
        for path in _modules()
        if MLFLOW_HOME not in path.parents
        for line, module in _imports(path)
        if _top(module) == "mlflow"
    ]
    assert offenders == [], "MLflow belongs in voiceprint/tracking/:\n" + "\n".join(offenders)
    # ... where it is actually used, so the rule above is not vacuous
    assert any(_top(m) == "mlflow" for p in MLFLOW_HOME.rglob("*.py") for _, m in _imports(p))


def test_import_scanner_catches_every_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "import prefect.runtime as rt\n"
        "from tasks.run import main\n"
        "def f():\n"
        "    from flows import pipeline\n"
        "    import importlib\n"
        "    return importlib.import_module('dvc.repo'), __import__('mlflow')\n"
        "from . import sibling\n"
    )
    assert sorted(_imports(sample)) == [
        (1, "os"), (2, "prefect.runtime"), (3, "tasks.run"), (5, "flows"), (6, "importlib"),
        (7, "dvc.repo"), (7, "mlflow"),
    ]  # fmt: skip

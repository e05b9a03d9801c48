"""Module docstrings say what a module is for, in a few lines; design narratives live in docs/.

Every module under ``voiceprint/``, ``tasks/`` and ``flows/``, ``__init__.py`` included, has a
module docstring of at most :data:`MAX_LINES` lines (as ``ast.get_docstring`` counts them). The
reasons, trade-offs, measurements and exact rules behind a module go to docs/stages.md,
docs/reliability.md, docs/orchestration.md or docs/design/, and the docstring points there.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("voiceprint", "tasks", "flows")
#: The most lines a module docstring may have.
MAX_LINES = 12


def _modules() -> list[Path]:
    return sorted(
        path for package in PACKAGES for path in (REPO / package).rglob("*.py") if "__pycache__" not in path.parts
    )


def _docstring_lines(path: Path) -> int | None:
    """Lines of the module docstring of ``path``; None when it has none."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    doc = ast.get_docstring(tree)
    return None if doc is None else len(doc.splitlines())


def test_the_scan_sees_every_package() -> None:
    modules = _modules()
    for package in PACKAGES:
        assert REPO / package / "__init__.py" in modules, package
    assert REPO / "voiceprint" / "evaluate" / "trials.py" in modules
    assert len(modules) > 40


def test_every_module_has_a_short_docstring() -> None:
    offenders = []
    for path in _modules():
        lines = _docstring_lines(path)
        name = path.relative_to(REPO).as_posix()
        if lines is None:
            offenders.append(f"{name}: no module docstring")
        elif lines > MAX_LINES:
            offenders.append(f"{name}: {lines} lines")
    assert offenders == [], (
        f"module docstrings must exist and have at most {MAX_LINES} lines (say what the module is for; "
        "move the design narrative to docs/ and point to it):\n" + "\n".join(offenders)
    )

"""``dvc.yaml`` deps cover every project file a stage's code imports.

A stage whose deps miss a module it runs is not rerun when that module changes, and ``dvc.lock``
then vouches for outputs the current code would not produce. For each stage (the ``foreach``
compare-encoder stage included) the import closure inside the project (``voiceprint/``,
``tasks/``) is computed from the stage's entry points: ``tasks/run.py`` (every ``cmd`` is
``python -m tasks.run STAGE [ITEM]``), ``voiceprint/stages.py`` and the module
``voiceprint.stages.STAGES[STAGE]`` names. The closure follows every ``import`` and
``from ... import`` anywhere in a module's syntax tree (inside functions too, relative imports
resolved), ``importlib.import_module("literal")`` / ``__import__("literal")`` calls, and the
``__init__.py`` of every package on the way (importing ``a.b.c`` runs ``a/__init__.py`` and
``a/b/__init__.py``), as Python would. ``STAGES`` itself holds module names as strings, which the
syntax tree does not follow: each stage reaches only its own module through it.

Every reached file must lie under a dep (a folder dep covers everything below it), and every dep
must exist in the checkout or be an output of some stage.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: Top-level packages of this project (anything else is a third-party or standard-library import).
PROJECT_PACKAGES = ("voiceprint", "tasks")
#: What every stage's command runs before its own module.
COMMON_ENTRIES = ("tasks.run", "voiceprint.stages")


# -------------------------------------------------------------------------------- import closure


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file that defines module ``name`` inside the project (``a/b.py`` or ``a/b/__init__.py``)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def files_of_import(name: str, root: Path = REPO) -> list[Path]:
    """Files executed by ``import name``: each parent package's ``__init__.py``, then the module."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:i]), root)
        if found is not None:
            files.append(found)
    return files


def module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str | None, level: int, current: str, is_package: bool) -> str | None:
    """Absolute name of ``from <level dots><module> import ...`` written in module ``current``."""
    if level == 0:
        return module
    package = current if is_package else current.rpartition(".")[0]
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None  # beyond the top-level package: Python raises ImportError
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base) or None


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_names(path: Path, root: Path = REPO) -> set[str]:
    """Every module name ``path`` may import: ``import``, ``from ... import`` (each imported name
    that is a submodule too), and ``importlib.import_module`` / ``__import__`` with literal names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    current = module_name(path, root)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, current, is_package)
            if base is None:
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if called not in ("import_module", "__import__") or not node.args:
                continue
            target = _literal(node.args[0])
            if target is None:
                continue  # a computed name (voiceprint.stages.STAGES): the caller adds what it reaches
            if called == "import_module" and target.startswith("."):
                package = (
                    _literal(node.args[1])
                    if len(node.args) > 1
                    else next((_literal(k.value) for k in node.keywords if k.arg == "package"), None)
                )
                if package is None:
                    continue
                level = len(target) - len(target.lstrip("."))
                target = _resolve_relative(target.lstrip(".") or None, level, package, True) or ""
            if target:
                names.add(target)
    return names


def import_closure(entries: Iterable[str], root: Path = REPO) -> dict[Path, str]:
    """Project files reached from the ``entries`` modules -> the import chain that reached each."""
    reached: dict[Path, str] = {}
    queue: list[tuple[str, str]] = [(name, name) for name in entries]
    while queue:
        name, chain = queue.pop()
        for file in files_of_import(name, root):
            if file in reached:
                continue
            reached[file] = chain
            for imported in sorted(imported_names(file, root)):
                if imported.split(".")[0] in PROJECT_PACKAGES:
                    # `from a.b import name`: name the module in the chain, not the attribute
                    shown = imported if module_file(imported, root) else imported.rpartition(".")[0]
                    queue.append((imported, f"{chain} -> {shown or imported}"))
    return reached


# -------------------------------------------------------------------------------- dvc.yaml


def _stage_modules() -> dict[str, str]:
    from voiceprint.stages import STAGES

    return dict(STAGES)


def _foreach_items(foreach: Any) -> list[str]:
    """Items of a ``foreach``: a literal list/mapping, or ``${compare.encoders}`` from the schema's
    defaults (tests never read the checkout's params.yaml)."""
    if isinstance(foreach, Mapping):
        return [str(k) for k in foreach]
    if isinstance(foreach, list):
        return [str(v) for v in foreach]
    match = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", str(foreach))
    assert match, f"unsupported foreach {foreach!r}"
    from voiceprint.config import Params

    node: Any = Params().model_dump(mode="json")
    for part in match.group(1).split("."):
        node = node[part]
    return [str(k) for k in (node if isinstance(node, Mapping) else node)]


def dvc_stages(dvc_yaml: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Stage name -> definition; a ``foreach`` stage is expanded to ``name@item`` like DVC does."""
    out: dict[str, dict[str, Any]] = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for item in _foreach_items(stage["foreach"]):
            text = yaml.safe_dump(stage["do"]).replace("${key}", item).replace("${item}", item)
            out[f"{name}@{item}"] = yaml.safe_load(text)
    return out


def _dep_path(dep: Any) -> str:
    return next(iter(dep)) if isinstance(dep, Mapping) else str(dep)


def _out_paths(stages: Mapping[str, Mapping[str, Any]]) -> set[str]:
    paths = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            paths.update(_dep_path(o).rstrip("/") for o in stage.get(kind, []) or [])
    return paths


def _covered(rel: str, deps: Iterable[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def stage_entries(stage: Mapping[str, Any], modules: Mapping[str, str]) -> tuple[str, list[str]]:
    """(the tasks.run stage name, the entry modules) from a stage's ``cmd``."""
    argv = shlex.split(stage["cmd"])
    assert argv[:3] == ["python", "-m", "tasks.run"] and len(argv) >= 4, f"unexpected cmd {stage['cmd']!r}"
    name = argv[3]
    assert name in modules, f"cmd {stage['cmd']!r} runs {name!r}, not a stage of voiceprint.stages.STAGES"
    return name, [*COMMON_ENTRIES, modules[name]]


def dep_problems(dvc_yaml: Mapping[str, Any], root: Path = REPO) -> list[str]:
    """Every reached file without a dep, and every dep that neither exists nor is a stage output."""
    modules = _stage_modules()
    stages = dvc_stages(dvc_yaml)
    outs = _out_paths(stages)
    problems: list[str] = []
    for name, stage in stages.items():
        deps = [_dep_path(d).rstrip("/") for d in stage.get("deps", []) or []]
        for dep in deps:
            produced = _covered(dep, outs) or any(o.startswith(dep + "/") for o in outs)
            if not (root / dep).exists() and not produced:
                problems.append(f"{name}: dep {dep} does not exist (and no stage produces it)")
        _, entries = stage_entries(stage, modules)
        reached = import_closure(entries, root)
        missing = {
            file.relative_to(root).as_posix(): chain
            for file, chain in reached.items()
            if not _covered(file.relative_to(root).as_posix(), deps)
        }
        for rel in sorted(missing):
            problems.append(f"{name}: {rel} not covered by a dep (imported via {missing[rel]})")
    return problems


# -------------------------------------------------------------------------------- tests


def test_dvc_yaml_deps_cover_each_stages_import_closure() -> None:
    problems = dep_problems(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert not problems, "dvc.yaml deps are incomplete:\n  " + "\n  ".join(problems)


def test_every_stage_runner_stage_is_in_dvc_yaml() -> None:
    stages = dvc_stages(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    modules = _stage_modules()
    run = {stage_entries(s, modules)[0] for s in stages.values()}
    assert run == set(modules), f"stages without a dvc.yaml stage: {sorted(set(modules) - run)}"


def test_closure_follows_every_import_form(tmp_path: Path) -> None:
    """The walker itself: nested and relative imports, submodules named in ``from``, literal
    ``import_module``, package ``__init__`` files; computed names and third-party modules ignored."""
    files = {
        "voiceprint/__init__.py": "",
        "voiceprint/a/__init__.py": "",
        "voiceprint/a/stage.py": (
            "import os\nfrom . import helper\nfrom ..b import thing\n"
            "def f():\n    from voiceprint.c import deep\n    import importlib\n"
            "    importlib.import_module('voiceprint.d')\n    importlib.import_module(os.environ['X'])\n"
        ),
        "voiceprint/a/helper.py": "from .sibling import x\n",
        "voiceprint/a/sibling.py": "x = 1\n",
        "voiceprint/b.py": "thing = 1\n",
        "voiceprint/c/__init__.py": "",
        "voiceprint/c/deep.py": "import numpy\n",
        "voiceprint/d.py": "",
        "voiceprint/unused.py": "",
        "tasks/__init__.py": "",
        "tasks/run.py": "from voiceprint import b\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    reached = {
        p.relative_to(tmp_path).as_posix() for p in import_closure(["tasks.run", "voiceprint.a.stage"], tmp_path)
    }
    assert reached == set(files) - {"voiceprint/unused.py"}


def test_a_missing_dep_is_reported() -> None:
    """Dropping the encoders folder from the embed stage must fail, naming the stage and the file;
    a dep that does not exist must fail too."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    embed = dvc_yaml["stages"]["embed"]
    embed["deps"] = [d for d in embed["deps"] if not str(d).startswith("voiceprint/encoders")]
    embed["deps"].append("voiceprint/no_such_module.py")
    problems = dep_problems(dvc_yaml)
    assert any(p.startswith("embed: voiceprint/encoders/ecapa.py not covered") for p in problems), problems
    assert "embed: dep voiceprint/no_such_module.py does not exist (and no stage produces it)" in problems
    assert not [p for p in problems if not p.startswith("embed: ")], problems


@pytest.mark.parametrize("stage", ["prepare", "model", "embed", "index", "evaluate", "compare"])
def test_closure_reaches_the_stage_module_and_not_other_stages(stage: str) -> None:
    modules = _stage_modules()
    reached = {p.relative_to(REPO).as_posix() for p in import_closure([*COMMON_ENTRIES, modules[stage]])}
    assert module_file(modules[stage]).relative_to(REPO).as_posix() in reached
    assert {"tasks/run.py", "voiceprint/stages.py", "voiceprint/__init__.py"} <= reached

"""The tests do not depend on the checkout's own settings or outputs.

``params.yaml`` is the user's file (the Prefect flows even rewrite it), and ``dvc.lock``,
``metrics.json``, ``data/``, ``models/`` are whatever the user's last run left behind. A test that
reads any of them passes or fails with the user's choices: set ``index.type: hnsw`` and a test
that copied params.yaml sees hnsw. So tests build what they need (``write_params`` in
tests/conftest.py writes the schema defaults plus explicit overrides) and copy only code
(``dvc.yaml``, ``voiceprint/``).

* :func:`test_no_test_reads_the_checkouts_live_files` is a cheap static check over tests/**.py;
* the slow tests copy the repository's files (as git lists them) to a temporary directory, put a
  user's params.yaml (valid, every headline choice changed), dvc.lock and metrics.json there, and
  run the tests that set up pipeline projects in that copy: they must pass unchanged.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

#: Files and folders of the checkout that hold user settings or pipeline outputs.
LIVE = {
    "params.yaml",
    "dvc.lock",
    "metrics.json",
    "compare.md",
    "compare.json",
    "data",
    "models",
    "plots",
    "mlflow.db",
    "mlartifacts",
    "mlruns",
    "enrollments",
}
#: How tests spell the checkout's root.
ROOT_SPELLINGS = ("REPO", "ROOT", "repo_root", "__file__", "parents[")

#: The tests that set up pipeline projects (params.yaml, DVC projects, small real runs), run in the
#: copy with ``-m 'not slow'``.
PROJECT_SETUP_TESTS = (
    "tests/test_prefect_tasks.py",
    "tests/test_pipeline_cli.py",
    "tests/test_config.py",
    "tests/test_moe.py::test_moe_with_a_pretrained_source_is_a_config_error",
    "tests/reliability/test_concurrency.py",
    "tests/reliability/test_crash_resume.py::test_prepare_survives_sigkill_during_extraction_and_verification",
)
#: The served-deployment tests (stand-in stages, then the real dvc.yaml on a small subset); marked
#: slow in their file, so run on their own, without ``-m 'not slow'``.
DEPLOYMENT_TESTS = "tests/test_prefect_deployment.py"

#: A user's choices: valid, and different from the defaults wherever a test could notice.
USER_CHOICES: dict[str, Any] = {
    "data.max_speakers": 2,
    "data.max_utterances_per_speaker": 3,
    "vad.threshold": 0.6,
    "vad.min_segment_s": 0.8,
    "model.init": "pretrained",
    "embed.utterance": "segments",
    "index.type": "hnsw",
    "index.nlist": 8,
    "evaluate.bootstrap": 0,
    "evaluate.snorm_top_k": 0,
    "evaluate.enroll_per_speaker": 1,
    "compare.encoders": {"mine": "ecapa"},
}


# ------------------------------------------------------------------------------- static check


def _live_reads(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: expression`` for each ``<checkout root> / "<live file>"`` and each cwd-relative
    ``open("params.yaml")``-style call in ``path`` (strings inside strings, e.g. scripts a test
    writes into its own project, are not code and are not looked at)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant)
            and node.right.value in LIVE
            and any(s in ast.unparse(node.left) for s in ROOT_SPELLINGS)
        ):
            hits.append(node)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"open", "Path", "load_params"} and node.args[0].value in LIVE:
                hits.append(node)
    return [f"{path.relative_to(root)}:{n.lineno}: {ast.unparse(n)}" for n in hits]


def test_no_test_reads_the_checkouts_live_files() -> None:
    tests = sorted(p for p in (REPO / "tests").rglob("*.py") if "__pycache__" not in p.parts)
    assert REPO / "tests" / "conftest.py" in tests
    offenders = [hit for path in tests for hit in _live_reads(path)]
    assert offenders == [], (
        "tests must not read the checkout's params.yaml, dvc.lock or outputs (write them in tmp_path, "
        "e.g. with the params_writer fixture):\n" + "\n".join(offenders)
    )


def test_static_check_sees_the_usual_spellings(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "shutil.copy(REPO / 'params.yaml', tmp / 'params.yaml')\n"
        "raw = yaml.safe_load((repo_root / 'params.yaml').read_text())\n"
        "P = Path(__file__).resolve().parents[1] / 'dvc.lock'\n"
        "m = json.load(open('metrics.json'))\n"
        "fine = tmp_path / 'params.yaml'\n"
        "also_fine = layout.root / 'params.yaml'\n"
        "script = \"p = yaml.safe_load(open('params.yaml'))\"\n"
    )
    assert sorted(int(hit.split(":")[1]) for hit in _live_reads(sample, tmp_path)) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- the copy


def repository_files(repo: Path = REPO) -> list[str]:
    """The repository's files as git sees them: tracked, plus new files that are not ignored."""
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout: nothing to copy the repository's files from")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (repo / f).is_file()})


def copy_repository(dest: Path, repo: Path = REPO) -> Path:
    for name in repository_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    return dest


def user_params() -> str:
    """A user's params.yaml: every key the schema knows, the headline choices changed."""
    from voiceprint.config import Params, params_from_dict, set_dotted

    raw = Params().model_dump(mode="json")
    for key, value in USER_CHOICES.items():
        set_dotted(raw, key, value)
    params_from_dict(raw, "the user's params.yaml of test_hermetic")  # valid, or this test is wrong
    return "# my own settings\n" + yaml.safe_dump(raw, sort_keys=False)


def make_users_checkout(dest: Path, replace: dict[str, str] | None = None) -> Path:
    """The repository's files in ``dest``, with a user's params.yaml, dvc.lock and outputs.

    ``replace`` maps repository paths to other contents (to check this test against old tests).
    """
    copy_repository(dest)
    (dest / "params.yaml").write_text(user_params())
    (dest / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "index": {
                        "cmd": "python -m tasks.run index",
                        "params": {"params.yaml": {"index": {"type": "hnsw"}}},
                    },
                },
            }
        )
    )
    (dest / "metrics.json").write_text(json.dumps({"eer": 0.5, "top1": 0.0, "n_trials": 1}))
    for name, text in (replace or {}).items():
        (dest / name).write_text(text)
    return dest


def run_pytest(
    checkout: Path, args: list[str], excerpts: Path, timeout_s: float = 1500
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in ``checkout``, importing that copy's packages, not this checkout's."""
    env = {k: v for k, v in os.environ.items() if k not in ("VOICEPRINT_PROJECT_DIR", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["VOICEPRINT_EXCERPTS"] = str(excerpts)  # the copy's ../shared does not exist
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import voiceprint, flows, tasks; print(voiceprint.__file__, flows.__file__, tasks.__file__)",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(checkout) for p in where), where
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _report(proc: subprocess.CompletedProcess[str], lines: int = 80) -> str:
    tail = (proc.stdout + proc.stderr).splitlines()[-lines:]
    return f"pytest in the user's checkout exited with {proc.returncode}:\n" + "\n".join(tail)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_project_setup_tests_pass_with_a_users_settings(tmp_path: Path, excerpts_dir: Path) -> None:
    checkout = make_users_checkout(tmp_path / "checkout")
    proc = run_pytest(checkout, ["-m", "not slow", *PROJECT_SETUP_TESTS], excerpts_dir)
    assert proc.returncode == 0, _report(proc)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_served_deployment_tests_pass_with_a_users_settings(tmp_path: Path, excerpts_dir: Path) -> None:
    checkout = make_users_checkout(tmp_path / "checkout")
    proc = run_pytest(checkout, [DEPLOYMENT_TESTS], excerpts_dir, timeout_s=2200)
    assert proc.returncode == 0, _report(proc)

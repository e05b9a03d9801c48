"""Shared fixtures: real LibriSpeech excerpts from ../shared (referenced, never copied into git).

Tests never read the checkout's own ``params.yaml`` (the user's settings), ``dvc.lock`` or outputs:
a project a test needs gets a ``params.yaml`` written from the schema defaults
(``voiceprint.config.Params``) plus the test's explicit overrides (:func:`write_params`), so a user
who sets ``index.type: hnsw`` in their checkout sees the same test results (tests/test_hermetic.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCERPTS = Path(
    os.environ.get("VOICEPRINT_EXCERPTS", REPO.parent / "shared" / "datasets" / "librispeech-excerpts")
).resolve()


def default_params(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema's default parameters as a ``params.yaml`` mapping, with dotted ``overrides`` applied."""
    from voiceprint.config import Params, set_dotted

    raw = Params().model_dump(mode="json")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw


def write_params(root: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write ``root/params.yaml``: every parameter at its default, except the dotted ``overrides``."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(default_params(overrides), sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout, for its tracked source files only (never its params.yaml, dvc.lock or outputs)."""
    return REPO


@pytest.fixture(scope="session")
def params_writer() -> Callable[..., Path]:
    """:func:`write_params`, for test modules: ``params_writer(root, {"index.type": "hnsw"})``."""
    return write_params


@pytest.fixture(scope="session")
def excerpts_dir() -> Path:
    if not (EXCERPTS / "MANIFEST.sha256").exists():
        pytest.fail(f"LibriSpeech excerpts not found at {EXCERPTS} (set VOICEPRINT_EXCERPTS)")
    return EXCERPTS


@pytest.fixture(scope="session")
def test_other_files(excerpts_dir: Path) -> list[Path]:
    return sorted((excerpts_dir / "test-other").glob("*/*.flac"))


@pytest.fixture(scope="session")
def small_project(tmp_path_factory, excerpts_dir: Path):
    """A project with the five stages up to ``index`` run on a small real subset (~10 s)."""
    from voiceprint.common.layout import Layout
    from voiceprint.stages import run_stage

    root = tmp_path_factory.mktemp("project")
    write_params(
        root,
        {
            "data.mirror": str(excerpts_dir.parent),
            "data.max_speakers": 4,
            "data.max_utterances_per_speaker": 5,
            "model.channels": 32,
            "model.steps": 30,
            "model.batch_size": 8,
            "evaluate.enroll_per_speaker": 2,
        },
    )
    for stage in ["prepare", "segment", "model", "embed", "index"]:
        run_stage(stage, root)
    return Layout.at(root)

"""Shared fixtures: real LibriSpeech excerpts from ../shared (referenced, never copied into git)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXCERPTS = Path(
    os.environ.get("VOICEPRINT_EXCERPTS", REPO.parent / "shared" / "datasets" / "librispeech-excerpts")
).resolve()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


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
    import yaml

    from tasks.stages import run_stage
    from voiceprint.config import set_dotted
    from voiceprint.layout import Layout

    root = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {
        "data.mirror": str(excerpts_dir.parent),
        "data.max_speakers": 4,
        "data.max_utterances_per_speaker": 5,
        "model.channels": 32,
        "model.steps": 30,
        "model.batch_size": 8,
        "evaluate.enroll_per_speaker": 2,
    }.items():
        set_dotted(raw, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in ["prepare", "segment", "model", "embed", "index"]:
        run_stage(stage, root)
    return Layout.at(root)

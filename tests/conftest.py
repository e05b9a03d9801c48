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

"""Atomic writers: outputs get ordinary permissions, and a failed write leaves the old file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from voiceprint.common import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_dirs_follow_the_umask_not_mkstemp(tmp_path: Path, umask_022) -> None:
    atomic.write_text(tmp_path / "a.json", "{}")
    with atomic.atomic_dir(tmp_path / "index") as tmp:
        (tmp / "x").write_text("1")
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "index") == 0o755


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

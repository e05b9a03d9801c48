"""A bad ``params.yaml`` is reported before any work starts, on one line, naming the key and the
allowed values: by :func:`load_params` and by both stage entry points (``python -m tasks.run`` as
DVC runs it, and ``voiceprint stage``), which exit non-zero without a traceback and without
creating or changing anything in the project.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from voiceprint.config import ConfigError, load_params

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
SECTIONS = "compare, compute, data, embed, evaluate, index, model, vad"
VAD_KEYS = "max_segment_s, method, min_segment_s, min_silence_s, min_speech_s, pad_s, threshold"

#: params.yaml text -> fragments the one-line message must contain (key, reason, allowed values).
BAD_PARAMS: dict[str, tuple[str, list[str]]] = {
    "unknown-key": ("vad:\n  treshold: 0.4\n", ["vad.treshold: unknown key", f"(allowed: {VAD_KEYS})"]),
    "unknown-section": ("modle:\n  steps: 3\n", ["modle: unknown key", f"(allowed: {SECTIONS})"]),
    "wrong-type": ("model:\n  steps: many\n", ["model.steps: Input should be a valid integer", "got 'many'"]),
    "wrong-choice": ("index:\n  type: annoy\n", ["index.type: Input should be 'flat', 'ivf' or 'hnsw'", "got 'annoy'"]),
    "wrong-dataset": (
        "data:\n  dataset: librivox\n",
        [
            "data.dataset: Input should be 'librispeech-excerpts', 'librispeech', 'folder', 'voxceleb' or 'speech-commands'",
            "got 'librivox'",
        ],
    ),
    "out-of-range": ("vad:\n  threshold: 1.5\n", ["vad.threshold: Input should be less than 1", "got 1.5"]),
    "section-not-a-mapping": ("vad: 3\n", ["vad: Input should be a valid dictionary", "got 3"]),
    "folder-without-path": ("data:\n  dataset: folder\n", ["data.path is required when data.dataset is 'folder'"]),
    "folder-path-null": ("data:\n  dataset: folder\n  path: null\n", ["data.path is required"]),
    "folder-path-missing": (
        "data:\n  dataset: folder\n  path: no/such/speakers\n",
        ["data.path: ", "no/such/speakers does not exist", "relative paths are resolved against"],
    ),
    "folder-path-is-a-file": ("data:\n  dataset: folder\n  path: params.yaml\n", ["data.path: ", "is not a directory"]),
    "two-mistakes": (
        "vad:\n  treshold: 0.4\nmodel:\n  steps: many\n",
        ["vad.treshold: unknown key", "; model.steps: Input should be a valid integer"],
    ),
    "not-yaml": ("vad: [0.5\n", ["not valid YAML"]),
    "speeds-without-1.0": (
        "model:\n  augment:\n    speeds: [0.9, 1.1]\n",
        ["model.augment.speeds [0.9, 1.1] must be distinct, sorted", "include 1.0"],
    ),
    "speeds-unsorted": (
        "model:\n  augment:\n    speeds: [1.0, 0.9]\n",
        ["model.augment.speeds [1.0, 0.9] must be distinct, sorted"],
    ),
    "flat-model-key": ("model:\n  aam_margin: 0.2\n", ["model.aam_margin: unknown key (renamed: model.aam.margin)"]),
}


def _write_project(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(text)
    return root


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# -- load_params -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_name_the_key_and_allowed_values_on_one_line(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_PARAMS[case]
    root = _write_project(tmp_path / "project", text)
    with pytest.raises(ConfigError) as err:
        load_params(root / "params.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(root / "params.yaml") + ": ")
    for fragment in fragments:
        assert fragment in message, message


def test_relative_dataset_path_is_resolved_against_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The positive control of the path check: an existing folder passes, whatever the cwd."""
    root = _write_project(tmp_path / "project", "data:\n  dataset: folder\n  path: voices\n")
    (root / "voices").mkdir()
    monkeypatch.chdir(tmp_path)  # 'voices' does not exist relative to the cwd
    assert load_params(root / "params.yaml").data.path == "voices"


def test_overrides_are_checked_like_the_file(tmp_path: Path) -> None:
    root = _write_project(tmp_path / "project", "{}\n")
    with pytest.raises(ConfigError, match=r"data\.path: .*/gone does not exist"):
        load_params(root / "params.yaml", {"data.dataset": "folder", "data.path": str(tmp_path / "gone")})


# -- the stage entry points --------------------------------------------------------------------------


def _voiceprint() -> list[str]:
    script = Path(sys.executable).with_name("voiceprint")
    return [str(script)] if script.exists() else [sys.executable, "-m", "voiceprint.cli"]


ENTRY_POINTS = {
    "tasks.run": lambda root: [sys.executable, "-m", "tasks.run", "prepare"],
    "voiceprint-stage": lambda root: [*_voiceprint(), "--project", str(root), "stage", "prepare"],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", ["unknown-key", "wrong-type", "folder-path-missing"])
def test_stage_commands_refuse_bad_params_before_any_work(tmp_path: Path, entry: str, case: str) -> None:
    text, fragments = BAD_PARAMS[case]
    root = _write_project(tmp_path / "project", text)
    before = _tree(root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(ENTRY_POINTS[entry](root), cwd=root, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("voiceprint: error: " if entry == "voiceprint-stage" else "error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert _tree(root) == before  # no data/, no lock file, nothing

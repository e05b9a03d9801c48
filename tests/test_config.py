"""params.yaml loads and overrides apply; the error cases live in tests/reliability/test_config_errors.py."""

from pathlib import Path

from voiceprint.config import load_params


def test_repo_params_are_valid(repo_root: Path):
    params = load_params(repo_root / "params.yaml")
    assert params.data.dataset == "librispeech-excerpts"
    assert params.index.type == "flat"


def test_overrides_use_dotted_keys(repo_root: Path):
    params = load_params(repo_root / "params.yaml", {"index.type": "hnsw", "data.max_speakers": 2})
    assert params.index.type == "hnsw" and params.data.max_speakers == 2

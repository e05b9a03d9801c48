from pathlib import Path

import pytest

from voiceprint.config import ConfigError, load_params


def test_repo_params_are_valid(repo_root: Path):
    params = load_params(repo_root / "params.yaml")
    assert params.data.dataset == "librispeech-excerpts"
    assert params.index.type == "flat"


def test_unknown_key_names_key_and_allowed(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("vad:\n  treshold: 0.4\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    text = str(err.value)
    assert "vad.treshold" in text and "threshold" in text and "allowed" in text


def test_wrong_literal_lists_choices(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("index:\n  type: annoy\n")
    with pytest.raises(ConfigError, match=r"index\.type.*'flat'.*'ivf'.*'hnsw'.*annoy"):
        load_params(p)


def test_wrong_type_and_folder_without_path(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  steps: many\ndata:\n  dataset: folder\n")
    with pytest.raises(ConfigError) as err:
        load_params(p)
    assert "model.steps" in str(err.value) and "data.path is required" in str(err.value)


def test_overrides_use_dotted_keys(repo_root: Path):
    params = load_params(repo_root / "params.yaml", {"index.type": "hnsw", "data.max_speakers": 2})
    assert params.index.type == "hnsw" and params.data.max_speakers == 2

"""params.yaml loads and overrides apply; the error cases live in tests/reliability/test_config_errors.py.

The files are written here (schema defaults): the checkout's params.yaml holds the user's choices.
"""

from pathlib import Path

from voiceprint.config import Params, load_params


def test_default_params_file_is_valid(params_writer, tmp_path: Path):
    params = load_params(params_writer(tmp_path))
    assert params == Params()
    assert params.data.dataset == "librispeech-excerpts"
    assert params.index.type == "flat"


def test_overrides_use_dotted_keys(params_writer, tmp_path: Path):
    params = load_params(params_writer(tmp_path), {"index.type": "hnsw", "data.max_speakers": 2})
    assert params.index.type == "hnsw" and params.data.max_speakers == 2

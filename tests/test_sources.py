"""Several dataset sources in one manifest: Speech Commands' speaker-disjoint split, a mixed
training source list, and a speaker shared by two sources counted once (real files, real digests)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import EXCERPTS, write_params
from voiceprint.common.layout import Layout
from voiceprint.config import ConfigError, load_params
from voiceprint.prepare.speech_commands import split_speakers, word_of
from voiceprint.prepare.stage import prepare

SPEECH_COMMANDS = EXCERPTS.parent / "speech-commands-test"


@pytest.fixture(scope="module")
def speech_commands_dir() -> Path:
    if not (SPEECH_COMMANDS / "MANIFEST.sha256").exists():
        pytest.fail(f"Speech Commands not found at {SPEECH_COMMANDS}")
    return SPEECH_COMMANDS


def _manifest(root: Path) -> list[dict]:
    return pq.read_table(Layout(root).manifest).to_pylist()


def _prepare(root: Path, overrides: dict) -> list[dict]:
    write_params(root, {"data.mirror": str(EXCERPTS.parent), **overrides})
    params = load_params(root / "params.yaml")
    prepare(params.data, Layout(root), progress=False)
    return _manifest(root)


def test_split_rule_is_disjoint_halves_fixed_by_the_ids(speech_commands_dir: Path) -> None:
    speakers = sorted(p.name for p in speech_commands_dir.iterdir() if p.is_dir())
    split = split_speakers(speakers)
    assert set(split) == set(speakers) and len(speakers) == 218
    eval_speakers = {s for s, side in split.items() if side == "eval"}
    assert len(eval_speakers) == math.ceil(len(speakers) / 2) == 109
    # the rule depends on the ids only: any order of the input gives the same halves
    assert split_speakers(reversed(speakers)) == split
    assert word_of("backward_0c540988_0") == "backward"


def test_speech_commands_source_has_no_speaker_on_both_sides(tmp_path: Path, speech_commands_dir: Path) -> None:
    rows = _prepare(
        tmp_path,
        {"data.sources": {"speech-commands": {"dataset": "speech-commands"}}, "data.train_subset": None},
    )
    commands = [r for r in rows if r["source"] == "speech-commands"]
    assert len(commands) == 4318  # every clip verified against MANIFEST.sha256, none rejected
    train = {r["speaker_id"] for r in commands if r["split"] == "train"}
    evaluated = {r["speaker_id"] for r in commands if r["split"] == "eval"}
    assert not train & evaluated and len(evaluated) == 109 and len(train) == 109
    assert {r["source"] for r in rows if r["split"] == "eval"} == {"librispeech", "speech-commands"}
    # the eval half is the one the rule names, whatever else is in the project
    expected = split_speakers(r["speaker_id"] for r in commands)
    assert all(expected[r["speaker_id"]] == r["split"] for r in commands)


def test_train_lists_the_sources_whose_train_split_is_kept(tmp_path: Path, speech_commands_dir: Path) -> None:
    sources = {"speech-commands": {"dataset": "speech-commands", "max_speakers": 3, "max_utterances_per_speaker": 2}}
    caps = {"data.max_speakers": 3, "data.max_utterances_per_speaker": 1, "data.sources": sources}
    both = _prepare(tmp_path / "both", caps)
    by = {(r["source"], r["split"]) for r in both}
    assert by == {
        ("librispeech", "train"),
        ("librispeech", "eval"),
        ("speech-commands", "train"),
        ("speech-commands", "eval"),
    }

    only_commands = _prepare(tmp_path / "commands", {**caps, "data.train": ["speech-commands"]})
    kept = {(r["source"], r["split"]) for r in only_commands}
    assert kept == {("librispeech", "eval"), ("speech-commands", "train"), ("speech-commands", "eval")}
    # the eval sets do not change with the training sources
    evals = sorted(r["utterance_id"] for r in both if r["split"] == "eval")
    assert evals == sorted(r["utterance_id"] for r in only_commands if r["split"] == "eval")


def test_a_speaker_in_two_sources_is_one_speaker(tmp_path: Path, excerpts_dir: Path) -> None:
    # The same LibriSpeech speaker as a folder source's train speaker and in the primary's eval split:
    # one speaker id, so its training files are rejected rather than training on an eval speaker.
    speaker = sorted(p.name for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())[0]
    folder = tmp_path / "mine"
    (folder / "train" / speaker).mkdir(parents=True)
    (folder / "test" / "other").mkdir(parents=True)
    files = sorted((excerpts_dir / "test-other" / speaker).glob("*.flac"))
    for f in files[:2]:
        (folder / "train" / speaker / f"copy-{f.name}").symlink_to(f)
    (folder / "test" / "other" / "x.flac").symlink_to(files[2])
    rows = _prepare(
        tmp_path / "p",
        {
            "data.train_subset": None,
            "data.max_speakers": 2,
            "data.sources": {"mine": {"dataset": "folder", "path": str(folder)}},
        },
    )
    assert speaker in {r["speaker_id"] for r in rows if r["split"] == "eval" and r["source"] == "librispeech"}
    assert not [r for r in rows if r["split"] == "train"]
    rejects = pq.read_table(Layout(tmp_path / "p").rejects("prepare")).to_pylist()
    assert len(rejects) == 2 and all(f"speaker {speaker!r} is also in the eval split" in r["reason"] for r in rejects)


def test_unknown_names_are_config_errors(tmp_path: Path) -> None:
    write_params(tmp_path, {"data.train": ["nope"]})
    with pytest.raises(ConfigError, match=r"data.train names unknown source\(s\) \['nope'\]"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"evaluate.sets": {"test-other": None}})
    with pytest.raises(ConfigError, match=r"evaluate.sets names unknown source\(s\) \['test-other'\]"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"data.sources": {"librispeech": {"dataset": "speech-commands"}}})
    with pytest.raises(ConfigError, match="the primary source's name"):
        load_params(tmp_path / "params.yaml")

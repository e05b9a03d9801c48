"""model.balance: batches shared out by speakers (each once per pass) or by sources (each the same
share of a pass), on real two-source training data and on the queue itself."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.test_sources import SPEECH_COMMANDS, _prepare
from voiceprint.common.layout import Layout
from voiceprint.config import ModelParams
from voiceprint.training.data import SpeakerQueue, TrainingData, load_training_data
from voiceprint.training.objectives import balance_groups


def test_source_balanced_pass_gives_each_source_the_same_share():
    groups = [list(range(0, 10)), list(range(10, 13))]  # a source of 10 speakers and one of 3
    queue = SpeakerQueue(13, np.random.default_rng(0), groups)
    one_pass = queue.take(20)
    counts = Counter(one_pass)
    assert sum(counts[s] for s in groups[0]) == sum(counts[s] for s in groups[1]) == 10
    assert all(counts[s] == 1 for s in groups[0])  # the larger source: every speaker once
    assert sorted(counts[s] for s in groups[1]) == [3, 3, 4]  # the smaller one: cycled, as evenly as can be
    # interleaved one per source: every adjacent pair of the pass holds one speaker of each
    assert all({a < 10, b < 10} == {True, False} for a, b in zip(one_pass[::2], one_pass[1::2], strict=True))
    assert queue.pending == [] and len(queue.take(7)) == 7 and len(queue.pending) == 13


def test_speaker_balance_is_the_plain_permutation_it_always_was():
    """The default must draw exactly what it drew before sources existed: seeded runs stay bit-identical."""
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    plain = SpeakerQueue(7, rng_a).take(20)
    expected = [*rng_b.permutation(7).tolist(), *rng_b.permutation(7).tolist(), *rng_b.permutation(7).tolist()][:20]
    assert plain == expected
    # one source only: nothing to balance, the same draws
    assert SpeakerQueue(7, np.random.default_rng(5), [list(range(7))]).take(20) == expected
    # one source beside an empty group is still one source
    assert SpeakerQueue(7, np.random.default_rng(5), [list(range(6, -1, -1)), []]).take(20) == expected


def test_training_data_knows_each_speakers_source(tmp_path: Path, excerpts_dir: Path):
    assert (SPEECH_COMMANDS / "MANIFEST.sha256").exists(), SPEECH_COMMANDS
    sources = {"speech-commands": {"dataset": "speech-commands", "max_speakers": 2, "max_utterances_per_speaker": 2}}
    rows = _prepare(tmp_path, {"data.max_speakers": 3, "data.max_utterances_per_speaker": 1, "data.sources": sources})
    train = [r for r in rows if r["split"] == "train"]
    # whole files as segments: what load_training_data reads, without running VAD here
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "segment_id": f"{r['utterance_id']}_0",
                    "utterance_id": r["utterance_id"],
                    "speaker_id": r["speaker_id"],
                    "split": r["split"],
                    "path": r["path"],
                    "start_s": 0.0,
                    "end_s": r["duration_s"],
                }
                for r in rows
            ]
        ),
        Layout(tmp_path).segments,
    )
    data = load_training_data(Layout(tmp_path), progress=False)
    truth = {r["speaker_id"]: r["source"] for r in train}
    assert len(data.labels) == len(truth) == 5
    assert dict(zip(data.labels, data.sources, strict=True)) == truth
    groups = data.source_groups()
    assert [sorted(data.labels[i] for i in g) for g in groups] == [
        sorted(s for s, src in truth.items() if src == name) for name in ("librispeech", "speech-commands")
    ]
    assert balance_groups(data, ModelParams(balance="sources")) == groups
    assert balance_groups(data, ModelParams()) is None
    assert TrainingData(labels=["a", "b"], clips=[[], []]).source_groups() == [[0, 1]]

"""``benchmarks/bench_utterance_pooling.py`` re-scores a finished project with the evaluate stage's protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_utterance_pooling import main, tile_to, windows
from voiceprint.common.layout import Layout
from voiceprint.common.precision import autocast_dtype
from voiceprint.config import load_params
from voiceprint.evaluate.stage import evaluate


def test_every_way_is_scored_and_the_shipped_one_matches_the_evaluate_stage(
    small_project: Layout, tmp_path: Path
) -> None:
    metrics = evaluate(
        small_project,
        load_params(small_project.root / "params.yaml"),
        out_metrics=tmp_path / "metrics.json",
        out_plots=tmp_path / "plots",
    )
    out = tmp_path / "pooling.jsonl"
    main(["--project", str(small_project.root), "--out", str(out)])
    records = {r["way"]: r for r in map(json.loads, out.read_text().splitlines())}
    expected = {
        "shipped",
        "segment_mean",
        "duration_weighted",
        "centered",
        "speech_concat",
        "whole_file",
        "segment_float32",
        "tiled_2s",
        "windows_2s",
    }
    if autocast_dtype(torch.device("cpu"), amp=True) is not None:
        expected.add("segment_bf16")
    assert set(records) == expected
    shipped = records["shipped"]
    assert shipped["eer_pct"] == pytest.approx(100 * metrics["eer"], abs=0.006)
    assert shipped["top1_pct"] == pytest.approx(100 * metrics["top1"], abs=0.06)
    assert all(0.0 <= r["eer_pct"] <= 100.0 and 0.0 <= r["top1_pct"] <= 100.0 for r in records.values())


def test_windows_cover_the_wave_and_end_at_its_end() -> None:
    wave = np.arange(10, dtype=np.float32)
    cuts = windows(wave, window=4, hop=3)
    assert [c.tolist() for c in cuts] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    cuts = windows(wave, window=4, hop=4)  # 0-3, 4-7, then the last one ends at the end: 6-9
    assert [c[0] for c in cuts] == [0, 4, 6] and all(len(c) == 4 for c in cuts)
    assert [c.tolist() for c in windows(wave, window=10, hop=5)] == [wave.tolist()]
    assert [c.tolist() for c in windows(wave[:3], window=4, hop=2)] == [[0, 1, 2]]  # short: whole, not padded


def test_tile_to_repeats_short_waves_only() -> None:
    wave = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert tile_to(wave, 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    long = np.arange(9, dtype=np.float32)
    assert tile_to(long, 7) is long

"""``benchmarks/bench_utterance_pooling.py`` re-scores a finished project with the evaluate stage's protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_utterance_pooling import main
from voiceprint.config import load_params
from voiceprint.evaluate import evaluate
from voiceprint.layout import Layout


def test_every_way_is_scored_and_the_shipped_one_matches_the_evaluate_stage(
    small_project: Layout, tmp_path: Path
) -> None:
    metrics = evaluate(small_project, load_params(small_project.root / "params.yaml"),
                       out_metrics=tmp_path / "metrics.json", out_plots=tmp_path / "plots")
    out = tmp_path / "pooling.jsonl"
    main(["--project", str(small_project.root), "--out", str(out)])
    records = {r["way"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"segment_mean", "duration_weighted", "centered", "speech_concat", "whole_file"}
    shipped = records["segment_mean"]
    assert shipped["eer_pct"] == pytest.approx(100 * metrics["eer"], abs=0.006)
    assert shipped["top1_pct"] == pytest.approx(100 * metrics["top1"], abs=0.06)
    assert all(0.0 <= r["eer_pct"] <= 100.0 and 0.0 <= r["top1_pct"] <= 100.0 for r in records.values())

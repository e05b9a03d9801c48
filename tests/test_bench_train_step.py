"""``benchmarks/bench_train_step.py`` times a real training step: every part runs and the weights move."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.bench_train_step import PARTS, StepRig, main


def test_one_step_times_every_part_and_trains_the_model() -> None:
    rig = StepRig(channels=16, batch=2, crop_s=0.5, classes=5)
    before = [p.detach().clone() for p in rig.model.parameters()]
    times = rig.step(bf16=False)
    assert list(times) == list(PARTS) and all(t > 0 for t in times.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, rig.model.parameters()))


def test_main_writes_one_record_per_precision(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    args = [
        "--channels",
        "16",
        "--batch",
        "2",
        "--crop-s",
        "0.5",
        "--classes",
        "5",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and {r["precision"] for r in records} <= {"bfloat16", "float32"}
    assert records[-1]["precision"] == "float32" and records[-1]["timed_steps"] == 2
    for r in records:
        assert r["seconds_per_step"] > 0 and all(r[f"{p}_s"] > 0 for p in PARTS)

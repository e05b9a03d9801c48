"""Resume after a kill: the training state is snapshotted atomically and a killed run, rerun, ends
with exactly the checkpoint of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _segments_table

from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.config import ModelParams
from voiceprint.encoders.ecapa import CLASSIFIER_CKPT, EMBEDDING_CKPT
from voiceprint.training.data import TrainingData
from voiceprint.training.state import TrainState, training_fingerprint

REPO = Path(__file__).resolve().parents[1]
PARAMS = dict(channels=32, steps=20, batch_size=8, crop_s=1.0, seed=3, device="cpu", checkpoint_every=5)
# Runs train_scratch on the project in argv[1] and prints its stats as JSON (last line).
TRAIN = (
    "import json, sys\n"
    "from voiceprint.config import ModelParams\n"
    "from voiceprint.common.layout import Layout\n"
    "from voiceprint.training.stage import train_scratch\n"
    "stats = train_scratch(ModelParams(**json.loads(sys.argv[2])), Layout.at(sys.argv[1]), progress=False)\n"
    "print(json.dumps(stats))\n"
)


def _project(root: Path, excerpts_dir: Path) -> Layout:
    layout = Layout.at(root)
    write_table(layout.segments, _segments_table(excerpts_dir))
    return layout


def _train_cmd(layout: Layout, **overrides: object) -> list[str]:
    return [sys.executable, "-c", TRAIN, str(layout.root), json.dumps({**PARAMS, **overrides})]


def _env() -> dict[str, str]:
    # The same thread count in every run: CPU kernels are deterministic for a given one.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(layout: Layout, **overrides: object) -> dict:
    proc = subprocess.run(
        _train_cmd(layout, **overrides), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _state_path(layout: Layout) -> Path:
    return layout.data / "train_state" / "model.pt"


def _tensors(model_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / name, weights_only=True, map_location="cpu")


MOE = {"arch": "moe", "moe": {"experts": 2, "expert_channels": 16, "gate_channels": 8}}
# Weight averaging over steps 11-40 (snapshots at 20, 30, 40); killed only once the step-20
# snapshot is in the saved state, so the resumed run must restore a running sum that is not empty.
AVERAGED = {"steps": 40, "average_last": 0.75, "_kill_after_step": 20}


def _snapshot_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["step"])
    except (FileNotFoundError, EOFError, RuntimeError):  # not written yet
        return 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", [{}, MOE, AVERAGED], ids=["ecapa", "moe", "weight-average"])
def test_resume_after_kill_gives_the_uninterrupted_checkpoint(
    tmp_path: Path, excerpts_dir: Path, arch: dict[str, object]
) -> None:
    arch = dict(arch)
    kill_after = int(arch.pop("_kill_after_step", 1))
    steps = int(arch.get("steps", PARAMS["steps"]))
    # The run that gets killed starts first, so the uninterrupted one overlaps its wait.
    killed = _project(tmp_path / "killed", excerpts_dir)
    proc = subprocess.Popen(
        _train_cmd(killed, **arch), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while _snapshot_step(_state_path(killed)) < kill_after:
            assert proc.poll() is None, f"training exited before its first snapshot: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no training state written within 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.model_dir.exists(), "the run finished before it could be killed"
    snap = torch.load(_state_path(killed), weights_only=True, map_location="cpu")  # tensors + plain containers only
    assert snap["step"] % PARAMS["checkpoint_every"] == 0 and kill_after <= snap["step"] < steps

    resumed = _run(killed, **arch)
    assert resumed["resumed_from_step"] >= PARAMS["checkpoint_every"]
    assert not _state_path(killed).exists()  # cleared once the model is written

    straight_layout = _project(tmp_path / "straight", excerpts_dir)
    straight = _run(straight_layout, **arch)
    assert straight["resumed_from_step"] == 0

    for name in (EMBEDDING_CKPT, CLASSIFIER_CKPT):
        a, b = _tensors(killed.model_dir, name), _tensors(straight_layout.model_dir, name)
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{name}: tensors differ after resume: {unequal[:5]}"
    assert resumed["model_id"] == straight["model_id"]
    for key in ("loss_initial", "loss_final", "train_accuracy"):  # history is part of the state
        assert resumed[key] == straight[key]


def test_a_state_of_another_config_is_ignored_and_replaced(tmp_path: Path, excerpts_dir: Path) -> None:
    layout = _project(tmp_path, excerpts_dir)
    first = _run(layout, steps=8, checkpoint_every=3)
    assert first["resumed_from_step"] == 0 and not _state_path(layout).exists()  # cleared on success

    # A foreign snapshot (another config's fingerprint) where this run looks for its own.
    _state_path(layout).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "fingerprint": "another-config", "step": 6}, _state_path(layout))
    again = _run(layout, steps=8, checkpoint_every=3)
    assert again["resumed_from_step"] == 0 and again["model_id"] == first["model_id"]
    assert not _state_path(layout).exists()  # replaced by this run's snapshots, then cleared


def _tiny_data() -> TrainingData:
    rng = np.random.default_rng(0)
    return TrainingData(labels=["a", "b"], clips=[[rng.standard_normal(8000).astype(np.float32)] for _ in range(2)])


def test_fingerprint_covers_what_changes_training_and_nothing_else() -> None:
    data, cpu = _tiny_data(), torch.device("cpu")
    base = ModelParams(**PARAMS)
    fp = training_fingerprint(base, data, cpu)
    for operational in ({"checkpoint_every": 7}, {"log_every": 1}, {"register_model": False}):
        assert training_fingerprint(base.model_copy(update=operational), data, cpu) == fp
    nested = ({"aam": {"scale": 16.0}}, {"moe": {"experts": 3}}, {"augment": {"kinds": ["noise"]}})
    for change in ({"steps": 21}, {"seed": 4}, {"lr": 0.01}, {"channels": 16}, {"arch": "moe"}, *nested):
        changed = ModelParams(**{**base.model_dump(), **change})  # a subsection given whole: its other keys default
        assert training_fingerprint(changed, data, cpu) != fp, change
    other = _tiny_data()
    other.clips[1][0] = other.clips[1][0] * 0.5
    assert training_fingerprint(base, other, cpu) != fp
    assert training_fingerprint(base, data, cpu, {"teacher_cache": "x"}) != fp


def test_no_state_when_checkpointing_is_off(tmp_path: Path) -> None:
    data, cpu = _tiny_data(), torch.device("cpu")
    state = TrainState.for_run(Layout.at(tmp_path), ModelParams(checkpoint_every=0), data, cpu, init="scratch")
    assert state.path is None and state.load() is None
    state.clear()
    assert not (tmp_path / "data").exists()

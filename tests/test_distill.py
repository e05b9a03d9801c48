"""Distillation: a tiny real run moves the student towards CAM++ on held-out audio, the teacher
cache is written once and reused, and the result is a plain loadable ECAPA checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from test_train import _segments_table

import voiceprint.training.distill as distill
from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.config import ModelParams
from voiceprint.encoders.campplus import load_campplus
from voiceprint.encoders.ecapa import load_ecapa
from voiceprint.training.stage import build_model

CROPS = 4
PARAMS = dict(
    init="distill",
    channels=32,
    steps=60,
    batch_size=12,
    crop_s=2.0,
    lr=0.01,
    seed=0,
    device="cpu",
    distill={"crops_per_segment": CROPS},
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, excerpts_dir: Path) -> dict:
    """A 60-step distillation run, then a 0-step run on the same data (the untrained student).

    The second run must take every teacher embedding from the cache: the teacher loader is
    replaced by one that raises.
    """
    layout = Layout.at(tmp_path_factory.mktemp("project"))
    write_table(layout.segments, _segments_table(excerpts_dir))
    trained = build_model(ModelParams(**PARAMS), layout, progress=False)
    trained_dir = layout.root / "models" / "trained"
    shutil.copytree(layout.model_dir, trained_dir)
    cache_mtime = Path(trained["teacher_cache"]).stat().st_mtime_ns

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher was loaded although its embeddings are cached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "load_campplus", no_teacher)
        untrained = build_model(ModelParams(**{**PARAMS, "steps": 0}), layout, progress=False)
    return dict(layout=layout, trained=trained, trained_dir=trained_dir, untrained=untrained, cache_mtime=cache_mtime)


def _held_out_cosine(model_dir: Path, files: list[Path]) -> float:
    """Mean cosine between student and teacher embeddings of 3 s of each file (none seen in training)."""
    student, teacher = load_ecapa(model_dir), load_campplus(device="cpu")
    wavs = torch.from_numpy(np.stack([audio.load(f, 0.0, 3.0) for f in files]))
    lengths = torch.ones(len(files))
    return F.cosine_similarity(student.embed(wavs, lengths), teacher.embed(wavs, lengths), dim=1).mean().item()


def test_distillation_raises_held_out_cosine_to_the_teacher(runs: dict, test_other_files: list[Path]) -> None:
    trained = runs["trained"]
    assert trained["init"] == "distill" and trained["steps"] == PARAMS["steps"]
    assert trained["teacher_model_id"].startswith("campplus-192-")
    assert trained["cosine_final"] > trained["cosine_initial"] + 0.1, trained

    # Held-out speakers and recordings: test-other, which the training segments never touch.
    files = [f for f in test_other_files if audio.probe(f).duration_s >= 3.0][:8]
    assert len(files) == 8
    before = _held_out_cosine(runs["layout"].model_dir, files)  # the 0-step run's model
    after = _held_out_cosine(runs["trained_dir"], files)
    # Six training speakers only generalise so far to new ones (measured: -0.04 -> +0.14), but an
    # untrained student is uncorrelated with the teacher, so any real learning shows as a margin.
    assert after > before + 0.1, (before, after)


def test_teacher_cache_is_written_once_and_reused(runs: dict) -> None:
    trained, untrained = runs["trained"], runs["untrained"]
    path = Path(trained["teacher_cache"])
    assert path.parent == runs["layout"].data / "teacher_cache" and path.name.startswith("campplus-")
    assert not trained["teacher_cache_reused"] and untrained["teacher_cache_reused"]
    assert untrained["teacher_cache"] == str(path) and path.stat().st_mtime_ns == runs["cache_mtime"]
    assert untrained["teacher_model_id"] == trained["teacher_model_id"]

    table = pq.read_table(path)
    n_segments = trained["num_segments"]
    assert table.num_rows == CROPS * n_segments == trained["teacher_crops"]
    emb_type = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 192
    assert emb_type.value_type == pa.float32()
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 192)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    start, end = table.column("start_s").to_numpy(), table.column("end_s").to_numpy()
    assert (end > start).all() and (end - start <= PARAMS["crop_s"] + 1e-6).all()


def test_cache_key_follows_crop_settings(runs: dict) -> None:
    """Different crop settings get a different file; identical ones the same file."""
    layout = runs["layout"]
    from voiceprint.training.data import load_training_data

    data = load_training_data(layout, progress=False)
    base = ModelParams(**PARAMS)
    sha = "0" * 64
    assert distill.cache_path(layout, data, base, sha) == distill.cache_path(layout, data, ModelParams(**PARAMS), sha)
    for change in ({"crop_s": 1.5}, {"distill": {"crops_per_segment": 2}}, {"seed": 1}):
        assert distill.cache_path(layout, data, base, sha) != distill.cache_path(
            layout, data, ModelParams(**{**PARAMS, **change}), sha
        )


def test_crop_offsets_are_deterministic_and_in_range() -> None:
    a = distill.crop_offsets("seg#000", 48_000, 16_000, 4, seed=0)
    assert a == distill.crop_offsets("seg#000", 48_000, 16_000, 4, seed=0)
    assert a != distill.crop_offsets("seg#000", 48_000, 16_000, 4, seed=1)
    assert a == sorted(a) and all(0 <= o <= 32_000 for o in a)
    short = distill.crop_offsets("seg#001", 8_000, 16_000, 3, seed=0)
    assert all(0 <= o < 8_000 for o in short)
    assert distill.crop_audio(np.arange(8_000, dtype=np.float32), short[0], 16_000).shape == (16_000,)


def test_distilled_checkpoint_loads_through_load_ecapa(runs: dict) -> None:
    encoder = load_ecapa(runs["trained_dir"])
    assert encoder.model_id.startswith("ecapa-c32-") and encoder.dim == 192
    emb = encoder.embed(torch.randn(2, 16_000) * 0.1, torch.ones(2))
    assert emb.shape == (2, 192) and torch.isfinite(emb).all()


def test_distillation_resumes_from_its_snapshot(runs: dict, tmp_path: Path) -> None:
    """A distillation run that dies after a snapshot, rerun, ends with the uninterrupted run's weights.

    The "crash" is an exception from ``on_step`` at step 30, right after the snapshot of that step
    (snapshots come first, so a failing callback loses no work); the teacher cache is copied, so the
    rerun needs no teacher.
    """
    layout = Layout.at(tmp_path)
    (layout.data / "teacher_cache").mkdir(parents=True)
    shutil.copy(runs["layout"].segments, layout.segments)
    cache = Path(runs["trained"]["teacher_cache"])
    shutil.copy(cache, layout.data / "teacher_cache" / cache.name)
    params = ModelParams(**{**PARAMS, "checkpoint_every": 30, "log_every": 30})

    class Crash(Exception):
        pass

    def crash(step: int, metrics: dict) -> None:
        raise Crash(step)

    with pytest.raises(Crash):  # same thread count as the fixture's run: CPU sums depend on it
        build_model(params, layout, progress=False, on_step=crash)
    state = layout.data / "train_state" / "model.pt"
    assert torch.load(state, weights_only=True)["step"] == 30 and not layout.model_dir.exists()

    resumed = build_model(params, layout, progress=False)
    assert resumed["resumed_from_step"] == 30 and resumed["teacher_cache_reused"] and not state.exists()
    assert resumed["model_id"] == runs["trained"]["model_id"]  # sha256 of embedding_model.ckpt
    assert resumed["cosine_final"] == runs["trained"]["cosine_final"]


def test_a_mixture_of_ecapa_experts_can_be_distilled(runs: dict, tmp_path: Path) -> None:
    """``arch: moe`` with ``init: distill``: the same cached teacher, the mixture as the student."""
    from voiceprint.encoders.loader import load_model_dir
    from voiceprint.encoders.moe import MoeEncoder

    layout = Layout.at(tmp_path)
    (layout.data / "teacher_cache").mkdir(parents=True)
    shutil.copy(runs["layout"].segments, layout.segments)
    cache = Path(runs["trained"]["teacher_cache"])
    shutil.copy(cache, layout.data / "teacher_cache" / cache.name)
    params = ModelParams(
        **{**PARAMS, "arch": "moe", "moe": {"experts": 2, "expert_channels": 16, "gate_channels": 8}, "steps": 40}
    )
    stats = build_model(params, layout, progress=False)
    assert stats["teacher_cache_reused"] and stats["arch"] == "moe" and stats["experts"] == 2
    assert stats["cosine_final"] > stats["cosine_initial"] + 0.1, stats
    assert 0.0 <= stats["gate_balance_loss_final"] < 1.0  # recorded for distilled mixtures too (K-1 = 1: collapsed)
    assert isinstance(load_model_dir(layout.model_dir), MoeEncoder)

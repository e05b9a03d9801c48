"""model.aam.centres: teacher: CAM++ centres of every AAM class, on real speech, cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import voiceprint.training.teacher_centres as tc
from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.common.precision import cpu_has_native_bf16
from voiceprint.common.schema import SEGMENTS
from voiceprint.config import ModelParams
from voiceprint.training.data import SpeedClasses, TrainingError
from voiceprint.training.stage import build_model

N_SPEAKERS = 4


@pytest.fixture(scope="module")
def speech(excerpts_dir: Path) -> tuple[list[str], list[list[str]], list[list[np.ndarray]]]:
    """Four train-clean-100 speakers, each utterance split into two segments."""
    files = sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[:N_SPEAKERS]
    labels, ids, clips = [], [], []
    for f in files:
        wav = audio.load(f)
        labels.append(f.parent.name)
        ids.append([f"{f.stem}#000", f"{f.stem}#001"])
        clips.append([wav[: len(wav) // 2], wav[len(wav) // 2 :]])
    return labels, ids, clips


def test_speech_excerpt_takes_the_first_seconds_across_segments() -> None:
    clips = [np.arange(5, dtype=np.float32), np.arange(5, 10, dtype=np.float32)]
    assert tc.speech_excerpt(clips, 7).tolist() == list(range(7))
    assert tc.speech_excerpt(clips, 100).tolist() == list(range(10))


def test_centres_are_the_teachers_map_of_the_voices_and_are_cached(
    speech: tuple[list[str], list[list[str]], list[list[np.ndarray]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels, ids, clips = speech
    layout = Layout.at(tmp_path)
    classes = SpeedClasses(N_SPEAKERS, enabled=True).members()
    first = tc.teacher_centres(
        layout, labels, ids, clips, classes, dim=192, centre_s=6.0, device=torch.device("cpu"), progress=False
    )
    c = first.centres
    assert c.shape == (3 * N_SPEAKERS, 192) and not first.reused and first.teacher_model_id.startswith("campplus-192-")
    assert torch.allclose(c.norm(dim=1), torch.ones(len(classes)), atol=1e-5)
    assert first.path.parent == layout.data / "teacher_cache" and first.path.exists()

    sim = c @ c.T
    real = sim[:N_SPEAKERS, :N_SPEAKERS][~torch.eye(N_SPEAKERS, dtype=torch.bool)]
    for k, (speaker, speed) in enumerate(classes[N_SPEAKERS:], start=N_SPEAKERS):
        assert speed != 1.0
        own = sim[k, speaker]  # the same voice played faster or slower: related, not identical
        assert 0.2 < own < 0.99, (k, own)
        assert own > real.max(), (k, own, real.max())  # closer to its own speaker than any two real speakers are

    # Batched with padding, each centre is still the teacher's embedding of that class's audio alone.
    teacher = tc.load_campplus()
    for k in (0, N_SPEAKERS + 1, len(classes) - 1):
        speaker, speed = classes[k]
        wav = tc.played_at(torch.from_numpy(tc.speech_excerpt(clips[speaker], 6 * audio.TARGET_SR)).unsqueeze(0), speed)
        alone = torch.nn.functional.normalize(teacher.embed(wav, torch.ones(1)), dim=1)[0]
        assert torch.dot(alone, c[k]).item() > 0.9999, k

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher must not be loaded when the cache matches")

    monkeypatch.setattr(tc, "load_campplus", no_teacher)
    again = tc.teacher_centres(
        layout, labels, ids, clips, classes, dim=192, centre_s=6.0, device=torch.device("cpu"), progress=False
    )
    assert again.reused and again.path == first.path and torch.equal(again.centres, c)
    assert again.teacher_model_id == first.teacher_model_id
    with pytest.raises(AssertionError, match="must not be loaded"):  # another excerpt length is another cache
        tc.teacher_centres(
            layout, labels, ids, clips, classes, dim=192, centre_s=5.0, device=torch.device("cpu"), progress=False
        )


def test_bf16_teacher_gives_nearly_the_float32_centres_in_a_cache_of_its_own(
    speech: tuple[list[str], list[list[str]], list[list[np.ndarray]]], tmp_path: Path
) -> None:
    labels, ids, clips = speech
    layout = Layout.at(tmp_path)
    classes = SpeedClasses(N_SPEAKERS, enabled=True).members()
    run = dict(dim=192, centre_s=4.0, device=torch.device("cpu"), progress=False)
    exact = tc.teacher_centres(layout, labels, ids, clips, classes, **run)
    fast = tc.teacher_centres(layout, labels, ids, clips, classes, precision=torch.bfloat16, **run)
    assert not fast.reused and fast.path != exact.path  # a float32 cache never stands in for bf16, nor back
    assert json.loads(pq.read_schema(fast.path).metadata[b"voiceprint.teacher_centres"])["precision"] == "bfloat16"
    assert json.loads(pq.read_schema(exact.path).metadata[b"voiceprint.teacher_centres"])["precision"] == "float32"
    cos = (fast.centres * exact.centres).sum(dim=1)
    assert cos.min() > 0.99 and cos.max() < 1 - 1e-6, cos
    assert tc.teacher_centres(layout, labels, ids, clips, classes, precision=torch.bfloat16, **run).reused


def test_training_with_teacher_centres_records_the_teacher(excerpts_dir: Path, tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    files = sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[:N_SPEAKERS]
    rows = [
        dict(
            segment_id=f"{f.stem}#000",
            utterance_id=f.stem,
            speaker_id=f.parent.name,
            split="train",
            path=str(f.resolve()),
            start_s=0.0,
            end_s=4.0,
        )
        for f in files
    ]
    write_table(layout.segments, pa.Table.from_pylist(rows, schema=SEGMENTS))
    params = ModelParams(
        channels=16,
        steps=4,
        batch_size=4,
        crop_s=0.5,
        aam={"teacher_centre_s": 3.0},
        augment={"speeds": (0.9, 1.0, 1.1)},
        device="cpu",
        checkpoint_every=0,
        register_model=False,
    )
    stats = build_model(params, layout, progress=False)
    assert stats["aam_classes"] == 3 * N_SPEAKERS and stats["teacher_model_id"].startswith("campplus-192-")
    assert stats["teacher_centres_reused"] is False and stats["teacher_seconds"] > 0
    assert stats["teacher_precision"] == ("bfloat16" if cpu_has_native_bf16() else "float32")  # model.amp: true
    card = json.loads((layout.model_dir / "model_card.json").read_text())
    assert card["params"]["aam"]["centres"] == "teacher" and card["training"]["teacher_model_id"].startswith(
        "campplus-192-"
    )
    assert build_model(params, layout, progress=False)["teacher_centres_reused"] is True

    with pytest.raises(
        TrainingError,
        match=r"model\.aam\.centres 'teacher' needs .* teacher's embeddings have 192 dimensions, the model's 64",
    ):
        build_model(params.model_copy(update={"lin_neurons": 64}), layout, progress=False)

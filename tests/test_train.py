"""Training stage: a tiny real run learns, writes a loadable checkpoint; AAM matches its formula."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from speechbrain.inference.speaker import EncoderClassifier

from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.common.schema import SEGMENTS
from voiceprint.config import ModelParams
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa
from voiceprint.training.aam import AAMHead, aam_softmax_loss
from voiceprint.training.augment import SPEEDS, UNPERTURBED, add_noise
from voiceprint.training.data import CropSampler, SpeedClasses, TrainingData, TrainingError
from voiceprint.training.loop import fit, lr_factor
from voiceprint.training.objectives import AamObjective, aam_margin_at
from voiceprint.training.stage import build_model, train_scratch, training_precision

N_SPEAKERS = 6
# Tests that compare the loss at the end of a run with its start need one objective throughout: under
# the default margin ramp the first steps train at margin 0, a lower loss than the final margin's.
FIXED_MARGIN = {"margin_ramp": (0.0, 0.0)}


def _segments_table(excerpts_dir: Path, first_speaker: int = 0) -> pa.Table:
    """Two segments (first/second half) per train speaker, plus an eval row that must be ignored."""
    files = sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[first_speaker : first_speaker + N_SPEAKERS]
    rows = []
    for f in files:
        dur = audio.probe(f).duration_s
        for k, (start, end) in enumerate([(0.0, dur / 2), (dur / 2, dur)]):
            rows.append(
                dict(
                    segment_id=f"{f.stem}#{k:03d}",
                    utterance_id=f.stem,
                    speaker_id=f.parent.name,
                    split="train",
                    path=str(f.resolve()),
                    start_s=start,
                    end_s=end,
                )
            )
    test_file = sorted((excerpts_dir / "test-other").glob("*/*.flac"))[0]
    rows.append(
        dict(
            segment_id=f"{test_file.stem}#000",
            utterance_id=test_file.stem,
            speaker_id=test_file.parent.name,
            split="eval",
            path=str(test_file.resolve()),
            start_s=0.0,
            end_s=2.0,
        )
    )
    return pa.Table.from_pylist(rows, schema=SEGMENTS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, excerpts_dir: Path) -> tuple[Layout, dict]:
    layout = Layout.at(tmp_path_factory.mktemp("project"))
    write_table(layout.segments, _segments_table(excerpts_dir))
    # Batches of 24: the loss is compared over 5-step windows, and with 12 crops a step their noise
    # (bf16 rounding included, on CPUs that have it) left a 20-step drop of 0.8 on one machine.
    params = ModelParams(channels=32, steps=20, batch_size=24, crop_s=1.0, seed=0, device="cpu", aam=FIXED_MARGIN)
    stats = build_model(params, layout, progress=False)
    return layout, stats


def test_short_training_run_lowers_the_loss(trained: tuple[Layout, dict]) -> None:
    _, stats = trained
    assert stats["init"] == "scratch" and stats["steps"] == 20 and stats["loss_window"] == 5
    assert stats["num_speakers"] == N_SPEAKERS and stats["num_segments"] == 2 * N_SPEAKERS  # eval row ignored
    assert math.isfinite(stats["loss_initial"]) and math.isfinite(stats["loss_final"])
    assert stats["loss_final"] < stats["loss_initial"] - 1.0, stats
    assert 0.0 <= stats["train_accuracy"] <= 1.0
    assert stats["num_parameters"] > 0 and stats["seconds"] > 0 and stats["device"] == "cpu"


def test_trained_checkpoint_loads_both_ways(trained: tuple[Layout, dict], tmp_path: Path) -> None:
    layout, stats = trained
    encoder = load_ecapa(layout.model_dir)
    assert encoder.model_id == stats["model_id"] and encoder.model_id.startswith("ecapa-c32-")
    wav = torch.from_numpy(audio.load(_train_paths(layout)[0], 0.0, 3.0)).unsqueeze(0)
    ours = encoder.embed(wav, torch.ones(1))

    # model.centre_embeddings (default): the saved network's embeddings of the training segments
    # average to zero, measured on the written checkpoint (the mean it removed is on the card).
    assert stats["centred_on_segments"] == 2 * N_SPEAKERS and stats["centre_norm"] > 0
    rows = pq.read_table(layout.segments).filter(pc.equal(pc.field("split"), "train")).to_pylist()
    train_embs = torch.cat(
        [
            encoder.embed(torch.from_numpy(audio.load(r["path"], r["start_s"], r["end_s"])).unsqueeze(0), torch.ones(1))
            for r in rows
        ]
    )
    assert train_embs.mean(0).norm() < 1e-3 * train_embs.norm(dim=1).mean()

    sb = EncoderClassifier.from_hparams(source=str(layout.model_dir), savedir=str(tmp_path / "sb"))
    assert (sb.encode_batch(wav).squeeze(1) - ours).abs().max().item() < 1e-4
    _, _, _, labels = sb.classify_batch(wav)
    speakers = {Path(p).parent.name for p in _train_paths(layout)}
    assert labels[0] in speakers


def test_speed_classes_map_each_speed_to_its_own_block_of_speakers() -> None:
    speakers = torch.tensor([0, 1, 2, 3])
    slow, fast = SPEEDS.index(0.9), SPEEDS.index(1.1)
    speeds = torch.tensor([UNPERTURBED, slow, fast, UNPERTURBED])
    on = SpeedClasses(5, enabled=True)
    assert on.count == 15
    targets = on.targets(speakers, speeds).tolist()
    assert targets[0] == 0 and targets[3] == 3  # unperturbed crops keep their speaker's class (block 0)
    assert sorted({targets[1] // 5, targets[2] // 5}) == [1, 2] and [t % 5 for t in targets] == [0, 1, 2, 3]
    off = SpeedClasses(5, enabled=False)
    assert off.count == 5 and torch.equal(off.targets(speakers, speeds), speakers)


def test_speed_as_speakers_trains_3x_classes_and_saves_only_the_real_speakers(
    excerpts_dir: Path, tmp_path: Path
) -> None:
    layout = Layout.at(tmp_path / "project")
    write_table(layout.segments, _segments_table(excerpts_dir))
    params = ModelParams(
        channels=32,
        steps=20,
        batch_size=12,
        crop_s=1.0,
        seed=0,
        device="cpu",
        register_model=False,
        augment={"speed_as_speakers": True, "speeds": (0.9, 1.0, 1.1)},
        aam=FIXED_MARGIN,
    )
    stats = build_model(params, layout, progress=False)
    assert stats["aam_classes"] == 3 * N_SPEAKERS and stats["num_speakers"] == N_SPEAKERS
    assert stats["loss_final"] < stats["loss_initial"] - 1.0, stats
    classifier = torch.load(layout.model_dir / "classifier.ckpt", weights_only=True)
    assert classifier["weight"].shape[0] == N_SPEAKERS  # pseudo-speaker rows are training-only
    sb = EncoderClassifier.from_hparams(source=str(layout.model_dir), savedir=str(tmp_path / "sb"))
    wav = torch.from_numpy(audio.load(_train_paths(layout)[0], 0.0, 3.0)).unsqueeze(0)
    assert sb.classify_batch(wav)[3][0] in {Path(p).parent.name for p in _train_paths(layout)}


def test_speed_as_speakers_acts_only_where_speed_perturbs() -> None:
    assert ModelParams().speed_pseudo_speakers  # the default: speed in augment, pseudo-speakers on
    assert not ModelParams(augment={"speed_as_speakers": False}).speed_pseudo_speakers
    assert not ModelParams(augment={"kinds": ["noise", "reverb"]}).speed_pseudo_speakers


def test_margin_ramp_schedule() -> None:
    ramp = ModelParams(steps=100, aam={"margin": 0.2, "margin_ramp": [0.1, 0.4]})
    margins = [aam_margin_at(step, ramp) for step in range(100)]
    assert margins[:11] == [0.0] * 11  # held at 0 through the start step
    assert margins[25] == pytest.approx(0.1) and margins[39] == pytest.approx(0.2 * 29 / 30)
    assert margins[40:] == [0.2] * 60
    assert all(a <= b for a, b in zip(margins, margins[1:]))
    off = ModelParams(steps=100, aam={"margin": 0.2, "margin_ramp": [0, 0]})
    assert {aam_margin_at(step, off) for step in range(100)} == {0.2}
    assert aam_margin_at(0, ModelParams(steps=100, aam={"margin_ramp": [0.5, 0.5]})) == 0.0  # a step, not a ramp
    assert aam_margin_at(50, ModelParams(steps=100, aam={"margin": 0.3, "margin_ramp": [0.5, 0.5]})) == 0.3


@pytest.mark.parametrize("ramp", [[0.5, 0.2], [-0.1, 0.2], [0.1, 1.5]])
def test_margin_ramp_must_be_ordered_fractions(ramp: list[float]) -> None:
    with pytest.raises(ValueError, match=r"model\.aam\.margin_ramp"):
        ModelParams(aam={"margin_ramp": ramp})


def test_aam_head_set_margin_gives_the_loss_of_that_margin() -> None:
    torch.manual_seed(0)
    head = AAMHead(8, 4, margin=0.2, scale=30.0)
    keys = set(head.state_dict())
    emb, targets = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    for margin in (0.0, 0.07, 0.2):
        head.set_margin(margin)
        loss, cosines = head(emb, targets)
        assert head.margin == margin
        assert loss.item() == pytest.approx(_reference_aam_loss(cosines.detach(), targets, margin, 30.0), rel=1e-5)
    assert set(head.state_dict()) == keys  # the schedule adds nothing to snapshots or checkpoints


def test_training_follows_the_margin_ramp(excerpts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout.at(tmp_path / "project")
    write_table(layout.segments, _segments_table(excerpts_dir))
    seen: list[float] = []
    set_margin = AAMHead.set_margin
    monkeypatch.setattr(AAMHead, "set_margin", lambda head, m: (seen.append(m), set_margin(head, m))[1])
    params = ModelParams(
        channels=16,
        steps=8,
        batch_size=4,
        crop_s=0.5,
        seed=0,
        device="cpu",
        aam={"margin": 0.2, "margin_ramp": [0.25, 0.75]},
        checkpoint_every=0,
        register_model=False,
    )
    build_model(params, layout, progress=False)
    assert seen == pytest.approx([0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.2])


def test_aam_head_keeps_its_first_classes() -> None:
    head = AAMHead(16, 9, margin=0.2, scale=30.0)
    cut = head.first_classes(3)
    assert torch.equal(cut.weight, head.classifier.weight[:3]) and head.first_classes(9) is head.classifier
    with pytest.raises(ValueError, match="cannot keep 10 of 9"):
        head.first_classes(10)


def test_finetune_starts_from_the_source_and_adapts_to_new_speakers(
    trained: tuple[Layout, dict], tmp_path: Path, excerpts_dir: Path
) -> None:
    source_layout, source_stats = trained
    layout = Layout.at(tmp_path)
    write_table(layout.segments, _segments_table(excerpts_dir, first_speaker=N_SPEAKERS))  # other people
    params = ModelParams(
        init="pretrained",
        source=str(source_layout.model_dir),
        finetune_steps=12,
        channels=64,
        batch_size=12,
        crop_s=1.0,
        lr=0.001,
        seed=0,
        device="cpu",
        aam=FIXED_MARGIN,
    )
    stats = build_model(params, layout, progress=False)
    assert stats["init"] == "finetune" and stats["steps"] == 12
    assert stats["source_model_id"] == source_stats["model_id"]
    assert stats["model_id"] != source_stats["model_id"] and stats["model_id"].startswith(
        "ecapa-c32-"
    )  # source's width
    assert stats["loss_final"] < stats["loss_initial"], stats

    weights = lambda m: {k: p.detach() for k, p in m.named_parameters()}  # noqa: E731  (not BN running stats: they move in any training)
    source = weights(load_ecapa(source_layout.model_dir).model)
    tuned = weights(load_ecapa(layout.model_dir).model)
    torch.manual_seed(1)  # not the source's own init seed (0): an independent random start
    fresh = weights(EcapaConfig.from_channels(32).build())
    dist = lambda a: sum(float((a[k] - source[k]).pow(2).sum()) for k in source)  # noqa: E731
    assert dist(tuned) < 0.1 * dist(fresh)  # a few steps from the source, far from a random start
    labels = (layout.model_dir / "label_encoder.txt").read_text()
    assert all(f"'{spk}'" in labels for spk in {Path(p).parent.name for p in _train_paths(layout)})


def test_pretrained_without_finetune_steps_is_adopted_unchanged(trained: tuple[Layout, dict], tmp_path: Path) -> None:
    source_layout, source_stats = trained
    stats = build_model(
        ModelParams(init="pretrained", source=str(source_layout.model_dir)), Layout.at(tmp_path), progress=False
    )
    assert stats["init"] == "pretrained" and stats["model_id"] == source_stats["model_id"]


def _train_paths(layout: Layout) -> list[str]:
    table = pq.read_table(layout.segments)
    return [r["path"] for r in table.to_pylist() if r["split"] == "train"]


def test_scratch_without_train_split_is_a_clear_error(tmp_path: Path, excerpts_dir: Path) -> None:
    layout = Layout.at(tmp_path)
    table = _segments_table(excerpts_dir)
    write_table(layout.segments, table.filter(pc.equal(table.column("split"), "eval")))
    with pytest.raises(TrainingError, match=r"no rows with split='train'.*required for model\.init=scratch"):
        train_scratch(ModelParams(steps=1), layout, progress=False)
    assert not layout.model_dir.exists()


def _reference_aam_loss(cosines: torch.Tensor, targets: torch.Tensor, m: float, s: float) -> float:
    """Mean over rows of -log(e^{s·φ_y} / (e^{s·φ_y} + Σ_{j≠y} e^{s·cos θ_j})), written out by hand.

    φ_y = cos(θ_y + m) if cos θ_y > cos(π − m), else cos θ_y − m·sin(π − m)  (SpeechBrain's
    non-easy-margin AdditiveAngularMargin).
    """
    total = 0.0
    for row, y in zip(cosines.tolist(), targets.tolist()):
        cos_y = row[y]
        theta_y = math.acos(cos_y)
        phi = math.cos(theta_y + m) if cos_y > math.cos(math.pi - m) else cos_y - m * math.sin(math.pi - m)
        numerator = math.exp(s * phi)
        others = sum(math.exp(s * c) for j, c in enumerate(row) if j != y)
        total += -math.log(numerator / (numerator + others))
    return total / len(targets)


def test_aam_loss_matches_hand_computed_value() -> None:
    m, s = 0.2, 30.0
    cosines = torch.tensor(
        [
            [0.80, 0.10, -0.30],
            [0.20, 0.50, 0.90],
            [-0.99, 0.30, 0.10],  # θ_y > π − m: the threshold branch
            [0.05, 0.60, -0.20],  # target not the best class: large loss
        ]
    )
    targets = torch.tensor([0, 2, 0, 0])
    got = aam_softmax_loss(m, s)(cosines.unsqueeze(1), targets.unsqueeze(1)).item()
    want = _reference_aam_loss(cosines, targets, m, s)
    assert got == pytest.approx(want, rel=1e-5)

    # Margin 0 reduces to plain scaled-cosine cross-entropy.
    plain = torch.nn.functional.cross_entropy(s * cosines, targets).item()
    assert aam_softmax_loss(0.0, s)(cosines.unsqueeze(1), targets.unsqueeze(1)).item() == pytest.approx(plain, rel=1e-5)


def test_aam_head_uses_margin_free_cosines() -> None:
    torch.manual_seed(0)
    head = AAMHead(8, 4, margin=0.2, scale=30.0)
    emb = torch.randn(5, 8)
    targets = torch.tensor([0, 1, 2, 3, 0])
    loss, cosines = head(emb, targets)
    expected = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(head.classifier.weight).T
    assert torch.allclose(cosines, expected, atol=1e-6)
    assert loss.item() == pytest.approx(_reference_aam_loss(cosines.detach(), targets, 0.2, 30.0), rel=1e-5)


def test_crop_sampler_is_speaker_balanced() -> None:
    rng = np.random.default_rng(0)
    data = TrainingData(
        labels=["a", "b", "c"],
        clips=[
            [np.ones(8000, np.float32)],
            [np.arange(500, dtype=np.float32), np.ones(100, np.float32)],
            [np.zeros(40000, np.float32)],
        ],
    )
    sampler = CropSampler(data, crop_samples=16000, rng=rng)
    seen: list[int] = []
    for _ in range(4):
        wavs, speakers = sampler.batch(6)
        assert wavs.shape == (6, 16000) and wavs.dtype == torch.float32
        seen += speakers.tolist()
    assert np.bincount(seen).tolist() == [8, 8, 8]


def test_augment_and_schedule() -> None:
    gen = torch.Generator().manual_seed(0)
    wavs = torch.randn(4, 16000) * 0.1
    out = add_noise(wavs, gen)
    assert out.shape == wavs.shape and torch.isfinite(out).all() and not torch.equal(out, wavs)
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10) < 0.05


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny kernels run faster on one thread, and a busy machine cannot stall a spinning second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_aam_scale_1_fails_to_train_where_30_works(excerpts_dir: Path) -> None:
    """A study found that AAM-softmax with s=1 fails to train while s around 16-30 works; both run here.

    Same 8 speakers, seed and 60 steps; only ``model.aam.scale`` differs. With s=1 the logits s·cos θ span
    at most 2, so the softmax stays close to uniform whatever the embeddings do: the loss hardly
    moves from where it started (measured over seeds 0-4: to 0.75-0.79 of it) and every sample pulls
    with nearly the same weight, well classified or not. With s=30 the loss falls to 0.30-0.57 of
    its start. Margin-free argmax accuracy alone does not separate the two on a run this short (both
    0.66-0.91 on those seeds: Adam rescales s=1's small gradients), so the criterion is the loss
    relative to its start; the s=30 run must also classify its batches far above chance.
    """
    files = sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[:8]
    data = TrainingData(labels=[f.parent.name for f in files], clips=[[audio.load(f)] for f in files])
    cfg = EcapaConfig.from_channels(32)
    runs = {}
    with _one_thread():
        for scale in (1.0, 30.0):
            params = ModelParams(  # noise only: the calibration above was measured with it
                channels=32,
                steps=60,
                batch_size=8,
                crop_s=1.0,
                seed=0,
                aam={"scale": scale, **FIXED_MARGIN},
                device="cpu",
                augment={"kinds": ["noise"]},
            )
            _, _, history = fit(AamObjective(data, params), params, cfg, device=torch.device("cpu"), progress=False)
            loss, acc = np.array(history["loss"]), np.array(history["acc"])
            runs[scale] = {"loss_ratio": loss[-10:].mean() / loss[:10].mean(), "acc": acc[-10:].mean()}
    s1, s30 = runs[1.0], runs[30.0]
    assert s1["loss_ratio"] > 0.7, runs  # s=1: the objective barely moves
    assert s30["loss_ratio"] < 0.6, runs  # s=30: it trains
    assert s30["loss_ratio"] < s1["loss_ratio"] - 0.2, runs
    assert s30["acc"] > 3 / len(files), runs  # and the s=30 classifier is far above chance (1/8)


def test_on_step_reports_every_log_every_steps_and_the_last() -> None:
    rng = np.random.default_rng(0)
    clips = [[rng.standard_normal(12000).astype(np.float32) * 0.1] for _ in range(3)]
    data = TrainingData(labels=["a", "b", "c"], clips=clips)
    # (channels=8 would be smaller but is far slower on CPU: Res2Net splits of width 1.)
    params = ModelParams(channels=32, steps=7, batch_size=3, crop_s=0.5, log_every=3, device="cpu")
    cfg = EcapaConfig.from_channels(32)
    calls: list[tuple[int, dict[str, float]]] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        calls.append((step, metrics))

    with _one_thread():
        _, _, history = fit(
            AamObjective(data, params), params, cfg, device=torch.device("cpu"), progress=False, on_step=on_step
        )
    assert [step for step, _ in calls] == [3, 6, 7]
    windows = [slice(0, 3), slice(3, 6), slice(6, 7)]  # averaged since the previous report
    warmup = max(1, round(0.1 * params.steps))
    for (step, metrics), window in zip(calls, windows):
        assert set(metrics) == {"train_loss", "train_acc", "lr"}
        assert metrics["train_loss"] == pytest.approx(np.mean(history["loss"][window]))
        assert metrics["train_acc"] == pytest.approx(np.mean(history["acc"][window]))
        assert metrics["lr"] == pytest.approx(params.lr * lr_factor(step - 1, params.steps, warmup))  # that step's

    calls.clear()
    quiet = params.model_copy(update={"log_every": 0})
    with _one_thread():
        fit(AamObjective(data, quiet), quiet, cfg, device=torch.device("cpu"), progress=False, on_step=on_step)
    assert calls == []


def test_speed_classes_members_name_each_class_in_order() -> None:
    on = SpeedClasses(4, enabled=True)
    members = on.members()
    assert len(members) == on.count and members[:4] == [(s, 1.0) for s in range(4)]  # real speakers first
    for c, (speaker, speed) in enumerate(members):
        assert on.targets(torch.tensor([speaker]), torch.tensor([SPEEDS.index(speed)])).item() == c
    assert SpeedClasses(4, enabled=False).members() == [(s, 1.0) for s in range(4)]

    five = (0.8, 0.9, 1.0, 1.1, 1.2)  # model.augment.speeds: one block of classes per speed, 1.0 first
    on5 = SpeedClasses(4, enabled=True, speeds=five)
    assert on5.count == 20 and [speed for _, speed in on5.members()[::4]] == [1.0, 1.1, 1.2, 0.8, 0.9]
    for c, (speaker, speed) in enumerate(on5.members()):
        assert on5.targets(torch.tensor([speaker]), torch.tensor([five.index(speed)])).item() == c


def test_fixed_centres_stay_put_while_the_encoder_trains_towards_them() -> None:
    rng = np.random.default_rng(0)
    clips = [[rng.standard_normal(12000).astype(np.float32) * 0.1] for _ in range(3)]
    data = TrainingData(labels=["a", "b", "c"], clips=clips)
    cfg = EcapaConfig.from_channels(16, lin_neurons=24)
    params = ModelParams(
        channels=16, lin_neurons=24, steps=6, batch_size=3, crop_s=0.5, device="cpu", augment={"kinds": ["noise"]}
    )
    centres = torch.nn.functional.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.manual_seed(params.seed)
    untrained = {k: v.clone() for k, v in cfg.build().state_dict().items()}
    with _one_thread():
        model, head, _ = fit(
            AamObjective(data, params, centres=centres), params, cfg, device=torch.device("cpu"), progress=False
        )
    assert torch.equal(head.classifier.weight, centres) and not head.classifier.weight.requires_grad
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in untrained.items())  # the encoder did train
    with pytest.raises(ValueError, match=r"centres of shape \(2, 24\) for a head of shape \(3, 24\)"):
        AAMHead(24, 3, margin=0.2, scale=30.0).fix_centres(centres[:2])


@pytest.mark.parametrize("amp", [True, False])
def test_model_amp_runs_the_encoder_in_bf16_and_the_aam_head_in_float32(
    monkeypatch: pytest.MonkeyPatch, amp: bool
) -> None:
    from voiceprint.common import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # bf16 also runs (emulated) elsewhere
    rng = np.random.default_rng(0)
    data = TrainingData(
        labels=["a", "b", "c"], clips=[[rng.standard_normal(12000).astype(np.float32) * 0.1] for _ in range(3)]
    )
    cfg = EcapaConfig.from_channels(16, lin_neurons=24)
    params = ModelParams(
        channels=16,
        lin_neurons=24,
        steps=4,
        batch_size=3,
        crop_s=0.5,
        device="cpu",
        augment={"kinds": ["noise"]},
        amp=amp,
    )
    seen: dict[str, torch.dtype] = {}
    original = AAMHead.forward

    def spy(self, embeddings, targets):
        seen["embedding"] = embeddings.dtype
        loss, cosines = original(self, embeddings, targets)
        seen["cosines"] = cosines.dtype
        return loss, cosines

    monkeypatch.setattr(AAMHead, "forward", spy)
    torch.manual_seed(0)
    with _one_thread():
        model, _, history = fit(AamObjective(data, params), params, cfg, device=torch.device("cpu"), progress=False)
    assert seen["embedding"] == (torch.bfloat16 if amp else torch.float32)
    assert seen["cosines"] == torch.float32
    assert all(math.isfinite(v) for v in history["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: float32 master weights
    assert training_precision(torch.device("cpu"), params) == ("bfloat16" if amp else "float32")

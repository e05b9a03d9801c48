"""Training augmentation: what each kind does to a signal, seeded replay, and the non-speech bank."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from voiceprint.common import audio
from voiceprint.training.augment import (
    KINDS,
    MAX_FREQ_MASK,
    MAX_SPEED,
    MAX_TIME_MASK,
    SPEEDS,
    Augmenter,
    add_noise,
    causal_convolve,
    reverberate,
    speed_perturb,
    synthetic_rir,
)
from voiceprint.training.data import load_nonspeech, nonspeech_gaps

SR = audio.TARGET_SR


def _dominant_hz(x: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(x * torch.hann_window(len(x))).abs()
    return float(torch.argmax(spectrum)) * SR / len(x)


def test_speed_perturbation_scales_frequency_by_the_speed() -> None:
    t = torch.arange(int(2 * SR * MAX_SPEED) + 10) / SR
    tone = torch.sin(2 * torch.pi * 1000.0 * t).repeat(64, 1)
    out, speeds = speed_perturb(tone, torch.Generator().manual_seed(0), out_samples=2 * SR)
    assert out.shape == (64, 2 * SR) and torch.isfinite(out).all()
    freqs = [round(_dominant_hz(row) / 10) * 10 for row in out]
    assert sorted(set(freqs)) == [900, 1000, 1100]  # every speed drawn over 64 rows; 1 kHz moved by 0.9 / 1.0 / 1.1
    # The returned index names each row's speed (training may count it as another speaker).
    assert freqs == [round(1000 * SPEEDS[k]) for k in speeds.tolist()]


def test_augmenter_plays_the_speeds_it_is_given() -> None:
    five = (0.8, 0.9, 1.0, 1.1, 1.2)
    aug = Augmenter(["speed"], 2 * SR, speeds=five)
    assert aug.source_samples == int(np.ceil(2 * SR * 1.2))  # slack for the fastest speed
    t = torch.arange(aug.source_samples) / SR
    tone = torch.sin(2 * torch.pi * 1000.0 * t).repeat(96, 1)
    out, speeds = aug.apply(tone, torch.Generator().manual_seed(0))
    freqs = [round(_dominant_hz(row) / 10) * 10 for row in out]
    assert freqs == [round(1000 * five[k]) for k in speeds.tolist()] and set(freqs) == {800, 900, 1000, 1100, 1200}
    unperturbed = Augmenter(["noise", "reverb"], SR, speeds=five).apply(tone[:2, :SR], torch.Generator())[1]
    assert unperturbed.tolist() == [five.index(1.0)] * 2
    with pytest.raises(ValueError, match="must include 1.0"):
        Augmenter(["speed"], SR, speeds=(0.9, 1.1))


def test_speed_perturbation_refuses_rows_without_slack() -> None:
    with pytest.raises(ValueError, match="needs rows of >="):
        speed_perturb(torch.zeros(2, SR), torch.Generator(), out_samples=SR)


def test_synthetic_rir_decays_and_reverb_keeps_energy() -> None:
    gen = torch.Generator().manual_seed(1)
    rirs = synthetic_rir(8, gen)
    assert torch.all(rirs[:, 0] == 1.0)
    early = rirs[:, 1 : SR // 20].pow(2).sum(dim=1)  # 0-50 ms
    late = rirs[:, -SR // 20 :].pow(2).sum(dim=1)  # the last 50 ms of 500
    assert torch.all(late < early * 1e-2)

    speech = torch.randn(16, SR) * torch.linspace(0, 1, SR)  # non-stationary, so smearing is visible
    wet = reverberate(speech, torch.Generator().manual_seed(2), prob=1.0)
    assert wet.shape == speech.shape
    assert torch.allclose(wet.pow(2).sum(dim=1), speech.pow(2).sum(dim=1), rtol=1e-3)
    assert not torch.allclose(wet, speech, atol=1e-3)
    dry = reverberate(speech, torch.Generator().manual_seed(2), prob=0.0)
    assert torch.equal(dry, speech)


def testcausal_convolve_is_the_truncated_linear_convolution() -> None:
    """The fast-length FFT must not wrap around: compare with direct convolution (numpy)."""
    gen = torch.Generator().manual_seed(4)
    signals = torch.randn(3, 4_999, generator=gen, dtype=torch.float64)  # 4999 + 1001 - 1: 5-smooth pad
    kernels = torch.randn(3, 1_001, generator=gen, dtype=torch.float64)
    got = causal_convolve(signals, kernels)
    assert got.shape == signals.shape
    for row in range(3):
        want = np.convolve(signals[row].numpy(), kernels[row].numpy())[: signals.shape[1]]
        np.testing.assert_allclose(got[row].numpy(), want, atol=1e-9)


def test_noise_only_chain_is_add_noise_draw_for_draw() -> None:
    """Models trained before the other kinds existed keep their ids: same draws, same arithmetic."""
    wavs = torch.randn(6, SR) * 0.1
    chained = Augmenter(["noise"], SR)(wavs, torch.Generator().manual_seed(3))
    direct = add_noise(wavs, torch.Generator().manual_seed(3))
    assert torch.equal(chained, direct)


def test_full_chain_shape_replay_and_unknown_kind() -> None:
    bank = np.random.default_rng(0).normal(0, 0.01, 3 * SR).astype(np.float32)
    aug = Augmenter(KINDS, SR, bank)
    assert aug.source_samples == int(np.ceil(SR * MAX_SPEED))
    wavs = torch.randn(8, aug.source_samples) * 0.1
    a = aug(wavs, torch.Generator().manual_seed(4))
    b = aug(wavs, torch.Generator().manual_seed(4))
    assert a.shape == (8, SR) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # the generator alone decides: a resumed run replays it
    with pytest.raises(ValueError, match="unknown augmentation.*allowed"):
        Augmenter(["noise", "babble"], SR)


def test_specaug_masks_whole_frame_and_bin_bands_only_when_asked() -> None:
    feats = torch.randn(16, 200, 80) + 3.0  # no cell is 0 before masking
    aug = Augmenter(["noise", "specaug"], SR)
    out = aug.features(feats, torch.Generator().manual_seed(0))
    again = aug.features(feats, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.shape == feats.shape
    zero = out == 0
    kept = ~zero
    assert torch.equal(out[kept], feats[kept])  # masking only ever sets cells to the mean (0)
    frames = zero.all(dim=2)  # whole frames hidden
    bins = zero.all(dim=1)  # whole mel bins hidden
    assert bool(frames.any()) and bool(bins.any())
    assert torch.equal(zero, frames[:, :, None] | bins[:, None, :])  # nothing but those bands
    assert int(frames.sum(dim=1).max()) <= 2 * MAX_TIME_MASK and int(bins.sum(dim=1).max()) <= 2 * MAX_FREQ_MASK
    assert torch.equal(Augmenter(["noise"], SR).features(feats, torch.Generator()), feats)


def test_nonspeech_gaps_are_the_complement_of_speech() -> None:
    rows = [
        {"path": "a.flac", "start_s": 0.5, "end_s": 2.0},
        {"path": "a.flac", "start_s": 2.0, "end_s": 4.0},  # split region: no gap
        {"path": "a.flac", "start_s": 4.1, "end_s": 6.0},  # 0.1 s pause: too short
        {"path": "a.flac", "start_s": 7.0, "end_s": 8.0},
        {"path": "b.flac", "start_s": 0.0, "end_s": 3.0},
    ]
    assert nonspeech_gaps(rows) == [("a.flac", 0.0, 0.5), ("a.flac", 6.0, 7.0)]


def test_nonspeech_bank_from_real_vad_output_is_quieter_than_speech(small_project) -> None:
    rows = [r for r in pq.read_table(small_project.segments).to_pylist() if r["split"] == "train"]
    bank = load_nonspeech(small_project, rows)
    assert bank is not None and len(bank) > SR // 2 and np.isfinite(bank).all()
    first = rows[0]
    speech = audio.load(small_project.resolve(first["path"]), first["start_s"], first["end_s"])
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))  # noqa: E731
    assert rms(bank) < 0.5 * rms(speech)

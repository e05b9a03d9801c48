"""Channel, loudness and short-crop augmentations: what each does to a known signal, seeded replay,
and the older kinds drawing exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from voiceprint.common import audio
from voiceprint.config import AugmentParams
from voiceprint.training.augment import (
    CLIP_SHARE,
    CODECS,
    KINDS,
    LOUDNESS_GAIN_DB,
    Augmenter,
    _uniform,
    available_codecs,
    bank_noise,
    change_loudness,
    codec_compress,
    codec_roundtrip,
    coloured_noise,
    hard_clip,
    mix_at_snr,
    mu_law,
    reverberate,
    short_crop,
    speed_perturb,
    telephone,
)

SR = audio.TARGET_SR


def _tone(hz: float, n: int, amp: float = 0.3) -> torch.Tensor:
    return amp * torch.sin(2 * torch.pi * hz * torch.arange(n, dtype=torch.float64) / SR).float()


def _chirp(n: int, f0: float = 100.0, f1: float = 4000.0, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / SR
    duration = n / SR
    return amp * torch.sin(2 * torch.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration))).float()


def _speech_like(n: int) -> np.ndarray:
    """Voiced harmonics of a gliding f0 under a syllable envelope, with a chirp and a little energy
    above 6 kHz (where a low-rate codec cuts)."""
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(120.0 + 25.0 * np.sin(2 * np.pi * 0.9 * t)) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25)) * (0.4 + 0.6 * np.sin(2 * np.pi * 4 * t) ** 2)
    chirp = 0.3 * np.sin(2 * np.pi * (300 * t + 1500 * t**2 / (n / SR)))
    high = 0.08 * (np.sin(2 * np.pi * 6500 * t) + np.sin(2 * np.pi * 7200 * t))
    x = voiced / np.abs(voiced).max() + chirp + high
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def _energy_db(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(after.pow(2).sum(dim=-1) / before.pow(2).sum(dim=-1))


def _band_energy(x: np.ndarray, low_hz: float, high_hz: float = SR / 2) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    return float(spectrum[(freqs >= low_hz) & (freqs <= high_hz)].sum())


def test_telephone_passes_the_voice_band_only() -> None:
    n = SR
    tones = torch.stack([_tone(1000, n), _tone(5000, n), _tone(100, n), _tone(2500, n)])
    out = telephone(tones, torch.Generator().manual_seed(0), prob=1.0, mu_law_prob=0.0)
    assert out.shape == tones.shape and torch.isfinite(out).all()
    kept = _energy_db(out, tones)
    assert kept[0] > -1.0 and kept[3] > -1.0  # 1 and 2.5 kHz: in the band
    assert kept[1] < -20.0 and kept[2] < -20.0  # 5 kHz (above the 8 kHz channel) and 100 Hz (mains hum)
    # Nothing above the 3.4 kHz edge comes back (the band between it and 8 kHz stays empty).
    assert _band_energy(out[0].numpy(), 3800) < 1e-4 * _band_energy(out[0].numpy(), 0)


def test_telephone_mu_law_is_a_small_quantisation_error_and_replays() -> None:
    speech = torch.from_numpy(np.stack([_speech_like(SR), 0.05 * _speech_like(SR)]))
    # G.711 itself: 8-bit codes, roughly 38 dB SNR whatever the level (the point of companding).
    for peak in (1.0, 0.25):
        quantised = mu_law(speech, torch.full((2,), peak))
        assert (_energy_db(quantised - speech, speech) < -30).all()
    plain = telephone(speech, torch.Generator().manual_seed(5), prob=1.0, mu_law_prob=0.0)
    coded = telephone(speech, torch.Generator().manual_seed(5), prob=1.0, mu_law_prob=1.0)
    assert (_energy_db(coded - plain, plain) < -25).all() and not torch.equal(coded, plain)
    again = telephone(speech, torch.Generator().manual_seed(5), prob=1.0, mu_law_prob=1.0)
    assert torch.equal(coded, again)  # the generator alone decides


def test_telephone_reaches_a_share_of_rows() -> None:
    rows = _tone(1000, SR // 4).repeat(32, 1) + _tone(5000, SR // 4)
    out = telephone(rows, torch.Generator().manual_seed(1))
    untouched = (out == rows).all(dim=1)
    assert 4 <= int(untouched.sum()) <= 28  # about half of the rows
    assert (_energy_db(out[~untouched], rows[~untouched]) < -2.0).all()  # the 5 kHz half removed


def test_augmenter_sends_its_telephone_share_through_the_channel() -> None:
    rows = _tone(1000, SR // 4).repeat(200, 1) + _tone(5000, SR // 4)
    for share, low, high in ((0.1, 8, 35), (0.5, 80, 120), (1.0, 200, 200)):
        out = Augmenter(["telephone"], SR // 4, telephone_share=share)(rows, torch.Generator().manual_seed(2))
        # A row through the phone channel loses its 5 kHz tone; the others keep both tones.
        spectrum = torch.fft.rfft(out, dim=1).abs()
        hf = spectrum[:, 5000 * (SR // 4) // SR]
        phoned = int((hf < 1e-2 * spectrum[:, 1000 * (SR // 4) // SR]).sum())
        assert low <= phoned <= high, (share, phoned)
    # The default share is the one every earlier telephone model was trained with, draw for draw.
    default = Augmenter(["telephone"], SR // 4)(rows[:8], torch.Generator().manual_seed(3))
    half = Augmenter(["telephone"], SR // 4, telephone_share=0.5)(rows[:8], torch.Generator().manual_seed(3))
    assert torch.equal(default, half)
    with pytest.raises(ValueError, match="telephone_share"):
        Augmenter(["telephone"], SR, telephone_share=0.0)


@pytest.mark.parametrize("codec", available_codecs())
def test_codec_round_trip_is_aligned_and_band_limited_at_low_rates(codec: str) -> None:
    x = _speech_like(SR)
    bitrates = CODECS[codec][2]
    for kbps in (min(bitrates), max(bitrates)):
        y = codec_roundtrip(x, codec, kbps)
        assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
        padded = np.pad(y, 3)
        corr = [float(np.corrcoef(padded[3 + lag : 3 + lag + len(x)], x)[0, 1]) for lag in range(-3, 4)]
        assert corr[3] > 0.9 and corr[3] == max(corr), (kbps, corr)  # time-aligned: best at lag 0
    low = codec_roundtrip(x, codec, min(bitrates))
    assert _band_energy(low, 6000) < 0.1 * _band_energy(x, 6000)  # the top band is dropped at low rate


def test_codec_compress_replays_keeps_shape_and_needs_an_encoder() -> None:
    codecs = available_codecs()
    assert codecs, "PyAV has neither libopus nor libmp3lame: the codec augmentation cannot run"
    rows = torch.from_numpy(np.stack([_speech_like(SR // 2)] * 4))
    a = codec_compress(rows, torch.Generator().manual_seed(2), codecs, prob=1.0)
    b = codec_compress(rows, torch.Generator().manual_seed(2), codecs, prob=1.0)
    assert a.shape == rows.shape and a.dtype == rows.dtype and torch.equal(a, b)
    assert not (a == rows).all(dim=1).any()
    assert torch.equal(codec_compress(rows, torch.Generator().manual_seed(2), codecs, prob=0.0), rows)
    assert Augmenter(["codec"], SR).codecs == codecs


def test_hard_clip_saturates_the_asked_share() -> None:
    rows = _chirp(SR // 2).repeat(3, 1)
    share = torch.tensor([0.001, 0.01, 0.05])
    clipped, level = hard_clip(rows, share)
    t = rows.shape[1]
    assert (clipped.abs().amax(dim=1) <= level).all()  # never above the clip level
    saturated = (clipped.abs() >= level[:, None]).float().mean(dim=1)
    assert (saturated >= share).all() and (saturated <= share + 5 / t).all()
    untouched = rows.abs() < level[:, None]
    assert torch.equal(clipped[untouched], rows[untouched])


def test_loudness_spans_the_gains_clips_some_rows_and_stays_finite() -> None:
    chirp = _chirp(SR // 8)
    rows = torch.cat([chirp.repeat(199, 1), torch.zeros(1, len(chirp))])  # the last row silent
    gains_only = change_loudness(rows, torch.Generator().manual_seed(3), clip_prob=0.0)
    gain_db = 20 * torch.log10(gains_only[:-1].abs().amax(dim=1) / chirp.abs().max())
    low, high = LOUDNESS_GAIN_DB
    assert gain_db.min() >= low - 1e-3 and gain_db.max() <= high + 1e-3
    assert gain_db.min() < low + 5 and gain_db.max() > high - 5  # the whole range is drawn
    assert torch.allclose(gains_only[:-1], chirp * (10 ** (gain_db / 20))[:, None], rtol=1e-4, atol=1e-7)

    out = change_loudness(rows, torch.Generator().manual_seed(3))
    assert torch.isfinite(out).all() and torch.equal(out[-1], rows[-1])
    clipped = (out != gains_only).any(dim=1)  # the same draws give the same gains: only clipping differs
    assert 30 <= int(clipped.sum()) <= 90  # about 30 % of the rows
    level = out[clipped].abs().amax(dim=1, keepdim=True)
    assert (gains_only[clipped].abs().amax(dim=1, keepdim=True) > level).all()  # the peaks are cut
    saturated = (out[clipped].abs() >= level).float().mean(dim=1)
    low_share, high_share = CLIP_SHARE
    assert (saturated >= low_share).all() and (saturated <= high_share + 5 / len(chirp)).all()


def test_short_crop_cuts_one_length_per_batch_at_random_offsets() -> None:
    t, rows = SR, 4
    ramps = torch.arange(t, dtype=torch.float32) + 100_000 * torch.arange(rows, dtype=torch.float32)[:, None]
    lengths = set()
    for seed in range(30):
        out = short_crop(ramps, torch.Generator().manual_seed(seed), SR // 4)
        length = out.shape[1]
        assert SR // 4 <= length <= t
        lengths.add(length)
        for r in range(rows):
            start = int(out[r, 0]) - 100_000 * r  # the ramp names its own sample index
            assert 0 <= start <= t - length
            assert np.allclose(out[r].numpy(), ramps[r, start : start + length].numpy())
    assert len(lengths) > 25 and min(lengths) < SR // 2 and max(lengths) > 0.85 * SR  # uniform over the range


def test_augmenter_shortcrop_after_speed_and_its_bounds() -> None:
    aug = Augmenter(["speed", "shortcrop"], 2 * SR, min_crop_s=0.5)
    assert aug.source_samples == int(np.ceil(2 * SR * 1.1))  # shortcrop draws from the usual crop
    chirp = _chirp(aug.source_samples).repeat(4, 1)
    out, speeds = aug.apply(chirp, torch.Generator().manual_seed(0))
    assert SR // 2 <= out.shape[1] <= 2 * SR and out.shape[0] == 4 and speeds.shape == (4,)
    capped = Augmenter(["shortcrop"], SR, min_crop_s=3.0)  # min_crop_s above the crop: the full crop
    assert capped(chirp[:, :SR], torch.Generator()).shape == (4, SR)
    with pytest.raises(ValueError, match="min_crop_s"):
        Augmenter(["shortcrop"], SR, min_crop_s=0.0)


def test_every_kind_together_replays_and_stays_finite() -> None:
    bank = (0.01 * _chirp(3 * SR, 50, 7000)).numpy()
    aug = Augmenter(KINDS, SR, bank, min_crop_s=0.5)
    wavs = torch.from_numpy(np.stack([_speech_like(aug.source_samples)] * 6))
    a = aug(wavs, torch.Generator().manual_seed(7))
    b = Augmenter(KINDS, SR, bank, min_crop_s=0.5)(wavs, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.shape[0] == 6 and SR // 2 <= a.shape[1] <= SR


@pytest.mark.parametrize(
    "kinds", [["speed", "reverb", "noise", "nonspeech", "specaug"], ["reverb", "nonspeech"], ["speed", "noise"]]
)
def test_older_kinds_draw_exactly_as_before(kinds: list[str]) -> None:
    """Models trained before the new kinds keep their ids: the chain without them is the composition
    of the pre-existing steps, draw for draw, and leaves the generator where it left it."""
    speeds = (0.9, 1.0, 1.1)
    bank = (0.01 * _chirp(3 * SR, 50, 7000)).numpy()
    aug = Augmenter(kinds, SR, bank, speeds)
    wavs = torch.stack([_chirp(aug.source_samples, 80, 5000), _chirp(aug.source_samples, 3000, 200)] * 2)
    got_gen = torch.Generator().manual_seed(11)
    got, got_speeds = aug.apply(wavs, got_gen)

    gen = torch.Generator().manual_seed(11)
    want_speeds = torch.full((4,), 1)
    if "speed" in kinds:
        want, want_speeds = speed_perturb(wavs, gen, SR, speeds)
    else:
        want = wavs[:, :SR]
    if "reverb" in kinds:
        want = reverberate(want, gen)
    b, t = want.shape
    apply = (torch.rand(b, generator=gen) < 0.6).float()
    snr = _uniform(b, (5.0, 20.0), gen)
    if "noise" in kinds and "nonspeech" in kinds:
        use_bank = torch.rand(b, generator=gen) < 0.5
        recorded = bank_noise(torch.from_numpy(bank), b, t, gen)
        noise = torch.where(use_bank[:, None], recorded, coloured_noise(b, t, gen))
    elif "nonspeech" in kinds:
        noise = bank_noise(torch.from_numpy(bank), b, t, gen)
    else:
        noise = coloured_noise(b, t, gen)
    want = mix_at_snr(want, noise, snr, apply)
    want = want * (10.0 ** (_uniform(b, (-6.0, 6.0), gen) / 20.0))[:, None]

    assert torch.equal(got, want) and torch.equal(got_speeds, want_speeds)
    assert torch.equal(got_gen.get_state(), gen.get_state())


def test_config_accepts_the_new_kinds_and_checks_min_crop() -> None:
    params = AugmentParams(kinds=["telephone", "codec", "loudness", "shortcrop"], min_crop_s=0.5)
    assert params.min_crop_s == 0.5 and AugmentParams().min_crop_s == 1.0
    assert set(AugmentParams.model_fields["kinds"].annotation.__args__[0].__args__) == set(KINDS)
    with pytest.raises(ValidationError):
        AugmentParams(min_crop_s=0.0)
    with pytest.raises(ValidationError):
        AugmentParams(kinds=["gsm"])
    assert AugmentParams().telephone_share == 0.5
    for share in (0.0, 1.5):
        with pytest.raises(ValidationError, match="telephone_share"):
            AugmentParams(telephone_share=share)

"""Training-time augmentation of fixed-length 16 kHz crops, batched and driven by one seeded generator.

:class:`Augmenter` applies the kinds ``model.augment.kinds`` picks (noise, nonspeech, reverb, speed,
specaug). Every random draw comes from the ``torch.Generator`` passed in, never from the global
RNGs, so a resumed run replays the same augmentations. Design: docs/design/training.md#augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import scipy.fft
import torch
import torchaudio.functional as AF

from voiceprint.common.audio import TARGET_SR

KINDS = ("noise", "nonspeech", "reverb", "speed", "specaug")
SPEEDS = (0.9, 1.0, 1.1)  # Kaldi's classic set; the pipeline's own default is model.augment.speeds
MAX_SPEED = max(SPEEDS)
UNPERTURBED = SPEEDS.index(1.0)
RT60_S = (0.2, 0.8)
RIR_MAX_S = 0.5
# specaug: per crop, this many masks along time (frames) and along frequency (mel bins), each of a
# width drawn uniformly from 0 to the maximum. For a 2-s crop (200 frames, 80 bins) at most 10 %
# of the frames and 20 % of the bins are hidden.
TIME_MASKS, MAX_TIME_MASK = 2, 10
FREQ_MASKS, MAX_FREQ_MASK = 2, 8


def coloured_noise(b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """``(b, t)`` noise with power ∝ 1/f^k, k drawn per row from 0, 1, 2 (white, pink, brown)."""
    exponent = torch.randint(0, 3, (b,), generator=gen).float()
    spec = torch.fft.rfft(torch.randn(b, t, generator=gen), dim=1)
    freqs = torch.arange(spec.shape[1], dtype=torch.float32).clamp(min=1.0)
    return torch.fft.irfft(spec * freqs.pow(-exponent[:, None] / 2), n=t, dim=1)


def mix_at_snr(wavs: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``wavs + noise`` scaled to ``snr_db`` per row, only where ``apply`` is 1."""
    p_signal = wavs.pow(2).mean(dim=1).clamp(min=1e-8)
    p_noise = noise.pow(2).mean(dim=1).clamp(min=1e-12)
    scale = torch.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0))) * apply
    return wavs + noise * scale[:, None]


def _uniform(b: int, low_high: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    low, high = low_high
    return low + (high - low) * torch.rand(b, generator=gen)


def add_noise(
    wavs: torch.Tensor,
    gen: torch.Generator,
    *,
    noise_prob: float = 0.6,
    snr_db: tuple[float, float] = (5.0, 20.0),
    gain_db: tuple[float, float] = (-6.0, 6.0),
) -> torch.Tensor:
    """Coloured noise at a random SNR, then a random gain: ``(B, T)`` in, ``(B, T)`` out.

    The gain mostly matters through its interaction with Fbank's log floor: sentence mean
    normalisation removes a constant log-gain.
    """
    b, t = wavs.shape
    apply = (torch.rand(b, generator=gen) < noise_prob).float()
    noise = coloured_noise(b, t, gen)
    mixed = mix_at_snr(wavs, noise, _uniform(b, snr_db, gen), apply)
    return mixed * (10.0 ** (_uniform(b, gain_db, gen) / 20.0))[:, None]


def bank_noise(bank: torch.Tensor, b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """``b`` random ``t``-sample windows of the non-speech bank (tiled when the bank is shorter)."""
    if len(bank) < t:
        bank = bank.repeat(math.ceil(t / len(bank)) + 1)
    starts = torch.randint(0, len(bank) - t + 1, (b,), generator=gen)
    return torch.stack([bank[s : s + t] for s in starts.tolist()])


def synthetic_rir(b: int, gen: torch.Generator, sr: int = TARGET_SR) -> torch.Tensor:
    """``(b, L)`` room impulse responses: a unit direct path, then Gaussian noise decaying 60 dB in RT60.

    The reverberant tail starts 2.5 ms after the direct path and carries a random share of the
    energy (direct-to-reverberant ratio 0-12 dB), so both dry and very wet rooms occur.
    """
    n = int(RIR_MAX_S * sr)
    rt60 = _uniform(b, RT60_S, gen)
    time_s = torch.arange(n, dtype=torch.float32) / sr
    tail = torch.randn(b, n, generator=gen) * torch.exp(-math.log(1000.0) * time_s[None, :] / rt60[:, None])
    tail[:, : int(0.0025 * sr)] = 0.0
    drr = 10.0 ** (_uniform(b, (0.0, 12.0), gen) / 10.0)
    tail = tail * torch.sqrt(1.0 / (drr * tail.pow(2).sum(dim=1).clamp(min=1e-12)))[:, None]
    tail[:, 0] = 1.0
    return tail


def causal_convolve(signals: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Row-wise linear convolution of ``signals`` with ``kernels``, cut to the signals' length.

    ``torchaudio.functional.fftconvolve`` transforms at the exact full length ``t + k - 1`` (39,999
    for a 2-s crop and a 0.5-s RIR), a size with a large prime factor that pocketfft handles about
    six times slower than the next 5-smooth size (measured 37 ms against 6 ms a batch on 2 cores).
    Padding to ``scipy.fft.next_fast_len`` gives the same linear convolution, since the transform
    still holds at least the full length, and the tail past ``t`` is dropped.
    """
    t = signals.shape[-1]
    n = scipy.fft.next_fast_len(t + kernels.shape[-1] - 1, real=True)
    spectrum = torch.fft.rfft(signals, n=n) * torch.fft.rfft(kernels, n=n)
    return torch.fft.irfft(spectrum, n=n)[..., :t]


def reverberate(wavs: torch.Tensor, gen: torch.Generator, *, prob: float = 0.4) -> torch.Tensor:
    """Convolve a random ``prob`` share of rows with a synthetic RIR, keeping length and energy."""
    b, t = wavs.shape
    apply = torch.rand(b, generator=gen) < prob
    rirs = synthetic_rir(b, gen)
    if not bool(apply.any()):
        return wavs
    wet = causal_convolve(wavs[apply], rirs[apply])
    energy = wavs[apply].pow(2).sum(dim=1) / wet.pow(2).sum(dim=1).clamp(min=1e-12)
    out = wavs.clone()
    out[apply] = wet * energy.sqrt()[:, None]
    return out


def speed_perturb(
    wavs: torch.Tensor, gen: torch.Generator, out_samples: int, speeds: tuple[float, ...] = SPEEDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample each row by a speed drawn from ``speeds``, then cut a random ``out_samples`` window.

    Returns the windows and each row's index into ``speeds`` (training may count a changed speed as
    another speaker). Rows must hold at least ``out_samples * max(speeds)`` samples, so even the
    fastest speed fills the window without padding.
    """
    b, t = wavs.shape
    needed = math.ceil(out_samples * max(speeds))
    if t < needed:
        raise ValueError(f"speed_perturb needs rows of >= {needed} samples, got {t}")
    choice = torch.randint(0, len(speeds), (b,), generator=gen)
    offsets = torch.rand(b, generator=gen)
    out = torch.empty(b, out_samples)
    for k, speed in enumerate(speeds):
        rows = torch.nonzero(choice == k).flatten()
        if rows.numel() == 0:
            continue
        # Resampling from 100*speed to 100 shortens the signal by 1/speed: played at 16 kHz it is
        # `speed` times faster, and pitch and formants move with it, as in Kaldi's recipe.
        fast = AF.resample(wavs[rows], orig_freq=round(100 * speed), new_freq=100) if speed != 1.0 else wavs[rows]
        slack = fast.shape[1] - out_samples
        for i, row in enumerate(rows.tolist()):
            start = int(offsets[row] * (slack + 1)) if slack > 0 else 0
            out[row] = fast[i, start : start + out_samples]
    return out, choice


def mask_features(feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """SpecAugment masks on ``(B, frames, bins)`` mean-normalised features: masked cells become 0 (the mean).

    Written here rather than taken from SpeechBrain's ``SpectrogramDrop`` because that draws from the
    global RNG, and every augmentation draw must come from ``gen`` (see the module docstring).
    """
    out = feats
    for axis, count, widest in ((1, TIME_MASKS, MAX_TIME_MASK), (2, FREQ_MASKS, MAX_FREQ_MASK)):
        b, n = feats.shape[0], feats.shape[axis]
        widths = torch.randint(0, min(widest, n) + 1, (b, count), generator=gen)
        starts = (torch.rand(b, count, generator=gen) * (n - widths + 1)).long()
        idx = torch.arange(n)
        hidden = ((idx >= starts[..., None]) & (idx < (starts + widths)[..., None])).any(dim=1)  # (B, n)
        hidden = hidden[:, :, None] if axis == 1 else hidden[:, None, :]
        out = out.masked_fill(hidden.to(feats.device), 0.0)
    return out


class Augmenter:
    """The ``model.augment.kinds`` chain: speed, then reverb, then additive noise (synthetic or recorded), then gain.

    ``source_samples`` is the crop length to draw from the data: longer than the output when speed
    perturbation needs the slack. With ``kinds == ["noise"]`` it reproduces :func:`add_noise`
    draw for draw (the models trained before the other kinds existed keep their ids).
    """

    def __init__(
        self,
        kinds: Iterable[str],
        crop_samples: int,
        nonspeech: np.ndarray | None = None,
        speeds: tuple[float, ...] = SPEEDS,
    ):
        self.kinds = frozenset(kinds)
        self.speeds = tuple(speeds)
        if 1.0 not in self.speeds:
            raise ValueError(f"speeds {list(self.speeds)} must include 1.0 (the unperturbed crop)")
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; allowed: {list(KINDS)}")
        self.crop = crop_samples
        bank = torch.from_numpy(np.ascontiguousarray(nonspeech, dtype=np.float32)) if nonspeech is not None else None
        self.bank = bank if bank is not None and len(bank) >= TARGET_SR // 10 else None

    @property
    def source_samples(self) -> int:
        return math.ceil(self.crop * max(self.speeds)) if "speed" in self.kinds else self.crop

    def features(self, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The feature-domain part of the chain (``specaug``); ``feats`` unchanged without it."""
        return mask_features(feats, gen) if "specaug" in self.kinds else feats

    def __call__(self, wavs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(wavs, gen)[0]

    def apply(self, wavs: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented crops and each row's index into ``speeds`` (that of 1.0 without ``speed``)."""
        speeds = torch.full((wavs.shape[0],), self.speeds.index(1.0), dtype=torch.long)
        if self.kinds == {"noise"}:
            return add_noise(wavs[:, : self.crop], gen), speeds
        if "speed" in self.kinds:
            wavs, speeds = speed_perturb(wavs, gen, self.crop, self.speeds)
        else:
            wavs = wavs[:, : self.crop]
        if "reverb" in self.kinds:
            wavs = reverberate(wavs, gen)
        synthetic = "noise" in self.kinds
        recorded = "nonspeech" in self.kinds and self.bank is not None
        if synthetic or recorded:
            b, t = wavs.shape
            apply = (torch.rand(b, generator=gen) < 0.6).float()
            snr = _uniform(b, (5.0, 20.0), gen)
            if synthetic and recorded:
                use_bank = torch.rand(b, generator=gen) < 0.5
                noise = torch.where(use_bank[:, None], bank_noise(self.bank, b, t, gen), coloured_noise(b, t, gen))
            elif recorded:
                noise = bank_noise(self.bank, b, t, gen)
            else:
                noise = coloured_noise(b, t, gen)
            wavs = mix_at_snr(wavs, noise, snr, apply)
        gain = 10.0 ** (_uniform(wavs.shape[0], (-6.0, 6.0), gen) / 20.0)
        return wavs * gain[:, None], speeds

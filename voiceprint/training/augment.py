"""Training-time augmentation of fixed-length 16 kHz crops, batched and driven by one seeded generator.

:class:`Augmenter` applies the kinds ``model.augment.kinds`` picks (noise, nonspeech, reverb, speed,
specaug, telephone, codec, loudness, shortcrop). Every random draw comes from the ``torch.Generator``
passed in, never from the global RNGs, so a resumed run replays the same augmentations. Design:
docs/design/training.md#augmentation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.fft
import scipy.signal
import torch
import torchaudio.functional as AF

from voiceprint.common.audio import TARGET_SR
from voiceprint.common.cores import usable_cores

KINDS = ("noise", "nonspeech", "reverb", "speed", "specaug", "telephone", "codec", "loudness", "shortcrop")
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
# telephone: the ITU-T narrow-band channel (300-3,400 Hz, 8 kHz, G.711 mu-law), its band edges jittered
# per row by up to these many Hz, and raised-cosine transitions this wide centred on the edges. The
# high edge plus half its transition stays below 4 kHz, the 8 kHz channel's Nyquist frequency.
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_JITTER_HZ = (50.0, 100.0)
TELEPHONE_TRANSITION_HZ = (100.0, 200.0)
TELEPHONE_SR = 8000
MU_LAW_CHANNELS = 256  # G.711: 8-bit codes
MU_LAW_PEAK_DB = (-12.0, 0.0)  # the row's peak level at the mu-law quantiser, dB full scale
# codec: PyAV (FFmpeg) encoder, sample format, bitrates drawn from (kbit/s), and decoders by preference.
CODECS: dict[str, tuple[str, str, tuple[int, ...], tuple[str, ...]]] = {
    "opus": ("libopus", "flt", (8, 12, 16, 20, 24, 32), ("opus", "libopus")),
    "mp3": ("libmp3lame", "fltp", (16, 24, 32, 40, 48, 56, 64), ("mp3float", "mp3")),
}
CODEC_PEAK = 0.9  # rows are scaled to this peak for the encoder (float input beyond +-1 may clip) and back
CODEC_MAX_LAG = 2048  # samples searched either way when measuring a codec's delay
# loudness: a gain over a wide range, and on a share of rows hard clipping that saturates a random
# share of the samples (a recording made too hot).
LOUDNESS_GAIN_DB = (-30.0, 20.0)
CLIP_PROB = 0.3
CLIP_SHARE = (0.001, 0.05)


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


def band_limit(wavs: torch.Tensor, low_hz: torch.Tensor, high_hz: torch.Tensor, sr: int = TARGET_SR) -> torch.Tensor:
    """Zero-phase band-pass of each row to ``[low_hz, high_hz]`` (per-row edges), by an FFT mask.

    The mask rises and falls as raised cosines :data:`TELEPHONE_TRANSITION_HZ` wide centred on the
    edges (half amplitude there); the smooth transitions keep the filter's ringing short, and the
    zero padding (longer than that ringing) keeps the circular FFT from wrapping one end onto the other.
    """
    t = wavs.shape[-1]
    n = scipy.fft.next_fast_len(t + 1024, real=True)
    freqs = torch.fft.rfftfreq(n, d=1.0 / sr)
    rise, fall = TELEPHONE_TRANSITION_HZ

    def ramp(u: torch.Tensor) -> torch.Tensor:
        return 0.5 - 0.5 * torch.cos(math.pi * u.clamp(0.0, 1.0))

    mask = ramp((freqs - (low_hz[:, None] - rise / 2)) / rise) * ramp(((high_hz[:, None] + fall / 2) - freqs) / fall)
    return torch.fft.irfft(torch.fft.rfft(wavs, n=n) * mask, n=n)[..., :t]


def mu_law(wavs: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """G.711 mu-law quantisation round trip (256 codes), each row scaled to ``peak`` (<= 1) at the quantiser."""
    scale = peak[:, None] / wavs.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    codes = AF.mu_law_encoding((wavs * scale).clamp(-1.0, 1.0), MU_LAW_CHANNELS)
    return AF.mu_law_decoding(codes, MU_LAW_CHANNELS) / scale


def telephone(wavs: torch.Tensor, gen: torch.Generator, *, prob: float = 0.5, mu_law_prob: float = 0.5) -> torch.Tensor:
    """A narrow-band telephone channel on a random ``prob`` share of rows; ``(B, T)`` in and out.

    Band-pass 300-3,400 Hz (edges jittered per row), down to 8 kHz, G.711 mu-law on a ``mu_law_prob``
    share of those rows (at a random level below full scale), and back up to 16 kHz: the band above
    3.4 kHz stays empty, as in a real narrow-band call.
    """
    b, t = wavs.shape
    apply = torch.rand(b, generator=gen) < prob
    use_mu = torch.rand(b, generator=gen) < mu_law_prob
    (low, high), (low_jitter, high_jitter) = TELEPHONE_BAND_HZ, TELEPHONE_JITTER_HZ
    low_hz = _uniform(b, (low - low_jitter, low + low_jitter), gen)
    high_hz = _uniform(b, (high - high_jitter, high + high_jitter), gen)
    peak = 10.0 ** (_uniform(b, MU_LAW_PEAK_DB, gen) / 20.0)
    if not bool(apply.any()):
        return wavs
    narrow = AF.resample(band_limit(wavs[apply], low_hz[apply], high_hz[apply]), TARGET_SR, TELEPHONE_SR)
    mu_rows = use_mu[apply]
    if bool(mu_rows.any()):
        narrow[mu_rows] = mu_law(narrow[mu_rows], peak[apply][mu_rows])
    out = wavs.clone()
    out[apply] = AF.resample(narrow, TELEPHONE_SR, TARGET_SR)[:, :t]
    return out


def _av() -> Any:
    """The ``av`` module, imported only when the codec kind is used (PyAV loads FFmpeg's libraries)."""
    import av

    return av


@functools.cache
def available_codecs() -> tuple[str, ...]:
    """The :data:`CODECS` whose encoder and a decoder this PyAV build has, in :data:`CODECS` order."""
    av = _av()
    found = []
    for name, (encoder, _, _, decoders) in CODECS.items():
        try:
            av.Codec(encoder, "w")
        except Exception:  # av.codec.codec.UnknownCodecError: not in this build
            continue
        if any(d in av.codecs_available for d in decoders):
            found.append(name)
    return tuple(found)


def _encode_decode(wav: np.ndarray, codec: str, kbps: int) -> np.ndarray:
    """One mono 16 kHz row through ``codec`` at ``kbps`` and back, at 16 kHz, not yet aligned or cut."""
    av = _av()
    encoder, fmt, _, decoders = CODECS[codec]
    enc = av.CodecContext.create(encoder, "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = TARGET_SR, "mono", fmt, kbps * 1000
    enc.open()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[None, :], dtype=np.float32), format=fmt, layout="mono")
    frame.sample_rate, frame.pts = TARGET_SR, 0
    packets = [*enc.encode(frame), *enc.encode(None)]
    dec = av.CodecContext.create(next(d for d in decoders if d in av.codecs_available), "r")
    if enc.extradata:
        dec.extradata = enc.extradata  # Opus: the OpusHead the decoder needs
    chunks, rate = [], TARGET_SR
    for packet in [*packets, None]:  # None flushes the decoder
        for out in dec.decode(packet):
            pcm = out.to_ndarray().reshape(-1)
            chunks.append(pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32))
            rate = out.sample_rate
    decoded = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if rate == TARGET_SR:
        return decoded
    # Opus always decodes at 48 kHz. scipy's polyphase resampler (zero-phase, like torchaudio's) on one
    # row: torch's intra-op threads cost more than the work on a job this small, inside a thread pool.
    g = math.gcd(rate, TARGET_SR)
    return scipy.signal.resample_poly(decoded, TARGET_SR // g, rate // g).astype(np.float32)


def _calibration_signal(n: int) -> np.ndarray:
    """A speech-like probe: harmonics of a gliding 110-170 Hz f0 under a 3 Hz syllable envelope."""
    time_s = np.arange(n) / TARGET_SR
    phase = 2 * np.pi * np.cumsum(140.0 + 30.0 * np.sin(2 * np.pi * 1.3 * time_s)) / TARGET_SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * time_s)) ** 2
    return (0.5 * voiced / np.abs(voiced).max()).astype(np.float32)


@functools.cache
def codec_lag(codec: str, kbps: int) -> int:
    """Samples by which ``codec``'s decoded output at ``kbps`` trails its input (negative: leads),
    measured once per process.

    FFmpeg trims the encoder's priming samples itself (the packets carry them as side data), but not
    quite everywhere: with PyAV 18, Opus at 8 kbit/s (narrow-band SILK) still trails by 2 samples, its
    other rates and MP3 by none, and libopus's own decoder (not used when FFmpeg's is there) leads by
    one. So the lag is measured per codec and bitrate, on :func:`_calibration_signal` (its f0 glides, so
    no pitch period correlates as well as the true lag), as the peak of the cross-correlation over
    +-:data:`CODEC_MAX_LAG` samples; a per-row search would be fooled by periodic rows.
    """
    probe = _calibration_signal(TARGET_SR)
    out = _encode_decode(probe, codec, kbps)
    n = scipy.fft.next_fast_len(len(out) + len(probe) + 2 * CODEC_MAX_LAG, real=True)
    xcorr = np.fft.irfft(np.fft.rfft(out, n) * np.conj(np.fft.rfft(probe, n)), n)
    lags = np.r_[np.arange(0, CODEC_MAX_LAG + 1), np.arange(-CODEC_MAX_LAG, 0)]
    return int(lags[np.argmax(np.r_[xcorr[: CODEC_MAX_LAG + 1], xcorr[-CODEC_MAX_LAG:]])])


def codec_roundtrip(wav: np.ndarray, codec: str, kbps: int) -> np.ndarray:
    """``wav`` (mono, 16 kHz) encoded by ``codec`` (a :data:`CODECS` key) at ``kbps`` and decoded, in
    memory, time-aligned with the input (the codec's delay removed) and cut or zero-padded to its length."""
    peak = float(np.abs(wav).max()) if len(wav) else 0.0
    scale = CODEC_PEAK / peak if peak > 0 else 1.0
    out = _encode_decode(wav * scale, codec, kbps) / scale
    lag = codec_lag(codec, kbps)
    out = out[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, np.float32), out])
    aligned = np.zeros(len(wav), np.float32)
    aligned[: min(len(out), len(wav))] = out[: len(wav)]
    return aligned


def codec_compress(
    wavs: torch.Tensor, gen: torch.Generator, codecs: tuple[str, ...], *, prob: float = 0.3
) -> torch.Tensor:
    """A lossy codec round trip (one of ``codecs`` at one of its bitrates, per row) on a random ``prob``
    share of rows; ``(B, T)`` in and out, aligned with the input. Rows run on a thread pool (FFmpeg
    releases the GIL); each row's result depends on its own draws only, so the output is deterministic."""
    b, _ = wavs.shape
    apply = torch.rand(b, generator=gen) < prob
    which = torch.randint(0, len(codecs), (b,), generator=gen)
    rate = torch.rand(b, generator=gen)
    rows = torch.nonzero(apply).flatten().tolist()
    if not rows:
        return wavs
    jobs = []
    for row in rows:
        codec = codecs[int(which[row])]
        bitrates = CODECS[codec][2]
        jobs.append((wavs[row].numpy(), codec, bitrates[min(int(rate[row] * len(bitrates)), len(bitrates) - 1)]))
    with ThreadPoolExecutor(max_workers=min(len(jobs), usable_cores())) as pool:
        coded = list(pool.map(lambda job: codec_roundtrip(*job), jobs))
    out = wavs.clone()
    out[rows] = torch.from_numpy(np.stack(coded)).to(wavs.dtype)
    return out


def hard_clip(wavs: torch.Tensor, share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each row at the level its loudest ``share`` of samples exceed, so about that share
    saturates; returns the clipped rows and each row's clip level."""
    t = wavs.shape[-1]
    k = (share * t).long().clamp(0, t - 1)
    loudest_first = wavs.abs().topk(int(k.max()) + 1, dim=1).values  # sorted, as much as is needed
    level = loudest_first.gather(1, k[:, None])
    return wavs.clamp(-level, level), level.squeeze(1)


def change_loudness(
    wavs: torch.Tensor,
    gen: torch.Generator,
    *,
    gain_db: tuple[float, float] = LOUDNESS_GAIN_DB,
    clip_prob: float = CLIP_PROB,
    clip_share: tuple[float, float] = CLIP_SHARE,
) -> torch.Tensor:
    """A random gain per row (relative to the row's own level), then, on a random ``clip_prob`` share
    of rows, hard clipping that saturates a random ``clip_share`` of the samples; ``(B, T)`` in and out."""
    b, _ = wavs.shape
    gain = 10.0 ** (_uniform(b, gain_db, gen) / 20.0)
    clip = torch.rand(b, generator=gen) < clip_prob
    share = _uniform(b, clip_share, gen)
    out = wavs * gain[:, None]
    if bool(clip.any()):
        out[clip] = hard_clip(out[clip], share[clip])[0]
    return out


def short_crop(wavs: torch.Tensor, gen: torch.Generator, min_samples: int) -> torch.Tensor:
    """Every row cut to one window whose length (one per batch, the batch keeps one length) is drawn
    uniformly from ``min_samples`` to the rows' length, at a random offset per row."""
    b, t = wavs.shape
    length = int(torch.randint(min(min_samples, t), t + 1, (1,), generator=gen))
    starts = (torch.rand(b, generator=gen) * (t - length + 1)).long().clamp(max=t - length)
    return wavs.gather(1, starts[:, None] + torch.arange(length)[None, :])


class Augmenter:
    """The ``model.augment.kinds`` chain: speed, shortcrop, reverb, telephone, codec, additive noise
    (synthetic or recorded), then a gain (``loudness`` when asked, else a +-6 dB one).

    ``source_samples`` is the crop length to draw from the data: longer than the output when speed
    perturbation needs the slack. With ``kinds == ["noise"]`` it reproduces :func:`add_noise`
    draw for draw, and the kinds added later (telephone, codec, loudness, shortcrop) draw nothing
    when absent (the models trained before them keep their ids). With ``shortcrop`` the output is
    shorter than ``crop_samples``: from ``min_crop_s`` (capped at the crop) to the full crop. With
    ``telephone``, a ``telephone_share`` of the rows goes through the phone channel.
    """

    def __init__(
        self,
        kinds: Iterable[str],
        crop_samples: int,
        nonspeech: np.ndarray | None = None,
        speeds: tuple[float, ...] = SPEEDS,
        *,
        min_crop_s: float = 1.0,
        telephone_share: float = 0.5,
    ):
        self.kinds = frozenset(kinds)
        self.speeds = tuple(speeds)
        if 1.0 not in self.speeds:
            raise ValueError(f"speeds {list(self.speeds)} must include 1.0 (the unperturbed crop)")
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; allowed: {list(KINDS)}")
        self.crop = crop_samples
        if not min_crop_s > 0:
            raise ValueError(f"min_crop_s must be > 0, got {min_crop_s}")
        self.min_crop = min(crop_samples, max(1, round(min_crop_s * TARGET_SR)))
        if not 0 < telephone_share <= 1:
            raise ValueError(f"telephone_share must be in (0, 1], got {telephone_share}")
        self.telephone_share = telephone_share
        self.codecs: tuple[str, ...] = ()
        if "codec" in self.kinds:
            self.codecs = available_codecs()
            if not self.codecs:
                wanted = " or ".join(f"{enc} ({name})" for name, (enc, *_) in CODECS.items())
                raise RuntimeError(
                    f"the codec augmentation needs PyAV with the {wanted} encoder; this build of PyAV "
                    f"(av {_av().__version__}) has none of them (see av.codecs_available)"
                )
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
        if "shortcrop" in self.kinds:
            wavs = short_crop(wavs, gen, self.min_crop)
        if "reverb" in self.kinds:
            wavs = reverberate(wavs, gen)
        if "telephone" in self.kinds:
            wavs = telephone(wavs, gen, prob=self.telephone_share)
        if "codec" in self.kinds:
            wavs = codec_compress(wavs, gen, self.codecs)
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
        if "loudness" in self.kinds:
            return change_loudness(wavs, gen), speeds
        gain = 10.0 ** (_uniform(wavs.shape[0], (-6.0, 6.0), gen) / 20.0)
        return wavs * gain[:, None], speeds

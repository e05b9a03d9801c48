"""Audio decoding: any WAV/FLAC soundfile reads, downmixed to mono and resampled to 16 kHz.

Decoding goes through libsndfile (``soundfile``) rather than ``torchaudio.load`` because the
latter needs torchcodec/FFmpeg from torchaudio 2.9 on. Bad audio raises :class:`AudioError` with
the file and the reason, so stages can record a reject and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

TARGET_SR = 16_000


class AudioError(ValueError):
    """A file that cannot be used as speech; ``reason`` is meant for humans (and rejects.parquet)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe(path: str | Path) -> AudioInfo:
    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile reports format errors as generic RuntimeError/LibsndfileError
        raise AudioError(path, f"not a readable audio file ({_short(err)})") from None
    if info.frames <= 0:
        raise AudioError(path, "contains no audio frames")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


def load(
    path: str | Path,
    start_s: float = 0.0,
    end_s: float | None = None,
    target_sr: int = TARGET_SR,
) -> np.ndarray:
    """Decode ``[start_s, end_s)`` of ``path`` as mono float32 at ``target_sr``.

    Only the requested frames are read, so segment-level access to long files stays bounded in memory.
    """
    info = probe(path)
    start = max(0, int(round(start_s * info.sample_rate)))
    stop = info.frames if end_s is None else min(info.frames, int(round(end_s * info.sample_rate)))
    if stop <= start:
        raise AudioError(path, f"empty range {start_s:.3f}-{end_s} s")
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(path, f"decoding failed ({_short(err)})") from None
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(path, "contains NaN or Inf samples")
    return resample(wav, sr, target_sr)


def resample(wav: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    if sr == target_sr:
        return np.ascontiguousarray(wav, dtype=np.float32)
    g = gcd(sr, target_sr)
    return resample_poly(wav, target_sr // g, sr // g).astype(np.float32)


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__

"""Audio decoding: any WAV/FLAC soundfile reads, downmixed to mono and resampled to 16 kHz.

Decoding goes through libsndfile (``soundfile``) rather than ``torchaudio.load`` because the
latter needs torchcodec/FFmpeg from torchaudio 2.9 on. Bad audio raises :class:`AudioError` with
the file and the reason, so stages can record a reject and carry on.

Three levels of looking at a file, from cheap to thorough:

* :func:`probe` reads the header only (rate, channels, frame count). It also turns the errors
  libsndfile reports as an opaque "System error." (empty file, symlink loop, missing file) into
  words, because a reason is only useful if a person can act on it.
* :func:`validate` decodes the whole file block by block (bounded memory, whatever the length)
  and rejects what would poison later stages: truncated/corrupt streams, NaN/Inf samples and
  digital silence. ``prepare`` runs it once per file so downstream stages can trust the manifest.
* :func:`load` decodes one ``[start, end)`` range, so VAD windows and segments of an hour-long
  file never need the whole file in memory.

A stream that decodes only partly (a truncated FLAC: libsndfile decodes a prefix, then reports
"lost sync") is rejected rather than shortened: the header promises more audio than is there,
so the copy is damaged and someone should fetch it again; silently keeping a prefix would hide
that loss and record a wrong duration.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

TARGET_SR = 16_000
SCAN_BLOCK_FRAMES = 1 << 16  # frames per block in validate(): ~4 s at 16 kHz, < 1 MB for 48 kHz stereo
_TEXT_SNIFF_BYTES = 4096


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
    """Header facts of ``path``; :class:`AudioError` with a reason in words when there are none."""
    _check_file(path)
    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile reports format errors as generic RuntimeError/LibsndfileError
        raise AudioError(path, _unreadable_reason(path, err)) from None
    if info.frames <= 0:
        raise AudioError(path, "contains no audio frames")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


def validate(path: str | Path, block_frames: int = SCAN_BLOCK_FRAMES) -> AudioInfo:
    """Decode all of ``path`` in blocks and raise :class:`AudioError` unless it is usable audio.

    Usable means: the header is readable, every frame it announces decodes, all samples are
    finite, and at least one is not zero. Clipping, any sample rate, any channel count and any
    sample format are fine (``load`` resamples and downmixes). Memory is one block, so an
    hour-long file costs the same as a short one.
    """
    info = probe(path)
    decoded = 0
    peak = 0.0
    try:
        with sf.SoundFile(str(path)) as fh:
            for block in fh.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                finite = np.isfinite(block)
                if not finite.all():
                    at = (decoded + int(np.argmin(finite.all(axis=1)))) / info.sample_rate
                    raise AudioError(path, f"non-finite samples (NaN/Inf), the first at {at:.2f} s")
                if len(block):
                    peak = max(peak, float(np.abs(block).max()))
                decoded += len(block)
    except AudioError:
        raise
    except Exception as err:
        fails_by = min(decoded + block_frames, info.frames) / info.sample_rate
        raise AudioError(
            path,
            f"truncated or corrupt audio: the header announces {info.duration_s:.2f} s but decoding fails "
            f"before {fails_by:.2f} s ({_short(err)})",
        ) from None
    if decoded < info.frames:
        raise AudioError(
            path,
            f"truncated audio: only {decoded / info.sample_rate:.2f} s of the {info.duration_s:.2f} s the "
            "header announces could be decoded",
        )
    if peak == 0.0:
        raise AudioError(path, f"digital silence: all {info.duration_s:.2f} s are exactly zero")
    return info


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
        raise AudioError(path, f"not decodable audio between {start_s:.2f} and {end_s} s ({_short(err)})") from None
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(path, "non-finite samples (NaN/Inf)")
    return resample(wav, sr, target_sr)


def resample(wav: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    if sr == target_sr:
        return np.ascontiguousarray(wav, dtype=np.float32)
    g = gcd(sr, target_sr)
    return resample_poly(wav, target_sr // g, sr // g).astype(np.float32)


def _check_file(path: str | Path) -> None:
    """Reasons libsndfile would only call "System error." or "Format not recognised."."""
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise AudioError(path, os_reason(path, err)) from None
    if size == 0:
        raise AudioError(path, "zero-byte file (empty)")


def os_reason(path: str | Path, err: OSError) -> str:
    """Words for an OS error on ``path``; symlink loops and dangling links are named as such."""
    if err.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return f"broken symlink (its target {os.readlink(path)} does not exist)"
    if err.errno == errno.ENOENT:
        return "file not found"
    return f"cannot be read ({err.strerror or err})"


def _unreadable_reason(path: str | Path, err: Exception) -> str:
    detail = _short(err)
    if _looks_like_text(path):
        return f"not a readable audio file: it holds text, not audio ({detail})"
    return f"not a readable audio file ({detail})"


def _looks_like_text(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_TEXT_SNIFF_BYTES)
    except OSError:
        return False
    if not head or b"\x00" in head:
        return False
    try:  # final=False: a multi-byte character cut at the end of the sniffed bytes is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text)


def _short(err: Exception) -> str:
    """libsndfile's last message line, without its "Error opening '<path>': " prefix."""
    text = str(err).strip().splitlines()
    line = text[-1] if text else type(err).__name__
    line = re.sub(r"^Error opening .*?: (Error : )?", "", line)
    return re.sub(r"^Error : ", "", line).rstrip(".") or type(err).__name__

"""Audio decoding: WAV/FLAC, M4A (AAC), MP3 and Ogg (Opus, Vorbis), downmixed to mono and resampled to 16 kHz.

libsndfile decodes WAV/FLAC, PyAV the compressed formats. :func:`probe` reads a header,
:func:`validate` decodes a whole file and rejects damaged or unusable audio, :func:`load` decodes one
``[start, end)`` range; bad audio raises :class:`AudioError` with the file and the reason.
Design (why two decoders, exact lengths and range reads): docs/design/audio.md.
"""

from __future__ import annotations

import codecs
import errno
import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

TARGET_SR = 16_000
SCAN_BLOCK_FRAMES = 1 << 16  # frames per block in validate(): ~4 s at 16 kHz, < 1 MB for 48 kHz stereo
_TEXT_SNIFF_BYTES = 4096

#: Extensions decoded with PyAV, each with the FFmpeg demuxer it is opened with. Naming the demuxer
#: (rather than letting FFmpeg guess) keeps random bytes called ``x.m4a`` from being probed as some
#: other format: they are "not a readable audio file".
PYAV_FORMATS = {".m4a": "mov", ".mp3": "mp3", ".ogg": "ogg", ".opus": "ogg"}
#: Extensions decoded with libsndfile.
SOUNDFILE_SUFFIXES = (".wav", ".flac")
#: Every extension the pipeline reads as audio (``prepare`` lists files by these).
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES + tuple(PYAV_FORMATS)
#: Seconds decoded (and dropped) before a range read's start, so the codec's state at the start
#: is that of a whole-file decode: it covers the overlap of one MDCT frame and MP3's bit reservoir
#: (tens of ms each) and Opus's recommended 80 ms pre-roll, several times over.
PREROLL_S = 0.5
#: A compressed stream may end this far short of the length its header announces before it counts
#: as truncated: the larger of 0.1 s and 2 % (MP3 without a Xing header: a bitrate estimate, which
#: was 15 ms off on a 15 s CBR file; Ogg Opus: the header counts the 6.5 ms pre-skip).
LENGTH_SLACK_S = 0.1
LENGTH_SLACK_FRACTION = 0.02


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
    """Header facts of ``path``; :class:`AudioError` with a reason in words when there are none.

    For the compressed formats (PyAV) the frame count is counted by decoding, since their headers
    only estimate it; the count is remembered per file version (path, size, modification time).
    """
    _check_file(path)
    if _uses_pyav(path):
        st = os.stat(path)
        return _probe_av(str(path), st.st_size, st.st_mtime_ns)
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
    if _uses_pyav(path):
        return _validate_av(path)
    info = probe(path)
    decoded = 0
    peak = 0.0
    try:
        with sf.SoundFile(str(path)) as fh:
            for block in fh.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                peak = max(peak, _block_peak(path, block, decoded, info.sample_rate))
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


def _block_peak(path: str | Path, block: np.ndarray, decoded: int, rate: int) -> float:
    """The largest absolute sample of a decoded ``(frames, channels)`` block (0 when empty), for
    ``validate`` of either decoder; non-finite samples raise, naming when the first one plays
    (``decoded`` frames precede the block)."""
    finite = np.isfinite(block)
    if not finite.all():
        at = (decoded + int(np.argmin(finite.all(axis=1)))) / rate
        raise AudioError(path, f"non-finite samples (NaN/Inf), the first at {at:.2f} s")
    return float(np.abs(block).max()) if len(block) else 0.0


def load(
    path: str | Path,
    start_s: float = 0.0,
    end_s: float | None = None,
    target_sr: int = TARGET_SR,
) -> np.ndarray:
    """Decode ``[start_s, end_s)`` of ``path`` as mono float32 at ``target_sr``.

    Only the requested frames are read, so segment-level access to long files stays bounded in memory.
    This is the one way the pipeline decodes audio, whatever the format.
    """
    if _uses_pyav(path):
        data, sr = _read_av(path, start_s, end_s)
    else:
        data, sr = _read_sf(path, start_s, end_s)
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(path, "non-finite samples (NaN/Inf)")
    return resample(wav, sr, target_sr)


def _read_sf(path: str | Path, start_s: float, end_s: float | None) -> tuple[np.ndarray, int]:
    """``[start_s, end_s)`` of ``path`` through libsndfile: ``(frames, channels)`` float32 and the rate."""
    info = probe(path)
    start = max(0, int(round(start_s * info.sample_rate)))
    stop = info.frames if end_s is None else min(info.frames, int(round(end_s * info.sample_rate)))
    if stop <= start:
        raise AudioError(path, f"empty range {start_s:.3f}-{end_s} s")
    try:
        data, sr = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(path, f"not decodable audio between {start_s:.2f} and {end_s} s ({_short(err)})") from None
    return data, sr


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


def _unreadable_reason(path: str | Path, err: Exception | str) -> str:
    detail = err if isinstance(err, str) else _short(err)
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


# --------------------------------------------------------------------------------------------------
# compressed formats: PyAV


def _uses_pyav(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PYAV_FORMATS


_av_setup = threading.Lock()
_av_ready = False


def _av() -> Any:
    """The ``av`` module, with FFmpeg's error messages routed to :class:`av.logging.Capture`.

    PyAV drops FFmpeg's log by default, and with it the only words that say *why* a file failed
    ("moov atom not found"). Errors only (decoding a good file logs none), every one of them (not
    folded into "repeated N times", which would hide the second bad file's reason); every PyAV call
    here runs inside a thread-local capture, so nothing reaches the console.
    """
    global _av_ready
    import av
    import av.logging

    with _av_setup:
        if not _av_ready:
            av.logging.set_level(av.logging.ERROR)
            av.logging.set_skip_repeated(False)
            _av_ready = True
    return av


class _AvSource:
    """An open container and its first audio stream, with what is needed to place decoded frames."""

    def __init__(self, path: str | Path):
        av = _av()
        self.path = path
        try:
            self.container = av.open(str(path), format=PYAV_FORMATS[Path(path).suffix.lower()])
        except Exception as err:  # av.FFmpegError mostly; whatever it is, the file is not readable
            raise AudioError(path, _unreadable_reason(path, _av_detail(err))) from None
        streams = self.container.streams.audio
        if not streams:
            self.container.close()
            raise AudioError(path, "not a readable audio file (it holds no audio stream)")
        self.stream = streams[0]
        ctx = self.stream.codec_context
        self.sample_rate = int(ctx.sample_rate or 0)
        self.channels = int(ctx.channels or 0)
        if self.sample_rate <= 0 or self.channels <= 0:
            self.container.close()
            raise AudioError(path, "not a readable audio file (no sample rate or channel count in its header)")
        self.time_base = self.stream.time_base
        self.origin = self.stream.start_time or 0
        duration = self.stream.duration
        #: The length the header announces, in frames (an estimate for MP3 without Xing header).
        self.announced = (
            round(duration * self.time_base * self.sample_rate)
            if duration and duration > 0 and self.time_base
            else None
        )
        #: MP4's sample table gives the exact length; frames after it are the last frame's padding.
        self.cap = self.announced if self.container.format.name.startswith("mov") else None

    def close(self) -> None:
        self.container.close()

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Decoded ``(frames, channels)`` float32 blocks covering ``[start, stop)`` in order.

        Seeks to :data:`PREROLL_S` before ``start`` and places each frame by its timestamp
        (relative to the stream's start, which for MP3 is its encoder delay). FFmpeg's errors
        propagate as they are; callers say what failed.
        """
        if self.cap is not None:
            stop = self.cap if stop is None else min(stop, self.cap)
        if stop is not None and stop <= start:
            return
        preroll = int(PREROLL_S * self.sample_rate)
        if start > preroll:
            target = (start - preroll) / self.sample_rate / self.time_base
            self.container.seek(self.origin + int(target), stream=self.stream, backward=True)
            frames = self._placed()
            first = next(frames, None)
            if first is not None and first[0] > start:  # the seek overshot: decode from the top instead
                self.container.seek(self.origin, stream=self.stream, backward=True)
                frames = self._placed()
            elif first is not None:
                frames = _chain(first, frames)
        else:
            frames = self._placed()
        for pos, data in frames:
            end = pos + len(data)
            if end <= start:
                continue
            if stop is not None and pos >= stop:
                return
            lo = max(0, start - pos)
            hi = len(data) if stop is None else min(len(data), stop - pos)
            yield data[lo:hi]

    def _placed(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first frame index, samples)`` of each decoded frame, from wherever the demuxer stands."""
        rate, tb = self.sample_rate, self.time_base
        pos: int | None = None
        for frame in self.container.decode(self.stream):
            if frame.pts is not None:
                pos = round((frame.pts - self.origin) * (frame.time_base or tb) * rate)
            elif pos is None:
                pos = 0
            data = _frame_samples(frame)
            if data.shape[1] != self.channels:
                raise ValueError(f"the channel count changes mid-stream ({self.channels} -> {data.shape[1]})")
            yield pos, data
            pos += len(data)


def _chain(first: tuple[int, np.ndarray], rest: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    yield first
    yield from rest


def _frame_samples(frame: Any) -> np.ndarray:
    """One decoded frame as ``(frames, channels)`` float32 in [-1, 1], whatever FFmpeg's sample format."""
    x = frame.to_ndarray()
    channels = len(frame.layout.channels)
    x = x if frame.format.is_planar else x.reshape(-1, channels).T
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif x.dtype.kind == "i":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return np.ascontiguousarray(x.T, dtype=np.float32)


def _av_detail(err: Exception, logs: list[tuple[int, str, str]] | None = None) -> str:
    """A short reason from a PyAV error: FFmpeg's error code in words, and what FFmpeg said last."""
    words = getattr(err, "strerror", None) or _short(err)
    said = [str(msg).strip().rstrip(".") for _level, _name, msg in (logs or []) if str(msg).strip()]
    log = getattr(err, "log", None)  # PyAV attaches the last error message to the exception too
    if not said and isinstance(log, tuple) and len(log) == 3 and str(log[2]).strip():
        said = [str(log[2]).strip().rstrip(".")]
    return f"{words}: {said[-1]}" if said else words


@contextmanager
def _ffmpeg_log() -> Iterator[list[tuple[int, str, str]]]:
    """FFmpeg's error messages raised in this thread while the block runs."""
    av = _av()
    with av.logging.Capture() as logs:
        yield logs


@functools.lru_cache(maxsize=4096)
def _probe_av(path: str, size: int, mtime_ns: int) -> AudioInfo:
    """Rate, channels and decoded length of a compressed file (cached: size and mtime name the version)."""
    with _ffmpeg_log() as logs:
        src = _AvSource(path)
        try:
            frames = 0
            try:
                for block in src.blocks():
                    frames += len(block)
            except Exception as err:
                raise AudioError(
                    path,
                    f"truncated or corrupt audio: decoding fails at {frames / src.sample_rate:.2f} s "
                    f"({_av_detail(err, logs)})",
                ) from None
        finally:
            src.close()
    if frames <= 0:
        raise AudioError(path, "contains no audio frames")
    return AudioInfo(src.sample_rate, src.channels, frames)


def _validate_av(path: str | Path) -> AudioInfo:
    """:func:`validate` for the PyAV formats: one decode, with the same checks and the same words."""
    _check_file(path)
    with _ffmpeg_log() as logs:
        src = _AvSource(path)
        rate = src.sample_rate
        announced = src.cap if src.cap is not None else src.announced
        decoded = 0
        peak = 0.0
        try:
            for block in src.blocks():
                peak = max(peak, _block_peak(path, block, decoded, rate))
                decoded += len(block)
        except AudioError:
            raise
        except Exception as err:
            promised = f"the header announces {announced / rate:.2f} s but " if announced else ""
            raise AudioError(
                path,
                f"truncated or corrupt audio: {promised}decoding fails at {decoded / rate:.2f} s "
                f"({_av_detail(err, logs)})",
            ) from None
        finally:
            src.close()
    if decoded <= 0:
        raise AudioError(path, "contains no audio frames")
    if announced and decoded < announced - max(LENGTH_SLACK_S * rate, LENGTH_SLACK_FRACTION * announced):
        raise AudioError(
            path,
            f"truncated audio: only {decoded / rate:.2f} s of the {announced / rate:.2f} s the header announces "
            "could be decoded",
        )
    if peak == 0.0:
        raise AudioError(path, f"digital silence: all {decoded / rate:.2f} s are exactly zero")
    return AudioInfo(rate, src.channels, decoded)


def _read_av(path: str | Path, start_s: float, end_s: float | None) -> tuple[np.ndarray, int]:
    """``[start_s, end_s)`` of a compressed file: ``(frames, channels)`` float32 and the rate."""
    _check_file(path)
    with _ffmpeg_log() as logs:
        src = _AvSource(path)
        rate = src.sample_rate
        start = max(0, int(round(start_s * rate)))
        stop = None if end_s is None else int(round(end_s * rate))
        try:
            blocks = list(src.blocks(start, stop))
        except Exception as err:
            raise AudioError(
                path, f"not decodable audio between {start_s:.2f} and {end_s} s ({_av_detail(err, logs)})"
            ) from None
        finally:
            src.close()
    if not blocks or not sum(len(b) for b in blocks):
        raise AudioError(path, f"empty range {start_s:.3f}-{end_s} s")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0], rate

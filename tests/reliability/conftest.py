"""Fixtures for the reliability tests: a ``folder`` dataset full of bad and odd audio, and a tiny
randomly initialised ECAPA encoder.

Every usable file is made from real LibriSpeech excerpts (``excerpts_dir``, never copied into the
repository) so the VAD finds real speech in it; the files are written to a temporary folder.
Nothing here is autouse, and torch/SpeechBrain are imported inside the fixture that needs them:
other test files in this folder pay for none of it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

SR = 16_000
LONG_S = 3600  # the 60-minute file
UNICODE_SPEAKER = "bob ø"  # a folder name with a space and a non-ASCII character
UNICODE_FILE = "ütt ñ 1.flac"


@dataclass(frozen=True)
class BadAudioDataset:
    """A ``<speaker>/<utterance>`` tree; file names are unique across speakers so tests key on them."""

    root: Path
    #: file name -> what is odd about it; each must end up embedded
    usable: dict[str, str]
    #: entry name -> (stage that must reject it, words its reason must contain)
    unusable: dict[str, tuple[str, str]]
    long_file: Path


def _speech(path: Path) -> np.ndarray:
    wav, sr = sf.read(path, dtype="float32")
    assert sr == SR and wav.ndim == 1, path
    return wav


def _resampled(wav: np.ndarray, rate: int) -> np.ndarray:
    g = np.gcd(rate, SR)
    return resample_poly(wav, rate // g, SR // g).astype(np.float32)


def _write_usable(folder: Path, sources: list[Path]) -> dict[str, str]:
    """Odd but valid files from one real speaker: rates, channels, sample formats, clipping."""
    folder.mkdir(parents=True)
    x = [_speech(p) for p in sources]
    clipped = np.clip(20.0 * x[0], -1.0, 1.0)
    assert np.mean(np.abs(clipped) >= 1.0) > 0.05  # really clipped, not just loud
    sf.write(folder / "clipped.wav", clipped, SR, subtype="PCM_16")
    sf.write(folder / "stereo.wav", np.stack([x[1], 0.5 * x[1]], axis=1), SR, subtype="PCM_16")
    sf.write(folder / "rate8k.wav", _resampled(x[2], 8_000), 8_000, subtype="PCM_16")
    sf.write(folder / "rate44k1.flac", _resampled(x[3], 44_100), 44_100, subtype="PCM_16")
    sf.write(folder / "rate48k.wav", _resampled(x[4], 48_000), 48_000, subtype="PCM_16")
    sf.write(folder / "pcm24.wav", x[5], SR, subtype="PCM_24")
    sf.write(folder / "float.wav", x[6], SR, subtype="FLOAT")
    return {
        "clipped.wav": "clipped (over 5 % of samples at full scale)",
        "stereo.wav": "stereo, channels differ (downmixed)",
        "rate8k.wav": "8 kHz (resampled)",
        "rate44k1.flac": "44.1 kHz (resampled)",
        "rate48k.wav": "48 kHz (resampled)",
        "pcm24.wav": "24-bit PCM",
        "float.wav": "32-bit float WAV",
    }


def _write_long(path: Path, sources: list[Path], seconds: int) -> None:
    """Real speech tiled to ``seconds``, written block by block (16-bit FLAC, 16 kHz mono)."""
    speech = np.concatenate([sf.read(p, dtype="int16")[0] for p in sources])
    total = seconds * SR
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16", format="FLAC") as out:
        written = 0
        while written < total:
            n = min(len(speech), total - written)
            out.write(speech[:n])
            written += n


def _write_unusable(folder: Path, source: Path) -> dict[str, tuple[str, str]]:
    """One file per way audio can be unusable, plus a file and a directory symlink loop."""
    folder.mkdir(parents=True)
    speech = _speech(source)
    (folder / "zero.wav").write_bytes(b"")
    flac = source.read_bytes()
    (folder / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (folder / "random.wav").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    (folder / "text.flac").write_text("This is a transcript, not a recording.\n" * 40)
    nan = speech.copy()
    nan[SR : SR + 10] = np.nan
    sf.write(folder / "nan.wav", nan, SR, subtype="FLOAT")
    inf = speech.copy()
    inf[2 * SR] = np.inf
    sf.write(folder / "inf.wav", inf, SR, subtype="FLOAT")
    sf.write(folder / "silence.wav", np.zeros(3 * SR, dtype=np.float32), SR, subtype="PCM_16")
    middle = len(speech) // 2
    sf.write(folder / "short.wav", speech[middle : middle + SR // 20], SR, subtype="PCM_16")  # 0.05 s
    os.symlink("loop.wav", folder / "loop.wav")  # points at itself: ELOOP on open
    os.symlink(".", folder / "again")  # a directory link back to its own folder
    prepare = "prepare"
    return {
        "zero.wav": (prepare, "zero-byte file"),
        "truncated.flac": (prepare, "truncated or corrupt audio"),
        "random.wav": (prepare, "not a readable audio file"),
        "text.flac": (prepare, "holds text, not audio"),
        "nan.wav": (prepare, "non-finite samples (NaN/Inf)"),
        "inf.wav": (prepare, "non-finite samples (NaN/Inf)"),
        "silence.wav": (prepare, "digital silence"),
        "loop.wav": (prepare, "symlink loop"),
        "again": (prepare, "symlink loop"),
        "short.wav": ("segment", "too short: 0.05 s"),
    }


@pytest.fixture(scope="session")
def bad_audio_dataset(tmp_path_factory: pytest.TempPathFactory, excerpts_dir: Path) -> BadAudioDataset:
    """The ``folder`` dataset of the issue "Bad audio" (see tests/reliability/test_bad_audio.py)."""
    speakers = sorted(p for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())
    utts = {s.name: sorted(s.glob("*.flac")) for s in speakers[:4]}
    names = list(utts)
    root = tmp_path_factory.mktemp("bad-audio") / "voices ø"
    usable = _write_usable(root / "alice", utts[names[0]][:7])
    (root / UNICODE_SPEAKER).mkdir(parents=True)
    shutil.copyfile(utts[names[1]][0], root / UNICODE_SPEAKER / UNICODE_FILE)
    usable[UNICODE_FILE] = "space and non-ASCII characters in its path"
    long_file = root / "carol" / "long.flac"
    _write_long(long_file, utts[names[2]], LONG_S)
    usable[long_file.name] = "60 minutes long"
    unusable = _write_unusable(root / "mallory", utts[names[3]][0])
    os.symlink("ghost", root / "ghost")  # a speaker-level loop: neither folder nor file
    unusable["ghost"] = ("prepare", "symlink loop")
    return BadAudioDataset(root=root, usable=usable, unusable=unusable, long_file=long_file)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised, small ECAPA-TDNN in SpeechBrain's layout: cheap, deterministic."""
    import torch

    from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint

    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(16, lin_neurons=32)
    model_dir = tmp_path_factory.mktemp("tiny-model") / "ecapa"
    save_speechbrain_checkpoint(model_dir, cfg.build().eval(), cfg)
    return load_ecapa(model_dir)

"""Build an N-times corpus of real speech from the LibriSpeech excerpts, for ``bench_scale.py``.

Variant ``v`` of a source file: speed ``SPEEDS[v % 5]`` (resampling, so pitch moves too), gain
``GAINS[(v // 5) % 3]`` dB (capped below full scale) and a circular shift by a golden-ratio share
of the file for ``v >= 15``. A pseudo-speaker is (source speaker, speed); gain and shift vary
utterances within it. Variant 0 is the file itself, so 1x is the excerpts. No RNG, no noise.
Layout (``folder`` dataset): ``<out>/{train,test}/<speaker>-s<speed%>/<utt>-v<v>.flac`` plus
``files.csv`` and ``corpus.json``. Files are written to a temporary name then renamed, and existing
ones are skipped, so a build can be interrupted, resumed or run twice at once.

    python benchmarks/scale_corpus.py --scale 10 --out /work/scale-corpus/x10
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "librispeech-excerpts"
SPLITS = {"test-other": "test", "train-clean-100": "train"}  # source subset -> folder-dataset split
SPEEDS = (1.0, 0.9, 1.1, 0.95, 1.05)
GAINS_DB = (0.0, -6.0, 6.0)
PEAK_CAP = 0.99  # a +6 dB variant is scaled down to this peak rather than clipped
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
SAMPLE_RATE = 16_000
VERSION = 1  # bump when a variant's audio changes: corpus.json records it


@dataclass(frozen=True)
class Variant:
    """One output file: which source, which perturbation, where it goes."""

    source: str  # path of the source file
    split: str  # train | test
    speaker: str  # pseudo-speaker folder name
    utterance: str  # file stem
    v: int
    speed: float
    gain_db: float
    shift: float  # share of the (speed-changed) file rotated to the end, in [0, 1)

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.speaker}/{self.utterance}.flac"


def perturbation(v: int) -> tuple[float, float, float]:
    """``(speed, gain_db, shift)`` of variant ``v``; variant 0 is the identity."""
    shift = (v // (len(SPEEDS) * len(GAINS_DB)) * GOLDEN) % 1.0
    return SPEEDS[v % len(SPEEDS)], GAINS_DB[(v // len(SPEEDS)) % len(GAINS_DB)], shift


def pseudo_speaker(speaker: str, speed: float) -> str:
    return f"{speaker}-s{round(speed * 100):03d}"


def source_files(source: Path, subsets: Iterable[str] = tuple(SPLITS)) -> list[tuple[str, str, Path]]:
    """``(split, speaker, path)`` of every source FLAC, sorted (the order variants are numbered in)."""
    out = []
    for subset in subsets:
        for path in sorted((source / subset).glob("*/*.flac")):
            out.append((SPLITS[subset], path.parent.name, path))
    return out


def plan(files: list[tuple[str, str, Path]], scale: int) -> list[Variant]:
    """The ``scale`` variants of each source file, in source order then ``v``."""
    if scale < 1:
        raise ValueError("scale must be >= 1")
    out = []
    for split, speaker, path in files:
        for v in range(scale):
            speed, gain, shift = perturbation(v)
            out.append(
                Variant(
                    str(path), split, pseudo_speaker(speaker, speed), f"{path.stem}-v{v:03d}", v, speed, gain, shift
                )
            )
    return out


def tiny_files(source: Path) -> list[tuple[str, str, Path]]:
    """The start-up-cost corpus: 2 test speakers x 3 utterances and 2 train speakers (8 files)."""
    files = source_files(source)
    test_speakers = sorted({s for split, s, _ in files if split == "test"})[:2]
    train_speakers = sorted({s for split, s, _ in files if split == "train"})[:2]
    test = [f for f in files if f[1] in test_speakers]
    keep = [f for s in test_speakers for f in [g for g in test if g[1] == s][:3]]
    return keep + [f for f in files if f[0] == "train" and f[1] in train_speakers]


def render(samples: np.ndarray, speed: float, gain_db: float, shift: float) -> tuple[np.ndarray, float]:
    """The variant's samples (float32 mono) and the gain actually applied (dB)."""
    from scipy.signal import resample_poly

    x = samples.astype(np.float64)
    if speed != 1.0:
        ratio = Fraction(1.0 / speed).limit_denominator(64)  # 0.9 -> 10/9: 1/speed times the samples
        x = resample_poly(x, ratio.numerator, ratio.denominator)
    gain = 10.0 ** (gain_db / 20.0)
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    if peak * gain > PEAK_CAP and peak > 0:
        gain = PEAK_CAP / peak
    x = x * gain
    if shift:
        x = np.roll(x, -int(round(shift * len(x))))
    return x.astype(np.float32), 20.0 * math.log10(gain) if gain > 0 else -math.inf


def _build_source(source: str, variants: list[Variant], out: str) -> list[dict[str, Any]]:
    """Write the missing variants of one source file (decoded once); rows for all of them."""
    import soundfile as sf

    rows, samples = [], None
    for var in variants:
        target = Path(out) / var.relpath
        written = False
        if not target.exists():
            if samples is None:
                samples, rate = sf.read(source, dtype="float32")
                if rate != SAMPLE_RATE or samples.ndim != 1:
                    raise ValueError(f"{source}: expected 16 kHz mono, got {rate} Hz, shape {samples.shape}")
            audio, _ = render(samples, var.speed, var.gain_db, var.shift)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            sf.write(str(tmp), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            os.replace(tmp, target)
            written = True
        info = sf.info(str(target))
        rows.append(
            {
                **asdict(var),
                "path": var.relpath,
                "duration_s": round(info.frames / info.samplerate, 4),
                "bytes": target.stat().st_size,
                "written": written,
            }
        )
    return rows


def build(
    variants: list[Variant], out: Path, *, jobs: int = 0, progress: bool = True, name: str = ""
) -> dict[str, Any]:
    """Write ``variants`` under ``out`` with ``jobs`` processes; write ``files.csv`` and ``corpus.json``."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    by_source: dict[str, list[Variant]] = {}
    for var in variants:
        by_source.setdefault(var.source, []).append(var)
    jobs = jobs or len(os.sched_getaffinity(0))
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants), desc=f"corpus {name or out.name}", unit="file", disable=not progress)
    if jobs == 1:
        for src, group in by_source.items():
            rows += _build_source(src, group, str(out))
            bar.update(len(group))
    else:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(_build_source, src, group, str(out)): len(group) for src, group in by_source.items()}
            for fut in as_completed(futures):
                rows += fut.result()
                bar.update(futures[fut])
    bar.close()
    build_s = time.perf_counter() - started
    rows.sort(key=lambda r: r["path"])
    _write_atomic(out / "files.csv", _csv_text(rows))
    audio_s = sum(r["duration_s"] for r in rows)
    written = [r for r in rows if r["written"]]
    summary = {
        "version": VERSION,
        "name": name or out.name,
        "files": len(rows),
        "audio_s": round(audio_s, 2),
        "audio_h": round(audio_s / 3600, 3),
        "bytes": sum(r["bytes"] for r in rows),
        "speakers": {s: len({r["speaker"] for r in rows if r["split"] == s}) for s in ("train", "test")},
        "sources": len(by_source),
        "written": len(written),
        "skipped": len(rows) - len(written),
        "build_s": round(build_s, 2),
        "jobs": jobs,
        # Audio seconds written per wall second (only meaningful when most files were written now).
        "build_xrt": round(sum(r["duration_s"] for r in written) / build_s, 1) if written and build_s > 0 else None,
    }
    _write_atomic(out / "corpus.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    fields = [
        "path",
        "split",
        "speaker",
        "utterance",
        "source",
        "v",
        "speed",
        "gain_db",
        "shift",
        "duration_s",
        "bytes",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_scale(
    scale: int | str, out: Path, source: Path = DEFAULT_SOURCE, jobs: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Build scale ``N`` (an int) or ``"tiny"`` under ``out``."""
    if scale == "tiny":
        return build(plan(tiny_files(source), 1), out, jobs=jobs, progress=progress, name="tiny")
    return build(plan(source_files(source), int(scale)), out, jobs=jobs, progress=progress, name=f"x{scale}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", required=True, help="N (variants per source file) or 'tiny'")
    p.add_argument("--out", type=Path, required=True, help="corpus folder, e.g. /work/scale-corpus/x10")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--jobs", type=int, default=0, help="processes [usable CPUs]")
    args = p.parse_args(argv)
    scale = args.scale if args.scale == "tiny" else int(args.scale)
    print(json.dumps(build_scale(scale, args.out, args.source, args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

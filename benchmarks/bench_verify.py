"""Verification latency: a warm :class:`voiceprint.verify.Verifier` vs a cold ``voiceprint verify``.

Two 3-second files of different speakers (cut from the LibriSpeech excerpts, written as 16 kHz
WAV) are scored again and again by one warm verifier: each call decodes both files, runs Silero VAD
and the ECAPA-TDNN on each and takes the cosine, exactly what ``voiceprint verify`` does after its
imports and model load. The peer is the cold CLI (a fresh process per pair), which is what a seed
design that promised 500-800 ms per pair measured.

The model is the project's trained one (``models/ecapa``) when it exists, otherwise a randomly
initialised ECAPA-TDNN of the same width (latency does not depend on the weights).

    python benchmarks/bench_verify.py [--project .] [--repeats 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import REPO, emit, hardware, percentiles  # noqa: E402
from voiceprint.common import audio  # noqa: E402
from voiceprint.common.layout import Layout  # noqa: E402
from voiceprint.verify import Verifier  # noqa: E402

EXCERPTS = REPO.parent / "shared" / "datasets" / "librispeech-excerpts" / "test-other"
TARGET_P50_MS = 100.0
THRESHOLD = 0.5  # a fixed threshold: latency, not accuracy, is measured here


def three_second_pair(out_dir: Path, excerpts: Path = EXCERPTS) -> tuple[Path, Path]:
    """The first 3 s of the first utterance of two different speakers, as 16 kHz mono WAV."""
    speakers = sorted(p for p in excerpts.iterdir() if p.is_dir())[:2]
    pair = []
    for spk in speakers:
        src = sorted(spk.glob("*.flac"))[0]
        wav = audio.load(src, 0.0, 3.0)
        dest = out_dir / f"{spk.name}_3s.wav"
        sf.write(dest, wav, audio.TARGET_SR, subtype="PCM_16")
        pair.append(dest)
    return pair[0], pair[1]


def benchmark_project(project: Path, scratch: Path) -> tuple[Layout, str]:
    """The project itself when it has a trained model, else a scratch project with a random one."""
    layout = Layout.at(project)
    if (layout.model_dir / "embedding_model.ckpt").exists():
        return layout, "project model"
    from voiceprint.encoders.ecapa import EcapaConfig, save_speechbrain_checkpoint

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (scratch / "params.yaml").write_text(yaml.safe_dump(params))
    layout = Layout.at(scratch)
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(int(params["model"]["channels"]))
    save_speechbrain_checkpoint(layout.model_dir, cfg.build().eval(), cfg)
    return layout, "random weights (no trained model in the project)"


def cold_cli_ms(layout: Layout, a: Path, b: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "voiceprint.cli",
                "--project",
                str(layout.root),
                "verify",
                str(a),
                str(b),
                "--threshold",
                str(THRESHOLD),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        times.append((time.perf_counter() - started) * 1e3)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"voiceprint verify failed: {proc.stderr[-2000:]}")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=REPO)
    ap.add_argument("--repeats", type=int, default=200, help="warm verifications timed")
    ap.add_argument("--cold-runs", type=int, default=3, help="cold CLI invocations timed")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON line to this file")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        tmp_path = Path(tmp)
        a, b = three_second_pair(tmp_path)
        layout, model_source = benchmark_project(args.project, tmp_path)

        started = time.perf_counter()
        verifier = Verifier(layout, threshold=THRESHOLD)
        verifier.warm_up()
        load_s = time.perf_counter() - started
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            verdict = verifier.verify(a, b)
            samples.append(time.perf_counter() - t0)
        warm = percentiles(samples)
        cold = cold_cli_ms(layout, a, b, args.cold_runs)

    cold_ms = statistics.median(cold)
    emit(
        {
            "bench": "verify",
            "files": "two 3.0 s WAV files, different speakers",
            "model": verifier.encoder.model_id,
            "model_source": model_source,
            "peer": "cold `voiceprint verify` (new process per pair)",
            "peer_ms": round(cold_ms, 1),
            "ours": "warm Verifier.verify (decode + VAD + ECAPA for both files + cosine)",
            "ours_p50_ms": warm["p50_ms"],
            "ours_p99_ms": warm["p99_ms"],
            "repeats": args.repeats,
            "warm_up_s": round(load_s, 2),
            "ratio": round(cold_ms / warm["p50_ms"], 1),
            "target_p50_ms": TARGET_P50_MS,
            "meets_target": warm["p50_ms"] < TARGET_P50_MS,
            "score": round(verdict.score, 4),
            "torch_threads": torch.get_num_threads(),
            "hardware": hardware(),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

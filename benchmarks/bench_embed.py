"""Embedding extraction: the pipeline's engine vs SpeechBrain, same weights, same audio, same process.

Peers (SpeechBrain's own inference class, ``EncoderClassifier.encode_batch``):

* ``sb_loop``: one file at a time, as it is usually called;
* ``sb_padded16``: padded batches of 16 files in corpus order (no length bucketing).

Ours: :func:`voiceprint.embed.engine.run_encoder` as the ``embed`` stage runs it with the default
``embed`` settings (on CPU, for this 20.8 M-parameter model: one segment per call, bf16 autocast
where the CPU has native bf16, decoding in the main process when no core is free for a worker).
Three ablations show what each choice earns: ``ours_fp32`` (``amp: false``), ``ours_fp32_batched``
(``amp: false, cpu_batching: true``: length-bucketed padded batches, the engine's GPU plan) and
``ours_decode_worker`` (defaults plus one decode worker process).

Every method decodes the FLAC files itself inside the timed region. Repetitions are interleaved
(round-robin, rotating order) and each method's median round is reported, so drift in machine load
hits all methods alike. Weights: a randomly initialised ECAPA-TDNN (C=1024, 20.8 M parameters, the
architecture of ``speechbrain/spkrec-ecapa-voxceleb``) written in SpeechBrain's checkpoint format
and loaded by both sides; speed does not depend on the weights. Agreement: the cosine between our
embedding and SpeechBrain's fp32 one-file-at-a-time embedding, for every file (target >= 0.999).

On CUDA (when a GPU is present) ``ours`` runs in bf16 autocast and the record adds the fraction
of the bf16 roofline that the throughput implies (about 4 GFLOP per second of audio at C=1024).

    python benchmarks/bench_embed.py [--seconds 290] [--rounds 3] [--channels 1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import REPO, emit, hardware  # noqa: E402
from voiceprint.common import schema  # noqa: E402
from voiceprint.config import EmbedParams  # noqa: E402
from voiceprint.embed.engine import Item, engine_dtype, run_encoder  # noqa: E402
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint  # noqa: E402

EXCERPTS = REPO.parent / "shared" / "datasets" / "librispeech-excerpts" / "test-other"
GFLOP_PER_AUDIO_S_C1024 = 4.0
# Dense bf16 tensor-core peaks (TFLOP/s), for the roofline fraction on a GPU.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}
TARGETS = {"vs_sb_loop": 2.0, "vs_sb_padded16": 8.0, "gpu_realtime_factor": 10_000.0, "min_cosine": 0.999}


def pick_files(seconds: float, excerpts: Path = EXCERPTS) -> list[tuple[Path, float]]:
    """test-other files in sorted order until ``seconds`` of audio (291 s in the issue's baseline)."""
    picked, total = [], 0.0
    for path in sorted(excerpts.glob("*/*.flac")):
        duration = sf.info(str(path)).duration
        picked.append((path, duration))
        total += duration
        if total >= seconds:
            break
    return picked


def decode(path: Path) -> torch.Tensor:
    wav, sr = sf.read(str(path), dtype="float32")
    assert sr == 16_000, path
    return torch.from_numpy(wav)


class Peers:
    """SpeechBrain's ``EncoderClassifier`` on the same checkpoint directory."""

    def __init__(self, model_dir: Path, files: list[tuple[Path, float]]):
        from speechbrain.inference.speaker import EncoderClassifier

        self.files = files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.classifier = EncoderClassifier.from_hparams(source=str(model_dir), savedir=str(model_dir))
        self.classifier.eval()

    def loop(self) -> np.ndarray:
        with torch.inference_mode():
            out = [self.classifier.encode_batch(decode(p).unsqueeze(0))[0, 0] for p, _ in self.files]
        return torch.stack(out).numpy()

    def padded(self, batch: int = 16) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(self.files), batch):
                wavs = [decode(p) for p, _ in self.files[start : start + batch]]
                longest = max(len(w) for w in wavs)
                padded = torch.zeros(len(wavs), longest)
                for row, w in enumerate(wavs):
                    padded[row, : len(w)] = w
                lens = torch.tensor([len(w) / longest for w in wavs])
                out.append(self.classifier.encode_batch(padded, lens)[:, 0])
        return torch.cat(out).numpy()


class Ours:
    """The embed stage's engine over whole files (each file one segment)."""

    def __init__(
        self,
        model_dir: Path,
        files: list[tuple[Path, float]],
        params: EmbedParams,
        device: str = "cpu",
        num_workers: int | None = None,
    ):
        self.num_workers = num_workers
        self.items = [Item(p, 0.0, d) for p, d in files]
        self.durations = np.array([d for _, d in files])
        self.params = params
        self.encoder = load_ecapa(model_dir).to(device)
        self.precision = str(engine_dtype(self.encoder, params) or torch.float32).removeprefix("torch.")

    def run(self) -> np.ndarray:
        out = np.zeros((len(self.items), self.encoder.dim), dtype=np.float32)
        for idx, vectors, bad in run_encoder(
            self.encoder, self.items, self.durations, self.params, progress=False, num_workers=self.num_workers
        ):
            assert not bad, bad
            out[idx] = vectors
        return out


def interleaved(
    methods: dict[str, Callable[[], np.ndarray]], rounds: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Median seconds per method over ``rounds`` round-robin repetitions (order rotated each round)."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            outputs[name] = methods[name]()
            times[name].append(time.perf_counter() - started)
    return {n: statistics.median(t) for n, t in times.items()}, outputs


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(schema.l2_normalise(a) * schema.l2_normalise(b), axis=1)


def gpu_record(
    model_dir: Path, files: list[tuple[Path, float]], rounds: int, audio_s: float, channels: int, reference: np.ndarray
) -> dict:
    name = torch.cuda.get_device_name(0)
    ours = Ours(model_dir, files, EmbedParams(device="cuda", amp=True, max_batch_s=600.0), device="cuda")
    ours.run()  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    seconds, outputs = interleaved({"ours_cuda": ours.run}, rounds)
    rtf = audio_s / seconds["ours_cuda"]
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    gflop = GFLOP_PER_AUDIO_S_C1024 * (channels / 1024) ** 2
    return {
        "device": name,
        "precision": ours.precision,
        "realtime_factor": round(rtf, 1),
        "roofline_fraction": round(rtf * gflop * 1e9 / (peak * 1e12), 4) if peak else None,
        "min_cosine_vs_sb_fp32": round(float(cosines(outputs["ours_cuda"], reference).min()), 6),
        "target_realtime_factor": TARGETS["gpu_realtime_factor"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=290.0, help="audio to embed per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=1024, help="ECAPA-TDNN width C")
    ap.add_argument("--no-padded", action="store_true", help="skip the slow padded-batch peer")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    files = pick_files(args.seconds)
    audio_s = sum(d for _, d in files)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        model_dir = Path(tmp) / "ecapa"
        torch.manual_seed(0)
        cfg = EcapaConfig.from_channels(args.channels)
        save_speechbrain_checkpoint(model_dir, cfg.build().eval(), cfg)

        peers = Peers(model_dir, files)
        ours = Ours(model_dir, files, EmbedParams(device="cpu"))
        ablations = {
            "ours_fp32": Ours(model_dir, files, EmbedParams(device="cpu", amp=False)),
            "ours_fp32_batched": Ours(model_dir, files, EmbedParams(device="cpu", amp=False, cpu_batching=True)),
            "ours_decode_worker": Ours(model_dir, files, EmbedParams(device="cpu"), num_workers=1),
        }

        methods: dict[str, Callable[[], np.ndarray]] = {
            "sb_loop": peers.loop,
            "ours": ours.run,
            **{name: o.run for name, o in ablations.items()},
        }
        if not args.no_padded:
            methods["sb_padded16"] = peers.padded
        for name, fn in methods.items():  # warm-up: allocator, oneDNN primitives
            if name != "sb_padded16":
                fn()
        seconds, outputs = interleaved(methods, args.rounds)

        reference = outputs["sb_loop"]
        rtf = {name: audio_s / s for name, s in seconds.items()}
        record = {
            "bench": "embed",
            "model": f"ECAPA-TDNN C={args.channels} ({ours.encoder.num_parameters() / 1e6:.1f} M params, random weights)",
            "audio": f"{len(files)} test-other excerpt files, {audio_s:.1f} s",
            "rounds": args.rounds,
            "peer": "SpeechBrain EncoderClassifier.encode_batch, one file at a time",
            "peer_realtime_factor": round(rtf["sb_loop"], 1),
            "ours": f"voiceprint embed engine, default settings ({ours.precision}, one segment per call, no decode worker on 2 cores)",
            "ours_realtime_factor": round(rtf["ours"], 1),
            "ratio_vs_sb_loop": round(rtf["ours"] / rtf["sb_loop"], 2),
            "min_cosine_vs_sb_fp32": round(float(cosines(outputs["ours"], reference).min()), 6),
            "ablations": {
                name: {
                    "realtime_factor": round(rtf[name], 1),
                    "ratio_vs_sb_loop": round(rtf[name] / rtf["sb_loop"], 2),
                    "min_cosine_vs_sb_fp32": round(float(cosines(outputs[name], reference).min()), 6),
                }
                for name in ablations
            },
            "torch_threads": torch.get_num_threads(),
            "targets": TARGETS,
        }
        if "sb_padded16" in rtf:
            record["peer_padded16_realtime_factor"] = round(rtf["sb_padded16"], 1)
            record["ratio_vs_sb_padded16"] = round(rtf["ours"] / rtf["sb_padded16"], 2)
            record["min_cosine_sb_padded16_vs_sb_loop"] = round(
                float(cosines(outputs["sb_padded16"], reference).min()), 6
            )
        record["meets_targets"] = bool(
            record["ratio_vs_sb_loop"] >= TARGETS["vs_sb_loop"]
            and record.get("ratio_vs_sb_padded16", float("inf")) >= TARGETS["vs_sb_padded16"]
            and record["min_cosine_vs_sb_fp32"] >= TARGETS["min_cosine"]
        )
        if torch.cuda.is_available():
            record["gpu"] = gpu_record(model_dir, files, args.rounds, audio_s, args.channels, reference)
        record["hardware"] = hardware()
        emit(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU inference backends for ECAPA-TDNN: eager torch (bf16 autocast, fp32) vs ONNX Runtime vs OpenVINO.

Same weights (bench_embed's seeded C=1024 checkpoint), files and engine (``run_encoder``: decoding,
batch plan, Fbank + sentence mean norm in torch float32); only the network after the features runs
in the backend (the ONNX export of ``embed.backend: openvino`` in voiceprint/encoders/openvino_backend.py,
dynamic batch and frame axes). Per-utterance (the engine's CPU default) and length-bucketed batches;
rounds interleaved in rotating order, each round trimming every file by ``--trim-s`` more so no
backend sees a known shape; min and median x real time. Agreement: cosine of every embedding (whole
files) to SpeechBrain fp32's (target >= 0.999).

    python benchmarks/bench_backends.py [--seconds 290] [--rounds 5] [--modes single,batched] [--out FILE]
    python benchmarks/bench_backends.py --quick     # < 1 min: 20 s of audio, 2 rounds, per-utterance only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_embed import Peers, cosines, decode, pick_files  # noqa: E402
from benchmarks.common import emit, hardware  # noqa: E402
from voiceprint.config import EmbedParams  # noqa: E402
from voiceprint.embed.engine import Item, engine_dtype, run_encoder  # noqa: E402
from voiceprint.encoders.ecapa import EcapaConfig, EcapaEncoder, load_ecapa, save_speechbrain_checkpoint  # noqa: E402
from voiceprint.encoders.openvino_backend import (  # noqa: E402
    OpenVinoNet,
    check_export,
    compile_onnx,
    export_onnx,
    frames_of,
)

TARGET_MIN_COSINE = 0.999


# --------------------------------------------------------------------------------------------------
# Backends: each is ``run(feats (B, T, F) float32, lengths (B,) float32) -> (B, 1, D) float32``


def ort_runner(path: Path, threads: int, spinning: bool = True) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def run(feats: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return session.run(None, {"feats": feats, "frames": frames_of(lengths, feats.shape[1])})[0]

    return run


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation (weights per channel, activations per call) with ORT's tool."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # one warning per unquantisable tensor
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    return dst


def ov_runner(path: Path, threads: int, precision: str | None) -> tuple[Callable, str]:
    """OpenVINO CPU plugin on the ONNX file (the package's ``embed.backend: openvino`` compile);
    ``precision`` is the inference precision hint (None: default)."""
    compiled, resolved = compile_onnx(path, threads=threads, precision=precision)  # resolved: "bf16", "f32"
    return OpenVinoNet(compiled).run, resolved


class BackendNet(torch.nn.Module):
    """Stands in for ``EcapaEncoder.model``: torch features in, the backend's embeddings out."""

    def __init__(self, run: Callable):
        super().__init__()
        self.run = run

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        feats = np.ascontiguousarray(feats.float().numpy())
        lengths = np.ascontiguousarray(lengths.float().numpy())
        return torch.from_numpy(np.asarray(self.run(feats, lengths), dtype=np.float32)).reshape(len(feats), 1, -1)


# --------------------------------------------------------------------------------------------------
# The engine around any of them


class EngineRun:
    """``run_encoder`` over whole files (one segment each, the last ``trim`` seconds left out)."""

    def __init__(self, encoder: EcapaEncoder, files: list[tuple[Path, float]], params: EmbedParams):
        self.encoder = encoder
        self.files = files
        self.params = params

    def __call__(self, trim: float = 0.0) -> np.ndarray:
        items = [Item(p, 0.0, d - trim) for p, d in self.files]
        durations = np.array([d - trim for _, d in self.files])
        out = np.zeros((len(items), self.encoder.dim), dtype=np.float32)
        for idx, vectors, bad in run_encoder(
            self.encoder, items, durations, self.params, progress=False, num_workers=0
        ):
            assert not bad, bad
            out[idx] = vectors
        return out


def sb_loop(peers: Peers, trim: float = 0.0) -> np.ndarray:
    """SpeechBrain's ``encode_batch``, one file at a time (bench_embed's ``sb_loop``), trimmed alike."""
    out = []
    with torch.inference_mode():
        for path, _ in peers.files:
            wav = decode(path)
            wav = wav[: len(wav) - round(trim * 16_000)]
            out.append(peers.classifier.encode_batch(wav.unsqueeze(0))[0, 0])
    return torch.stack(out).numpy()


def interleaved(methods: dict[str, Callable[[float], np.ndarray]], rounds: int, trim_s: float):
    """Seconds of every round per method (round-robin, order rotated each round).

    Round ``r`` (from 1) cuts ``r * trim_s`` seconds off every file, so with ``trim_s`` > 0 no
    backend has seen a round's input shapes before (as with real segments); 0 repeats the shapes.
    """
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    load: list[float] = []  # 1-minute load average after each round: > 2 means others competed for the cores
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            methods[name]((r + 1) * trim_s)
            times[name].append(time.perf_counter() - started)
        load.append(round(os.getloadavg()[0], 2))
    return times, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=290.0, help="audio to embed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--channels", type=int, default=1024, help="ECAPA-TDNN width C")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch, ORT and OpenVINO")
    ap.add_argument("--modes", default="single,batched", help="single (one file per call), batched (buckets)")
    ap.add_argument("--backends", default="eager,ort,ov", help="comma list of eager, ort, ort_int8 (slow), ov")
    ap.add_argument(
        "--trim-s", type=float, default=0.05, help="round r embeds every file less r*trim_s s (0: repeat the shapes)"
    )
    ap.add_argument("--quick", action="store_true", help="20 s of audio, 2 rounds, single mode only (< 1 min)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.modes = 20.0, 2, "single"
    modes = [m for m in args.modes.split(",") if m]
    backends = {b for b in args.backends.split(",") if b}
    torch.set_num_threads(args.threads)

    files = pick_files(args.seconds)
    audio_s = sum(d for _, d in files)
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        model_dir = Path(tmp) / "ecapa"
        torch.manual_seed(0)
        cfg = EcapaConfig.from_channels(args.channels)
        save_speechbrain_checkpoint(model_dir, cfg.build().eval(), cfg)
        reference_encoder = load_ecapa(model_dir)

        setup: dict[str, float | str] = {}
        started = time.perf_counter()
        onnx_path = export_onnx(reference_encoder.model, Path(tmp) / "ecapa.onnx", cfg.n_mels)
        setup["onnx_export_s"] = time.perf_counter() - started

        # name -> (backend, precision, run function or None for eager, amp)
        variants: dict[str, tuple[str, str, Callable | None, bool]] = {}
        export_error: dict[str, float] = {}
        if "eager" in backends:
            amp = engine_dtype(reference_encoder, EmbedParams(device="cpu"))
            variants["eager_bf16"] = (
                "torch eager (oneDNN)",
                str(amp or torch.float32).removeprefix("torch."),
                None,
                True,
            )
            variants["eager_fp32"] = ("torch eager (oneDNN)", "float32", None, False)
        if "ort" in backends:
            run = ort_runner(onnx_path, args.threads)
            variants["ort_fp32"] = ("ONNX Runtime CPU EP, ORT_ENABLE_ALL", "float32", run, False)
            variants["ort_fp32_nospin"] = (
                "ONNX Runtime CPU EP, ORT_ENABLE_ALL, no intra-op spinning",
                "float32",
                ort_runner(onnx_path, args.threads, spinning=False),
                False,
            )
        if "ort_int8" in backends:
            started = time.perf_counter()
            int8_path = quantize_int8(onnx_path, Path(tmp) / "ecapa.int8.onnx")
            setup["ort_int8_quantize_s"] = time.perf_counter() - started
            variants["ort_int8"] = (
                "ONNX Runtime CPU EP, quantize_dynamic",
                "int8 weights, dynamic uint8 activations",
                ort_runner(int8_path, args.threads),
                False,
            )
        if "ov" in backends:
            import openvino as ov

            setup["ov_default_precision"] = ov_runner(onnx_path, args.threads, None)[1]  # bf16 where AMX/AVX512-BF16
            for name, hint in (("ov_fp32", "f32"), ("ov_bf16", "bf16")):
                started = time.perf_counter()
                run, resolved = ov_runner(onnx_path, args.threads, hint)
                setup[f"{name}_compile_s"] = time.perf_counter() - started
                variants[name] = (
                    f"OpenVINO {ov.__version__} CPU plugin, INFERENCE_PRECISION_HINT {hint}",
                    resolved,
                    run,
                    False,
                )
        for name, (_, _, run, _) in variants.items():
            if run is not None:
                export_error[name] = check_export(run, reference_encoder.model, cfg.n_mels)

        peers = Peers(model_dir, files)
        methods: dict[str, Callable[[float], np.ndarray]] = {"sb_fp32_loop": lambda trim: sb_loop(peers, trim)}
        for mode in modes:
            for name, (_, _, run, amp) in variants.items():
                encoder = load_ecapa(model_dir)
                if run is not None:
                    encoder.model = BackendNet(run)
                params = EmbedParams(device="cpu", amp=amp, cpu_batching=mode == "batched")
                methods[f"{name}/{mode}"] = EngineRun(encoder, files, params)

        outputs, first = {}, {}
        for name, fn in methods.items():  # warm-up on the whole files: the embeddings compared
            started = time.perf_counter()
            outputs[name] = fn(0.0)
            first[name] = audio_s / (time.perf_counter() - started)
        times, load = interleaved(methods, args.rounds, args.trim_s)
        round_audio = [audio_s - len(files) * (r + 1) * args.trim_s for r in range(args.rounds)]

        reference = outputs["sb_fp32_loop"]
        sb_median = statistics.median(a / t for a, t in zip(round_audio, times["sb_fp32_loop"]))
        results = {}
        for name, ts in times.items():
            base = name.split("/")[0]
            rtfs = [a / t for a, t in zip(round_audio, ts)]
            cos = cosines(outputs[name], reference)
            backend, precision = (
                ("SpeechBrain EncoderClassifier.encode_batch", "float32")
                if base == "sb_fp32_loop"
                else variants[base][:2]
            )
            results[name] = {
                "backend": backend,
                "precision": precision,
                "rtf_min": round(min(rtfs), 1),
                "rtf_median": round(statistics.median(rtfs), 1),
                "rtf_max": round(max(rtfs), 1),
                "rtf_rounds": [round(x, 1) for x in rtfs],
                "rtf_first_pass": round(first[name], 1),
                "ratio_vs_sb_fp32_median": round(statistics.median(rtfs) / sb_median, 2),
                "min_cosine_vs_sb_fp32": round(float(cos.min()), 6),
                "mean_cosine_vs_sb_fp32": round(float(cos.mean()), 6),
                "max_abs_err_vs_torch_fp32_check": export_error.get(base),
            }
        # A backend is kept only if it beats eager bf16 in its best mode and agrees with SpeechBrain.
        eager = max((r["rtf_median"] for n, r in results.items() if n.startswith("eager_bf16/")), default=None)
        keep = [
            name
            for name, r in results.items()
            if name.split("/")[0] not in ("sb_fp32_loop", "eager_bf16", "eager_fp32")
            and eager is not None
            and r["rtf_median"] > eager
            and r["min_cosine_vs_sb_fp32"] >= TARGET_MIN_COSINE
        ]
        import onnxruntime

        versions = {"onnxruntime": onnxruntime.__version__}
        try:
            import openvino

            versions["openvino"] = openvino.__version__
        except ImportError:
            pass
        record = {
            "bench": "backends",
            "model": f"ECAPA-TDNN C={args.channels} ({reference_encoder.num_parameters() / 1e6:.1f} M params, random weights)",
            "audio": f"{len(files)} test-other excerpt files, {audio_s:.1f} s",
            "rounds": args.rounds,
            "trim_s": args.trim_s,
            "loadavg_after_round": load,
            "threads": args.threads,
            "split": "decode + Fbank + sentence mean norm in torch float32 (the engine's own code); "
            "the ECAPA_TDNN network in the backend",
            "modes": {"single": "one file per call (engine CPU default)", "batched": "length buckets, max_batch_s 120"},
            "results": results,
            "beats_eager_bf16_and_cosine_ok": keep,
            "setup": {k: round(v, 2) if isinstance(v, float) else v for k, v in setup.items()},
            "versions": versions,
            "target_min_cosine": TARGET_MIN_COSINE,
            "hardware": hardware(torch_threads=torch.get_num_threads()),
        }
        emit(record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

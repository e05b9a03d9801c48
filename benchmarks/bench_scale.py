"""Scale benchmark: prepare -> segment -> embed -> index -> evaluate on 1x/10x/100x real-speech corpora.

Per (scale, engine) a fresh project (params.yaml, a copy of ``--model-dir``) runs each stage as its
own ``python -m tasks.run STAGE``; recorded: wall, CPU (wait4 rusage of the tree), per-process and
summed peak RSS (psutil, 0.2 s), bytes under data/. Start-up cost: two-point fit through the "tiny"
corpus and the smallest scale. Writes JSON lines (``--out``) and SCALE.md (``--report``).
Corpora: benchmarks/scale_corpus.py. Not run in CI.

    python benchmarks/bench_scale.py --scales 1 --engines local,dask     # a few minutes
    python benchmarks/bench_scale.py --scales 10,100 --engines local,dask  # 100x runs local only
    python benchmarks/bench_scale.py --report-only                        # SCALE.md from the JSONL
    python benchmarks/bench_scale.py --identification                     # 10^5 x 10^5 identification
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/bench_scale.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, emit, hardware  # noqa: E402
from benchmarks.scale_corpus import DEFAULT_SOURCE, build_scale  # noqa: E402

BENCH = "scale"
STAGES = ("prepare", "segment", "embed", "index", "evaluate")
DECODING_STAGES = ("prepare", "segment", "embed")  # read every audio second; the others read tables
POLL_S = 0.2
MB = 2**20

# Targets of the scaling issue.
LINEAR_SLACK = 1.10  # stage time at k-times the audio <= 1.1 k times the 1x time, start-up subtracted
RSS_FLAT = 1.30  # per-process peak RSS at 100x <= 1.3x the 1x peak
DISK_SHARE = 0.10  # data/ bytes excluding embeddings <= 10 % of the corpus bytes
#: The DVC outputs of dvc.yaml's prepare, segment and index stages: what `dvc commit` caches, embeddings excluded.
DVC_OUTS = (
    "data/manifest.parquet",
    "data/rejects/prepare.parquet",
    "data/segments.parquet",
    "data/rejects/segment.parquet",
    "data/index",
)
DASK_SEGMENT_SLACK = 1.10  # dask local:2 segment within 10 % of local; embed not slower

# VoxCeleb2 (dev + test) for the projection.
VOX = {"utterances": 1_128_246, "audio_h": 2442.0, "format": "m4a"}
# ASSUMPTIONS, NOT MEASURED (there is no GPU and no m4a corpus here); change them and rerun --report-only.
GPU_EMBED_XRT = 3000.0  # one H100, this repo's ECAPA (C=128) with AMP: audio seconds embedded per second
M4A_DECODE_FACTOR = 2.0  # CPU of decoding AAC (m4a) / CPU of decoding FLAC, applied to the decode share
PARALLEL_EFFICIENCY = 0.9  # of segment/embed over cores and over machines (Dask), vs the per-core rate
TARGET_MACHINES = {
    "this machine (2 cores)": (None, 1, False),
    "1 x (16 cores + H100)": (16, 1, True),
    "8 x (16 cores + H100)": (16, 8, True),
}


# --------------------------------------------------------------------------------------------
# Process-tree sampling
# --------------------------------------------------------------------------------------------


def _role(cmdline: list[str]) -> str:
    """A short name for a process of a stage's tree (for the per-process RSS table)."""
    text = " ".join(cmdline)
    if "tasks.run" in text:
        return "stage " + cmdline[-1]
    if "dask" in text and ("worker" in text or "nanny" in text):
        return "dask worker"
    if "multiprocessing" in text or "spawn_main" in text or "forkserver" in text:
        return "spawned child"  # Dask LocalCluster workers are spawned this way
    return (Path(cmdline[0]).name if cmdline else "?")[:20]


class TreeSampler(threading.Thread):
    """Polls the RSS of ``pid`` and all its descendants every ``interval`` s; keeps per-process maxima."""

    def __init__(self, pid: int, interval: float = POLL_S) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.stop_event = threading.Event()
        self.peaks: dict[int, dict[str, Any]] = {}
        self.max_sum = 0
        self.max_procs = 0
        self.samples = 0

    def run(self) -> None:
        import psutil

        while not self.stop_event.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    times = proc.cpu_times()
                    if proc.pid not in self.peaks:
                        self.peaks[proc.pid] = {"pid": proc.pid, "role": _role(proc.cmdline()), "peak_mb": 0.0}
                except psutil.Error:
                    continue
                total += rss
                entry = self.peaks[proc.pid]
                entry["peak_mb"] = max(entry["peak_mb"], round(rss / MB, 1))
                entry["cpu_s"] = round(times.user + times.system, 2)  # own CPU, at the last sample
            self.max_sum = max(self.max_sum, total)
            self.max_procs = max(self.max_procs, len(procs))
            self.samples += 1
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def run_measured(cmd: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``, sampling its tree; exact CPU seconds and the largest process's peak RSS from wait4."""
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: rusage covers every waited descendant
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    procs = sorted(sampler.peaks.values(), key=lambda p: -p["peak_mb"])
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        # Cross-check: own CPU of each sampled process at its last sample (misses its last 0.2 s).
        "cpu_s_sampled": round(sum(p.get("cpu_s", 0.0) for p in procs), 2),
        "peak_rss_mb": procs[0]["peak_mb"] if procs else None,  # largest single process (sampled)
        "peak_rss_sum_mb": round(sampler.max_sum / MB, 1),  # whole tree at its largest sample
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),  # exact peak of the largest process (kernel)
        "processes": procs[:12],
        "n_processes": len(procs),
        "samples": sampler.samples,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def tree_bytes(path: Path, exclude: Iterable[str] = ()) -> int:
    """Bytes of the files under ``path`` (not following links), skipping top-level names in ``exclude``."""
    if not path.exists():
        return 0
    skip = set(exclude)
    total = 0
    for entry in path.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            total += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
        elif entry.is_file():
            total += entry.stat().st_size
    return total


def dvc_cache(project: Path) -> dict[str, Any]:
    """Cache the project's DVC outputs (:data:`DVC_OUTS`) as ``dvc commit`` would; bytes in ``.dvc/cache``.

    The bench projects have no ``dvc.yaml``, so ``dvc add`` stands in for ``dvc commit``: same hashing,
    same cache, with DVC's default link type (a copy on ext4, the worst case). Reruns start a fresh cache.
    """
    dvc = Path(sys.executable).with_name("dvc")
    shutil.rmtree(project / ".dvc", ignore_errors=True)
    for stale in project.glob("data/**/*.dvc"):
        stale.unlink()
    outs = [o for o in DVC_OUTS if (project / o).exists()]
    started = time.perf_counter()
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([str(dvc), "add", "-q", *outs], cwd=project, check=True)
    return {
        "outs": outs,
        "dvc_cache_bytes": tree_bytes(project / ".dvc" / "cache"),
        "dvc_add_s": round(time.perf_counter() - started, 2),
    }


# --------------------------------------------------------------------------------------------
# One (scale, engine) run
# --------------------------------------------------------------------------------------------


def max_sampled_trials(speaker_counts: Iterable[int]) -> int:
    """The largest ``sampled:N`` the eval split allows (N // 2 targets, the rest non-targets)."""
    counts = list(speaker_counts)
    n = sum(counts)
    target = sum(c * (c - 1) // 2 for c in counts)
    nontarget = n * (n - 1) // 2 - target
    return 2 * target + 1 if nontarget > target else 2 * nontarget


def eval_speaker_counts(corpus: Path) -> list[int]:
    import csv

    counts: dict[str, int] = {}
    with open(corpus / "files.csv") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "test":
                counts[row["speaker"]] = counts.get(row["speaker"], 0) + 1
    return list(counts.values())


def write_project(project: Path, corpus: Path, model_dir: Path, engine: str, address: str, trials: int) -> None:
    """A fresh project: params.yaml (defaults + this run's settings) and models/ecapa copied."""
    import yaml

    from voiceprint.config import Params, set_dotted

    if project.exists():
        shutil.rmtree(project)
    (project / "models").mkdir(parents=True)
    shutil.copytree(model_dir, project / "models" / "ecapa")
    raw = Params().model_dump(mode="json")
    overrides = {
        "data.dataset": "folder",
        "data.path": str(corpus),
        "evaluate.trials": f"sampled:{trials}",
        "compute.engine": engine,
        "compute.address": address,
    }
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def run_pipeline(
    label: str, corpus: Path, corpus_info: dict[str, Any], engine: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every stage of one (corpus, engine) in a fresh project; one record per stage and one for the run."""
    project = args.work_root / f"{label}-{engine}"
    per_utt = max(2, int(args.trials_per_utterance * sum(eval_speaker_counts(corpus))))
    trials = min(per_utt, max_sampled_trials(eval_speaker_counts(corpus)))
    write_project(project, corpus, args.model_dir, engine, args.address, trials)
    (project / "logs").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    base = {
        "bench": BENCH,
        "scale": label,
        "engine": engine,
        "address": args.address if engine == "dask" else None,
        "audio_s": corpus_info["audio_s"],
        "files": corpus_info["files"],
        "corpus_bytes": corpus_info["bytes"],
        "trials": trials,
        "run_id": args.run_id,
    }
    records: list[dict[str, Any]] = []
    data_before = 0
    for stage in STAGES:
        cmd = [sys.executable, "-m", "tasks.run", stage]
        print(f"[{label} {engine}] {stage} ...", file=sys.stderr, flush=True)
        m = run_measured(cmd, project, project / "logs" / f"{stage}.log", env)
        data_after = tree_bytes(project / "data")
        rec = {
            **base,
            "kind": "stage",
            "stage": stage,
            **m,
            "xrt": round(corpus_info["audio_s"] / m["wall_s"], 2) if m["wall_s"] else None,
            "xrt_per_core": round(corpus_info["audio_s"] / m["cpu_s"], 2) if m["cpu_s"] else None,
            "data_bytes_added": data_after - data_before,
            "summary": _stage_summary(project / "logs" / f"{stage}.log"),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        data_before = data_after
        print(
            f"[{label} {engine}] {stage}: rc {m['rc']}, {m['wall_s']:.1f} s wall, {m['cpu_s']:.1f} s CPU, "
            f"peak {m['peak_rss_mb']} MB/process, {m['peak_rss_sum_mb']} MB tree",
            file=sys.stderr,
            flush=True,
        )
        emit(rec, args.out)
        records.append(rec)
        if m["rc"] != 0:
            tail = (project / "logs" / f"{stage}.log").read_text(errors="replace")[-3000:]
            print(tail, file=sys.stderr)
            break
    data = project / "data"
    metrics = json.loads((project / "metrics.json").read_text()) if (project / "metrics.json").exists() else {}
    metrics = next((block for block in metrics.values() if isinstance(block, dict)), metrics)  # the one eval set
    run = {
        **base,
        "kind": "run",
        "ok": all(r["rc"] == 0 for r in records) and len(records) == len(STAGES),
        "wall_s": round(sum(r["wall_s"] for r in records), 2),
        "disk": {
            "data_bytes": tree_bytes(data),
            "embeddings_bytes": tree_bytes(data / "embeddings"),
            "index_bytes": tree_bytes(data / "index"),
            "cache_bytes": tree_bytes(data / "cache"),
            "data_excl_embeddings_bytes": tree_bytes(data, exclude=["embeddings"]),
            "project_other_bytes": tree_bytes(project, exclude=["data", "models", "logs"]),
            "by_entry": {
                e.name: tree_bytes(data, exclude=[x.name for x in data.iterdir() if x != e])
                for e in sorted(data.iterdir())
            }
            if data.exists()
            else {},
        },
        "metrics": {
            k: metrics.get(k)
            for k in ("n_trials", "eer", "eer_snorm", "top1", "top5", "n_queries", "n_gallery_speakers")
        },
        "hardware": hardware(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    emit(run, args.out)
    records.append(run)
    if run["ok"] and not args.no_dvc:
        emit(dvc_record(project, base), args.out)
    if not args.keep_projects and run["ok"]:
        shutil.rmtree(data / "embeddings", ignore_errors=True)  # the bulk; the rest stays for inspection
    return records


def dvc_record(project: Path, base: dict[str, Any]) -> dict[str, Any]:
    """A ``kind: dvc`` record: what caching the project's DVC outputs adds (:func:`dvc_cache`)."""
    print(f"[{base['scale']} {base['engine']}] dvc add {', '.join(DVC_OUTS)} ...", file=sys.stderr, flush=True)
    return {
        **base,
        "kind": "dvc",
        **dvc_cache(project),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _stage_summary(log_path: Path) -> dict[str, Any]:
    """The JSON summary ``tasks.run`` prints last, trimmed to scalars."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"stage"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                return {}
            return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {}


def _encode_aac(wav: np.ndarray, sr: int, path: Path) -> None:
    """``wav`` as VoxCeleb2 ships its audio: AAC in MP4 (.m4a), 16 kHz mono, 64 kb/s (PyAV's FFmpeg encoder)."""
    import av

    with av.open(str(path), "w", format="ipod") as out:
        stream = out.add_stream("aac", rate=sr, layout="mono")
        stream.codec_context.options = {"b": "64000"}
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(wav[None, :].astype(np.float32)), format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = sr, 0, Fraction(1, sr)
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=sr, frame_size=1024)
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))


def decode_rate(corpus: Path, limit_s: float = 600.0) -> dict[str, Any]:
    """CPU seconds per audio second of decoding with the pipeline's own loader, one process: the corpus's
    FLAC, and the same files transcoded to AAC (.m4a, as VoxCeleb2) in a scratch folder, up to ``limit_s``."""
    import tempfile

    from voiceprint.common import audio as vp_audio

    files: list[Path] = []
    total = 0.0
    for path in sorted(corpus.glob("*/*/*.flac")):
        files.append(path)
        total += vp_audio.probe(path).duration_s
        if total >= limit_s:
            break

    def timed(paths: list[Path]) -> tuple[float, float]:
        audio, t0 = 0.0, time.process_time()
        for path in paths:
            audio += len(vp_audio.load(path)) / vp_audio.TARGET_SR
        return audio, time.process_time() - t0

    flac_audio, flac_cpu = timed(files)
    with tempfile.TemporaryDirectory(prefix="bench-scale-aac-") as tmp:
        m4a = []
        for k, path in enumerate(files):
            _encode_aac(vp_audio.load(path), vp_audio.TARGET_SR, Path(tmp) / f"{k:05d}.m4a")
            m4a.append(Path(tmp) / f"{k:05d}.m4a")
        m4a_audio, m4a_cpu = timed(m4a)
    return {
        "bench": BENCH,
        "kind": "decode",
        "format": "flac",
        "audio_s": round(flac_audio, 1),
        "cpu_s": round(flac_cpu, 3),
        "xrt_per_core": round(flac_audio / flac_cpu, 1) if flac_cpu else None,
        "m4a_audio_s": round(m4a_audio, 1),
        "m4a_cpu_s": round(m4a_cpu, 3),
        "m4a_xrt_per_core": round(m4a_audio / m4a_cpu, 1) if m4a_cpu else None,
        "hardware": hardware(),
    }


# --------------------------------------------------------------------------------------------
# Identification at 10^5 speakers (Task 1's measurement)
# --------------------------------------------------------------------------------------------


def bench_identification(
    gallery: int, queries: int, eval_speakers: int, bootstrap: int, seed: int = 0
) -> dict[str, Any]:
    """``_identification`` on synthetic unit vectors (dim 192): ``eval_speakers`` enroll 3 and give
    ``queries / eval_speakers`` queries each; the rest of the gallery are 2-utterance distractors."""

    from benchmarks.common import peak_rss_mb, reset_peak_rss, rss_mb
    from voiceprint.config import Params
    from voiceprint.evaluate import stage

    dim, enroll = 192, 3
    per_query = max(1, queries // eval_speakers)
    distractors = gallery - eval_speakers
    counts = np.concatenate([np.full(eval_speakers, enroll + per_query), np.full(distractors, 2)])
    names = np.char.add("spk", np.char.zfill(np.arange(len(counts)).astype(str), 7))
    speakers = np.repeat(names, counts)
    is_eval = np.repeat(np.arange(len(counts)) < eval_speakers, counts)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(counts), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    label = np.repeat(np.arange(len(counts)), counts)
    x = np.empty((len(label), dim), np.float32)
    for s in range(0, len(label), 65536):
        block = rng.standard_normal((len(label[s : s + 65536]), dim), dtype=np.float32) * np.float32(
            0.9 / math.sqrt(dim)
        )
        block += centres[label[s : s + 65536]]
        x[s : s + 65536] = block / np.linalg.norm(block, axis=1, keepdims=True)
    params = Params()
    params.index.use_gpu = "never"
    params.evaluate.bootstrap = bootstrap
    before = rss_mb()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    out = stage._identification(x, speakers, is_eval, params)
    wall = time.perf_counter() - t0
    return {
        "bench": BENCH,
        "kind": "identification",
        "gallery_speakers": out["n_gallery_speakers"],
        "queries": out["n_queries"],
        "eval_speakers": eval_speakers,
        "utterances": int(len(label)),
        "dim": dim,
        "bootstrap": bootstrap,
        "wall_s": round(wall, 2),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1) if reset_ok else None,
        "peak_added_mb": round(peak_rss_mb() - before, 1) if reset_ok else None,
        "embeddings_mb": round(x.nbytes / MB, 1),
        "top1": out["top1"],
        "hardware": hardware(),
    }


# --------------------------------------------------------------------------------------------
# Report maths (pure; tests/test_bench_scale.py)
# --------------------------------------------------------------------------------------------


def fixed_cost(wall_tiny: float, audio_tiny: float, wall_ref: float, audio_ref: float) -> float:
    """Start-up seconds: the intercept of the line through (audio_tiny, wall_tiny) and (audio_ref, wall_ref),
    clipped to [0, wall_tiny] (noise can tilt the line either way)."""
    if audio_ref <= audio_tiny:
        return max(0.0, wall_tiny)
    slope = (wall_ref - wall_tiny) / (audio_ref - audio_tiny)
    return min(max(0.0, wall_tiny - slope * audio_tiny), max(0.0, wall_tiny))


def linearity(wall_small: float, audio_small: float, wall_big: float, audio_big: float, fixed: float) -> dict[str, Any]:
    """Growth of the variable time (wall - fixed) against growth of the audio; target <= LINEAR_SLACK."""
    var_small, var_big = wall_small - fixed, wall_big - fixed
    audio_ratio = audio_big / audio_small
    if var_small <= 0:
        return {"time_ratio": None, "audio_ratio": round(audio_ratio, 2), "excess": None, "ok": None}
    excess = (var_big / var_small) / audio_ratio
    return {
        "time_ratio": round(var_big / var_small, 2),
        "audio_ratio": round(audio_ratio, 2),
        "excess": round(excess, 3),
        "ok": excess <= LINEAR_SLACK,
    }


def memory_per_file(
    rss_small: float, files_small: int, rss_big: float, files_big: int, files_at: int
) -> dict[str, Any]:
    """Peak RSS as a line in the number of files through two scales: MB per 1,000 files, and the peak
    that line gives at ``files_at`` files (a stage whose peak does not grow projects its own peak)."""
    slope = max(0.0, (rss_big - rss_small) / (files_big - files_small)) if files_big > files_small else 0.0
    return {
        "mb_per_1000_files": round(1000 * slope, 2),
        "projected_mb": round(rss_big + slope * (files_at - files_big)),
    }


def rss_ratio(peak_big: float, peak_small: float) -> dict[str, Any]:
    ratio = peak_big / peak_small if peak_small else math.inf
    return {"ratio": round(ratio, 3), "ok": ratio <= RSS_FLAT}


def disk_share(added_bytes: int, corpus_bytes: int) -> dict[str, Any]:
    share = added_bytes / corpus_bytes if corpus_bytes else math.inf
    return {"share": round(share, 4), "ok": share <= DISK_SHARE}


def project(
    stages: dict[str, dict[str, float]],
    *,
    audio_s: float,
    utterances: int,
    cores: int,
    machines: int,
    gpu: bool,
    decode_cpu_per_audio: float,
    m4a_factor: float = M4A_DECODE_FACTOR,
    gpu_xrt: float = GPU_EMBED_XRT,
    efficiency: float = PARALLEL_EFFICIENCY,
) -> dict[str, Any]:
    """Seconds per stage for a corpus of ``audio_s`` seconds / ``utterances`` files on ``machines`` x ``cores``.

    ``stages[name]``: ``fixed_s``, ``cpu_per_audio`` (CPU s per audio s) and ``cpu_per_utt`` (CPU s per file).
    prepare runs in one process whose threads use the ``cores`` of one machine; segment and embed scale over
    ``cores * machines * efficiency``;
    index and evaluate run on one core of one machine at their per-file CPU. Decoding stages pay the m4a factor on
    their decode share. With ``gpu``, embed is bounded by the assumed GPU rate or by decoding on the CPUs.
    """
    extra_decode = (m4a_factor - 1.0) * decode_cpu_per_audio
    out: dict[str, float] = {}
    for name, s in stages.items():
        if name in ("index", "evaluate"):
            out[name] = s["fixed_s"] + utterances * s["cpu_per_utt"]
            continue
        cpu = audio_s * (s["cpu_per_audio"] + extra_decode)
        if name == "prepare":
            out[name] = s["fixed_s"] + cpu / (cores * efficiency)
        elif name == "embed" and gpu:
            decode = audio_s * decode_cpu_per_audio * m4a_factor / (cores * machines * efficiency)
            out[name] = s["fixed_s"] + max(audio_s / (gpu_xrt * machines), decode)
        else:
            out[name] = s["fixed_s"] + cpu / (cores * machines * efficiency)
    bound = max(out, key=lambda k: out[k]) if out else None
    return {
        "stages_s": {k: round(v, 1) for k, v in out.items()},
        "total_s": round(sum(out.values()), 1),
        "bound_by": bound,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("bench") == BENCH:
                out.append(rec)
    return out


def _latest(records: list[dict[str, Any]], kind: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The last record per (scale, engine, stage) of ``kind`` (later runs replace earlier ones).

    Where the latest invocation (``run_id``) repeated a stage (``--repeats``), its wall and CPU
    seconds are the median of the repeats, and ``repeats`` says how many there were.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("kind") == kind and rec.get("rc", 0) == 0:
            key = (rec.get("scale"), rec.get("engine"), rec.get("stage"))
            same = [r for r in groups.get(key, []) if r.get("run_id") == rec.get("run_id")]
            groups[key] = [*same, rec]
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, recs in groups.items():
        rec = dict(recs[-1])
        if len(recs) > 1 and kind == "stage":
            for field in ("wall_s", "cpu_s"):
                rec[field] = round(statistics.median(r[field] for r in recs), 3)
            rec["xrt"] = round(rec["audio_s"] / rec["wall_s"], 2) if rec["wall_s"] else None
            rec["xrt_per_core"] = round(rec["audio_s"] / rec["cpu_s"], 2) if rec["cpu_s"] else None
        rec["repeats"] = len(recs)
        out[key] = rec
    return out


def _scale_key(label: str) -> float:
    return 0.0 if label == "tiny" else float(str(label).lstrip("x"))


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _hms(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fixed_costs(stage_recs: dict[tuple[Any, ...], dict[str, Any]], engine: str) -> dict[str, float]:
    """Start-up seconds per stage for ``engine``: two-point fit through tiny and the smallest real scale."""
    scales = sorted({k[0] for k in stage_recs if k[0] != "tiny" and k[1] == engine}, key=_scale_key)
    out: dict[str, float] = {}
    for stage in STAGES:
        tiny = stage_recs.get(("tiny", engine, stage))
        ref = next((stage_recs[(s, engine, stage)] for s in scales if (s, engine, stage) in stage_recs), None)
        if tiny and ref:
            out[stage] = fixed_cost(tiny["wall_s"], tiny["audio_s"], ref["wall_s"], ref["audio_s"])
        elif tiny:
            out[stage] = tiny["wall_s"]
    return out


def render_report(records: list[dict[str, Any]]) -> str:
    stage_recs = _latest(records, "stage")
    runs = {(k[0], k[1]): v for k, v in _latest(records, "run").items()}
    dvc = {(k[0], k[1]): v for k, v in _latest(records, "dvc").items()}
    corpora: dict[str, dict[str, Any]] = {}
    for r in records:  # the latest record per corpus, build figures from the latest that wrote files
        if r.get("kind") == "corpus":
            built = r if r.get("written") else corpora.get(r["name"], {}).get("_built")
            corpora[r["name"]] = {**r, "_built": built}
    engines = sorted({k[1] for k in stage_recs}, key=lambda e: (e != "local", e))
    scales = sorted({k[0] for k in stage_recs}, key=_scale_key)
    lines = [
        "# Scale benchmark",
        "",
        "Generated by `python benchmarks/bench_scale.py --report-only` from `benchmarks/scale.jsonl`; do not edit.",
        "Corpora: real LibriSpeech excerpts, N variants per file (speed 0.9-1.1 = pseudo-speakers, gain, circular",
        "shift), see `benchmarks/scale_corpus.py`. Each stage is one `python -m tasks.run STAGE` process tree.",
        "x RT = audio seconds / wall seconds; per core = audio seconds / CPU seconds of the whole tree.",
        "Peak RSS/proc: the largest process of the tree (wait4 `ru_maxrss`, exact); tree: the largest sampled sum.",
        "Start-up: intercept of the line through the `tiny` corpus (8 files) and the smallest scale's wall; tiny and the "
        "smallest scale run `--repeats` times (medians; column `n`).",
        "",
    ]
    hw = next((r.get("hardware") for r in reversed(records) if r.get("hardware")), None)
    if hw:
        lines += [
            f"Hardware: {hw.get('cpu', '?')}, {hw.get('cpus_usable', '?')} usable CPUs, {hw.get('mem_total_gb', '?')} GB.",
            "",
        ]
    if corpora:
        lines += [
            "## Corpora",
            "",
            "| corpus | files | audio | bytes | speakers train/test | build s (files written) | build x RT |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for name in sorted(corpora, key=_scale_key):
            c, b = corpora[name], corpora[name]["_built"]
            built = f"{b['build_s']} ({b['written']:,})" if b else "-"
            lines.append(
                f"| {name} | {c['files']:,} | {c['audio_h']:.2f} h | {_fmt_bytes(c['bytes'])} | "
                f"{c['speakers']['train']}/{c['speakers']['test']} | {built} | "
                f"{(b or {}).get('build_xrt') or '-'} |"
            )
        lines.append("")
    lines += [
        "## Stages",
        "",
        "| stage | scale | engine | n | wall s | start-up s | x RT | x RT/core | peak RSS/proc MB | tree MB | procs | data/ added | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fixed = {e: fixed_costs(stage_recs, e) for e in engines}
    for stage in STAGES:
        for scale in scales:
            for engine in engines:
                r = stage_recs.get((scale, engine, stage))
                if not r:
                    continue
                lines.append(
                    f"| {stage} | {scale} | {engine} | {r['repeats']} | {r['wall_s']:.1f} | {fixed[engine].get(stage, 0):.1f} | {r['xrt'] or 0:.1f} | "
                    f"{r['xrt_per_core'] or 0:.1f} | {r['ru_maxrss_mb']:.0f} | {r['peak_rss_sum_mb']:.0f} | {r['n_processes']} | "
                    f"{_fmt_bytes(r['data_bytes_added'])} | {r['load_before']:.1f}/{r['load_after']:.1f} |"
                )
    lines += [
        "",
        "`load`: 1-minute load average before/after the stage (other work on the machine inflates wall times).",
        "",
    ]
    lines += _targets(stage_recs, runs, dvc, fixed, engines, scales)
    lines += _memory_section(stage_recs, engines, scales, runs)
    lines += _projection_section(records, stage_recs, fixed, engines, scales)
    ident = [r for r in records if r.get("kind") == "identification"]
    if ident:
        lines += [
            "## Identification at scale (evaluate `_identification`, synthetic unit vectors, dim 192)",
            "",
            "| gallery speakers | queries | eval speakers | bootstrap | wall s | peak RSS MB | added MB | embeddings MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ident:
            lines.append(
                f"| {r['gallery_speakers']:,} | {r['queries']:,} | {r['eval_speakers']:,} | {r['bootstrap']} | {r['wall_s']} | "
                f"{r['peak_rss_mb']} | {r['peak_added_mb']} | {r['embeddings_mb']} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _targets(stage_recs: dict, runs: dict, dvc: dict, fixed: dict, engines: list[str], scales: list[str]) -> list[str]:
    real = [s for s in scales if s != "tiny"]
    lines = ["## Targets", ""]
    if len(real) >= 2:
        small, big = real[0], real[-1]
        lines += [
            f"Time linear and memory flat: {big} against {small}, per engine.",
            "",
            "| stage | engine | (wall-startup) ratio | audio ratio | excess (<= 1.10) | time | RSS/proc ratio (<= 1.3) | memory |",
            "|---|---|---:|---:|---:|---|---:|---|",
        ]
        for engine in engines:
            for stage in STAGES:
                a, b = stage_recs.get((small, engine, stage)), stage_recs.get((big, engine, stage))
                if not (a and b):
                    continue
                lin = linearity(a["wall_s"], a["audio_s"], b["wall_s"], b["audio_s"], fixed[engine].get(stage, 0.0))
                rss = rss_ratio(b["ru_maxrss_mb"], a["ru_maxrss_mb"])
                lines.append(
                    f"| {stage} | {engine} | {lin['time_ratio']} | {lin['audio_ratio']} | {lin['excess']} | {_mark(lin['ok'])} | "
                    f"{rss['ratio']} | {_mark(rss['ok'])} |"
                )
        lines.append("")
        for engine in engines:
            held = index_held(stage_recs, runs, engine, small, big)
            if held:
                ok = held["rest_ratio"] <= RSS_FLAT
                lines += [
                    f"index ({engine}) without the FAISS indexes it holds ({held['index_mb_big']:.0f} MB at {big}): "
                    f"RSS ratio {held['rest_ratio']} ({_mark(ok)}).",
                    "",
                ]
    else:
        lines += [
            "Time linearity and memory flatness need two real scales (e.g. 1x and 100x); only "
            f"{', '.join(real) or 'none'} measured so far.",
            "",
        ]
    lines += [
        "Disk: what the project adds, against the corpus bytes; the corpus is read in place, never copied.",
        "`data/` excl. embeddings: manifest, segments, index, caches and rejects after every stage.",
        "DVC cache: `.dvc/cache` after caching the DVC outputs of prepare, segment and index (`dvc add`",
        "standing in for `dvc commit`, DVC's default link type: a copy on ext4); embeddings are excluded as",
        "the target says. Share = (data/ excl. embeddings + DVC cache) / corpus.",
        "",
        "| scale | engine | corpus | data/ | embeddings | index | data/ excl. embeddings | DVC cache | share (<= 10 %) | disk |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (scale, engine), run in sorted(runs.items(), key=lambda kv: (_scale_key(kv[0][0]), kv[0][1])):
        d = run["disk"]
        cached = dvc.get((scale, engine))
        cache_bytes = cached["dvc_cache_bytes"] if cached else 0
        share = disk_share(d["data_excl_embeddings_bytes"] + cache_bytes, run["corpus_bytes"])
        lines.append(
            f"| {scale} | {engine} | {_fmt_bytes(run['corpus_bytes'])} | {_fmt_bytes(d['data_bytes'])} | {_fmt_bytes(d['embeddings_bytes'])} | "
            f"{_fmt_bytes(d['index_bytes'])} | {_fmt_bytes(d['data_excl_embeddings_bytes'])} | "
            f"{_fmt_bytes(cache_bytes) if cached else '-'} | {share['share']:.1%} | {_mark(share['ok'])} |"
        )
    lines.append("")
    if "dask" in engines and "local" in engines:
        lines += [
            "Dask `local:2` against `local` (segment within 10 %, embed not slower):",
            "",
            "| scale | segment dask/local | ok | embed dask/local | ok |",
            "|---|---:|---|---:|---|",
        ]
        for scale in real:
            cells = []
            for stage, slack in (("segment", DASK_SEGMENT_SLACK), ("embed", 1.0)):
                lo, da = stage_recs.get((scale, "local", stage)), stage_recs.get((scale, "dask", stage))
                if lo and da:
                    ratio = da["wall_s"] / lo["wall_s"]
                    cells += [f"{ratio:.2f}", _mark(ratio <= slack)]
                else:
                    cells += ["-", "n/a"]
            lines.append(f"| {scale} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _memory_section(stage_recs: dict, engines: list[str], scales: list[str], runs: dict | None = None) -> list[str]:
    """Per-process peak RSS as fixed + per-file, fitted through the two largest scales, at VoxCeleb2's file count;
    for index, also the part of its growth that is the FAISS indexes themselves (``runs``' index bytes)."""
    real = [s for s in scales if s != "tiny"]
    lines: list[str] = []
    notes: list[str] = []
    for engine in engines:
        measured = [s for s in real if all((s, engine, st) in stage_recs for st in STAGES)]
        if len(measured) < 2 or measured[-1] != real[-1]:
            continue  # only an engine measured at the largest scale: smaller pairs project noise
        a, b = measured[-2], measured[-1]
        if not lines:
            lines += [
                "## Memory per file",
                "",
                f"Peak RSS of the largest process as a line in the number of files, through the two largest scales "
                f"of each engine, extended to VoxCeleb2's {VOX['utterances']:,} files. A stage that holds per-file "
                "state (the manifest rows, the batch plan, the embeddings it scores or indexes) grows; a streaming "
                "stage stays flat.",
                "",
                "| stage | engine | scales | peak MB | MB per 1,000 files | projected at VoxCeleb2 |",
                "|---|---|---|---:|---:|---:|",
            ]
        for stage in STAGES:
            ra, rb = stage_recs[(a, engine, stage)], stage_recs[(b, engine, stage)]
            m = memory_per_file(ra["ru_maxrss_mb"], ra["files"], rb["ru_maxrss_mb"], rb["files"], VOX["utterances"])
            lines.append(
                f"| {stage} | {engine} | {a} -> {b} | {ra['ru_maxrss_mb']:.0f} -> {rb['ru_maxrss_mb']:.0f} | "
                f"{m['mb_per_1000_files']} | {_fmt_bytes(m['projected_mb'] * MB)} |"
            )
        held = index_held(stage_recs, runs or {}, engine, a, b)
        if held:
            notes.append(
                f"- index ({engine}): the FAISS indexes it builds are its output and are held whole: "
                f"{held['index_mb_small']:.0f} -> {held['index_mb_big']:.0f} MB ({held['index_per_1000']} MB per "
                f"1,000 files). The rest of its peak grows {held['rest_per_1000']} MB per 1,000 files, and "
                f"{held['rest_big']:.0f} MB at {b} is {held['rest_ratio']}x the {held['rss_small']:.0f} MB at {a}."
            )
    return [*lines, "", *notes, *([""] if notes else [])] if lines else []


def index_held(stage_recs: dict, runs: dict, engine: str, a: str, b: str) -> dict[str, float] | None:
    """The index stage's peak at scales ``a`` < ``b`` split into the indexes it must hold (their bytes on disk,
    ``data/index``) and the rest; None without both runs' disk records, or when the big run wrote its index
    from the batches instead of holding it (a flat index, ``indexes_in_memory: false`` in its summary)."""
    ra, rb = stage_recs.get((a, engine, "index")), stage_recs.get((b, engine, "index"))
    if rb and (rb.get("summary") or {}).get("indexes_in_memory") is False:
        return None
    da, db = (runs.get((scale, engine), {}).get("disk", {}).get("index_bytes") for scale in (a, b))
    if not (ra and rb and da and db) or rb["files"] <= ra["files"]:
        return None
    files = (rb["files"] - ra["files"]) / 1000
    index_a, index_b = da / MB, db / MB
    rest_b = rb["ru_maxrss_mb"] - (index_b - index_a)  # the big peak less the index growth
    return {
        "index_mb_small": index_a,
        "index_mb_big": index_b,
        "index_per_1000": round((index_b - index_a) / files, 2),
        "rest_per_1000": round(max(0.0, rest_b - ra["ru_maxrss_mb"]) / files, 2),
        "rest_big": rest_b,
        "rss_small": ra["ru_maxrss_mb"],
        "rest_ratio": round(rest_b / ra["ru_maxrss_mb"], 2),
    }


def stage_rates(stage_recs: dict, fixed: dict[str, float], engine: str, scale: str) -> dict[str, dict[str, float]]:
    """Per-stage inputs of :func:`project` from one measured (scale, engine): marginal CPU, i.e. the CPU of
    ``scale`` minus the CPU of the tiny corpus, per audio second and per file (CPU time suffers far less than
    wall time from other load on the machine); without a tiny run, all of the CPU."""
    out = {}
    for stage in STAGES:
        r = stage_recs.get((scale, engine, stage))
        if not r:
            continue
        t = stage_recs.get(("tiny", engine, stage)) or {"cpu_s": 0.0, "audio_s": 0.0, "files": 0}
        cpu = max(0.0, r["cpu_s"] - t["cpu_s"])
        out[stage] = {
            "fixed_s": fixed.get(stage, 0.0),
            "cpu_per_audio": cpu / max(r["audio_s"] - t["audio_s"], 1e-9),
            "cpu_per_utt": cpu / max(r["files"] - t["files"], 1),
        }
    return out


def _projection_section(
    records: list, stage_recs: dict, fixed: dict, engines: list[str], scales: list[str]
) -> list[str]:
    real = [s for s in scales if s != "tiny" and any((s, e, "embed") in stage_recs for e in engines)]
    decode = [r for r in records if r.get("kind") == "decode"]
    if not real or not decode:
        return ["## VoxCeleb2 projection", "", "Needs a run with embed and a decode measurement.", ""]
    scale = real[-1]
    rates: dict[str, dict[str, float]] = {}
    chosen: dict[str, str] = {}
    for engine in engines:  # per stage, the engine that needed the least CPU at this scale
        for stage, rate in stage_rates(stage_recs, fixed[engine], engine, scale).items():
            if stage not in rates or rate["cpu_per_audio"] < rates[stage]["cpu_per_audio"]:
                rates[stage], chosen[stage] = rate, engine
    decode_cpu = decode[-1]["cpu_s"] / decode[-1]["audio_s"]
    m4a_factor = (
        decode[-1]["m4a_cpu_s"] / decode[-1]["m4a_audio_s"] / decode_cpu
        if decode[-1].get("m4a_cpu_s") and decode[-1].get("m4a_audio_s")
        else M4A_DECODE_FACTOR
    )
    m4a_note = (
        f"AAC (.m4a, 16 kHz mono 64 kb/s) decoding measured at {m4a_factor:.2f}x the CPU of FLAC"
        if m4a_factor != M4A_DECODE_FACTOR
        else f"**assumed**: AAC decoding costs {M4A_DECODE_FACTOR:g}x the CPU of FLAC"
    )
    audio = VOX["audio_h"] * 3600
    lines = [
        "## VoxCeleb2 projection",
        "",
        f"VoxCeleb2: {VOX['utterances']:,} utterances, {VOX['audio_h']:,.0f} h, {VOX['format']}. Inputs, measured at "
        f"{scale}: the marginal CPU of each stage ({scale} minus tiny; per stage the engine that needed less), per audio "
        "second for the decoding stages (x RT per core: "
        + ", ".join(
            f"{s} {1 / rates[s]['cpu_per_audio']:.0f} ({chosen[s]})"
            for s in DECODING_STAGES
            if rates.get(s, {}).get("cpu_per_audio")
        )
        + f"; FLAC decoding alone {1 / decode_cpu:.0f}) and per file for index and evaluate; start-up as above.",
        "Model: prepare hashes and decode-checks on the threads of one machine; segment and embed spread over all cores",
        "(and machines, with Dask)",
        f"at {PARALLEL_EFFICIENCY:.0%} efficiency; index and evaluate run on one core of one machine. CPU rates are used "
        "for every row: wall times move with other load on the machine (see `load`).",
        "",
        "**Assumed, not measured** (no GPU was lent to this work): one H100 embeds "
        f"{GPU_EMBED_XRT:,.0f} x real time with this model; with a GPU, embed is bounded by that rate or by decoding. "
        f"{m4a_note} (applied to the decode share of prepare, segment and embed).",
        "",
        "| machine | " + " | ".join(STAGES) + " | total | bound by |",
        "|---|" + "---:|" * len(STAGES) + "---:|---|",
    ]
    cores_here = next((r["hardware"].get("cpus_usable") for r in reversed(records) if r.get("hardware")), None) or 2
    for name, (cores, machines, gpu) in TARGET_MACHINES.items():
        p = project(
            rates,
            audio_s=audio,
            utterances=VOX["utterances"],
            cores=cores or cores_here,
            machines=machines,
            gpu=gpu,
            decode_cpu_per_audio=decode_cpu,
            m4a_factor=m4a_factor,
        )
        lines.append(
            f"| {name} | "
            + " | ".join(_hms(p["stages_s"].get(s, 0)) for s in STAGES)
            + f" | {_hms(p['total_s'])} | {p['bound_by']} |"
        )
    lines += [
        "",
        "index and evaluate are extrapolated linearly per file; evaluate's s-norm and identification grow faster",
        "(eval x cohort, queries x gallery), so treat those two cells as lower bounds.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _default_model_dir() -> Path:
    for candidate in (
        REPO / "models" / "ecapa",
        REPO.parent / "fresh2" / "models" / "ecapa",
        REPO.parent / "baseline" / "models" / "ecapa",
    ):
        if (candidate / "embedding_model.ckpt").exists():
            return candidate
    return REPO / "models" / "ecapa"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--scales", default="1", help="comma-separated N (variants per source file), e.g. 1,10,100")
    p.add_argument("--engines", default="local", help="comma-separated: local, dask")
    p.add_argument("--address", default="local:2", help="compute.address for the dask engine")
    p.add_argument("--single-engine-at", default="100", help="scales that run only the first of --engines")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny corpus (start-up cost) runs")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of tiny and of the smallest scale, whose few seconds of work the start-up fit and the "
        "linearity ratios divide by; the report takes each stage's median",
    )
    p.add_argument(
        "--corpus-root", type=Path, default=Path("/work/scale-corpus"), help="corpora: <root>/x<N>, <root>/tiny"
    )
    p.add_argument("--work-root", type=Path, default=Path("/work/scale-runs"), help="projects: <root>/<scale>-<engine>")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the LibriSpeech excerpts")
    p.add_argument("--model-dir", type=Path, default=_default_model_dir(), help="a trained models/ecapa folder")
    p.add_argument("--jobs", type=int, default=0, help="corpus build processes [usable CPUs]")
    p.add_argument(
        "--trials-per-utterance",
        type=float,
        default=9.0,
        help="sampled trials per eval utterance (9: as many as 1x allows, so trials grow with the audio)",
    )
    p.add_argument("--keep-projects", action="store_true", help="keep data/embeddings of finished runs")
    p.add_argument("--no-dvc", action="store_true", help="skip caching each run's DVC outputs (dvc add)")
    p.add_argument(
        "--dvc-only",
        action="store_true",
        help="only cache the DVC outputs of the finished projects of --scales/--engines, then report",
    )
    p.add_argument("--build-only", action="store_true", help="build the corpora and stop")
    p.add_argument("--report-only", action="store_true", help="regenerate the report from --out and stop")
    p.add_argument(
        "--identification", action="store_true", help="measure _identification at --id-gallery x --id-queries"
    )
    p.add_argument("--id-gallery", type=int, default=100_000)
    p.add_argument("--id-queries", type=int, default=100_000)
    p.add_argument("--id-eval-speakers", type=int, default=20_000)
    p.add_argument("--id-bootstrap", default="1000,0", help="comma-separated evaluate.bootstrap values to measure")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "scale.jsonl")
    p.add_argument("--report", type=Path, default=REPO / "benchmarks" / "SCALE.md")
    args = p.parse_args(argv)
    args.scales = [int(s) for s in str(args.scales).split(",") if s.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [e for e in args.engines if e not in ("local", "dask")]:
        p.error(f"unknown engine(s) {bad}")
    args.single_engine_at = {int(s) for s in str(args.single_engine_at).split(",") if s.strip()}
    args.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return args


def write_report(args: argparse.Namespace) -> None:
    args.report.write_text(render_report(load_records(args.out)))
    print(f"wrote {args.report}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(args)
        return 0
    if args.dvc_only:
        runs = _latest(load_records(args.out), "run")
        for label in ["tiny", *(f"x{n}" for n in args.scales)]:
            for engine in args.engines:
                project = args.work_root / f"{label}-{engine}"
                run = runs.get((label, engine, None))
                if run and (project / "data" / "manifest.parquet").exists():
                    base = {
                        k: run[k] for k in ("bench", "scale", "engine", "address", "audio_s", "files", "corpus_bytes")
                    }
                    emit(dvc_record(project, {**base, "run_id": args.run_id}), args.out)
        write_report(args)
        return 0
    if args.identification:
        for boot in [int(b) for b in args.id_bootstrap.split(",")]:
            emit(bench_identification(args.id_gallery, args.id_queries, args.id_eval_speakers, boot), args.out)
        write_report(args)
        return 0
    labels: list[tuple[str, int | str]] = [] if args.no_tiny else [("tiny", "tiny")]
    labels += [(f"x{n}", n) for n in args.scales]
    corpora: dict[str, dict[str, Any]] = {}
    for label, scale in labels:
        info = build_scale(scale, args.corpus_root / label, args.source, args.jobs)
        emit(
            {"bench": BENCH, "kind": "corpus", **info, "path": str(args.corpus_root / label), "hardware": hardware()},
            args.out,
        )
        corpora[label] = info
    if args.build_only:
        return 0
    if not (args.model_dir / "embedding_model.ckpt").exists():
        print(f"error: --model-dir {args.model_dir} holds no trained model (embedding_model.ckpt)", file=sys.stderr)
        return 2
    emit(decode_rate(args.corpus_root / labels[-1][0]), args.out)
    failed = False
    smallest = min(args.scales, default=None)
    for label, scale in labels:
        engines = args.engines[:1] if scale in args.single_engine_at else args.engines
        repeats = args.repeats if scale in ("tiny", smallest) else 1
        for _ in range(repeats):
            for engine in engines:
                records = run_pipeline(label, args.corpus_root / label, corpora[label], engine, args)
                failed |= not records[-1]["ok"]
    write_report(args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""FAISS index benchmark: Flat (exact, the peer) vs IVF and HNSW at 100 k / 1 M (/ 10 M) embeddings.

Synthetic 192-d L2-normalised embeddings "clustered like speakers": ``n / per_speaker`` speakers,
each a random unit centroid; an utterance is ``normalise(centroid + noise)`` with isotropic noise
scaled so two utterances of one speaker have cosine ``--within-cos`` (0.7, like same-speaker ECAPA
scores) and two speakers ~0. Rows are stored speaker by speaker, as the pipeline's embedding tables
are (sorted by utterance id). Queries are fresh utterances of existing speakers (not in the index).

Every index is built with the pipeline's own :func:`voiceprint.index.faiss_index.build_index` and
:class:`~voiceprint.config.IndexParams`, so the numbers are those of ``index:`` settings in
``params.yaml``. One JSON line per (size, index): build time, serialized size, RSS delta and peak
during the build, latency p50/p99 at batch 1 and batch 1024, recall@1 against the exact Flat top-1,
speaker-ID accuracy of the top-1 neighbour, speed-up over Flat; one line per size for the
speaker-centroid path (the gallery the ``identify`` command searches); one final summary line.

    python benchmarks/bench_index.py                       # 100k and 1M, ~3 min on 2 cores
    python benchmarks/bench_index.py --quick               # smoke run, seconds
    python benchmarks/bench_index.py --with-10m --out results/bench.jsonl
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_index.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    emit,
    hardware,
    mem_available_mb,
    peak_rss_mb,
    percentiles,
    reset_peak_rss,
    rss_mb,
)
from voiceprint.config import IndexParams  # noqa: E402
from voiceprint.index.faiss_index import build_index, gpu_available, speaker_centroids, to_cpu  # noqa: E402

DIM = 192
TARGET = {"n": 1_000_000, "recall_at_1": 0.99, "p50_ms_b1": 5.0}
BENCH = "index"


# --------------------------------------------------------------------------------------------
# Synthetic speakers
# --------------------------------------------------------------------------------------------


def noise_scale(within_cos: float) -> float:
    """Noise norm giving utterance-utterance cosine ``within_cos`` (in expectation, high dim).

    ``u = c + s g`` with ``|c| = 1`` and ``|g| ~ 1`` orthogonal-ish to ``c``: ``cos(u, c) =
    1/sqrt(1+s^2)``, so two utterances of one speaker meet at ``1/(1+s^2)``.
    """
    if not 0.0 < within_cos < 1.0:
        raise ValueError("--within-cos must be in (0, 1)")
    return math.sqrt(1.0 / within_cos - 1.0)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def utterances(
    rng: np.random.Generator,
    centroids: np.ndarray,
    labels: np.ndarray,
    scale: float,
    out: np.ndarray | None = None,
    chunk: int = 65536,
) -> np.ndarray:
    """Unit vectors around ``centroids[labels]``, generated in chunks into ``out`` (float32)."""
    n, d = len(labels), centroids.shape[1]
    x = np.empty((n, d), np.float32) if out is None else out
    sigma = np.float32(scale / math.sqrt(d))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = rng.standard_normal((e - s, d), dtype=np.float32)
        block *= sigma
        block += centroids[labels[s:e]]
        x[s:e] = _unit_rows(block)
    return x


class Dataset:
    """Base vectors, their speaker labels, and held-out queries of the same speakers."""

    def __init__(self, n: int, per_speaker: int, within_cos: float, n_queries: int, batch: int, seed: int) -> None:
        rng = np.random.default_rng([seed, n])
        self.n, self.per_speaker = n, per_speaker
        self.speakers = max(1, math.ceil(n / per_speaker))
        self.scale = noise_scale(within_cos)
        self.centroids = _unit_rows(rng.standard_normal((self.speakers, DIM), dtype=np.float32))
        self.labels = (np.arange(n, dtype=np.int64) // per_speaker).astype(np.int32)
        self.x = utterances(rng, self.centroids, self.labels, self.scale)
        # Queries for recall/accuracy and batch-1 timing, and one extra batch for batch timing.
        self.q_labels = rng.integers(0, self.speakers, n_queries).astype(np.int32)
        self.q = utterances(rng, self.centroids, self.q_labels, self.scale)
        self.qb = utterances(rng, self.centroids, rng.integers(0, self.speakers, batch), self.scale)
        self.stats = self._cosine_stats(rng)

    def _cosine_stats(self, rng: np.random.Generator, pairs: int = 20000) -> dict[str, float | None]:
        """Measured cosines: two utterances of one speaker, and of two different speakers."""
        i = rng.integers(0, self.n, pairs)
        mate = np.minimum(
            self.labels[i].astype(np.int64) * self.per_speaker + rng.integers(0, self.per_speaker, pairs), self.n - 1
        )
        other = rng.integers(0, self.n, pairs)
        same = (self.labels[mate] == self.labels[i]) & (mate != i)
        diff = self.labels[other] != self.labels[i]
        within = np.einsum("ij,ij->i", self.x[i[same]], self.x[mate[same]])
        between = np.einsum("ij,ij->i", self.x[i[diff]], self.x[other[diff]])

        def stat(a: np.ndarray, f: Any) -> float | None:
            return round(float(f(a)), 4) if len(a) else None

        return {
            "within_cos_mean": stat(within, np.mean),
            "between_cos_mean": stat(between, np.mean),
            "between_cos_p99": stat(between, lambda a: np.quantile(a, 0.99)),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "speakers": self.speakers,
            "per_speaker": self.per_speaker,
            "dim": DIM,
            "queries": len(self.q),
            **self.stats,
        }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def index_bytes(index: faiss.Index) -> int:
    """Serialized size of a CPU index (what ``faiss.write_index`` writes), without a numpy copy."""
    writer = faiss.VectorIOWriter()
    faiss.write_index(index, writer)
    return int(writer.data.size())


def time_batch1(index: faiss.Index, q: np.ndarray, k: int, max_queries: int, cap_s: float) -> list[float]:
    """Seconds per single-query search, over up to ``max_queries`` queries or ``cap_s`` seconds."""
    for i in range(min(5, len(q))):  # warm-up: thread pool, caches, lazily allocated buffers
        index.search(q[i : i + 1], k)
    queries = (q[i : i + 1] for i in range(min(max_queries, len(q))))
    return _time_searches(index, queries, k, min_samples=20, cap_s=cap_s)


def time_batches(index: faiss.Index, qb: np.ndarray, k: int, reps: int, cap_s: float) -> list[float]:
    """Seconds per search of the whole batch ``qb``, ``reps`` times (at least 2, at most ``cap_s``)."""
    index.search(qb[:8], k)  # warm-up
    return _time_searches(index, (qb for _ in range(reps)), k, min_samples=2, cap_s=cap_s)


def _time_searches(
    index: faiss.Index, queries: Iterable[np.ndarray], k: int, *, min_samples: int, cap_s: float
) -> list[float]:
    """Seconds per ``index.search`` of each query array; stops early past ``cap_s`` once
    ``min_samples`` are in."""
    samples: list[float] = []
    started = time.perf_counter()
    for query in queries:
        t0 = time.perf_counter()
        index.search(query, k)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= min_samples and time.perf_counter() - started > cap_s:
            break
    return samples


def latency_fields(b1: list[float], bb: list[float], batch: int) -> dict[str, Any]:
    p1, pb = percentiles(b1), percentiles(bb)
    return {
        "p50_ms_b1": p1["p50_ms"],
        "p99_ms_b1": p1["p99_ms"],
        "samples_b1": len(b1),
        f"p50_ms_b{batch}": pb["p50_ms"],
        f"p99_ms_b{batch}": pb["p99_ms"],
        f"samples_b{batch}": len(bb),
        f"per_query_us_b{batch}": round(pb["p50_ms"] * 1e3 / batch, 3) if bb else None,
        f"qps_b{batch}": round(batch / (pb["p50_ms"] / 1e3)) if bb and pb["p50_ms"] else None,
    }


def build_measured(x: np.ndarray, params: IndexParams) -> tuple[faiss.Index, dict[str, Any]]:
    """``build_index`` with wall time, RSS growth (what stays) and peak RSS growth (transients)."""
    gc.collect()
    before = rss_mb()
    peak_ok = reset_peak_rss()
    t0 = time.perf_counter()
    index = build_index(x, params)
    build_s = time.perf_counter() - t0
    after = rss_mb()
    fields = {
        "build_s": round(build_s, 3),
        "rss_delta_mb": round(after - before, 1),
        "build_peak_delta_mb": round(peak_rss_mb() - before, 1) if peak_ok else None,
    }
    return index, fields


def effective_settings(index: faiss.Index) -> dict[str, Any]:
    """Search settings actually in effect (nlist clamped by the data, etc.) of a CPU index."""
    cpu = index
    out: dict[str, Any] = {}
    try:
        ivf = faiss.extract_index_ivf(cpu)
        out.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    except Exception:
        pass
    if isinstance(cpu, faiss.IndexHNSW):
        out.update(
            hnsw_m=int(cpu.hnsw.nb_neighbors(1)),
            ef_search=int(cpu.hnsw.efSearch),
            ef_construction=int(cpu.hnsw.efConstruction),
        )
    return out


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: ~2 sqrt(n) rounded to a power of two, within [16, 4096].

    On speaker-clustered data the k-means has to keep each speaker's utterances in one or two
    lists; 1M vectors (10k speakers) reach recall@1 ~1.0 at nprobe 8 with 2048 lists but only
    ~0.97-0.99 at nprobe 16-32 with 1024, while 4096 lists triple the training time (k-means is
    O(n_train * nlist) and faiss trains on 256 points per list). Above 4096 training dominates.
    """
    target = 2.0 * math.sqrt(max(n, 1))
    return int(min(4096, max(16, 2 ** round(math.log2(target)))))


def params_for(kind: str, n: int, args: argparse.Namespace, use_gpu: str = "never") -> IndexParams:
    if kind == "flat":
        return IndexParams(type="flat", use_gpu=use_gpu)
    if kind == "ivf":
        nlist = auto_nlist(n) if args.ivf_nlist == "auto" else int(args.ivf_nlist)
        return IndexParams(type="ivf", nlist=nlist, nprobe=args.ivf_nprobe, use_gpu=use_gpu)
    if kind == "hnsw":
        return IndexParams(
            type="hnsw",
            hnsw_m=args.hnsw_m,
            ef_construction=args.hnsw_ef_construction,
            ef_search=args.hnsw_ef_search,
            use_gpu="never",
        )
    raise ValueError(kind)


def estimate_hnsw_build_s(measured: dict[int, float], n: int) -> float | None:
    """Extrapolate HNSW build time (~ n log n) from the largest size measured so far."""
    if not measured:
        return None
    n0 = max(measured)
    return measured[n0] * (n / n0) * (math.log(n) / math.log(max(n0, 2)))


def memory_needed_mb(n: int, with_graph: bool, hnsw_m: int) -> float:
    """Rough peak: the data, plus build_index's normalised copy and the index's own copy (3x the
    raw vectors while a Flat/IVF/HNSW is filled), plus the HNSW graph, plus 20%."""
    raw = n * DIM * 4 / 2**20
    graph = n * hnsw_m * 2 * 4 * 1.1 / 2**20 if with_graph else 0.0
    return 1.2 * (3 * raw + graph) + 300


# --------------------------------------------------------------------------------------------
# One size
# --------------------------------------------------------------------------------------------


def bench_size(n: int, args: argparse.Namespace, hnsw_builds: dict[int, float], results: list[dict[str, Any]]) -> None:
    base = {"bench": BENCH, "n": n, "dim": DIM}
    kinds = list(args.types)
    with_graph = "hnsw" in kinds and n <= args.hnsw_max_n
    need, avail = memory_needed_mb(n, with_graph, args.hnsw_m), mem_available_mb()
    if avail is not None and need > avail:
        emit(
            {
                **base,
                "skipped": f"needs ~{need / 1024:.1f} GiB, MemAvailable {avail / 1024:.1f} GiB",
                "hardware": hardware(threads=args.threads),
            },
            args.out,
        )
        return

    t0 = time.perf_counter()
    data = Dataset(n, args.per_speaker, args.within_cos, args.queries, args.batch, args.seed)
    base["data"] = {**data.describe(), "generate_s": round(time.perf_counter() - t0, 2)}

    truth: np.ndarray | None = None
    flat_p50_b1 = flat_p50_bb = None
    spk_acc_utt: dict[str, float] = {}
    bb_key = f"p50_ms_b{args.batch}"

    variants: list[tuple[str, str]] = [(k, "never") for k in kinds]
    if gpu_available():
        variants += [(k, "auto") for k in kinds if k in ("flat", "ivf")]
    if "flat" not in kinds:  # recall needs the exact top-1: compute it without timing Flat
        exact = build_index(data.x, IndexParams(type="flat", use_gpu="never"))
        truth = exact.search(data.q, 1)[1][:, 0]
        del exact

    for kind, use_gpu in variants:
        name = kind if use_gpu == "never" else f"{kind}-gpu"
        params = params_for(kind, n, args, use_gpu)
        record: dict[str, Any] = {**base, "index": name, "params": params.model_dump()}
        if kind == "hnsw" and n > args.hnsw_max_n:
            est = estimate_hnsw_build_s(hnsw_builds, n)
            emit(
                {
                    **record,
                    "skipped": f"HNSW build above --hnsw-max-n {args.hnsw_max_n}",
                    "est_build_s": round(est, 1) if est else None,
                    "hardware": hardware(threads=args.threads),
                },
                args.out,
            )
            continue

        index, build = build_measured(data.x, params)
        if kind == "hnsw":
            hnsw_builds[n] = build["build_s"]
        cpu_index = to_cpu(index)  # a GPU index is copied back once, for its settings and size
        record["effective"] = effective_settings(cpu_index)
        record.update(build)
        record["index_bytes"] = index_bytes(cpu_index)
        del cpu_index

        b1 = time_batch1(index, data.q, args.k, args.b1_queries, args.time_cap)
        bb = time_batches(index, data.qb, args.k, args.batch_reps, args.time_cap)
        record.update(latency_fields(b1, bb, args.batch))

        top1 = index.search(data.q, 1)[1][:, 0]
        if truth is None and kind == "flat":
            truth = top1
        record["recall_at_1"] = round(float(np.mean(top1 == truth)), 4)
        record["speaker_acc"] = round(float(np.mean(data.labels[top1] == data.q_labels)), 4)
        spk_acc_utt[name] = record["speaker_acc"]

        if kind == "flat" and use_gpu == "never":
            flat_p50_b1, flat_p50_bb = record["p50_ms_b1"], record[bb_key]
        if flat_p50_b1 and record["p50_ms_b1"]:
            record["speedup_vs_flat_b1"] = round(flat_p50_b1 / record["p50_ms_b1"], 2)
        if flat_p50_bb and record[bb_key]:
            record[f"speedup_vs_flat_b{args.batch}"] = round(flat_p50_bb / record[bb_key], 2)
        record["k"] = args.k
        record["hardware"] = hardware(threads=args.threads)
        emit(record, args.out)
        results.append(record)
        del index
        gc.collect()

    if not args.no_centroids:
        results.append(bench_centroids(data, base, args, spk_acc_utt, flat_p50_b1))
    del data
    gc.collect()


def bench_centroids(
    data: Dataset,
    base: dict[str, Any],
    args: argparse.Namespace,
    spk_acc_utt: dict[str, float],
    flat_p50_b1: float | None,
) -> dict[str, Any]:
    """Speaker-centroid gallery: one mean vector per speaker (``speaker_centroids``), Flat-indexed."""
    t0 = time.perf_counter()
    speakers, centroids, _ = speaker_centroids(data.x, data.labels)
    centroid_s = time.perf_counter() - t0
    speaker_of_row = np.asarray([int(s) for s in speakers], dtype=np.int64)  # ids sorted as strings
    params = IndexParams(type="flat", use_gpu="never")
    index, build = build_measured(centroids, params)
    b1 = time_batch1(index, data.q, args.k, args.b1_queries, args.time_cap)
    bb = time_batches(index, data.qb, args.k, args.batch_reps, args.time_cap)
    top1 = index.search(data.q, 1)[1][:, 0]
    record = {
        **base,
        "index": "centroids-flat",
        "params": params.model_dump(),
        "speakers": len(speakers),
        "centroids_s": round(centroid_s, 3),
        **build,
        "index_bytes": index_bytes(index),
        **latency_fields(b1, bb, args.batch),
        "speaker_acc": round(float(np.mean(speaker_of_row[top1] == data.q_labels)), 4),
        "speaker_acc_utterance_top1": spk_acc_utt,
        "k": args.k,
    }
    if flat_p50_b1 and record["p50_ms_b1"]:
        record["speedup_vs_flat_b1"] = round(flat_p50_b1 / record["p50_ms_b1"], 2)
    record["hardware"] = hardware(threads=args.threads)
    emit(record, args.out)
    return record


def summary(results: list[dict[str, Any]], args: argparse.Namespace, total_s: float) -> dict[str, Any]:
    """Peer (exact Flat) vs ours (the approximate index the pipeline would use) at the largest size:
    the fastest batch-1 index with recall@1 >= 0.99, else the one with the best recall."""
    measured = [r for r in results if r["index"] in ("ivf", "hnsw")]
    rec: dict[str, Any] = {"bench": BENCH, "summary": True, "peer": "flat", "target": TARGET}
    if measured:
        n = max(r["n"] for r in measured)
        at_n = [r for r in measured if r["n"] == n]
        good = [r for r in at_n if r["recall_at_1"] >= TARGET["recall_at_1"]]
        ours = (
            min(good, key=lambda r: r["p50_ms_b1"])
            if good
            else max(at_n, key=lambda r: (r["recall_at_1"], -r["p50_ms_b1"]))
        )
        flat = next((r for r in results if r["n"] == n and r["index"] == "flat"), None)
        rec.update(
            n=n,
            ours=ours["index"],
            ours_params=ours["effective"],
            ours_p50_ms_b1=ours["p50_ms_b1"],
            ours_p99_ms_b1=ours["p99_ms_b1"],
            ours_recall_at_1=ours["recall_at_1"],
            ours_build_s=ours["build_s"],
            peer_p50_ms_b1=flat["p50_ms_b1"] if flat else None,
            ratio=ours.get("speedup_vs_flat_b1"),
            **{f"ratio_b{args.batch}": ours.get(f"speedup_vs_flat_b{args.batch}")},
            target_met=(
                n >= TARGET["n"]
                and ours["recall_at_1"] >= TARGET["recall_at_1"]
                and ours["p50_ms_b1"] < TARGET["p50_ms_b1"]
            ),
        )
    rec["table"] = [
        {
            k: r.get(k)
            for k in (
                "n",
                "index",
                "build_s",
                "index_bytes",
                "p50_ms_b1",
                "p99_ms_b1",
                f"p50_ms_b{args.batch}",
                "recall_at_1",
                "speaker_acc",
            )
        }
        for r in results
    ]
    if not gpu_available():
        rec["gpu_note"] = "no GPU visible to faiss: GPU Flat/IVF skipped"
    rec["total_s"] = round(total_s, 1)
    rec["hardware"] = hardware(threads=args.threads)
    return rec


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        out.append(int(float(part[:-1] if mult > 1 else part) * mult))
    if any(n < 2 for n in out):
        raise argparse.ArgumentTypeError("sizes must be >= 2")
    return out


def _types(text: str) -> list[str]:
    kinds = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in kinds if t not in ("flat", "ivf", "hnsw")]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"index types are flat, ivf, hnsw; got {text!r}")
    return sorted(kinds, key=["flat", "ivf", "hnsw"].index)  # Flat first: it is the ground truth


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated index sizes, e.g. 100000,1000000 or 100k,1m [default 100k,1m; --quick: 20k]",
    )
    p.add_argument(
        "--with-10m",
        action="store_true",
        help="add 10M vectors (skipped with a JSON line when MemAvailable is too small)",
    )
    p.add_argument("--types", type=_types, default=["flat", "ivf", "hnsw"], help="index types")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k vectors, few queries")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall@1")
    p.add_argument("--b1-queries", type=int, default=500, help="max single-query timings per index")
    p.add_argument("--batch", type=int, default=1024, help="batch size for the batched timing")
    p.add_argument("--batch-reps", type=int, default=10, help="max batched searches per index")
    p.add_argument(
        "--time-cap",
        type=float,
        default=8.0,
        help="stop a latency series after this many seconds (min 20 single / 2 batched)",
    )
    p.add_argument("--k", type=int, default=10, help="neighbours per search in the timed searches")
    p.add_argument("--per-speaker", type=int, default=100, help="utterances per synthetic speaker")
    p.add_argument("--within-cos", type=float, default=0.7, help="same-speaker utterance cosine")
    p.add_argument("--ivf-nlist", default="auto", help="IVF lists, or 'auto' (~2 sqrt(n), pow2, <=4096)")
    p.add_argument("--ivf-nprobe", type=int, default=16, help="IVF lists scanned per query")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    p.add_argument("--hnsw-ef-construction", type=int, default=80, help="HNSW build beam")
    p.add_argument("--hnsw-ef-search", type=int, default=128, help="HNSW search beam")
    p.add_argument(
        "--hnsw-max-n",
        type=int,
        default=100_000,
        help="skip HNSW above this size, printing its build time extrapolated from the "
        "largest size built (~n log n): at 1M it takes minutes on 2 cores",
    )
    p.add_argument("--no-centroids", action="store_true", help="skip the speaker-centroid path")
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads [usable CPUs]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [20_000]
        args.queries, args.b1_queries = min(args.queries, 200), min(args.b1_queries, 100)
        args.batch_reps, args.time_cap = min(args.batch_reps, 3), min(args.time_cap, 2.0)
    args.sizes = list(args.sizes or [100_000, 1_000_000])
    if args.with_10m and 10_000_000 not in args.sizes:
        args.sizes.append(10_000_000)
    if args.ivf_nlist != "auto" and not str(args.ivf_nlist).isdigit():
        p.error("--ivf-nlist must be an integer or 'auto'")
    args.queries = max(1, args.queries)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.threads = args.threads or hardware()["cpus_usable"] or 1
    faiss.omp_set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    hnsw_builds: dict[int, float] = {}
    for n in sorted(args.sizes):
        bench_size(n, args, hnsw_builds, results)
    emit(summary(results, args, time.perf_counter() - started), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

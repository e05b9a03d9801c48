"""The ``embed`` stage: speech segments in, L2-normalised speaker embeddings out (Parquet).

Two tables: one embedding per VAD segment (the segment index, DuckDB queries) and one per
utterance (verification, identification, the speaker index). With ``embed.utterance: file`` (the
default) the utterance embedding is one encoder pass over the whole file, as SpeechBrain's and
WeSpeaker's verification recipes embed an utterance; files longer than ``embed.utterance_chunk_s``
are cut into equal chunks whose normalised embeddings are averaged, which bounds memory on
hour-long recordings. Only utterances in which VAD found speech get one. ``embed.utterance:
segments`` forms it as the renormalised mean of the utterance's segment embeddings instead (no
second pass). Measured on the default model's four seeds, the whole-file pass lowered EER on every
seed (docs/experiments/training-log.md, "How the utterance embedding is formed").

The engine sorts segments by duration and cuts batches by total padded audio seconds
(``embed.max_batch_s``), so batches carry little padding; on CUDA they are copied pinned and
non-blocking. On CPU a large model gets one segment per call instead (faster there, see
:func:`batch_plan`). Decoding and
resampling run in a DataLoader worker process while the model computes (on CPU only when a core is
free for it). The model runs under bf16
autocast where the hardware has native bf16 (CUDA; CPUs with AVX512-BF16/AMX), fp16 on older GPUs. Finished batches are staged as Parquet
parts outside the DVC output (:mod:`voiceprint.common.parts`), so a killed run resumes with the batches it
had not finished; the final tables are merged from the parts in row groups, keeping only
per-utterance running sums in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from voiceprint.common import atomic, audio, schema
from voiceprint.common.layout import Layout
from voiceprint.common.memory import release_free_heap
from voiceprint.common.parts import PartStore, fingerprint
from voiceprint.common.precision import autocast_dtype, dtype_name
from voiceprint.config import EmbedParams, Params
from voiceprint.encoders.base import SpeakerEncoder

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def length_buckets(durations: np.ndarray, max_batch_s: float) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each with padded size <= max_batch_s.

    Sorting by duration means a batch's padded size is its longest member times its count; a
    segment longer than the cap still gets a batch of its own.
    """
    order = np.argsort(durations, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    for idx in order:
        longest = durations[idx]  # ascending order: the newest member is the longest
        if current and longest * (len(current) + 1) > max_batch_s:
            batches.append(np.asarray(current))
            current = []
        current.append(int(idx))
    if current:
        batches.append(np.asarray(current))
    return batches


@dataclass(frozen=True)
class _Item:
    path: Path
    start_s: float
    end_s: float


class _SegmentAudio(Dataset):
    def __init__(self, items: list[_Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        item = self.items[i]
        try:
            return i, audio.load(item.path, item.start_s, item.end_s), None
        except audio.AudioError as err:
            return i, None, err.reason


def _collate(batch: list[tuple[int, np.ndarray | None, str | None]]):
    good = [(i, w) for i, w, _ in batch if w is not None]
    bad = [(i, reason) for i, w, reason in batch if w is None]
    if not good:
        return [], None, None, bad
    longest = max(len(w) for _, w in good)
    wavs = torch.zeros(len(good), longest)
    for row, (_, w) in enumerate(good):
        wavs[row, : len(w)] = torch.from_numpy(w)
    lengths = torch.tensor([len(w) / longest for _, w in good], dtype=torch.float32)
    return [i for i, _ in good], wavs, lengths, bad


def engine_dtype(encoder: SpeakerEncoder, params: EmbedParams) -> torch.dtype | None:
    """The autocast type the engine runs ``encoder`` under, or None for float32."""
    return autocast_dtype(encoder.device, params.amp) if encoder.autocast_safe else None


def decode_workers(device: torch.device) -> int:
    """One decode worker process, unless on CPU it would take a core from the model's threads.

    Measured on 2 cores: a decode worker beside two intra-op threads cost ECAPA-TDNN C=1024 half
    its throughput (33 vs 75 audio s/s) and C=128 a third (~350 vs ~500), while decoding FLAC in
    the main process costs ~1 %.
    """
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return 1 if cores > torch.get_num_threads() else 0


#: Seconds between returns of free heap pages to the kernel during a run.
TRIM_EVERY_S = 2.0

#: On CPU, encoders at least this large get one segment per call (``embed.cpu_batching: auto``).
CPU_PER_SEGMENT_MIN_PARAMS = 10_000_000


def batch_plan(durations: np.ndarray, params: EmbedParams, encoder: SpeakerEncoder) -> list[np.ndarray]:
    """Length-bucketed batches (``max_batch_s`` of padded audio each), or one segment per call.

    Measured on 2 CPU cores (benchmarks/RESULTS.md): a large model (ECAPA-TDNN C=1024, 20.8 M
    parameters) runs 1.8x faster one segment at a time than in padded batches (padding is wasted
    work and its activations fall out of cache), while a small one (C=128, 0.76 M) runs 3x faster
    in batches (per-call overhead dominates). ``cpu_batching: auto`` picks by parameter count;
    accelerators always batch.
    """
    choice = params.cpu_batching
    if choice == "auto":
        choice = encoder.num_parameters() < CPU_PER_SEGMENT_MIN_PARAMS
    if encoder.device.type == "cpu" and not choice:
        return [np.asarray([i]) for i in np.argsort(durations, kind="stable")]
    return length_buckets(durations, params.max_batch_s)


def run_encoder(
    encoder: SpeakerEncoder,
    items: list[_Item],
    durations: np.ndarray,
    params: EmbedParams,
    *,
    batches: list[np.ndarray] | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(item indices, normalised embeddings, rejected (index, reason))`` batch by batch.

    ``batches`` defaults to :func:`batch_plan`; a resumed run passes the ones still to do.
    ``num_workers`` defaults to :func:`decode_workers`.
    """
    device = encoder.device
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = decode_workers(device)
    if batches is None:
        batches = batch_plan(durations, params, encoder)
    if not batches:
        return
    loader = DataLoader(
        _SegmentAudio(items),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=8 if num_workers else None,
        persistent_workers=False,
    )
    amp_dtype = engine_dtype(encoder, params)
    total = float(sum(durations[b].sum() for b in batches))
    bar = tqdm(
        total=total,
        desc="embed",
        unit="audio-s",
        disable=not progress or None,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]",
    )
    trimmed = time.monotonic()
    with torch.inference_mode():
        for idx, wavs, lengths, bad in loader:
            if idx:
                wavs = wavs.to(device, non_blocking=True)
                lengths = lengths.to(device, non_blocking=True)
                with torch.autocast(
                    device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    emb = encoder.embed(wavs, lengths)
                vectors = schema.l2_normalise(emb.float().cpu().numpy())
            else:
                vectors = np.zeros((0, encoder.dim), dtype=np.float32)
            bar.update(float(durations[idx].sum()) + float(durations[[i for i, _ in bad]].sum()))
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                release_free_heap()  # keeps peak RSS independent of the batch count (voiceprint.common.memory)
                trimmed = time.monotonic()
            yield idx, vectors, bad
    bar.close()


def load_pipeline_encoder(layout: Layout, device: torch.device) -> SpeakerEncoder:
    from voiceprint.encoders.loader import load_encoder

    return load_encoder("ecapa", model_dir=layout.model_dir, device=str(device))


def utterance_chunks(duration_s: float, chunk_s: float) -> list[tuple[float, float]]:
    """``[0, duration_s)`` cut into the fewest equal chunks of at most ``chunk_s`` seconds.

    Equal chunks rather than ``chunk_s`` pieces plus a remainder: a last chunk of a fraction of a
    second would weigh as much as a full one in the mean.
    """
    n = max(1, math.ceil(duration_s / chunk_s - 1e-9))
    step = duration_s / n
    return [(k * step, duration_s if k == n - 1 else (k + 1) * step) for k in range(n)]


def _file_chunk_rows(layout: Layout, seg: dict[str, list], chunk_s: float) -> dict[str, list]:
    """Rows (the segment table's columns) for the whole-file pass: the chunks of every utterance that has a segment."""
    rows: dict[str, list] = {
        k: [] for k in ("segment_id", "utterance_id", "speaker_id", "split", "path", "start_s", "end_s")
    }
    seen: set[str] = set()
    for i, utt in enumerate(seg["utterance_id"]):
        if utt in seen:
            continue
        seen.add(utt)
        try:
            duration = audio.probe(layout.resolve(seg["path"][i])).duration_s
        except audio.AudioError:
            continue  # unreadable: the segment pass rejects it, or the utterance keeps its segments' mean
        for k, (a, b) in enumerate(utterance_chunks(duration, chunk_s)):
            for key, value in (
                ("segment_id", f"{utt}@file{k:03d}"),
                ("utterance_id", utt),
                ("speaker_id", seg["speaker_id"][i]),
                ("split", seg["split"][i]),
                ("path", seg["path"][i]),
                ("start_s", a),
                ("end_s", b),
            ):
                rows[key].append(value)
    return rows


@dataclass
class _Pass:
    """One pass of the engine over ``rows`` (segment-table columns): its items, durations and batch plan."""

    rows: dict[str, list]
    items: list[_Item]
    durations: np.ndarray
    batches: list[np.ndarray]

    @classmethod
    def plan(cls, layout: Layout, rows: dict[str, list], params: EmbedParams, encoder: SpeakerEncoder) -> _Pass:
        durations = _durations(rows)
        items = [_Item(layout.resolve(p), a, b) for p, a, b in zip(rows["path"], rows["start_s"], rows["end_s"])]
        return cls(rows, items, durations, batch_plan(durations, params, encoder))


def _passes(layout: Layout, params: EmbedParams, encoder: SpeakerEncoder) -> tuple[_Pass, _Pass | None]:
    """The segment pass, and the whole-file pass when ``embed.utterance`` is ``file``."""
    seg = pq.read_table(layout.segments).to_pydict()
    segments = _Pass.plan(layout, seg, params, encoder)
    if params.utterance != "file":
        return segments, None
    return segments, _Pass.plan(layout, _file_chunk_rows(layout, seg, params.utterance_chunk_s), params, encoder)


def _run_pass(
    store: PartStore,
    work: _Pass,
    encoder: SpeakerEncoder,
    params: EmbedParams,
    sch: pa.Schema,
    *,
    progress: bool,
    rows_per_group: int,
    part_every_s: float,
    name: str,
) -> tuple[int, float]:
    """Embed the batches of ``work`` that ``store`` has not staged yet; (batches resumed, audio seconds embedded)."""
    done = store.done_units()
    todo = [k for k in range(len(work.batches)) if k not in done]
    if done:
        log.info(
            "embed (%s): resuming, %d of %d batches already staged in %s",
            name,
            len(done),
            len(work.batches),
            store.directory,
        )
    stager = _Stager(store, sch, rows_per_group, part_every_s)
    stream = run_encoder(
        encoder, work.items, work.durations, params, batches=[work.batches[k] for k in todo], progress=progress
    )
    for unit, (idx, vectors, bad) in zip(todo, stream):
        rows = _segment_batch(work.rows, idx, vectors, encoder.model_id, sch) if idx else None
        stager.add(unit, rows, [{"path": work.rows["path"][i], "stage": "embed", "reason": r} for i, r in bad])
    stager.flush()
    return len(done), float(sum(work.durations[work.batches[k]].sum() for k in todo))


def embed_segments(
    layout: Layout,
    params: EmbedParams,
    *,
    encoder: SpeakerEncoder | None = None,
    progress: bool = True,
    rows_per_group: int = 4096,
    part_every_s: float = 30.0,
    out_dir: Path | None = None,
    utterances_only: bool = False,
) -> dict[str, Any]:
    """Embed every row of ``layout.segments`` into ``out_dir`` (default ``data/embeddings``).

    ``segments.parquet`` (one row per segment), ``utterances.parquet`` (see the module docstring for
    ``embed.utterance``) and ``rejects.parquet`` are written there; the comparison stage passes its
    own directory and encoder. ``utterances_only`` (the comparison stage, whose metrics are all
    utterance-level) skips the segment pass and its table where ``embed.utterance: file`` makes
    the utterance embeddings without it.

    Finished batches are staged as parts under ``data/work/`` (see :mod:`voiceprint.common.parts`) at least
    every ``part_every_s`` seconds, so a killed run resumes where it stopped and loses at most that
    much work; the final files appear atomically once every batch is done.
    """
    out_dir = Path(out_dir) if out_dir is not None else layout.embeddings
    device = pick_device(params.device) if encoder is None else encoder.device
    encoder = encoder or load_pipeline_encoder(layout, device)
    segments, files = _passes(layout, params, encoder)
    skip_segments = utterances_only and files is not None

    source = _source(layout, encoder, params, segments, files) + ("-utterances" if skip_segments else "")
    key = _staging_key(layout, out_dir)
    stores: dict[str, PartStore] = {}
    if not skip_segments:
        stores["segments"] = PartStore.open(layout.data / "work", key, source)
    if files is not None:
        stores["files"] = PartStore.open(layout.data / "work", key + "_files", source)
    seg_schema = schema.embedding_schema(encoder.dim)
    started = time.perf_counter()
    resumed, audio_s = 0, 0.0
    for name, work in (("segments", segments), ("files", files)):
        if name in stores:
            r, a = _run_pass(
                stores[name],
                work,
                encoder,
                params,
                seg_schema,
                progress=progress,
                rows_per_group=rows_per_group,
                part_every_s=part_every_s,
                name=name,
            )
            resumed, audio_s = resumed + r, audio_s + a
    elapsed = time.perf_counter() - started

    (out_dir / EMBED_SUMMARY).unlink(missing_ok=True)  # the tables below are about to change
    counts = _merge_parts(
        stores.get("segments"),
        out_dir,
        layout,
        seg_schema,
        encoder,
        rows_per_group,
        file_store=stores.get("files"),
        segment_rows=segments.rows,
    )
    for store in stores.values():
        store.remove()
    summary = {
        **counts,
        "dim": encoder.dim,
        "model_id": encoder.model_id,
        "utterance": params.utterance,
        "device": str(device),
        "precision": dtype_name(engine_dtype(encoder, params)),
        "resumed_batches": resumed,
        "audio_s": round(float(segments.durations.sum()), 2),
        "seconds": round(elapsed, 2),
        "realtime_factor": round(audio_s / elapsed, 1) if elapsed > 0 and audio_s else None,
    }
    atomic.write_json(out_dir / EMBED_SUMMARY, {**{k: summary[k] for k in _STABLE}, "source": source})
    return {**summary, "source": source}


#: Written beside the tables once they are complete: what they hold and the digest of everything
#: that determines them (:func:`_source`), which is what :func:`reuse_embeddings` checks. No timings:
#: a rerun that writes the same vectors must leave the directory byte-identical for DVC.
EMBED_SUMMARY = "embed.json"
_STABLE = ("segments", "utterances", "rejected", "dim", "model_id", "utterance", "precision", "audio_s")
_TIMING = ("device", "seconds", "realtime_factor")
_TABLES = ("segments.parquet", "utterances.parquet", "rejects.parquet")


def _durations(segments: dict[str, list]) -> np.ndarray:
    return np.asarray(segments["end_s"], dtype=np.float64) - np.asarray(segments["start_s"], dtype=np.float64)


def _source(layout: Layout, encoder: SpeakerEncoder, params: EmbedParams, segments: _Pass, files: _Pass | None) -> str:
    """Digest of the inputs that fix the output tables: segments, weights, precision, utterance way and batch plans."""
    file_plan = (
        None if files is None else (files.rows["start_s"], files.rows["end_s"], [b.tolist() for b in files.batches])
    )
    return fingerprint(
        layout.segments,
        encoder.model_id,
        encoder.dim,
        str(engine_dtype(encoder, params)),
        [b.tolist() for b in segments.batches],
        params.utterance,
        file_plan,
        _BATCH_PLAN_VERSION,
    )


def reuse_embeddings(
    layout: Layout, params: EmbedParams, encoder: SpeakerEncoder, out_dir: Path
) -> dict[str, Any] | None:
    """Copy the embed stage's tables to ``out_dir`` when they are exactly what embedding would write.

    The comparison stage embeds the same segments with the pipeline's own model that the embed
    stage already embedded: same weights, precision and batch plan (checked through the digest in
    ``embed.json``) give the same vectors, so the copy saves a full pass over the audio. Returns the
    embed stage's summary (its throughput is the one measured there), or None to embed afresh.
    """
    src = layout.embeddings
    summary_path = src / EMBED_SUMMARY
    if Path(out_dir).resolve() == src.resolve() or not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("source") != _source(layout, encoder, params, *_passes(layout, params, encoder)):
        return None
    if not all((src / name).exists() for name in _TABLES):
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EMBED_SUMMARY).unlink(missing_ok=True)
    for name in _TABLES:
        with atomic.atomic_path(out_dir / name, suffix=".parquet") as tmp:
            shutil.copyfile(src / name, tmp)
    atomic.write_json(out_dir / EMBED_SUMMARY, summary)
    log.info("embed: %s holds these segments embedded by %s; copied to %s", src, encoder.model_id, out_dir)
    timing = json.loads(layout.embed_stats.read_text()) if layout.embed_stats.exists() else {}
    if timing.get("source") != summary["source"]:
        timing = {}  # the timing file is from another embedding run: no throughput rather than a wrong one
    return {
        **{k: v for k, v in summary.items() if k != "source"},
        **{k: timing.get(k) for k in _TIMING},
        "reused_from": str(layout.relative(src)),  # metrics name no machine paths
    }


# Bump when length_buckets or the engine's batching changes: staged parts from another plan would
# mix batch compositions.
_BATCH_PLAN_VERSION = 1


def _staging_key(layout: Layout, out_dir: Path) -> str:
    return "embed_" + "_".join(part for part in layout.relative(out_dir).parts if part not in ("/", ""))


class _Stager:
    """Collects finished batches and writes them as one part per ``rows`` rows or ``every_s`` seconds."""

    def __init__(self, store: PartStore, sch: pa.Schema, rows: int, every_s: float):
        self.store, self.schema, self.rows, self.every_s = store, sch, rows, every_s
        self._reset()

    def _reset(self) -> None:
        self.batches: list[pa.RecordBatch] = []
        self.units: list[int] = []
        self.rejects: list[dict[str, str]] = []
        self.pending_rows = 0
        self.since = time.monotonic()

    def add(self, unit: int, rows: pa.RecordBatch | None, rejects: list[dict[str, str]]) -> None:
        self.units.append(unit)
        self.rejects.extend(rejects)
        if rows is not None:
            self.batches.append(rows)
            self.pending_rows += rows.num_rows
        if self.pending_rows >= self.rows or time.monotonic() - self.since >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.units:
            self.store.write(pa.Table.from_batches(self.batches, self.schema), self.units, self.rejects)
        self._reset()


def _merge_parts(
    store: PartStore | None,
    out_dir: Path,
    layout: Layout,
    seg_schema: pa.Schema,
    encoder: SpeakerEncoder,
    rows_per_group: int,
    *,
    file_store: PartStore | None = None,
    segment_rows: dict[str, list] | None = None,
) -> dict[str, int]:
    """Staged parts -> the final segment, utterance and rejects tables, each replaced atomically.

    Rows are re-cut into fixed-size row groups, so the file does not depend on where a run was killed.
    With a ``file_store`` (``embed.utterance: file``) an utterance's vector is the mean of its file
    chunks' embeddings; its other columns (speech span, segment count) still come from the segments.
    Without a segment ``store`` (``utterances_only``) no segment table is written and those columns
    come from ``segment_rows``.
    """
    utt_sums: dict[str, np.ndarray] = {}
    utt_meta: dict[str, dict[str, Any]] = {}
    rejects: list[dict[str, str]] = []
    written = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if store is None:
        assert file_store is not None and segment_rows is not None, "utterances need segments or whole files"
        utt_meta = _segment_meta(segment_rows)
        (out_dir / layout.segment_embeddings.name).unlink(missing_ok=True)  # not this run's: no stale table
    else:
        written = _write_segment_table(
            store, out_dir / layout.segment_embeddings.name, seg_schema, rows_per_group, utt_sums, utt_meta, rejects
        )
    if file_store is not None:
        file_sums: dict[str, np.ndarray] = {}
        rejected = {r["path"] for r in rejects}  # a file the segment pass rejected is reported once
        for part, table in file_store.iter_tables():
            rejects.extend(r for r in part.rejects if r["path"] not in rejected)
            _accumulate_table(file_sums, None, table)
        if store is None:  # no segment embeddings to fall back on
            utt_sums = {u: file_sums[u] for u in utt_meta if u in file_sums}
        else:
            missing = sorted(set(utt_sums) - set(file_sums))
            if missing:
                log.warning(
                    "embed: %d utterance(s) could not be embedded whole and keep the mean of their segments: %s",
                    len(missing),
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
                )
            utt_sums = {u: file_sums.get(u, v) for u, v in utt_sums.items()}
    utterances = _utterance_table(utt_sums, utt_meta, encoder)
    atomic.write_table(out_dir / layout.utterance_embeddings.name, utterances)
    atomic.write_table(out_dir / "rejects.parquet", pa.Table.from_pylist(rejects, schema=schema.REJECTS))
    return {"segments": written, "utterances": utterances.num_rows, "rejected": len(rejects)}


def _write_segment_table(
    store: PartStore,
    target: Path,
    seg_schema: pa.Schema,
    rows_per_group: int,
    utt_sums: dict[str, np.ndarray],
    utt_meta: dict[str, dict[str, Any]],
    rejects: list[dict[str, str]],
) -> int:
    """The staged segment parts as one table in fixed row groups; fills the per-utterance sums and rejects."""
    written = 0
    with atomic.atomic_path(target, suffix=".parquet") as tmp, pq.ParquetWriter(tmp, seg_schema) as writer:
        buffer: list[pa.Table] = []
        buffered = 0
        for part, table in store.iter_tables():
            rejects.extend(part.rejects)
            _accumulate_table(utt_sums, utt_meta, table)
            buffer.append(table)
            buffered += table.num_rows
            while buffered >= rows_per_group:
                merged = pa.concat_tables(buffer)
                writer.write_table(merged.slice(0, rows_per_group), row_group_size=rows_per_group)
                rest = merged.slice(rows_per_group)
                buffer, buffered = [rest], rest.num_rows
                written += rows_per_group
        if buffered:
            writer.write_table(pa.concat_tables(buffer), row_group_size=rows_per_group)
            written += buffered
    return written


def _segment_meta(rows: dict[str, list], meta: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per utterance: speaker, split, speech span and segment count of ``rows`` (segment-table columns), added to ``meta``."""
    meta = {} if meta is None else meta
    for utt, spk, split, a, b in zip(
        rows["utterance_id"], rows["speaker_id"], rows["split"], rows["start_s"], rows["end_s"]
    ):
        m = meta.setdefault(utt, {"speaker_id": spk, "split": split, "start_s": a, "end_s": b, "num_segments": 0})
        m["start_s"], m["end_s"] = min(m["start_s"], a), max(m["end_s"], b)
        m["num_segments"] += 1
    return meta


def _segment_batch(
    seg: dict[str, list], idx: list[int], vectors: np.ndarray, model_id: str, sch: pa.Schema
) -> pa.RecordBatch:
    cols = {
        "segment_id": pa.array([seg["segment_id"][i] for i in idx]),
        "utterance_id": pa.array([seg["utterance_id"][i] for i in idx]),
        "speaker_id": pa.array([seg["speaker_id"][i] for i in idx]),
        "split": pa.array([seg["split"][i] for i in idx]),
        "start_s": pa.array([seg["start_s"][i] for i in idx], pa.float64()),
        "end_s": pa.array([seg["end_s"][i] for i in idx], pa.float64()),
        "model_id": pa.array([model_id] * len(idx)),
        "embedding": schema.embedding_column(vectors),
    }
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


def _accumulate_table(sums: dict[str, np.ndarray], meta: dict[str, dict[str, Any]] | None, table: pa.Table) -> None:
    """Add a part's embeddings to per-utterance running sums (memory: one vector per utterance).

    ``meta`` (speech span, segment count) is updated too where given; file chunks pass None, their
    utterances' other columns come from the segments.
    """
    cols = table.select(["utterance_id", "speaker_id", "split", "start_s", "end_s"]).to_pydict()
    vectors = schema.embeddings_matrix(table)
    for row, utt in enumerate(cols["utterance_id"]):
        if utt not in sums:
            sums[utt] = np.zeros(vectors.shape[1], dtype=np.float64)
        sums[utt] += vectors[row]
    if meta is not None:
        _segment_meta(cols, meta)


def _utterance_table(sums: dict[str, np.ndarray], meta: dict[str, dict[str, Any]], encoder: SpeakerEncoder) -> pa.Table:
    """Utterance embedding = the renormalised sum of its normalised segment (or file chunk) embeddings."""
    sch = schema.embedding_schema(encoder.dim, utterance_level=True)
    ids = sorted(sums)
    vectors = schema.l2_normalise(np.stack([sums[u] for u in ids])) if ids else np.zeros((0, encoder.dim), np.float32)
    cols = {
        "utterance_id": pa.array(ids, pa.string()),
        "speaker_id": pa.array([meta[u]["speaker_id"] for u in ids], pa.string()),
        "split": pa.array([meta[u]["split"] for u in ids], pa.string()),
        "start_s": pa.array([meta[u]["start_s"] for u in ids], pa.float64()),
        "end_s": pa.array([meta[u]["end_s"] for u in ids], pa.float64()),
        "num_segments": pa.array([meta[u]["num_segments"] for u in ids], pa.int32()),
        "model_id": pa.array([encoder.model_id] * len(ids), pa.string()),
        "embedding": schema.embedding_column(vectors),
    }
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def embed_utterance_file(
    encoder: SpeakerEncoder, path: str | Path, vad_params: Any | None = None, embed_params: EmbedParams | None = None
) -> np.ndarray:
    """One utterance embedding the way the pipeline builds them (``embed.utterance``).

    Used by ``verify``/``identify``/``enroll`` so ad-hoc files are scored in the same space as the
    indexed ones. ``file``: the whole file in one pass (chunked like the embed stage); ``segments``:
    VAD segments, mean, renormalise, falling back to the whole file when VAD finds no segment.
    """
    from voiceprint.config import VadParams
    from voiceprint.segment.vad import detect

    embed_params = embed_params or EmbedParams()
    duration = audio.probe(path).duration_s
    if embed_params.utterance == "file":
        spans = utterance_chunks(duration, embed_params.utterance_chunk_s)
    else:
        found = detect(path, duration, vad_params or VadParams())
        spans = [(s.start_s, s.end_s) for s in found] or [(0.0, None)]
    vectors = []
    with torch.inference_mode():
        for start_s, end_s in spans:
            x = torch.from_numpy(audio.load(path, start_s, end_s)).unsqueeze(0).to(encoder.device)
            vectors.append(encoder.embed(x, torch.ones(1, device=encoder.device)).float().cpu().numpy()[0])
    return schema.l2_normalise(schema.l2_normalise(np.stack(vectors)).mean(axis=0, keepdims=True))[0]


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``embed`` stage: :func:`embed_segments`; its timings go to ``layout.embed_stats``."""
    summary = embed_segments(layout, params.embed)
    atomic.write_json(layout.embed_stats, summary)
    return summary

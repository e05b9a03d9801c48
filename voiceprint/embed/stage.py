"""The ``embed`` stage: speech segments in, L2-normalised speaker embeddings out (Parquet).

:func:`run` writes one embedding per VAD segment and one per utterance (by default one encoder pass
over the whole file, ``embed.utterance``) with the batching engine (:mod:`voiceprint.embed.engine`),
staging finished batches so a killed run resumes (:mod:`voiceprint.embed.tables`).
Design and measurements: docs/stages.md#embed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common import atomic, schema
from voiceprint.common.layout import Layout
from voiceprint.common.parts import PartStore, fingerprint
from voiceprint.config import ComputeParams, EmbedParams, Params
from voiceprint.embed.engine import (
    BATCH_PLAN_VERSION,
    Spans,
    batch_plan,
    load_pipeline_encoder,
    pick_device,
    precision_key,
    precision_name,
    run_encoder,
)
from voiceprint.embed.tables import Stager, merge_parts, reject_rows, segment_batch
from voiceprint.embed.utterances import file_chunk_rows
from voiceprint.encoders.base import SpeakerEncoder

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass
class _Pass:
    """One pass of the engine over ``rows`` (segment-table columns): its items, durations and batch plan.

    Columnar (an Arrow table, NumPy arrays), so the plan of a million files stays small.
    """

    rows: pa.Table
    items: Spans
    durations: np.ndarray
    batches: list[np.ndarray]

    @classmethod
    def plan(cls, layout: Layout, rows: pa.Table, params: EmbedParams, encoder: SpeakerEncoder) -> _Pass:
        durations = _durations(rows)
        return cls(rows, Spans(layout, rows), durations, batch_plan(durations, params, encoder))


def _passes(layout: Layout, params: EmbedParams, encoder: SpeakerEncoder) -> tuple[_Pass, _Pass | None]:
    """The segment pass, and the whole-file pass when ``embed.utterance`` is ``file``."""
    seg = pq.read_table(layout.segments).combine_chunks()
    segments = _Pass.plan(layout, seg, params, encoder)
    if params.utterance != "file":
        return segments, None
    return segments, _Pass.plan(layout, file_chunk_rows(layout, seg, params.utterance_chunk_s), params, encoder)


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
    stager = Stager(store, sch, rows_per_group, part_every_s)
    stream = run_encoder(
        encoder, work.items, work.durations, params, batches=[work.batches[k] for k in todo], progress=progress
    )
    for unit, (idx, vectors, bad) in zip(todo, stream):
        rows = segment_batch(work.rows, idx, vectors, encoder.model_id, sch) if idx else None
        stager.add(unit, rows, reject_rows(work.rows, bad))
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
    compute: ComputeParams | None = None,
) -> dict[str, Any]:
    """Embed every row of ``layout.segments`` into ``out_dir`` (default ``data/embeddings``).

    ``segments.parquet`` (one row per segment), ``utterances.parquet`` (see the module docstring for
    ``embed.utterance``) and ``rejects.parquet`` are written there; the comparison stage passes its
    own directory and encoder. ``utterances_only`` (the comparison stage, whose metrics are all
    utterance-level) skips the segment pass and its table where ``embed.utterance: file`` makes
    the utterance embeddings without it.

    Finished batches are staged as parts under ``data/work/`` (see :mod:`voiceprint.common.parts`) at least
    every ``part_every_s`` seconds, so a killed run resumes where it stopped and loses at most that
    much work; the final files appear atomically once every batch is done. With ``compute.engine:
    dask`` Dask workers embed shards of batches instead (:mod:`voiceprint.embed.sharded`) into
    their own staging directory, merged the same way.
    """
    out_dir = Path(out_dir) if out_dir is not None else layout.embeddings
    device = pick_device(params.device) if encoder is None else encoder.device
    encoder = encoder or load_pipeline_encoder(layout, device, params.backend, amp=params.amp)
    segments, files = _passes(layout, params, encoder)
    skip_segments = utterances_only and files is not None

    source = _source(layout, encoder, params, segments, files) + ("-utterances" if skip_segments else "")
    dask = compute is not None and compute.engine == "dask"
    key = _staging_key(layout, out_dir)
    suffix = "_dask" if dask else ""  # one store per engine: their part files are numbered differently
    stores: dict[str, PartStore] = {}
    if not skip_segments:
        stores["segments"] = PartStore.open(layout.data / "work", key + suffix, source)
    if files is not None:
        stores["files"] = PartStore.open(layout.data / "work", key + "_files" + suffix, source)
    seg_schema = schema.embedding_schema(encoder.dim)
    started = time.perf_counter()
    resumed, audio_s = 0, 0.0
    with contextlib.ExitStack() as stack:
        client_of = _lazy_client(stack, compute) if dask else None
        for name, work in (("segments", segments), ("files", files)):
            if name not in stores:
                continue
            if client_of is not None and compute is not None:
                from voiceprint.embed.sharded import run_pass_sharded

                r, a = run_pass_sharded(
                    client_of,
                    stores[name],
                    work,
                    encoder,
                    params,
                    seg_schema,
                    layout,
                    compute,
                    precision=precision_key(encoder, params),
                    progress=progress,
                    name=name,
                )
            else:
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
    counts = merge_parts(
        stores.get("segments"),
        out_dir,
        layout,
        seg_schema,
        encoder,
        rows_per_group,
        segments,
        file_store=stores.get("files"),
        files=files,
    )
    for store in stores.values():
        store.remove()
    summary = {
        **counts,
        "dim": encoder.dim,
        "model_id": encoder.model_id,
        "utterance": params.utterance,
        "device": str(device),
        "precision": precision_name(encoder, params),
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


def _durations(segments: pa.Table) -> np.ndarray:
    return segments.column("end_s").to_numpy() - segments.column("start_s").to_numpy()


def _source(layout: Layout, encoder: SpeakerEncoder, params: EmbedParams, segments: _Pass, files: _Pass | None) -> str:
    """Digest of the inputs that fix the output tables: segments, weights, precision, utterance way and batch plans."""
    file_plan = None
    if files is not None:
        file_plan = (
            files.rows.column("start_s").to_pylist(),
            files.rows.column("end_s").to_pylist(),
            [b.tolist() for b in files.batches],
        )
    return fingerprint(
        layout.segments,
        encoder.model_id,
        encoder.dim,
        precision_key(encoder, params),  # the backend too: openvino-bf16 vectors never mix with torch's
        [b.tolist() for b in segments.batches],
        params.utterance,
        file_plan,
        BATCH_PLAN_VERSION,
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


def _lazy_client(stack: contextlib.ExitStack, compute: ComputeParams | None) -> Callable[[], Client]:
    """A function that opens the Dask client on its first call (closed with ``stack``), so a run
    with every batch already staged starts no cluster."""
    opened: list[Client] = []

    def client_of() -> Client:
        if not opened:
            from voiceprint.compute.cluster import open_client

            assert compute is not None
            opened.append(stack.enter_context(open_client(compute)))
        return opened[0]

    return client_of


def _staging_key(layout: Layout, out_dir: Path) -> str:
    return "embed_" + "_".join(part for part in layout.relative(out_dir).parts if part not in ("/", ""))


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``embed`` stage: :func:`embed_segments` on ``params.compute``; its timings go to ``layout.embed_stats``."""
    summary = embed_segments(layout, params.embed, compute=params.compute)
    atomic.write_json(layout.embed_stats, summary)
    return summary

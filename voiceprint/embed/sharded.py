"""One pass of the ``embed`` stage on a Dask cluster (``compute.engine: dask``).

The driver plans the batches as the local engine does; a shard is a contiguous range of batch
indices (the units) of at most ``compute.shard_s`` audio seconds. A worker loads the encoder once
per process (:mod:`voiceprint.compute.worker`), runs :func:`~voiceprint.embed.engine.run_encoder`
over its batches and writes one part whose units are its batch indices, so the stage merges the
parts exactly as it merges the local engine's. Guide: docs/compute.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from voiceprint.common.layout import Layout
from voiceprint.common.parts import PartStore
from voiceprint.compute.cluster import ComputeError
from voiceprint.compute.runner import host_threads, run_shards
from voiceprint.compute.shards import Shard, cut_shards
from voiceprint.config import ComputeParams, EmbedParams

if TYPE_CHECKING:
    from distributed import Client

    from voiceprint.embed.stage import _Pass
    from voiceprint.encoders.base import SpeakerEncoder


@dataclass(frozen=True)
class EmbedShard:
    """Everything a worker needs for one shard: its batches re-indexed over its own rows."""

    layout: Layout
    device: str
    model_id: str
    precision: str
    params: EmbedParams
    schema: pa.Schema
    store: PartStore
    first: int
    units: tuple[int, ...]
    durations: np.ndarray
    batches: list[np.ndarray]
    rows: pa.Table
    threads: int | None
    host_threads: dict[str, int]


def shard_task(work: _Pass, shard: Shard, **common: Any) -> EmbedShard:
    """The batches ``shard`` covers, with the rows they index renumbered from 0."""
    batches = work.batches[shard.start : shard.stop]
    idx = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    local, offset = [], 0
    for b in batches:
        local.append(np.arange(offset, offset + len(b)))
        offset += len(b)
    return EmbedShard(
        first=shard.start,
        units=tuple(shard.units),
        durations=work.durations[idx],
        batches=local,
        rows=work.rows.take(idx),
        **common,
    )


def run_pass_sharded(
    client_of: Callable[[], Client],
    store: PartStore,
    work: _Pass,
    encoder: SpeakerEncoder,
    params: EmbedParams,
    sch: pa.Schema,
    layout: Layout,
    compute: ComputeParams,
    *,
    precision: str,
    progress: bool,
    name: str,
) -> tuple[int, float]:
    """Embed the batches of ``work`` that ``store`` does not hold on the cluster; (batches resumed, audio seconds).

    ``client_of`` opens the client on first use, so a pass with nothing left starts no cluster.
    """
    done = store.done_units()
    unit_s = [float(work.durations[b].sum()) for b in work.batches]
    shards = cut_shards(unit_s, compute.shard_s, done)
    if not shards:
        return len(done), 0.0
    client = client_of()
    common = {
        "layout": layout,
        "device": str(encoder.device),
        "model_id": encoder.model_id,
        "precision": precision,
        "params": params,
        "schema": sch,
        "store": store,
        "threads": compute.threads_per_worker,
        "host_threads": host_threads(client),
    }
    run_shards(
        client,
        embed_shard,
        shards,
        lambda shard: (shard_task(work, shard, **common),),
        retries=compute.retries,
        total_s=float(sum(unit_s)),
        done_s=float(sum(unit_s[u] for u in done if u < len(unit_s))),
        desc=f"embed ({name})",
        progress=progress,
    )
    return len(done), float(sum(s.audio_s for s in shards))


def embed_shard(task: EmbedShard) -> dict[str, int]:
    """Worker task: embed one shard's batches with this process's cached encoder and write its part."""
    import torch

    from voiceprint.compute.worker import cached, files_key, prepare_worker, threads_for
    from voiceprint.embed.engine import Spans, load_pipeline_encoder, precision_key, run_encoder
    from voiceprint.embed.tables import reject_rows, segment_batch

    prepare_worker(threads_for(task.threads, task.host_threads))
    backend, amp = task.params.backend, task.params.amp
    key = ("pipeline-encoder", files_key(task.layout.model_dir), task.device, backend, amp)
    encoder = cached(key, lambda: load_pipeline_encoder(task.layout, torch.device(task.device), backend, amp=amp))
    precision = precision_key(encoder, task.params)
    if encoder.model_id != task.model_id or precision != task.precision:
        raise ComputeError(
            f"this worker's encoder ({encoder.model_id}, {precision}) differs from the driver's "
            f"({task.model_id}, {task.precision}): workers need the same model files and hardware kind"
        )
    tables: list[pa.RecordBatch] = []
    rejects: list[dict[str, str]] = []
    stream = run_encoder(
        encoder,
        Spans(task.layout, task.rows),
        task.durations,
        task.params,
        batches=task.batches,
        progress=False,
        num_workers=0,
    )
    for idx, vectors, bad in stream:  # in a daemonic worker process: decode here, no DataLoader worker
        if idx:
            tables.append(segment_batch(task.rows, idx, vectors, encoder.model_id, task.schema))
        rejects.extend(reject_rows(task.rows, bad))
    task.store.write(pa.Table.from_batches(tables, task.schema), task.units, rejects, number=task.first)
    return {"batches": len(task.units), "rows": sum(t.num_rows for t in tables), "rejected": len(rejects)}

"""The ``segment`` stage on a Dask cluster (``compute.engine: dask``).

Manifest rows are cut into shards of at most ``compute.shard_s`` audio seconds; a worker runs the
stage's own per-file VAD (:func:`~voiceprint.segment.stage.segment_rows`) on one shard and writes
its rows and rejects as one part under ``data/work/``. The driver skips shards already written
and returns every part's rows in manifest order. Guide: docs/compute.md.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from voiceprint.common import schema
from voiceprint.common.layout import Layout
from voiceprint.common.parts import PartStore, fingerprint
from voiceprint.compute.cluster import ComputeError, open_client
from voiceprint.compute.runner import run_shards
from voiceprint.compute.shards import cut_shards
from voiceprint.config import ComputeParams, VadParams

#: Staging key of the parts (beside the embed stage's under data/work/).
STORE_KEY = "segment_dask"
#: Bump when the per-file VAD rows change: parts of another version must not be merged.
VERSION = 1


def segment_sharded(
    layout: Layout, params: VadParams, compute: ComputeParams, manifest: list[dict[str, Any]], *, progress: bool
) -> tuple[list[dict[str, Any]], list[dict[str, str]], PartStore]:
    """(segment rows, rejects, the part store) of every manifest row, computed on the cluster.

    The caller writes the tables and then removes the store; until then a killed run resumes.
    """
    store = PartStore.open(
        layout.data / "work", STORE_KEY, fingerprint(layout.manifest, params.model_dump(mode="json"), VERSION)
    )
    durations = [float(u["duration_s"]) for u in manifest]
    done = store.done_units()
    shards = cut_shards(durations, compute.shard_s, done)
    if shards:
        with open_client(compute) as client:
            run_shards(
                client,
                segment_shard,
                shards,
                lambda shard: (layout, params, store, shard.start, manifest[shard.start : shard.stop]),
                retries=compute.retries,
                total_s=sum(durations),
                done_s=sum(durations[u] for u in done if u < len(durations)),
                desc="VAD",
                progress=progress,
            )
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    covered: list[int] = []
    for part, table in store.iter_tables():
        rows.extend(table.to_pylist())
        rejects.extend(part.rejects)
        covered.extend(part.units)
    if covered != list(range(len(manifest))):
        raise ComputeError(f"{store.directory}: the parts do not cover the manifest once each; delete it and rerun")
    return rows, rejects, store


def segment_shard(
    layout: Layout, params: VadParams, store: PartStore, first: int, utts: list[dict[str, Any]]
) -> dict[str, int]:
    """Worker task: segment manifest rows ``first`` .. ``first + len(utts) - 1`` into one part."""
    from voiceprint.compute.worker import prepare_worker
    from voiceprint.segment.stage import segment_rows

    prepare_worker()
    rows, rejects, _ = segment_rows(layout, utts, params, progress=False)
    store.write(
        pa.Table.from_pylist(rows, schema=schema.SEGMENTS), range(first, first + len(utts)), rejects, number=first
    )
    return {"segments": len(rows), "rejected": len(rejects)}

"""The ``index`` stage: FAISS indexes over the embeddings into ``data/index``.

:func:`run` (through :func:`build_indexes`) builds a segment index and a speaker-centroid index,
each with its id table, and swaps them in whole. The embeddings are read in batches and a flat
index is written as they come, so memory is one batch plus the speaker centroids (plus the index
itself for IVF and HNSW). Index building is in
:mod:`voiceprint.index.faiss_index`; enrolled speakers join at load time
(:class:`voiceprint.index.gallery.SpeakerGallery`). Design: docs/stages.md#index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common.atomic import atomic_dir
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embeddings_matrix
from voiceprint.config import IndexParams, Params
from voiceprint.index.faiss_index import (
    INDEX_INFO,
    SEGMENTS_IDS,
    SEGMENTS_INDEX,
    SPEAKERS_IDS,
    SPEAKERS_INDEX,
    SpeakerSums,
    build_index_from_batches,
    to_cpu,
    use_gpu,
    write_flat_index,
)

log = logging.getLogger(__name__)

__all__ = ["build_indexes", "run"]


def _index_params_info(index: faiss.Index) -> dict[str, Any]:
    """The search-time settings actually in effect (after clamping), for ``index.json``."""
    info: dict[str, Any] = {"ntotal": int(index.ntotal)}
    with contextlib.suppress(Exception):
        ivf = faiss.extract_index_ivf(index)
        info.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
    if isinstance(index, faiss.IndexHNSW):
        info.update(
            hnsw_m=int(index.hnsw.nb_neighbors(1)),
            ef_search=int(index.hnsw.efSearch),
            ef_construction=int(index.hnsw.efConstruction),
        )
    return info


#: Rows of ids read at a time, and the row group of ``segments_ids.parquet`` (the embed stage's).
BATCH_ROWS = 4_096
#: Rows read at a time where the embeddings come too: Parquet decodes a ``fixed_size_list`` column
#: with a level per value, so 4,096 rows of 192 floats take about 30 MB of reader buffers.
VECTOR_ROWS = 1_024


class _EmbeddingsFile:
    """One embeddings table read a column set and a batch of rows at a time, never whole."""

    def __init__(self, path: Path, kind: str) -> None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: embeddings not found; run the embed stage first")
        # pre_buffer=False: otherwise the reader caches every row group's column chunks up front.
        self.file = pq.ParquetFile(path, pre_buffer=False)
        self.kind, self.rows = kind, self.file.metadata.num_rows
        self.dim = int(self.file.schema_arrow.field("embedding").type.list_size)

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        rows = VECTOR_ROWS if "embedding" in columns else BATCH_ROWS
        return self.file.iter_batches(batch_size=rows, columns=columns)

    def vectors(self) -> Iterator[np.ndarray]:
        for batch in self.batches(["embedding"]):
            yield embeddings_matrix(batch)

    def model_ids(self) -> set[str]:
        found: set[str] = set()
        for batch in self.batches(["model_id"]):
            found |= {m for m in batch.column(0).unique().to_pylist() if m is not None}
        if len(found) > 1:
            raise ValueError(f"{self.kind} embeddings mix several models: {sorted(found)}")
        return found


def _single_model_id(files: list[_EmbeddingsFile]) -> str:
    """The one model id shared by all rows: mixing models in one index makes scores meaningless."""
    ids: set[str] = set()
    for f in files:
        ids |= f.model_ids()
    if len(ids) > 1:
        raise ValueError(f"segment and utterance embeddings come from different models: {sorted(ids)}")
    return ids.pop() if ids else "unknown"


def _write_segment_ids(segs: _EmbeddingsFile, target: Path) -> None:
    """Row ``i`` of the segment index's id table, copied batch by batch from the embeddings table."""
    columns = ["segment_id", "utterance_id", "speaker_id", "split"]
    sch = segs.file.schema_arrow
    with pq.ParquetWriter(target, pa.schema([sch.field(c) for c in columns])) as writer:
        for batch in segs.batches(columns):
            writer.write_batch(batch, row_group_size=BATCH_ROWS)


def _speaker_table(utts: _EmbeddingsFile) -> tuple[np.ndarray, pa.Table]:
    """Speaker centroids and their id table (speaker, splits, utterance count): two passes, batch by batch."""
    splits_by_speaker: dict[str, set[str]] = {}
    for batch in utts.batches(["speaker_id", "split"]):
        for spk, split in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            splits_by_speaker.setdefault(str(spk), set()).add(str(split))
    sums = SpeakerSums(splits_by_speaker, utts.dim)
    for batch in utts.batches(["speaker_id", "embedding"]):
        sums.add(embeddings_matrix(batch), batch.column(0).to_pylist())
    speakers, centroids, counts = sums.centroids()
    table = pa.table(
        {
            "speaker_id": pa.array(speakers, pa.string()),
            # A speaker present in several splits (folder datasets) gets e.g. "eval,train".
            "split": pa.array([",".join(sorted(splits_by_speaker[s])) for s in speakers], pa.string()),
            "num_utterances": pa.array(counts, pa.int64()),
        }
    )
    return centroids, table


def _written_from_batches(kind: str) -> bool:
    """True for a flat index: the stage writes it to its file from the batches, never building it
    (so it is never held, nor put on a GPU); IVF and HNSW are built in memory."""
    return kind == "flat"


def _write_index(
    batches: Callable[[], Iterator[np.ndarray]], n: int, dim: int, params: IndexParams, path: Path
) -> dict[str, Any]:
    """Build one index over ``n`` vectors into ``path``; returns its block of ``index.json``.

    A flat index goes from the batches straight to the file (:func:`write_flat_index`: the same
    bytes, memory one batch); IVF and HNSW are built in memory (on the GPU where one is used).
    """
    if _written_from_batches(params.type):
        write_flat_index(batches, n, dim, path)
        return {"ntotal": int(n)}
    index = to_cpu(build_index_from_batches(batches, n, dim, params))
    faiss.write_index(index, str(path))
    return _index_params_info(index)


def _centroid_batches(centroids: np.ndarray, kind: str) -> Callable[[], Iterator[np.ndarray]]:
    """The centroids a batch at a time for a flat index; whole for the others, as before (an HNSW
    graph depends on how its adds are split)."""
    if not _written_from_batches(kind):
        return lambda: iter((centroids,))
    return lambda: (centroids[i : i + VECTOR_ROWS] for i in range(0, len(centroids), VECTOR_ROWS))


def build_indexes(layout: Layout, params: IndexParams) -> dict[str, Any]:
    """The ``index`` stage: segment index and speaker-centroid index into ``layout.index_dir``.

    Reads ``layout.segment_embeddings`` and ``layout.utterance_embeddings`` (all splits: the
    gallery should know every speaker we have audio for) in batches of :data:`VECTOR_ROWS` rows; a
    flat index goes to its file batch by batch, so memory does not grow with the segments. Row
    ``i`` of each ``*_ids.parquet`` is faiss id ``i``. Returns the statistics also in ``index.json``.
    """
    started = time.perf_counter()
    segs = _EmbeddingsFile(layout.segment_embeddings, "segment")
    utts = _EmbeddingsFile(layout.utterance_embeddings, "utterance")
    model_id = _single_model_id([segs, utts])
    if segs.dim != utts.dim:
        raise ValueError(f"segment embeddings are {segs.dim}-d but utterance embeddings {utts.dim}-d")

    centroids, spk_ids = _speaker_table(utts)
    in_memory = not _written_from_batches(params.type)
    built_with = "gpu" if use_gpu(params) and in_memory else "cpu"
    with atomic_dir(layout.index_dir) as tmp:
        seg_info = _write_index(segs.vectors, segs.rows, segs.dim, params, tmp / SEGMENTS_INDEX)
        _write_segment_ids(segs, tmp / SEGMENTS_IDS)
        spk_batches = _centroid_batches(centroids, params.type)
        spk_info = _write_index(spk_batches, len(centroids), utts.dim, params, tmp / SPEAKERS_INDEX)
        pq.write_table(spk_ids, tmp / SPEAKERS_IDS)
        info: dict[str, Any] = {
            "type": params.type,
            "dim": int(utts.dim),
            "model_id": model_id,
            "counts": {
                "segments": int(segs.rows),
                "utterances": int(utts.rows),
                "speakers": int(spk_ids.num_rows),
            },
            "segments_index": seg_info,
            "speakers_index": spk_info,
            "params": params.model_dump(),
            "faiss_version": faiss.__version__,
            "built_with": built_with,
            # No build time, host or path: index.json is part of the DVC output, so the same
            # embeddings and parameters must give the same bytes; the stage's wall time is in the
            # returned stats.
        }
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # Whether the stage held whole indexes in memory (IVF, HNSW) or wrote them from the batches.
    stats = dict(info, seconds=round(time.perf_counter() - started, 3), indexes_in_memory=in_memory)
    log.info(
        "indexed %d segments and %d speakers (%s, %s, model %s)",
        segs.rows,
        spk_ids.num_rows,
        params.type,
        built_with,
        model_id,
    )
    return stats


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``index`` stage: :func:`build_indexes` with ``params.index``."""
    return build_indexes(layout, params.index)

"""The ``index`` stage: FAISS indexes over the embeddings into ``data/index``.

:func:`run` (through :func:`build_indexes`) builds a segment index and a speaker-centroid index,
each with its id table, and swaps them in whole. Index building is in
:mod:`voiceprint.index.faiss_index`; enrolled speakers join at load time
(:class:`voiceprint.index.gallery.SpeakerGallery`). Design: docs/stages.md#index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import faiss
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
    build_index,
    speaker_centroids,
    to_cpu,
    use_gpu,
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


def _read_embeddings(path: Path, columns: list[str]) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"{path}: embeddings not found; run the embed stage first")
    return pq.read_table(path, columns=columns)


def _single_model_id(tables: dict[str, pa.Table]) -> str:
    """The one model id shared by all rows: mixing models in one index makes scores meaningless."""
    ids: set[str] = set()
    for name, table in tables.items():
        found = {m for m in table.column("model_id").unique().to_pylist() if m is not None}
        if len(found) > 1:
            raise ValueError(f"{name} embeddings mix several models: {sorted(found)}")
        ids |= found
    if len(ids) > 1:
        raise ValueError(f"segment and utterance embeddings come from different models: {sorted(ids)}")
    return ids.pop() if ids else "unknown"


def build_indexes(layout: Layout, params: IndexParams) -> dict[str, Any]:
    """The ``index`` stage: segment index and speaker-centroid index into ``layout.index_dir``.

    Reads ``layout.segment_embeddings`` and ``layout.utterance_embeddings`` (all splits: the
    gallery should know every speaker we have audio for). Row ``i`` of each ``*_ids.parquet`` is
    faiss id ``i``. Returns the statistics also written to ``index.json``.
    """
    started = time.perf_counter()
    segs = _read_embeddings(
        layout.segment_embeddings,
        ["segment_id", "utterance_id", "speaker_id", "split", "model_id", "embedding"],
    )
    utts = _read_embeddings(
        layout.utterance_embeddings, ["utterance_id", "speaker_id", "split", "model_id", "embedding"]
    )
    model_id = _single_model_id({"segment": segs, "utterance": utts})
    seg_dim = segs.schema.field("embedding").type.list_size
    utt_dim = utts.schema.field("embedding").type.list_size
    if seg_dim != utt_dim:
        raise ValueError(f"segment embeddings are {seg_dim}-d but utterance embeddings {utt_dim}-d")

    seg_vectors = embeddings_matrix(segs)
    seg_index = build_index(seg_vectors, params)

    utt_vectors = embeddings_matrix(utts)
    speaker_col = utts.column("speaker_id").to_pylist()
    speakers, centroids, counts = speaker_centroids(utt_vectors, speaker_col)
    splits_by_speaker: dict[str, set[str]] = {}
    for spk, split in zip(speaker_col, utts.column("split").to_pylist(), strict=True):
        splits_by_speaker.setdefault(str(spk), set()).add(str(split))
    spk_index = build_index(centroids, params)
    built_with = "gpu" if use_gpu(params) else "cpu"

    seg_ids = segs.select(["segment_id", "utterance_id", "speaker_id", "split"])
    spk_ids = pa.table(
        {
            "speaker_id": pa.array(speakers, pa.string()),
            # A speaker present in several splits (folder datasets) gets e.g. "eval,train".
            "split": pa.array([",".join(sorted(splits_by_speaker[s])) for s in speakers], pa.string()),
            "num_utterances": pa.array(counts, pa.int64()),
        }
    )
    info: dict[str, Any] = {
        "type": params.type,
        "dim": int(utt_dim),
        "model_id": model_id,
        "counts": {
            "segments": int(segs.num_rows),
            "utterances": int(utts.num_rows),
            "speakers": len(speakers),
        },
        "segments_index": _index_params_info(to_cpu(seg_index)),
        "speakers_index": _index_params_info(to_cpu(spk_index)),
        "params": params.model_dump(),
        "faiss_version": faiss.__version__,
        "built_with": built_with,
        # No build time, host or path: index.json is part of the DVC output, so the same embeddings
        # and parameters must give the same bytes; the stage's wall time is in the returned stats.
    }
    with atomic_dir(layout.index_dir) as tmp:
        faiss.write_index(to_cpu(seg_index), str(tmp / SEGMENTS_INDEX))
        pq.write_table(seg_ids, tmp / SEGMENTS_IDS)
        faiss.write_index(to_cpu(spk_index), str(tmp / SPEAKERS_INDEX))
        pq.write_table(spk_ids, tmp / SPEAKERS_IDS)
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    stats = dict(info, seconds=round(time.perf_counter() - started, 3))
    log.info(
        "indexed %d segments and %d speakers (%s, %s, model %s)",
        segs.num_rows,
        len(speakers),
        params.type,
        built_with,
        model_id,
    )
    return stats


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``index`` stage: :func:`build_indexes` with ``params.index``."""
    return build_indexes(layout, params.index)

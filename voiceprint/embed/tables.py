"""Staged parts of the embed stage and the final tables merged from them.

Finished batches are staged as Parquet parts outside the DVC output (:mod:`voiceprint.common.parts`)
by :class:`Stager`, so a killed run resumes with the batches it had not finished; :func:`merge_parts`
then writes the segment, utterance and rejects tables from the parts in fixed row groups, keeping
only per-utterance running sums in memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common import atomic, schema
from voiceprint.common.layout import Layout
from voiceprint.common.parts import PartStore
from voiceprint.encoders.base import SpeakerEncoder

log = logging.getLogger(__name__)


class Stager:
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


def merge_parts(
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


def segment_batch(
    seg: dict[str, list], idx: list[int], vectors: np.ndarray, model_id: str, sch: pa.Schema
) -> pa.RecordBatch:
    """Rows ``idx`` of ``seg`` (segment-table columns) with their embeddings, as a batch of ``sch``."""
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

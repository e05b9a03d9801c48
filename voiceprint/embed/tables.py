"""Staged parts of the embed stage and the final tables merged from them.

Finished batches are staged as Parquet parts outside the DVC output (:mod:`voiceprint.common.parts`)
by :class:`Stager`, so a killed run resumes with the batches it had not finished; :func:`merge_parts`
then writes the segment, utterance and rejects tables from the parts in fixed row groups, keeping
only per-utterance running sums (one matrix, rows indexed by utterance code) in memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voiceprint.common import atomic, schema
from voiceprint.common.layout import Layout
from voiceprint.common.parts import Part, PartStore
from voiceprint.encoders.base import SpeakerEncoder

if TYPE_CHECKING:
    from voiceprint.embed.stage import _Pass

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
    segments: _Pass,
    *,
    file_store: PartStore | None = None,
    files: _Pass | None = None,
) -> dict[str, int]:
    """Staged parts -> the final segment, utterance and rejects tables, each replaced atomically.

    Rows are re-cut into fixed-size row groups, so the file does not depend on where a run was killed.
    With a ``file_store`` (``embed.utterance: file``, the parts of the ``files`` pass) an utterance's
    vector is the mean of its file chunks' embeddings; its other columns (speech span, segment
    count) still come from the segments. Without a segment ``store`` (``utterances_only``) no
    segment table is written and those columns come from all of ``segments.rows``.
    """
    utts = _Utterances(segments.rows, encoder.dim)
    out_dir.mkdir(parents=True, exist_ok=True)
    file_rejects: list[dict[str, str]] = []
    if file_store is not None:
        assert files is not None, "file parts need the file pass's plan"
        file_codes = utts.codes_of(files.rows.column("utterance_id"))
        for part, table in file_store.iter_tables():
            file_rejects.extend(part.rejects)
            utts.add_vectors(file_codes[_plan_rows(files, part, table)], schema.embeddings_matrix(table))
    whole = utts.summed.copy()  # utterances with a whole-file vector; the others keep their segments' mean
    rejects: list[dict[str, str]] = []
    written = 0
    if store is None:
        assert file_store is not None, "utterances need segments or whole files"
        utts.add_segments(utts.codes, segments.rows.column("start_s"), segments.rows.column("end_s"))
        (out_dir / layout.segment_embeddings.name).unlink(missing_ok=True)  # not this run's: no stale table
        keep = whole
    else:
        target = out_dir / layout.segment_embeddings.name
        written = _write_segment_table(store, segments, target, seg_schema, rows_per_group, utts, whole, rejects)
        keep = utts.num_segments > 0
        missing = np.flatnonzero(keep & ~whole) if file_store is not None else []
        if len(missing):
            log.warning(
                "embed: %d utterance(s) could not be embedded whole and keep the mean of their segments: %s",
                len(missing),
                ", ".join(utts.ids.take(missing[:5]).to_pylist()) + (" ..." if len(missing) > 5 else ""),
            )
    rejected = {r["path"] for r in rejects}  # a file the segment pass rejected is reported once
    rejects.extend(r for r in file_rejects if r["path"] not in rejected)
    utterances = utts.table(np.flatnonzero(keep), encoder)
    del utts  # its sums matrix, before the writer's buffers
    # Row groups of the segment table's size: a reader's batch then never decodes more than that.
    atomic.write_table(out_dir / layout.utterance_embeddings.name, utterances, row_group_size=rows_per_group)
    atomic.write_table(out_dir / "rejects.parquet", pa.Table.from_pylist(rejects, schema=schema.REJECTS))
    return {"segments": written, "utterances": utterances.num_rows, "rejected": len(rejects)}


def _write_segment_table(
    store: PartStore,
    segments: _Pass,
    target: Path,
    seg_schema: pa.Schema,
    rows_per_group: int,
    utts: _Utterances,
    whole: np.ndarray,
    rejects: list[dict[str, str]],
) -> int:
    """The staged segment parts as one table in fixed row groups; adds each row to its utterance in
    ``utts`` (its vector only where the utterance has no ``whole``-file one) and collects the rejects."""
    written = 0
    with atomic.atomic_path(target, suffix=".parquet") as tmp, pq.ParquetWriter(tmp, seg_schema) as writer:
        buffer: list[pa.Table] = []
        buffered = 0
        for part, table in store.iter_tables():
            rejects.extend(part.rejects)
            codes = utts.codes[_plan_rows(segments, part, table)]
            utts.add_segments(codes, table.column("start_s"), table.column("end_s"))
            fallback = ~whole[codes]
            utts.add_vectors(codes[fallback], schema.embeddings_matrix(table)[fallback])
            buffer.append(table)
            buffered += table.num_rows
            while buffered >= rows_per_group:
                merged = pa.concat_tables(buffer)
                # One chunk per row group: Parquet's page cuts follow chunk boundaries, which follow
                # where the parts were cut (the flush timer, a kill), and the bytes must not.
                writer.write_table(merged.slice(0, rows_per_group).combine_chunks(), row_group_size=rows_per_group)
                rest = merged.slice(rows_per_group)
                buffer, buffered = [rest], rest.num_rows
                written += rows_per_group
        if buffered:
            writer.write_table(pa.concat_tables(buffer).combine_chunks(), row_group_size=rows_per_group)
            written += buffered
    return written


def _plan_rows(plan: _Pass, part: Part, table: pa.Table) -> np.ndarray:
    """The rows of ``plan.rows`` that a staged part holds, in the part's order (found by segment id
    among its units' batches, as rejected rows are missing from it)."""
    batches = [plan.batches[u] for u in part.units]
    candidates = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    planned = plan.rows.column("segment_id").take(candidates).combine_chunks()
    found = pc.index_in(table.column("segment_id"), value_set=planned)
    if found.null_count:
        raise RuntimeError(f"{part.path} holds rows that its batches do not plan")
    return candidates[found.to_numpy()]


def reject_rows(rows: pa.Table, bad: list[tuple[int, str]]) -> list[dict[str, str]]:
    """Rows of the rejects table for the ``(row, reason)`` pairs ``bad`` of ``rows`` (segment-table columns)."""
    paths = rows.column("path")
    return [{"path": paths[i].as_py(), "stage": "embed", "reason": reason} for i, reason in bad]


def segment_batch(rows: pa.Table, idx: list[int], vectors: np.ndarray, model_id: str, sch: pa.Schema) -> pa.RecordBatch:
    """Rows ``idx`` of ``rows`` (segment-table columns) with their embeddings, as a batch of ``sch``."""
    picked = rows.take(idx)
    cols = {name: picked.column(name).combine_chunks() for name in picked.column_names}
    cols["model_id"] = pa.array([model_id] * len(idx))
    cols["embedding"] = schema.embedding_column(vectors)
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


#: Rows normalised at a time when the utterance table is built (bounds the float64 temporaries).
_NORMALISE_ROWS = 4096


class _Utterances:
    """Per-utterance state of the merge, in arrays indexed by utterance code (the rank of its id).

    ``codes`` gives each segment row's utterance; ``sums`` holds the running float64 sums of
    vectors in one matrix (``summed`` marks the rows with any), and ``start_s``/``end_s``/
    ``num_segments`` the speech span and segment count of the segments added.
    """

    def __init__(self, rows: pa.Table, dim: int):
        encoded = rows.column("utterance_id").combine_chunks().dictionary_encode()
        order = pc.sort_indices(encoded.dictionary).to_numpy()  # UTF-8 byte order is Python's str order
        rank = np.empty(len(order), dtype=np.int32)
        rank[order] = np.arange(len(order), dtype=np.int32)
        self.codes = rank[encoded.indices.to_numpy()]
        self.ids = encoded.dictionary.take(order)
        _, first = np.unique(self.codes, return_index=True)
        self.speaker_id = rows.column("speaker_id").take(first)
        self.split = rows.column("split").take(first)
        self.sums = np.zeros((len(order), dim), dtype=np.float64)
        self.summed = np.zeros(len(order), dtype=bool)
        self.start_s = np.full(len(order), np.inf)
        self.end_s = np.full(len(order), -np.inf)
        self.num_segments = np.zeros(len(order), dtype=np.int64)

    def codes_of(self, utterance_ids: pa.ChunkedArray) -> np.ndarray:
        return pc.index_in(utterance_ids, value_set=self.ids).to_numpy()

    def add_vectors(self, codes: np.ndarray, vectors: np.ndarray) -> None:
        np.add.at(self.sums, codes, vectors)  # row by row, in order: the sums of adding one vector at a time
        self.summed[codes] = True

    def add_segments(self, codes: np.ndarray, start_s: pa.ChunkedArray, end_s: pa.ChunkedArray) -> None:
        np.minimum.at(self.start_s, codes, start_s.to_numpy())
        np.maximum.at(self.end_s, codes, end_s.to_numpy())
        np.add.at(self.num_segments, codes, 1)

    def table(self, keep: np.ndarray, encoder: SpeakerEncoder) -> pa.Table:
        """Utterances ``keep`` (codes, ascending): embedding = the renormalised sum of its normalised
        segment (or file chunk) embeddings."""
        sch = schema.embedding_schema(encoder.dim, utterance_level=True)
        vectors = np.empty((len(keep), encoder.dim), dtype=np.float32)
        for lo in range(0, len(keep), _NORMALISE_ROWS):
            vectors[lo : lo + _NORMALISE_ROWS] = schema.l2_normalise(self.sums[keep[lo : lo + _NORMALISE_ROWS]])
        cols = {
            "utterance_id": self.ids.take(keep),
            "speaker_id": self.speaker_id.take(keep),
            "split": self.split.take(keep),
            "start_s": pa.array(self.start_s[keep], pa.float64()),
            "end_s": pa.array(self.end_s[keep], pa.float64()),
            "num_segments": pa.array(self.num_segments[keep].astype(np.int32), pa.int32()),
            "model_id": pa.array([encoder.model_id] * len(keep), pa.string()),
            "embedding": schema.embedding_column(vectors),
        }
        return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)

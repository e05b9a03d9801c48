"""Column layouts of the Parquet tables the stages exchange.

Kept in one module so producers and consumers (stages, DuckDB views, tests) cannot drift apart.
Embeddings are ``FIXED_SIZE_LIST<float32>[D]`` so DuckDB sees ``FLOAT[D]`` arrays and numpy gets a
zero-copy ``(N, D)`` view.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

MANIFEST = pa.schema(
    [
        ("utterance_id", pa.string()),
        ("speaker_id", pa.string()),
        ("split", pa.string()),  # "train" | "eval"
        # The file read in place: relative to the project root when inside it, else under the corpus
        # base as params.yaml writes it (``../shared/datasets/...``); Layout.resolve makes it absolute.
        ("path", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("sha256", pa.string()),
        ("size_bytes", pa.int64()),
        # The source it came from (data.name or a data.sources key): its eval set in evaluate.
        ("source", pa.string()),
    ]
)

SEGMENTS = pa.schema(
    [
        ("segment_id", pa.string()),  # f"{utterance_id}#{k:03d}"
        ("utterance_id", pa.string()),
        ("speaker_id", pa.string()),
        ("split", pa.string()),
        ("path", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
    ]
)

REJECTS = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


def embedding_schema(dim: int, *, utterance_level: bool = False) -> pa.Schema:
    fields = [
        ("utterance_id", pa.string()),
        ("speaker_id", pa.string()),
        ("split", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("model_id", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ]
    if utterance_level:
        fields.insert(5, ("num_segments", pa.int32()))
    else:
        fields.insert(0, ("segment_id", pa.string()))
    return pa.schema(fields)


def embedding_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embeddings_matrix(table: pa.Table | pa.RecordBatch, column: str = "embedding") -> np.ndarray:
    """(N, D) float32 view of a FIXED_SIZE_LIST column of a table or a record batch."""
    col = table.column(column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), dtype=np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False)  # .values would ignore a slice's offset
    return flat.reshape(len(col), col.type.list_size).astype(np.float32, copy=False)


def l2_normalise(vectors: np.ndarray, eps: float = 1e-12, *, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; ``out=vectors`` (a float32 matrix) does it in place."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if out is not None:  # for float32 input the same bits as the copy below, without the copy
        return np.divide(vectors, np.maximum(norms, eps), out=out)
    return (vectors / np.maximum(norms, eps)).astype(np.float32, copy=False)  # the quotient is new already

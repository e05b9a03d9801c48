"""FAISS inner-product indexes over speaker embeddings: building, GPU placement, centroids.

Cosine similarity is computed as an inner product on L2-normalised vectors, so every index here is
an inner-product index and every vector (indexed or query) is normalised on the way in
(:func:`as_matrix`); a score is then directly a cosine in [-1, 1], comparable across index types
and with the evaluation scores. Also names the files of the index directory the ``index`` stage
writes (:mod:`voiceprint.index.stage`) and reads its ``index.json`` back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import faiss
import numpy as np

from voiceprint.common.layout import Layout
from voiceprint.common.schema import l2_normalise
from voiceprint.config import IndexParams

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_INFO",
    "MIN_POINTS_PER_CENTROID",
    "SEGMENTS_IDS",
    "SEGMENTS_INDEX",
    "SPEAKERS_IDS",
    "SPEAKERS_INDEX",
    "as_matrix",
    "build_index",
    "effective_nlist",
    "gpu_available",
    "read_index_info",
    "speaker_centroids",
    "to_cpu",
    "use_gpu",
]

SEGMENTS_INDEX = "segments.faiss"
SEGMENTS_IDS = "segments_ids.parquet"
SPEAKERS_INDEX = "speakers.faiss"
SPEAKERS_IDS = "speakers_ids.parquet"
INDEX_INFO = "index.json"

# FAISS warns below 39 training points per centroid: k-means on fewer gives unstable lists.
MIN_POINTS_PER_CENTROID = 39

_gpu_resources: Any = None  # one StandardGpuResources per process; GPU indexes borrow it


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a broken CUDA install should degrade to CPU, not fail the stage
        return False


def use_gpu(params: IndexParams) -> bool:
    """True when ``params`` builds flat/IVF indexes on a GPU (``use_gpu="auto"`` and one is there)."""
    # HNSW has no GPU implementation in faiss; flat and IVF do.
    return params.use_gpu == "auto" and params.type in ("flat", "ivf") and gpu_available()


def _gpu_res() -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def effective_nlist(n_vectors: int, nlist: int) -> int:
    """Number of IVF lists the data supports: at most ``n / 39``, at least 1."""
    return max(1, min(int(nlist), int(n_vectors) // MIN_POINTS_PER_CENTROID))


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a contiguous float32 ``(N, D)`` matrix of L2-normalised rows; rejects NaN/inf."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected an (N, D) matrix of embeddings, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("embeddings contain NaN or infinite values")
    return np.ascontiguousarray(l2_normalise(arr))


def build_index(vectors: np.ndarray, params: IndexParams) -> faiss.Index:
    """Inner-product index over ``vectors`` (normalised here, so scores are cosines).

    ``flat`` is exact; ``ivf`` clusters into ``nlist`` lists (clamped by :func:`effective_nlist`,
    trained with spherical k-means on the data itself) and scans ``nprobe`` of them; ``hnsw`` is a
    graph index with ``hnsw_m`` links per node. With ``use_gpu="auto"`` and a GPU-enabled faiss,
    flat/IVF are built on the GPU and the returned index searches there; pass it through
    :func:`to_cpu` before ``faiss.write_index``.
    """
    x = as_matrix(vectors)
    n, d = x.shape
    kind = params.type
    if kind == "ivf" and n == 0:
        log.warning("no vectors to train an IVF index on; using an exact flat index instead")
        kind = "flat"

    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = effective_nlist(n, params.nlist)
        if nlist < params.nlist:
            log.info("IVF: %d vectors support %d lists (asked for %d)", n, nlist, params.nlist)
        # index_factory owns its quantizer, avoiding the SWIG lifetime pitfall of IndexIVFFlat(q).
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # centroids renormalised each k-means step: right for cosine
        ivf.nprobe = min(params.nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:  # pragma: no cover - IndexParams validates the literal
        raise ValueError(f"unknown index type {kind!r}")

    if use_gpu(params) and kind in ("flat", "ivf"):
        index = faiss.index_cpu_to_gpu(_gpu_res(), 0, index)
        if kind == "ivf":
            # The GPU copy has its own clustering and search settings; set them again there.
            if hasattr(index, "cp"):
                index.cp.spherical = True
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(params.nprobe, nlist))

    if kind == "ivf":
        index.train(x)
    if n:
        index.add(x)
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """CPU copy of a GPU index (identity for CPU indexes); ``faiss.write_index`` needs CPU."""
    if type(index).__name__.startswith("GpuIndex") and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def speaker_centroids(
    vectors: np.ndarray, speaker_ids: list[str] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-speaker centroids: mean of the L2-normalised vectors, renormalised.

    Returns ``(speakers sorted, centroids (S, D) float32, counts (S,))``. Averaging normalised
    vectors weights every utterance equally regardless of its embedding norm, and the final
    renormalisation keeps centroid scores on the same cosine scale as utterance scores.
    """
    x = as_matrix(vectors) if len(vectors) else np.zeros((0, np.shape(vectors)[-1]), np.float32)
    labels = np.asarray(speaker_ids, dtype=object)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} vectors for {len(labels)} speaker ids")
    speakers, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    # Column-wise bincount: float64 sums in row order, ~20x faster than np.add.at at 1M rows.
    sums = np.zeros((len(speakers), x.shape[1]), dtype=np.float64)
    for d in range(x.shape[1]):
        sums[:, d] = np.bincount(inverse, weights=x[:, d], minlength=len(speakers))
    centroids = l2_normalise(sums / np.maximum(counts, 1)[:, None]) if len(speakers) else sums
    return [str(s) for s in speakers], centroids.astype(np.float32), counts.astype(np.int64)


def read_index_info(layout: Layout) -> dict[str, Any]:
    """The ``index.json`` the ``index`` stage wrote (model id, dimension, counts, settings)."""
    path = layout.index_dir / INDEX_INFO
    if not path.exists():
        raise FileNotFoundError(f"{path}: no speaker index; run the index stage first")
    return json.loads(path.read_text())

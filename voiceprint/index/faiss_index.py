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
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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
    "SpeakerSums",
    "as_matrix",
    "build_index",
    "build_index_from_batches",
    "effective_nlist",
    "gpu_available",
    "read_index_info",
    "speaker_centroids",
    "to_cpu",
    "use_gpu",
    "write_flat_index",
]

SEGMENTS_INDEX = "segments.faiss"
SEGMENTS_IDS = "segments_ids.parquet"
SPEAKERS_INDEX = "speakers.faiss"
SPEAKERS_IDS = "speakers_ids.parquet"
INDEX_INFO = "index.json"

# FAISS warns below 39 training points per centroid: k-means on fewer gives unstable lists.
MIN_POINTS_PER_CENTROID = 39
# faiss's k-means samples at most 256 points per centroid (ClusteringParameters.max_points_per_centroid).
MAX_TRAINING_POINTS_PER_CENTROID = 256

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


def _as_2d(vectors: np.ndarray) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected an (N, D) matrix of embeddings, got shape {arr.shape}")
    return arr


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a contiguous float32 ``(N, D)`` matrix of L2-normalised rows; rejects NaN/inf."""
    arr = _as_2d(vectors)
    if not np.all(np.isfinite(arr)):
        raise ValueError("embeddings contain NaN or infinite values")
    return np.ascontiguousarray(l2_normalise(arr))


def build_index(vectors: np.ndarray, params: IndexParams) -> faiss.Index:
    """Inner-product index over ``vectors`` (normalised here, so scores are cosines).

    ``flat`` is exact; ``ivf`` clusters into ``nlist`` lists (clamped by :func:`effective_nlist`,
    trained with spherical k-means) and scans ``nprobe`` of them; ``hnsw`` is a graph index with
    ``hnsw_m`` links per node. With ``use_gpu="auto"`` and a GPU-enabled faiss, flat/IVF are built
    on the GPU and the returned index searches there; pass it through :func:`to_cpu` before
    ``faiss.write_index``.
    """
    x = _as_2d(vectors)
    return build_index_from_batches(lambda: iter((x,)), len(x), x.shape[1], params)


def build_index_from_batches(
    batches: Callable[[], Iterator[np.ndarray]], n: int, dim: int, params: IndexParams
) -> faiss.Index:
    """:func:`build_index` over ``n`` vectors that ``batches()`` yields a few at a time.

    Memory is the index itself plus one batch, so an index over millions of vectors does not
    need the matrix, or a copy of it, first. ``batches`` is called once to add the vectors and,
    for ``ivf``, once before that to take the k-means training sample: every row when ``n`` is at
    most ``nlist x`` :data:`MAX_TRAINING_POINTS_PER_CENTROID` (what faiss itself would use), else
    that many evenly spaced rows, so the index depends only on the data and the parameters.
    """
    kind = params.type
    if kind == "ivf" and n == 0:
        log.warning("no vectors to train an IVF index on; using an exact flat index instead")
        kind = "flat"

    nlist = effective_nlist(n, params.nlist)
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        if nlist < params.nlist:
            log.info("IVF: %d vectors support %d lists (asked for %d)", n, nlist, params.nlist)
        # index_factory owns its quantizer, avoiding the SWIG lifetime pitfall of IndexIVFFlat(q).
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # centroids renormalised each k-means step: right for cosine
        ivf.nprobe = min(params.nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
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
        index.train(_training_sample(batches(), n, dim, nlist * MAX_TRAINING_POINTS_PER_CENTROID))
    added = 0
    for batch in batches():
        x = _batch_matrix(batch, dim)
        if len(x):
            index.add(x)
        added += len(x)
    if added != n:
        raise ValueError(f"expected {n} vectors, the batches held {added}")
    return index


def _batch_matrix(batch: np.ndarray, dim: int) -> np.ndarray:
    """One batch of a stream as :func:`as_matrix` rows; an empty batch is ``(0, dim)``, a batch of
    another width an error."""
    x = as_matrix(batch) if len(batch) else np.zeros((0, dim), np.float32)
    if x.shape[1] != dim:
        raise ValueError(f"expected {dim}-d vectors, got a batch of {x.shape[1]}-d ones")
    return x


def _training_sample(batches: Iterator[np.ndarray], n: int, dim: int, limit: int) -> np.ndarray:
    """Every row of the stream if ``n <= limit``, else ``limit`` evenly spaced rows (normalised)."""
    wanted = np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(np.int64)
    sample = np.empty((len(wanted), dim), dtype=np.float32)
    start = filled = 0
    for batch in batches:
        x = _batch_matrix(batch, dim)
        stop = start + len(x)
        take = wanted[(wanted >= start) & (wanted < stop)]
        sample[filled : filled + len(take)] = x[take - start]
        filled += len(take)
        start = stop
    if filled != len(wanted):
        raise ValueError(f"expected {n} vectors to sample from, the batches held {start}")
    return sample


def _flat_ip_header(dim: int, n: int) -> bytes:
    """The bytes ``faiss.write_index`` puts before the vectors of an ``IndexFlatIP`` of ``n`` vectors.

    Taken from faiss's own serialisation of an empty index (fourcc ``IxFI``, int32 d, int64 ntotal,
    two int64, bool is_trained, int32 metric, then the codes as a uint64 count of floats and the
    floats), with ntotal and the count set; checked against faiss's bytes for one vector, so a
    faiss that lays the file out otherwise fails here instead of writing a file it cannot read.
    """
    empty = faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes()
    one = faiss.IndexFlatIP(dim)
    one.add(np.zeros((1, dim), np.float32))
    expected_one = faiss.serialize_index(one).tobytes()
    if (
        empty[:4] != b"IxFI"
        or struct.unpack_from("<iq", empty, 4) != (dim, 0)
        or _with_count(empty, 1, dim) + bytes(4 * dim) != expected_one
    ):
        raise RuntimeError(f"faiss {faiss.__version__} lays out IndexFlatIP files in a way this writer does not know")
    return _with_count(empty, n, dim)


def _with_count(header: bytes, n: int, dim: int) -> bytes:
    """``header`` with ntotal (bytes 8-16) set to ``n`` and the trailing float count to ``n * dim``."""
    return header[:8] + struct.pack("<q", n) + header[16:-8] + struct.pack("<Q", n * dim)


def write_flat_index(batches: Callable[[], Iterator[np.ndarray]], n: int, dim: int, path: str | Path) -> None:
    """Write the exact index :func:`build_index` would build for ``type: flat`` straight to ``path``.

    The file is byte for byte what ``faiss.write_index`` writes for that index (``faiss.read_index``
    loads it), but the vectors go from each batch to the file, so memory is one batch, not the
    index: the flat index of a VoxCeleb2-size corpus is about 3 GB. ``batches`` is called once.
    """
    header = _flat_ip_header(dim, n)
    added = 0
    with open(path, "wb") as out:
        out.write(header)
        for batch in batches():
            x = _batch_matrix(batch, dim)
            if len(x):  # (a memoryview of an empty matrix cannot be cast)
                out.write(memoryview(x).cast("B"))
            added += len(x)
    if added != n:
        raise ValueError(f"expected {n} vectors, the batches held {added}")


def to_cpu(index: faiss.Index) -> faiss.Index:
    """CPU copy of a GPU index (identity for CPU indexes); ``faiss.write_index`` needs CPU."""
    if type(index).__name__.startswith("GpuIndex") and hasattr(faiss, "index_gpu_to_cpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


class SpeakerSums:
    """Running per-speaker sums of L2-normalised vectors, fed a batch at a time.

    ``speakers`` names every speaker that will be fed (a first pass over the ids), so memory is one
    float64 row per speaker, allocated once, whatever the number of utterances. Rows are summed in
    the order they arrive, so feeding a table in batches gives the same bits as feeding it whole.
    """

    def __init__(self, speakers: Iterable[str], dim: int) -> None:
        self.speakers = sorted({str(s) for s in speakers})
        self.dim = dim
        self._code = {s: i for i, s in enumerate(self.speakers)}
        self._sums = np.zeros((len(self.speakers), dim), dtype=np.float64)
        self._counts = np.zeros(len(self.speakers), dtype=np.int64)

    def add(self, vectors: np.ndarray, speaker_ids: list[str] | np.ndarray) -> None:
        x = _batch_matrix(vectors, self.dim)
        if len(speaker_ids) != len(x):
            raise ValueError(f"{len(x)} vectors for {len(speaker_ids)} speaker ids")
        try:
            codes = np.fromiter((self._code[str(s)] for s in speaker_ids), np.int64, len(x))
        except KeyError as err:
            raise ValueError(f"speaker {err.args[0]!r} was not among the speakers given up front") from None
        np.add.at(self._sums, codes, x.astype(np.float64))
        np.add.at(self._counts, codes, 1)

    def centroids(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(speakers sorted, centroids (S, D) float32, counts (S,))``; see :func:`speaker_centroids`."""
        centroids = np.empty((len(self.speakers), self.dim), np.float32)
        step = 4_096  # rows at a time: no float64 copy of every sum (rows are independent, same bits)
        for start in range(0, len(self.speakers), step):
            rows = slice(start, start + step)
            centroids[rows] = l2_normalise(self._sums[rows] / np.maximum(self._counts[rows], 1)[:, None])
        return list(self.speakers), centroids, self._counts.copy()


def speaker_centroids(
    vectors: np.ndarray, speaker_ids: list[str] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-speaker centroids: mean of the L2-normalised vectors, renormalised.

    Returns ``(speakers sorted, centroids (S, D) float32, counts (S,))``. Averaging normalised
    vectors weights every utterance equally regardless of its embedding norm, and the final
    renormalisation keeps centroid scores on the same cosine scale as utterance scores.
    """
    sums = SpeakerSums((str(s) for s in speaker_ids), np.shape(vectors)[-1])
    sums.add(vectors, speaker_ids)
    return sums.centroids()


def read_index_info(layout: Layout) -> dict[str, Any]:
    """The ``index.json`` the ``index`` stage wrote (model id, dimension, counts, settings)."""
    path = layout.index_dir / INDEX_INFO
    if not path.exists():
        raise FileNotFoundError(f"{path}: no speaker index; run the index stage first")
    return json.loads(path.read_text())

"""FAISS indexes over the embeddings, and the speaker gallery used for identification.

Cosine similarity is computed as an inner product on L2-normalised vectors, so every index here is
an inner-product index and every vector (indexed or query) is normalised on the way in; a score is
then directly a cosine in [-1, 1], comparable across index types and with the evaluation scores.

Two indexes are built by the ``index`` stage into ``data/index`` (swapped in whole, so a reader
never sees a segment index from one run next to the id table of another):

* ``segments.faiss`` + ``segments_ids.parquet``: one vector per VAD segment, for "which stretch of
  audio sounds like this" queries;
* ``speakers.faiss`` + ``speakers_ids.parquet``: one centroid per speaker (mean of its L2-normalised
  utterance embeddings, renormalised), the gallery for "who is this".

Enrolled speakers (``voiceprint enroll``) live in ``enrollments/``, outside the DVC outputs, because
``dvc repro`` deletes and rebuilds ``data/index``; they are merged with the base index at load time
instead of being written into it, so enrolling never touches ``speakers.faiss``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common.atomic import atomic_dir, write_table
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embedding_column, embeddings_matrix, l2_normalise
from voiceprint.config import IndexParams, Params

log = logging.getLogger(__name__)

__all__ = [
    "Enrollment",
    "EnrollmentError",
    "SpeakerGallery",
    "build_index",
    "build_indexes",
    "effective_nlist",
    "enroll",
    "gpu_available",
    "load_enrollments",
    "speaker_centroids",
    "to_cpu",
]

SEGMENTS_INDEX = "segments.faiss"
SEGMENTS_IDS = "segments_ids.parquet"
SPEAKERS_INDEX = "speakers.faiss"
SPEAKERS_IDS = "speakers_ids.parquet"
INDEX_INFO = "index.json"
LOCK_NAME = ".lock"

# FAISS warns below 39 training points per centroid: k-means on fewer gives unstable lists.
MIN_POINTS_PER_CENTROID = 39

_gpu_resources: Any = None  # one StandardGpuResources per process; GPU indexes borrow it


class EnrollmentError(ValueError):
    """An enrollment that cannot be accepted (model mismatch, wrong dimension, bad input)."""


# --------------------------------------------------------------------------------------------
# Building indexes
# --------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a broken CUDA install should degrade to CPU, not fail the stage
        return False


def _use_gpu(params: IndexParams) -> bool:
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


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
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
    x = _as_matrix(vectors)
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

    if _use_gpu(params) and kind in ("flat", "ivf"):
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


def speaker_centroids(
    vectors: np.ndarray, speaker_ids: list[str] | np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-speaker centroids: mean of the L2-normalised vectors, renormalised.

    Returns ``(speakers sorted, centroids (S, D) float32, counts (S,))``. Averaging normalised
    vectors weights every utterance equally regardless of its embedding norm, and the final
    renormalisation keeps centroid scores on the same cosine scale as utterance scores.
    """
    x = _as_matrix(vectors) if len(vectors) else np.zeros((0, np.shape(vectors)[-1]), np.float32)
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
    built_with = "gpu" if _use_gpu(params) else "cpu"

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


def read_index_info(layout: Layout) -> dict[str, Any]:
    path = layout.index_dir / INDEX_INFO
    if not path.exists():
        raise FileNotFoundError(f"{path}: no speaker index; run the index stage first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Enrollments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrollment:
    """One enrolled speaker: the running mean of its normalised embeddings and how many."""

    name: str
    model_id: str
    count: int
    mean: np.ndarray  # (D,) float64, mean of L2-normalised vectors (not renormalised)
    path: Path

    @property
    def centroid(self) -> np.ndarray:
        return l2_normalise(self.mean.reshape(1, -1).astype(np.float32))[0]


def safe_name(name: str) -> str:
    """File-name form of a speaker name; injective (a hash suffix whenever characters changed)."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    if slug != name or slug.startswith("."):
        slug = f"{slug.lstrip('.') or 'speaker'}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return slug


@contextlib.contextmanager
def _enrollment_lock(directory: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``enrollments/.lock``: serialises read-modify-write of enrollments.

    The kernel releases a flock when the process dies, so a crashed ``enroll`` cannot wedge others.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_enrollment(path: Path) -> Enrollment:
    # One read of the whole (tiny) file: pq.read_table(path) may open the path more than once, and
    # a concurrent enroll replacing the file in between would hand it two different files.
    row = pq.read_table(pa.BufferReader(path.read_bytes())).to_pylist()[0]
    return Enrollment(
        name=row["speaker_id"],
        model_id=row["model_id"],
        count=int(row["count"]),
        mean=np.asarray(row["mean"], dtype=np.float64),
        path=path,
    )


def _write_enrollment(path: Path, name: str, model_id: str, count: int, mean: np.ndarray) -> None:
    centroid = l2_normalise(mean.reshape(1, -1).astype(np.float32))
    dim = mean.shape[0]
    table = pa.table(
        {
            "speaker_id": pa.array([name], pa.string()),
            "model_id": pa.array([model_id], pa.string()),
            "count": pa.array([count], pa.int64()),
            "mean": pa.FixedSizeListArray.from_arrays(pa.array(mean.astype(np.float64)), dim),
            "centroid": embedding_column(centroid),
            "updated_at": pa.array([datetime.now(UTC)], pa.timestamp("us", tz="UTC")),
        }
    )
    write_table(path, table)


def enroll(layout: Layout, name: str, vectors: np.ndarray, model_id: str) -> Enrollment:
    """Add (or update) speaker ``name`` in the gallery without rebuilding the base index.

    ``vectors``: ``(N, D)`` embeddings of the speaker's enrollment files, from model ``model_id``.
    Re-enrolling the same name with more files updates its centroid as the count-weighted mean, so
    enrolling 3 files then 2 equals enrolling all 5 at once. Refused when ``model_id`` is not the
    model the speaker index was built with: cosines between different models' embeddings mean
    nothing. An existing enrollment from an older model is replaced, not averaged in.
    """
    name = name.strip()
    if not name:
        raise EnrollmentError("speaker name is empty")
    info = read_index_info(layout)
    index_model = info.get("model_id")
    if model_id != index_model:
        raise EnrollmentError(
            f"cannot enroll {name!r}: embeddings come from model {model_id!r} but the speaker index "
            f"was built with {index_model!r}; embed the enrollment audio with the index's model "
            "(after a model change, rebuild the index and re-enroll)"
        )
    x = np.asarray(vectors, dtype=np.float32)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[0] == 0:
        raise EnrollmentError(f"cannot enroll {name!r}: expected (N, D) embeddings, got {x.shape}")
    if x.shape[1] != int(info["dim"]):
        raise EnrollmentError(f"cannot enroll {name!r}: {x.shape[1]}-d embeddings, the index is {info['dim']}-d")
    x = _as_matrix(x)

    directory = layout.enrollments
    path = directory / f"{safe_name(name)}.parquet"
    with _enrollment_lock(directory):
        count, total = x.shape[0], x.astype(np.float64).sum(axis=0)
        if path.exists():
            old = _read_enrollment(path)
            if old.model_id == model_id and old.mean.shape == total.shape:
                count += old.count
                total += old.mean * old.count
            else:
                log.warning("replacing enrollment of %r made with model %r (now %r)", name, old.model_id, model_id)
        mean = total / count
        _write_enrollment(path, name, model_id, count, mean)
    log.info("enrolled %r (%d embeddings in total)", name, count)
    return Enrollment(name=name, model_id=model_id, count=count, mean=mean, path=path)


def load_enrollments(layout: Layout) -> list[Enrollment]:
    """All enrolled speakers, sorted by name (files are replaced atomically: no lock needed)."""
    directory = layout.enrollments
    if not directory.is_dir():
        return []
    return sorted((_read_enrollment(p) for p in directory.glob("*.parquet")), key=lambda e: e.name)


# --------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------


@dataclass
class SpeakerGallery:
    """Speaker centroids from the index stage plus enrolled speakers, searchable together.

    Enrolled centroids go into a small in-memory exact index beside the base index; a search
    queries both and merges by score. An enrolled name equal to a base speaker id appears once,
    with the better score.
    """

    index: faiss.Index
    speaker_ids: list[str]
    model_id: str
    dim: int
    enrolled: list[Enrollment] = field(default_factory=list)
    stale: list[Enrollment] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _enrolled_index: faiss.Index = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._enrolled_index = faiss.IndexFlatIP(self.dim)
        if self.enrolled:
            self._enrolled_index.add(np.stack([e.centroid for e in self.enrolled]).astype(np.float32))

    @classmethod
    def load(cls, layout: Layout) -> SpeakerGallery:
        """Read ``speakers.faiss``, its id table and the enrollments made with the same model."""
        info = read_index_info(layout)
        index = faiss.read_index(str(layout.index_dir / SPEAKERS_INDEX))
        ids = pq.read_table(layout.index_dir / SPEAKERS_IDS, columns=["speaker_id"])
        speaker_ids = [str(s) for s in ids.column("speaker_id").to_pylist()]
        if len(speaker_ids) != index.ntotal:
            raise ValueError(f"{layout.index_dir}: {index.ntotal} vectors but {len(speaker_ids)} speaker ids")
        model_id, dim = str(info["model_id"]), int(info["dim"])
        enrolled, stale = [], []
        for e in load_enrollments(layout):
            (enrolled if e.model_id == model_id and e.mean.shape[0] == dim else stale).append(e)
        if stale:
            log.warning(
                "ignoring %d enrollment(s) made with another model (%s); re-enroll them after the model change: %s",
                len(stale),
                ", ".join(sorted({e.model_id for e in stale})),
                ", ".join(e.name for e in stale),
            )
        return cls(
            index=index,
            speaker_ids=speaker_ids,
            model_id=model_id,
            dim=dim,
            enrolled=enrolled,
            stale=stale,
            info=info,
        )

    def __len__(self) -> int:
        return len(self.speaker_ids) + len(self.enrolled)

    def search(self, vectors: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(speaker_id, cosine)`` per query row, best first."""
        if k < 1:
            raise ValueError("k must be >= 1")
        q = _as_matrix(vectors)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries are {q.shape[1]}-d, the gallery is {self.dim}-d")
        results: list[dict[str, float]] = [{} for _ in range(len(q))]
        for index, names in (
            (self.index, self.speaker_ids),
            (self._enrolled_index, [e.name for e in self.enrolled]),
        ):
            kk = min(k, index.ntotal)
            if kk == 0:
                continue
            scores, rows = index.search(q, kk)
            for i in range(len(q)):
                best = results[i]
                for score, row in zip(scores[i], rows[i], strict=True):
                    if row < 0:  # IVF/HNSW pad with -1 when they find fewer than k
                        continue
                    name = names[row]
                    if score > best.get(name, -np.inf):
                        best[name] = float(score)
        return [sorted(r.items(), key=lambda kv: (-kv[1], kv[0]))[:k] for r in results]


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``index`` stage: :func:`build_indexes` with ``params.index``."""
    return build_indexes(layout, params.index)

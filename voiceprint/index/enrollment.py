"""Enrolled speakers: one Parquet file per speaker under ``enrollments/``, added without a rebuild.

Enrollments live outside the DVC outputs because ``dvc repro`` deletes and rebuilds ``data/index``;
they are merged with the base index at load time (:class:`voiceprint.index.gallery.SpeakerGallery`)
instead of being written into it, so enrolling never touches ``speakers.faiss``. Read-modify-write
of an enrollment is serialised by an ``flock`` on ``enrollments/.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embedding_column, l2_normalise
from voiceprint.index.faiss_index import as_matrix, read_index_info

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "Enrollment", "EnrollmentError", "enroll", "load_enrollments", "safe_name"]

LOCK_NAME = ".lock"


class EnrollmentError(ValueError):
    """An enrollment that cannot be accepted (model mismatch, wrong dimension, bad input)."""


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
    x = as_matrix(x)

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

"""The speaker gallery behind ``voiceprint identify``: indexed speaker centroids plus enrollments.

The base gallery is ``speakers.faiss`` from the ``index`` stage (one centroid per speaker); enrolled
speakers (:mod:`voiceprint.index.enrollment`) made with the same model are searched beside it in a
small in-memory exact index, and the two result lists are merged by cosine score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from voiceprint.common.layout import Layout
from voiceprint.index.enrollment import Enrollment, load_enrollments
from voiceprint.index.faiss_index import SPEAKERS_IDS, SPEAKERS_INDEX, as_matrix, read_index_info

log = logging.getLogger(__name__)

__all__ = ["SpeakerGallery"]


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
        q = as_matrix(vectors)
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

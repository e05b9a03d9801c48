"""The scoring back-end (``evaluate.backend``): in-domain mean subtraction and LDA before the cosine.

:func:`fit_backend` fits it on one eval set's in-domain rows (the train split of the set's own
source, :func:`in_domain_train`); :meth:`Backend.apply` maps every embedding the set is scored with
(trials, AS-norm cohort, identification gallery and queries) to the scoring space, unit length.
The evaluate stage and the encoder comparison both use it, so every encoder is scored alike; the
stage writes each set's to ``data/backend/<set>.json``, which ``voiceprint verify`` applies.
Design and measurements: docs/stages.md#scoring-back-end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from voiceprint.common.atomic import write_json
from voiceprint.common.layout import Layout
from voiceprint.common.schema import l2_normalise
from voiceprint.config import BackendParams

log = logging.getLogger(__name__)

#: The layout of data/backend/<set>.json; bump when it changes, so an old file is refused, not misread.
BACKEND_VERSION = 1
#: LDA is fitted on at most this many utterances (a seeded sample of whole speakers beyond it): the
#: fit holds them in float64 and their SVD, so this bounds its memory (about 100 MB at 256 dimensions).
LDA_MAX_UTTERANCES = 50_000


@dataclass(frozen=True)
class Backend:
    """A fitted back-end: ``mean`` ``(D,)`` (None: not centred), and the LDA as ``(y - lda_mean) @
    projection`` with ``projection`` ``(D, lda_dim)`` (None: no LDA), with what they were fitted on
    (:meth:`stats`)."""

    mean: np.ndarray | None = None
    projection: np.ndarray | None = None
    lda_mean: np.ndarray | None = None
    centre_utterances: int = 0
    lda_speakers: int = 0

    def apply(self, x: np.ndarray, *, in_place: bool = False) -> np.ndarray:
        """``x`` ``(N, D)`` in the scoring space: centred, projected and L2-normalised, float32.

        ``in_place`` centres a float32 ``x`` in its own memory (the evaluate stage's matrix, which
        may be most of its peak); ``x`` is then overwritten.
        """
        if self.mean is None and self.projection is None:
            return x
        y = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            centre = self.mean.astype(np.float32)
            y = l2_normalise(np.subtract(y, centre, out=y), out=y) if in_place else l2_normalise(y - centre)
        if self.projection is not None:
            assert self.lda_mean is not None
            y = l2_normalise((y - self.lda_mean) @ self.projection)
        return y

    def to_json(self) -> dict[str, Any]:
        """The fitted arrays as plain lists (float32 values), for :func:`write_backend`."""

        def rows(a: np.ndarray | None) -> list[Any] | None:
            return None if a is None else np.asarray(a, dtype=np.float32).tolist()

        return {
            "version": BACKEND_VERSION,
            **self.stats(),
            "mean": rows(self.mean),
            "lda_mean": rows(self.lda_mean),
            "projection": rows(self.projection),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Backend:
        def array(key: str) -> np.ndarray | None:
            return None if obj.get(key) is None else np.asarray(obj[key], dtype=np.float32)

        if obj.get("version") != BACKEND_VERSION:
            raise ValueError(f"scoring back-end version {obj.get('version')!r}, expected {BACKEND_VERSION}")
        return cls(
            array("mean"),
            array("projection"),
            array("lda_mean"),
            int(obj.get("backend_centre_utterances") or 0),
            int(obj.get("backend_lda_speakers") or 0),
        )

    def stats(self) -> dict[str, Any]:
        """The metrics.json keys that say which back-end scored the set."""
        return {
            "backend_centre_utterances": self.centre_utterances,
            "backend_lda_dim": None if self.projection is None else int(self.projection.shape[1]),
            "backend_lda_speakers": self.lda_speakers,
        }


def in_domain_train(ids: np.ndarray, split: np.ndarray, sources: dict[str, str], eval_set: str | None) -> np.ndarray:
    """The rows a set's back-end is fitted on: the train split of source ``eval_set`` by ``sources``
    (``{utterance_id: source}``); the whole train split when ``eval_set`` is None (one source)."""
    train = np.asarray(split) == "train"
    if eval_set is None:
        return train
    return train & of_source(ids, sources, eval_set)


def of_source(ids: np.ndarray, sources: dict[str, str], source: str) -> np.ndarray:
    """A boolean row mask: which utterance ``ids`` are of ``source`` by ``sources`` (``{utterance_id: source}``)."""
    return np.asarray([sources.get(u) == source for u in np.asarray(ids).tolist()], dtype=bool)


def fit_backend(
    x: np.ndarray, speakers: np.ndarray, fit_rows: np.ndarray, params: BackendParams, *, seed: int = 0, name: str = ""
) -> Backend:
    """Fit the back-end on the unit-length rows ``x[fit_rows]`` (labels ``speakers``); ``name`` (the
    set) is for the log. What cannot be fitted is skipped with a warning, never an error: a set
    whose source has no train split is scored uncentred, one with too few speakers without LDA."""
    fit_rows = np.asarray(fit_rows, dtype=bool)
    n_fit = int(fit_rows.sum())
    mean: np.ndarray | None = None
    if params.centre == "source":
        if n_fit:
            mean = x[fit_rows].mean(axis=0, dtype=np.float64)
        else:
            log.warning("set %s: its source has no train-split utterances to centre on; scored uncentred", name)
    if params.lda_dim is None:
        return Backend(mean, None, None, n_fit if mean is not None else 0, 0)

    labels = np.asarray(speakers)[fit_rows]
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    repeated = counts[inverse] >= 2
    n_speakers = int((counts >= 2).sum())
    if n_speakers < params.lda_dim + 1 or x.shape[1] < params.lda_dim:
        log.warning(
            "set %s: LDA to %d dimensions needs %d speakers with two or more train utterances of its source "
            "and at least %d embedding dimensions; it has %d and %d: scored without LDA",
            name,
            params.lda_dim,
            params.lda_dim + 1,
            params.lda_dim,
            n_speakers,
            x.shape[1],
        )
        return Backend(mean, None, None, n_fit if mean is not None else 0, 0)
    rows = np.flatnonzero(fit_rows)[repeated]
    codes = inverse[repeated]
    if len(rows) > LDA_MAX_UTTERANCES:
        rows, codes = _speaker_sample(rows, codes, LDA_MAX_UTTERANCES, seed)
        n_speakers = len(np.unique(codes))
    fit = x[rows] if mean is None else l2_normalise(x[rows] - mean.astype(np.float32))
    # The SVD solver: classic LDA, and it copes with a within-speaker scatter of low rank (few
    # utterances per speaker), where the eigen solver's inverse does not.
    lda = LinearDiscriminantAnalysis(solver="svd", n_components=params.lda_dim)
    lda.fit(fit.astype(np.float64), codes)
    projection = np.ascontiguousarray(lda.scalings_[:, : params.lda_dim], dtype=np.float32)
    lda_mean = np.asarray(lda.xbar_, dtype=np.float32)
    log.info(
        "set %s: LDA %d -> %d fitted on %d utterances of %d speakers",
        name,
        x.shape[1],
        params.lda_dim,
        len(rows),
        n_speakers,
    )
    return Backend(mean, projection, lda_mean, n_fit if mean is not None else 0, n_speakers)


def _speaker_sample(rows: np.ndarray, codes: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole speakers, in a seeded order, until ``limit`` utterances: a speaker is never split."""
    order = np.random.default_rng(seed).permutation(int(codes.max()) + 1)
    sizes = np.bincount(codes, minlength=len(order))
    keep_speakers = order[np.cumsum(sizes[order]) <= limit]
    keep = np.isin(codes, keep_speakers)
    return rows[keep], codes[keep]


def backend_dir(layout: Layout) -> Path:
    """``data/backend/``: one JSON file per evaluated set (:func:`backend_path`)."""
    return layout.data / "backend"


def backend_path(layout: Layout, eval_set: str) -> Path:
    """``data/backend/<set>.json``: the back-end the evaluate stage scored ``eval_set`` with."""
    return backend_dir(layout) / f"{eval_set}.json"


def write_backend(path: Path, backend: Backend) -> None:
    """Write ``backend`` atomically as JSON (deterministic bytes: no timestamps, sorted keys)."""
    write_json(path, backend.to_json())


def read_backend(path: Path) -> Backend:
    """The back-end :func:`write_backend` wrote (plain JSON: nothing in it is executed or unpickled)."""
    return Backend.from_json(json.loads(path.read_text()))

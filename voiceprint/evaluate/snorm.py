"""Adaptive symmetric score normalisation (AS-norm) of cosine verification scores.

Each side of a trial is standardised by its top-K scores against an impostor cohort:
:func:`as_norm_scores` (the ``(N, N)`` matrix), :func:`as_norm_pairs` (aligned with the all-pairs
trial list) and :func:`as_norm_trials` (a chosen trial list, blockwise).
Design (formula, cohort choice, references): docs/design/evaluation.md#as-norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "as_norm",
    "as_norm_pairs",
    "as_norm_scores",
    "as_norm_trials",
    "cohort_stats",
    "upper_pairs",
]

_BLOCK = 1024  # rows processed at once: peak extra memory is block x max(M, N) floats
_COHORT_SCORES = 1 << 21  # cohort scores held at once (8 MB float32, twice with the partition)
_MIN_SIGMA = 1e-6  # guards the division when the top-K cohort scores are (nearly) all equal


def _unit_rows(X: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(X, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an (N, D) matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _effective_k(top_k: int, m: int) -> int:
    """``top_k`` clamped to the cohort size; at least 2 scores are needed for a std."""
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2 (a standard deviation needs two scores), got {top_k}")
    if m < 2:
        raise ValueError(f"the cohort needs at least 2 embeddings, got {m}")
    return min(int(top_k), m)


def _cohort_block(cohort_size: int) -> int:
    """Rows of :func:`cohort_stats` per block: :data:`_BLOCK`, fewer for a cohort so large that
    ``_BLOCK x M`` scores would exceed :data:`_COHORT_SCORES` (memory then does not grow with ``M``)."""
    return max(16, min(_BLOCK, _COHORT_SCORES // max(cohort_size, 1)))


def cohort_stats(X: ArrayLike, cohort: ArrayLike, top_k: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float64, ``(N,)``) of each row's top-K cosine scores against the cohort.

    ``top_k`` is clamped to the cohort size ``M`` (then every cohort score is used: plain
    symmetric S-norm). ``sigma`` is floored at ``1e-6`` so a degenerate cohort cannot divide by
    zero. Computed in row blocks with ``np.partition`` (``O(M)`` per row, no full sort) of at
    most about :data:`_COHORT_SCORES` scores, so the ``N x M`` score matrix is never held at once.
    """
    x = _unit_rows(X, "X")
    c = _unit_rows(cohort, "cohort")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"dimension mismatch: X has {x.shape[1]}, cohort has {c.shape[1]}")
    k = _effective_k(top_k, len(c))
    mu = np.empty(len(x), dtype=np.float64)
    sigma = np.empty(len(x), dtype=np.float64)
    rows = _cohort_block(len(c))
    for start in range(0, len(x), rows):
        sl = slice(start, min(len(x), start + rows))
        scores = x[sl] @ c.T
        top = np.partition(scores, len(c) - k, axis=1)[:, len(c) - k :].astype(np.float64)
        mu[sl] = top.mean(axis=1)
        sigma[sl] = top.std(axis=1)
    return mu, np.maximum(sigma, _MIN_SIGMA)


def as_norm(
    enroll: ArrayLike,
    test: ArrayLike,
    cohort: ArrayLike,
    top_k: int = 200,
) -> np.ndarray:
    """AS-norm scores ``(E, T)`` float32 of every enrollment x test embedding pair.

    The raw score is the cosine of the L2-normalised embeddings, as in the evaluate stage.
    """
    e = _unit_rows(enroll, "enroll")
    t = _unit_rows(test, "test")
    if e.shape[1] != t.shape[1]:
        raise ValueError(f"dimension mismatch: enroll has {e.shape[1]}, test has {t.shape[1]}")
    mu_e, sd_e = cohort_stats(e, cohort, top_k)
    mu_t, sd_t = cohort_stats(t, cohort, top_k)
    return _normalise_matrix(e, t, mu_e, sd_e, mu_t, sd_t)


def _normalise_matrix(
    e: np.ndarray,
    t: np.ndarray,
    mu_e: np.ndarray,
    sd_e: np.ndarray,
    mu_t: np.ndarray,
    sd_t: np.ndarray,
) -> np.ndarray:
    out = np.empty((len(e), len(t)), dtype=np.float32)
    mu_t_row, sd_t_row = mu_t[None, :], sd_t[None, :]
    for start in range(0, len(e), _BLOCK):
        sl = slice(start, min(len(e), start + _BLOCK))
        raw = (e[sl] @ t.T).astype(np.float64)
        z_e = (raw - mu_e[sl, None]) / sd_e[sl, None]
        z_t = (raw - mu_t_row) / sd_t_row
        out[sl] = 0.5 * (z_e + z_t)
    return out


def as_norm_scores(X_eval: ArrayLike, cohort: ArrayLike, top_k: int = 200) -> np.ndarray:
    """AS-norm score matrix ``(N, N)`` float32 over one evaluation set (every item vs every item).

    The matrix is symmetric (the formula is symmetric in ``e`` and ``t`` and the cohort
    statistics are computed once per item). The diagonal holds self-trials, which are not
    verification trials; :func:`upper_pairs` drops it.
    """
    x = _unit_rows(X_eval, "X_eval")
    mu, sd = cohort_stats(x, cohort, top_k)
    n = len(x)
    out = np.empty((n, n), dtype=np.float32)
    # Only the upper block-triangle is computed and mirrored: half the work, and exact symmetry
    # (a blockwise BLAS product can differ by an ulp between (i, j) and (j, i)).
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        raw = (x[start:stop] @ x[start:].T).astype(np.float64)
        z = 0.5 * ((raw - mu[start:stop, None]) / sd[start:stop, None] + (raw - mu[None, start:]) / sd[None, start:])
        out[start:, start:stop] = z.T
        out[start:stop, start:] = z
        diag = out[start:stop, start:stop]  # a view: symmetrise the diagonal block in place
        lower = np.tril_indices(stop - start, k=-1)
        diag[lower] = diag.T[lower]
    return out


def upper_pairs(matrix: ArrayLike, labels: ArrayLike | Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32, same bool)`` of every unordered pair ``i < j`` of a square score matrix.

    Same order and label convention as :func:`voiceprint.evaluate.stage.all_pairs_scores`: pairs in
    row-major order of the strict upper triangle (``(0,1), (0,2), ..., (1,2), ...``), and
    ``same`` compares labels as strings.
    """
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square score matrix, got shape {m.shape}")
    y = np.asarray(labels, dtype=object).reshape(-1)
    if len(y) != len(m):
        raise ValueError(f"{len(m)} rows for {len(y)} labels")
    codes = np.unique(y.astype(str), return_inverse=True)[1].reshape(-1)
    n = len(m)
    scores: list[np.ndarray] = []
    same: list[np.ndarray] = []
    # Row blocks with a boolean upper-triangle mask, exactly as all_pairs_scores walks the pairs
    # (and without np.triu_indices' two N(N-1)/2 int64 index arrays).
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        upper = np.triu(np.ones((stop - start, n - start), dtype=bool), k=1)
        scores.append(m[start:stop, start:][upper])
        same.append((codes[start:stop, None] == codes[None, start:])[upper])
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(scores).astype(np.float32), np.concatenate(same)


def as_norm_pairs(
    X_eval: ArrayLike,
    labels: ArrayLike | Sequence[Any],
    cohort: ArrayLike,
    top_k: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """AS-normalised all-pairs trial list, aligned with :func:`voiceprint.evaluate.stage.all_pairs_scores`.

    Element ``k`` of the returned ``(scores, same)`` is the same trial as element ``k`` of
    ``all_pairs_scores(X_eval, labels)``, so raw and normalised EER/minDCF can be compared (or
    the two score lists fused) directly. Memory: the ``N x N`` float32 matrix plus the
    ``N(N-1)/2`` trial list.
    """
    return upper_pairs(as_norm_scores(X_eval, cohort, top_k), labels)


def as_norm_trials(
    X_eval: ArrayLike,
    left: ArrayLike,
    right: ArrayLike,
    cohort: ArrayLike,
    top_k: int = 200,
    *,
    block: int = 8192,
) -> np.ndarray:
    """AS-norm scores (float32) of the trials ``(X_eval[left[k]], X_eval[right[k]])``.

    The same formula as :func:`as_norm_scores` (which it matches to float32 rounding on the same
    pairs), computed trial by trial: the cohort statistics of the utterances the trials use, then
    the raw cosine of each block of trials by index gathering. Memory: the scores plus one block.
    """
    x = _unit_rows(X_eval, "X_eval")
    a = np.asarray(left, dtype=np.int64).reshape(-1)
    b = np.asarray(right, dtype=np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"left ({a.size}) and right ({b.size}) differ in length")
    used = np.unique(np.concatenate([a, b]))
    mu = np.zeros(len(x), dtype=np.float64)
    sd = np.ones(len(x), dtype=np.float64)
    if used.size:
        mu[used], sd[used] = cohort_stats(x[used], cohort, top_k)
    out = np.empty(a.size, dtype=np.float32)
    for start in range(0, a.size, block):
        sl = slice(start, min(a.size, start + block))
        ia, ib = a[sl], b[sl]
        raw = np.einsum("ij,ij->i", x[ia], x[ib]).astype(np.float64)
        out[sl] = 0.5 * ((raw - mu[ia]) / sd[ia] + (raw - mu[ib]) / sd[ib])
    return out

"""Cluster-separation metrics for speaker embeddings: OIIDD, CCR and silhouette.

Each is computed on cosine distance in the native space and on Euclidean distance after UMAP to
2-D. :func:`cluster_report` returns the flat, JSON-able metrics; :func:`cluster_analysis` also keeps
the distances and UMAP coordinates for :mod:`voiceprint.compare.plots`.
Definitions and their biases: docs/design/comparison.md.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

__all__ = [
    "ClusterAnalysis",
    "Metric",
    "ccr",
    "centroid_distances",
    "cluster_analysis",
    "cluster_report",
    "kde_pair",
    "oiidd",
    "overlap_area",
    "silhouette",
    "umap_2d",
]

Metric = Literal["cosine", "euclidean"]

REPORT_KEYS = (
    "cos_oiidd",
    "cos_ccr",
    "cos_ccr_rate",
    "cos_silhouette",
    "euc_oiidd_umap",
    "euc_ccr_umap",
    "euc_ccr_rate_umap",
    "euc_silhouette_umap",
)

_EPS = 1e-12
_ROW_BLOCK = 4096  # rows of the (N, S) distance matrix computed at once (bounds peak memory)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _as_matrix(X: ArrayLike) -> np.ndarray:
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinite values")
    return x


def _label_codes(labels: ArrayLike | Sequence[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(unique labels, code per row)``; labels compared as strings, like the evaluate stage."""
    y = np.asarray(labels, dtype=object).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{n} embeddings for {len(y)} labels")
    names, codes = np.unique(y.astype(str), return_inverse=True)
    return names, codes.reshape(-1)


def _check_metric(metric: str) -> None:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


# ----------------------------------------------------------------------------------------------
# Distances to centroids, CCR, silhouette
# ----------------------------------------------------------------------------------------------


def centroid_distances(
    X: ArrayLike,
    labels: ArrayLike | Sequence[Any],
    metric: Metric = "cosine",
    *,
    leave_one_out: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every embedding to its own speaker's centroid and to the nearest other one.

    ``metric="cosine"``: rows are L2-normalised, a centroid is the mean of its speaker's
    normalised vectors renormalised to unit length (as
    :func:`voiceprint.index.faiss_index.speaker_centroids` builds the gallery, so every utterance
    weighs the same whatever its norm), and the distance is ``1 - cos`` (range ``[0, 2]``).
    ``metric="euclidean"``: plain means and the L2 distance (used on UMAP coordinates, where the
    norm carries meaning).

    The own centroid includes the embedding itself, as in the study's definition (see
    docs/design/comparison.md for the bias this implies). With ``leave_one_out=True`` it is instead the centroid of
    the speaker's *other* embeddings, and ``own`` is NaN for speakers with a single embedding.
    Other speakers' centroids are always computed from all their embeddings.

    Returns ``(own, nearest_other)``, both ``(N,)`` float64. Needs at least two speakers.
    """
    from scipy.spatial.distance import cdist

    _check_metric(metric)
    x = _as_matrix(X)
    names, codes = _label_codes(labels, len(x))
    n_spk = len(names)
    if n_spk < 2:
        raise ValueError(f"need at least two speakers for a nearest-other centroid, got {n_spk}")
    if metric == "cosine":
        x = _normalise(x)
    counts = np.bincount(codes, minlength=n_spk).astype(np.float64)
    sums = np.zeros((n_spk, x.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, x)
    means = sums / counts[:, None]
    centroids = _normalise(means) if metric == "cosine" else means

    own = np.empty(len(x))
    other = np.empty(len(x))
    rows = np.arange(len(x))
    for start in range(0, len(x), _ROW_BLOCK):
        sl = slice(start, min(len(x), start + _ROW_BLOCK))
        if metric == "cosine":
            d = 1.0 - x[sl] @ centroids.T
        else:
            # cdist rather than |x|^2 + |c|^2 - 2x.c: no cancellation error for near points.
            d = cdist(x[sl], centroids, metric="euclidean")
        own[sl] = d[rows[sl] - start, codes[sl]]
        d[rows[sl] - start, codes[sl]] = np.inf
        other[sl] = d.min(axis=1)

    if leave_one_out:
        own = _leave_one_out_own(x, codes, sums, counts, metric)
    if metric == "cosine":
        # 1 - cos can come out a hair below 0 (or above 2) through rounding.
        np.clip(own, 0.0, 2.0, out=own)
        np.clip(other, 0.0, 2.0, out=other)
    return own, other


def _leave_one_out_own(
    x: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray, metric: Metric
) -> np.ndarray:
    """Distance of each row to the centroid of its speaker's other rows (NaN for singletons)."""
    n_own = counts[codes]
    rest = sums[codes] - x  # sum over the speaker's other rows
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "cosine":
            # Renormalising the mean = renormalising the sum; the 1/(n-1) factor cancels.
            own = 1.0 - np.einsum("ij,ij->i", x, _normalise(rest))
        else:
            own = np.linalg.norm(x - rest / (n_own - 1.0)[:, None], axis=1)
    own[n_own < 2] = np.nan
    return own


def ccr(own: ArrayLike, nearest_other: ArrayLike) -> tuple[int, float]:
    """Centroid confusion count and rate: embeddings strictly closer to another centroid.

    A tie (equal distances) is not counted: the nearest-centroid rule is ambiguous there, and
    counting ties would make perfectly symmetric toy configurations look confused. NaN distances
    (leave-one-out singletons) are never counted, but are in the denominator of the rate.
    Returns ``(count, count / N)``; the rate is NaN for empty input.
    """
    a = np.asarray(own, dtype=np.float64).reshape(-1)
    b = np.asarray(nearest_other, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"own and nearest_other differ in length: {a.size} vs {b.size}")
    count = int(np.count_nonzero(b < a))
    return count, (count / a.size if a.size else math.nan)


def silhouette(X: ArrayLike, labels: ArrayLike | Sequence[Any], metric: Metric = "cosine") -> float:
    """Mean silhouette coefficient over speaker labels (:func:`sklearn.metrics.silhouette_score`).

    Silhouette needs ``2 <= n_speakers <= N - 1``; outside that range it is undefined and NaN is
    returned with a warning instead of sklearn's exception, so a report over a tiny dataset still
    completes. Singleton speakers contribute 0, as in sklearn.
    """
    from sklearn.metrics import silhouette_score

    _check_metric(metric)
    x = _as_matrix(X)
    names, codes = _label_codes(labels, len(x))
    if not 2 <= len(names) <= len(x) - 1:
        warnings.warn(
            f"silhouette undefined for {len(names)} speaker(s) over {len(x)} embeddings "
            "(needs 2 <= speakers <= embeddings - 1); returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    return float(silhouette_score(x, codes, metric=metric))


# ----------------------------------------------------------------------------------------------
# OIIDD
# ----------------------------------------------------------------------------------------------


def _clean_1d(values: ArrayLike, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    if not finite.all():
        # NaN appears legitimately (leave-one-out singletons); infinities would break the grid.
        v = v[finite]
        log.debug("oiidd: dropped %d non-finite value(s) from %s", int((~finite).sum()), name)
    return v


def _kde_sigma(sample: np.ndarray, bandwidth: str | float) -> float | None:
    """Kernel standard deviation ``gaussian_kde`` would use, or None for a zero-spread sample."""
    from scipy.stats import gaussian_kde

    if np.ptp(sample) <= 0:
        return None
    kde = gaussian_kde(sample, bw_method=bandwidth)
    return float(np.sqrt(kde.covariance[0, 0]))


def kde_pair(
    a: ArrayLike,
    b: ArrayLike,
    *,
    grid: int = 2048,
    bandwidth: str | float = "scott",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-KDE densities of two 1-D samples on one common grid: ``(xs, p_a, p_b)``.

    The grid spans both samples extended by 3 kernel standard deviations on each side, so at
    least ~99.7 % of each density's mass lies on it and the trapezoid integral of each density is
    ~1 (the overlap is not inflated or cut by the grid's ends). ``bandwidth`` is ``gaussian_kde``'s
    ``bw_method`` ("scott", "silverman" or a scalar factor).

    Degenerate samples: ``gaussian_kde`` cannot fit a sample whose values are all equal (singular
    covariance). Such a sample is a point mass; it is smoothed with the *other* sample's kernel
    width, i.e. at the resolution at which the other density is known, which keeps the overlap
    meaningful (a point mass in the middle of the other distribution overlaps it a lot, one far
    away does not). If both samples are constant, each gets a kernel of width ``1e-6 * max(1,
    |value|)``, so the overlap is ~1 for equal values and 0 otherwise. Raises ``ValueError`` when
    a sample has fewer than two finite values; :func:`oiidd` turns that into NaN.
    """
    from scipy.stats import gaussian_kde, norm

    if grid < 16:
        raise ValueError(f"grid must have at least 16 points, got {grid}")
    sa, sb = _clean_1d(a, "a"), _clean_1d(b, "b")
    if sa.size < 2 or sb.size < 2:
        raise ValueError(f"KDE needs at least two finite values per sample (got {sa.size} and {sb.size})")
    sig_a, sig_b = _kde_sigma(sa, bandwidth), _kde_sigma(sb, bandwidth)
    if sig_a is None and sig_b is None:
        tiny = 1e-6 * max(1.0, abs(float(sa[0])), abs(float(sb[0])))
        sig_a = sig_b = tiny
    elif sig_a is None:
        sig_a = sig_b
    elif sig_b is None:
        sig_b = sig_a
    assert sig_a is not None and sig_b is not None

    lo = min(float(sa.min()) - 3.0 * sig_a, float(sb.min()) - 3.0 * sig_b)
    hi = max(float(sa.max()) + 3.0 * sig_a, float(sb.max()) + 3.0 * sig_b)
    xs = np.linspace(lo, hi, grid)

    def density(sample: np.ndarray, sigma: float) -> np.ndarray:
        if np.ptp(sample) > 0:
            return gaussian_kde(sample, bw_method=bandwidth)(xs)
        return norm.pdf(xs, loc=float(sample[0]), scale=sigma)

    return xs, density(sa, sig_a), density(sb, sig_b)


def oiidd(
    a: ArrayLike,
    b: ArrayLike,
    *,
    grid: int = 2048,
    bandwidth: str | float = "scott",
) -> float:
    """Overlap of the densities of two 1-D samples: ``∫ min(p_a, p_b) dx`` in ``[0, 1]``.

    With ``a`` the own-centroid distances and ``b`` the nearest-other-centroid distances this is
    the study's OIIDD: 0 = perfectly separated speakers, 1 = intra- and inter-speaker distances
    indistinguishable. Densities are Gaussian KDEs on a common grid (:func:`kde_pair`), integrated
    with the trapezoid rule; the result is clipped to ``[0, 1]`` (trapezoid and grid-truncation
    error can push it a hair outside).

    Unlike a histogram overlap it does not depend on bin placement, but KDE smoothing widens both
    densities, so for well-separated distributions it slightly overestimates the overlap and for
    identical ones underestimates it (two finite samples from one distribution never coincide);
    with a few thousand values both effects are ~0.01-0.02.

    Returns NaN, with a ``RuntimeWarning`` saying why, when a sample has fewer than two finite
    values (no density can be estimated).
    """
    try:
        xs, pa, pb = kde_pair(a, b, grid=grid, bandwidth=bandwidth)
    except ValueError as exc:
        if "at least two finite values" not in str(exc):
            raise
        warnings.warn(f"OIIDD undefined: {exc}; returning NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return overlap_area(xs, pa, pb)


def overlap_area(xs: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> float:
    """Trapezoid integral of ``min(pa, pb)`` over ``xs``, clipped to ``[0, 1]``."""
    value = float(np.trapezoid(np.minimum(pa, pb), xs))
    return min(1.0, max(0.0, value))


# ----------------------------------------------------------------------------------------------
# UMAP
# ----------------------------------------------------------------------------------------------


def umap_2d(
    X: ArrayLike,
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
) -> np.ndarray:
    """2-D UMAP embedding ``(N, 2)`` float64, reproducible for a given ``seed``.

    ``n_neighbors`` is clamped to ``N - 1`` (UMAP needs fewer neighbours than points). Passing
    ``random_state`` makes umap-learn run single-threaded (its parallel SGD is not deterministic);
    ``n_jobs=1`` is set explicitly so it does not warn about overriding it. The result is
    deterministic for the same seed, data and library versions on one machine; across machines
    or numba versions coordinates may differ slightly, so compare metrics, not coordinates.
    Needs at least 4 points (UMAP's spectral initialisation needs ``N > n_components + 1``).
    """
    import umap  # heavy import (numba); only paid when a UMAP is asked for

    cache_umap_kernels()
    x = _as_matrix(X)
    n = len(x)
    if n < 4:
        raise ValueError(f"UMAP to 2-D needs at least 4 points, got {n}")
    k = max(2, min(int(n_neighbors), n - 1))
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # Small inputs make UMAP warn about its spectral initialisation / graph; not actionable.
        warnings.filterwarnings("ignore", message=".*(spectral|disconnected|n_jobs).*")
        coords = reducer.fit_transform(x)
    return np.asarray(coords, dtype=np.float64)


#: umap-learn's numba kernels that a small fit compiles on every call in a new process, without
#: ``cache=True``: together about 8 s on 2 CPU cores, for a fit that then takes under a second.
UMAP_KERNELS = (
    "umap.utils.fast_knn_indices",
    "umap.umap_.smooth_knn_dist",
    "umap.umap_.compute_membership_strengths",
    "umap.distances.cosine",
)


def cache_umap_kernels() -> list[str]:
    """Turn on numba's on-disk cache for :data:`UMAP_KERNELS`; returns the names now cached.

    Each comparison stage is its own process, so without this every encoder paid the compilation
    again (three times in ``dvc repro``). With it the first process compiles and writes the cache
    (next to umap-learn's sources, or numba's user cache directory when those are read-only) and
    later processes load it. Numba keys the cache on the kernel's source file and the CPU, so a
    umap-learn upgrade recompiles. The layout optimiser is jitted inside each call and is not
    covered (about 0.5 s). Where no cache location is writable, UMAP runs as before.
    """
    import importlib

    cached = []
    for dotted in UMAP_KERNELS:
        module_name, _, attr = dotted.rpartition(".")
        kernel = getattr(importlib.import_module(module_name), attr, None)
        enable = getattr(kernel, "enable_caching", None)
        if enable is None:
            continue
        if getattr(getattr(kernel, "_cache", None), "cache_path", None) is None:
            try:
                enable()
            except RuntimeError as err:  # numba: no writable cache location
                log.debug("UMAP kernel %s not cached: %s", dotted, err)
                continue
        cached.append(dotted)
    return cached


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class ClusterAnalysis:
    """Everything :func:`cluster_analysis` computed.

    ``metrics`` is the flat JSON-able dictionary (keys ``REPORT_KEYS``; ``None`` where a metric
    could not be computed, since JSON has no NaN). The arrays are for plotting: ``cos_own`` /
    ``cos_other`` the cosine distances to own / nearest-other centroid in the native space,
    ``umap_coords`` the ``(N, 2)`` UMAP embedding and ``euc_own`` / ``euc_other`` the Euclidean
    centroid distances on it (all empty when not computed), ``labels`` the speaker labels as
    strings in input order.
    """

    metrics: dict[str, float | int | None]
    labels: np.ndarray
    cos_own: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cos_other: np.ndarray = field(default_factory=lambda: np.zeros(0))
    umap_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    euc_own: np.ndarray = field(default_factory=lambda: np.zeros(0))
    euc_other: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _json_number(value: float | int) -> float | int | None:
    if isinstance(value, int):
        return value
    return float(value) if math.isfinite(value) else None


def _space_metrics(
    x: np.ndarray, labels: np.ndarray, metric: Metric
) -> tuple[np.ndarray, np.ndarray, float, int, float, float]:
    own, other = centroid_distances(x, labels, metric)
    count, rate = ccr(own, other)
    return own, other, oiidd(own, other), count, rate, silhouette(x, labels, metric)


def cluster_analysis(
    X: ArrayLike,
    labels: ArrayLike | Sequence[Any],
    *,
    seed: int = 0,
    with_umap: bool = True,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> ClusterAnalysis:
    """Cosine-space and UMAP-space cluster metrics plus the arrays behind them.

    Native space: cosine distances (:func:`centroid_distances`), OIIDD, CCR and cosine silhouette.
    UMAP space: a 2-D UMAP with cosine input metric (:func:`umap_2d`, ``seed``), then the same
    metrics with Euclidean distance. ``with_umap=False`` skips the (slow: numba compilation, then
    roughly linear in N) UMAP part and leaves its metrics ``None``.

    Never raises for too-small inputs: with fewer than two speakers every metric is ``None``
    (logged), matching the evaluate stage's "report what can be computed" behaviour.
    """
    x = _as_matrix(X)
    names, codes = _label_codes(labels, len(x))
    y = names[codes] if len(x) else np.zeros(0, dtype=str)
    metrics: dict[str, float | int | None] = dict.fromkeys(REPORT_KEYS)
    result = ClusterAnalysis(metrics=metrics, labels=y)
    if len(names) < 2:
        log.warning("cluster metrics skipped: %d speaker(s), need at least two", len(names))
        return result

    own, other, ov, count, rate, sil = _space_metrics(x, y, "cosine")
    result.cos_own, result.cos_other = own, other
    metrics.update(
        cos_oiidd=_json_number(ov),
        cos_ccr=count,
        cos_ccr_rate=_json_number(rate),
        cos_silhouette=_json_number(sil),
    )
    if not with_umap:
        return result
    if len(x) < 4:
        log.warning("UMAP cluster metrics skipped: %d embeddings, need at least 4", len(x))
        return result

    coords = umap_2d(x, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine")
    own, other, ov, count, rate, sil = _space_metrics(coords, y, "euclidean")
    result.umap_coords, result.euc_own, result.euc_other = coords, own, other
    metrics.update(
        euc_oiidd_umap=_json_number(ov),
        euc_ccr_umap=count,
        euc_ccr_rate_umap=_json_number(rate),
        euc_silhouette_umap=_json_number(sil),
    )
    return result


def cluster_report(
    X: ArrayLike,
    labels: ArrayLike | Sequence[Any],
    *,
    seed: int = 0,
    with_umap: bool = True,
) -> dict[str, float | int | None]:
    """Flat JSON-able cluster metrics (``REPORT_KEYS``); see :func:`cluster_analysis`.

    Keys: ``cos_oiidd``, ``cos_ccr``, ``cos_ccr_rate``, ``cos_silhouette`` (native space, cosine)
    and ``euc_oiidd_umap``, ``euc_ccr_umap``, ``euc_ccr_rate_umap``, ``euc_silhouette_umap`` (2-D
    UMAP, Euclidean). Use :func:`cluster_analysis` when the distances / coordinates are needed too.
    """
    return cluster_analysis(X, labels, seed=seed, with_umap=with_umap).metrics

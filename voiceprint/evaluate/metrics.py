"""Speaker-verification and identification metrics in plain numpy.

:func:`eer`, :func:`min_dcf`, :func:`det_curve` and :func:`identification_accuracy`, every operating
point computed at once from sorted scores (``O(n log n)``), with SpeechBrain's conventions; the
differences (normalised minDCF, ties) are in docs/design/evaluation.md#metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["det_curve", "eer", "identification_accuracy", "min_dcf"]


def _split(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sorted target and non-target scores (float64), validated."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    y = y.astype(bool)
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need both target and non-target trials (got {pos.size} target, {neg.size} non-target)")
    return pos, neg


def _rates(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct score used as threshold (ascending)."""
    thresholds = np.unique(np.concatenate([pos, neg]))
    p_miss = np.searchsorted(pos, thresholds, side="right") / pos.size
    p_fa = (neg.size - np.searchsorted(neg, thresholds, side="right")) / neg.size
    return thresholds, p_miss, p_fa


def eer(scores: Any, labels: Any) -> tuple[float, float]:
    """Equal error rate and its threshold.

    ``scores``: one similarity per trial (higher = more likely the same speaker);
    ``labels``: truthy for target (same-speaker) trials. Returns ``(eer, threshold)`` with trials
    accepted when ``score > threshold``. Perfect separation gives 0.0, fully swapped scores 1.0.
    """
    pos, neg = _split(scores, labels)
    thresholds, p_miss, p_fa = _rates(pos, neg)
    gap = np.abs(p_fa - p_miss)
    i = int(np.argmin(gap))  # first minimum = lowest threshold, as SpeechBrain's strict '<' loop
    return float((p_fa[i] + p_miss[i]) / 2.0), float(thresholds[i])


def min_dcf(
    scores: Any,
    labels: Any,
    p_target: float,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    *,
    normalise: bool = True,
) -> tuple[float, float]:
    """Minimum detection cost over all thresholds, and the threshold that reaches it.

    ``C_det(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target)``; normalised
    (the NIST SRE convention, default) by ``min(c_miss * p_target, c_fa * (1 - p_target))``.
    ``normalise=False`` returns the raw cost that SpeechBrain's ``minDCF`` reports. The returned
    threshold is ``-inf`` when accepting every trial is the cheapest choice.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError("c_miss and c_fa must be positive")
    pos, neg = _split(scores, labels)
    thresholds, p_miss, p_fa = _rates(pos, neg)
    # "Accept everything" goes last so it only wins when strictly cheaper (keeps SpeechBrain's
    # threshold on ties).
    thresholds = np.append(thresholds, -np.inf)
    p_miss = np.append(p_miss, 0.0)
    p_fa = np.append(p_fa, 1.0)
    cost = c_miss * p_miss * p_target + c_fa * p_fa * (1.0 - p_target)
    i = int(np.argmin(cost))
    value = float(cost[i])
    if normalise:
        value /= min(c_miss * p_target, c_fa * (1.0 - p_target))
    return value, float(thresholds[i])


def det_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection error trade-off: ``(fpr, fnr, thresholds)``, thresholds ascending.

    The first point is "accept everything" (threshold ``-inf``: fpr 1, fnr 0); each following
    point uses a distinct observed score as threshold (accept when ``score > threshold``), the last
    one rejects everything (fpr 0). ``fpr`` is non-increasing and ``fnr`` non-decreasing.
    """
    pos, neg = _split(scores, labels)
    thresholds, p_miss, p_fa = _rates(pos, neg)
    return (
        np.concatenate([[1.0], p_fa]),
        np.concatenate([[0.0], p_miss]),
        np.concatenate([[-np.inf], thresholds]),
    )


def identification_accuracy(
    ranked_labels: Sequence[Sequence[Any]] | np.ndarray,
    true_labels: Sequence[Any] | np.ndarray,
    ks: Iterable[int] = (1, 5),
) -> dict[str, float]:
    """Closed-set top-k accuracy: ``{"top1": ..., "top5": ...}``.

    ``ranked_labels[i]`` lists the gallery labels returned for query ``i``, best first;
    a query counts as correct at ``k`` when its true label is among the first ``k``. Rows shorter
    than ``k`` (small galleries) are used as they are, so top-k equals top-len there.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    true = list(true_labels)
    ranked = [list(r) for r in ranked_labels]
    if len(ranked) != len(true):
        raise ValueError(f"{len(ranked)} ranked rows for {len(true)} queries")
    if not true:
        raise ValueError("no queries")
    # Position of the true label in each row (len(row) when absent), then one comparison per k.
    first_hit = np.array([row.index(t) if t in row else len(row) for row, t in zip(ranked, true, strict=True)])
    rows_len = np.array([len(row) for row in ranked])
    found = first_hit < rows_len
    return {f"top{k}": float(np.mean(found & (first_hit < k))) for k in ks}

"""Confidence intervals for EER and top-1 by resampling speakers (a speaker-level bootstrap).

:func:`eer_interval` and :func:`accuracy_interval` give one system's interval;
:func:`shared_draw_eers` and :func:`paired_eer_difference` compare systems under one set of draws.
Why speakers and not trials, and how draws weight trials: docs/design/evaluation.md#speaker-level-bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "accuracy_interval",
    "eer_interval",
    "paired_eer_difference",
    "percentile_interval",
    "replicate_eers",
    "shared_draw_eers",
    "speaker_counts",
]

# Replicates are processed in chunks of at most this many (replicate, speaker pair) cells, which
# bounds the memory of one chunk (a few arrays of this many int64/float64) to some tens of MB.
_CHUNK_CELLS = 1_000_000


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval; ``low``/``high`` are None when no replicate was defined."""

    low: float | None
    high: float | None
    replicates: int  # replicates that gave a value (a draw of one speaker has no non-target trial)


def speaker_counts(n_speakers: int, replicates: int, seed: int) -> np.ndarray:
    """``(replicates, n_speakers)`` draw counts: each row sums to ``n_speakers`` (a resample with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_speakers, np.full(n_speakers, 1.0 / n_speakers), size=replicates)


class _PairTrials:
    """The trials grouped by unordered speaker pair, each group's scores as ranks among the distinct scores.

    Every trial of a pair carries the same bootstrap weight, so a replicate's weighted count of
    trials at or below a threshold is, per pair, one binary search into that pair's sorted ranks:
    ``O(pairs x log trials)`` per threshold instead of ``O(trials)``. That is what lets 1,000
    replicates of millions of trials (all pairs of a 40-speaker test set) run in seconds.
    """

    def __init__(self, scores: np.ndarray, speaker_a: np.ndarray, speaker_b: np.ndarray):
        codes, inverse = np.unique(np.concatenate([speaker_a, speaker_b]), return_inverse=True)
        self.n_speakers = len(codes)
        a, b = inverse[: speaker_a.size], inverse[speaker_a.size :]
        low, high = np.minimum(a, b), np.maximum(a, b)
        pairs, group = np.unique(low.astype(np.int64) * self.n_speakers + high, return_inverse=True)
        self.first, self.second = pairs // self.n_speakers, pairs % self.n_speakers
        self.is_target = self.first == self.second
        _, rank = np.unique(scores, return_inverse=True)
        self.n_thresholds = int(rank.max()) + 1  # the distinct scores, ascending: the candidate thresholds
        self.keys = np.sort(group.astype(np.int64) * self.n_thresholds + rank)
        self.group_base = np.arange(len(pairs), dtype=np.int64) * self.n_thresholds
        self.group_start = np.searchsorted(self.keys, self.group_base)
        self.group_size = np.bincount(group, minlength=len(pairs)).astype(np.float64)

    def weights(self, counts: np.ndarray) -> np.ndarray:
        """``(R, pairs)`` weight of one trial of each pair: ``c_a`` for a target pair, ``c_a * c_b`` otherwise."""
        first, second = counts[:, self.first], counts[:, self.second]
        return np.where(self.is_target[None, :], first, first * second)

    def at_or_below(self, ranks: np.ndarray) -> np.ndarray:
        """``(R, pairs)`` trials of each pair whose score rank is ``<= ranks[r]``."""
        queries = self.group_base[None, :] + ranks[:, None]
        return np.searchsorted(self.keys, queries, side="right") - self.group_start[None, :]


def replicate_eers(scores: np.ndarray, speaker_a: np.ndarray, speaker_b: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """EER of each bootstrap replicate, ``counts[r, s]`` being how often speaker ``s`` was drawn.

    Speakers are numbered in the sorted order of their labels. Exactly the convention of
    :func:`voiceprint.evaluate.metrics.eer`: thresholds are the distinct observed scores, the miss rate at
    ``t`` is the target weight at or below it, the false-alarm rate the non-target weight above it,
    and the EER is their mean at the threshold where they are closest (the lowest such). Their
    difference only falls as the threshold rises, so that threshold is found by binary search.
    A replicate without target or without non-target weight gives NaN.
    """
    trials = _PairTrials(np.asarray(scores, dtype=np.float64), np.asarray(speaker_a), np.asarray(speaker_b))
    counts = np.asarray(counts, dtype=np.float64)
    out = np.empty(len(counts))
    step = max(1, _CHUNK_CELLS // len(trials.group_size))
    for start in range(0, len(counts), step):
        out[start : start + step] = _chunk_eers(trials, counts[start : start + step])
    return out


def _chunk_eers(trials: _PairTrials, counts: np.ndarray) -> np.ndarray:
    weights = trials.weights(counts)
    target_weights = np.where(trials.is_target[None, :], weights, 0.0)
    nontarget_weights = weights - target_weights
    n_target = target_weights @ trials.group_size
    n_nontarget = nontarget_weights @ trials.group_size
    valid = (n_target > 0) & (n_nontarget > 0)
    n_target, n_nontarget = np.where(valid, n_target, 1.0), np.where(valid, n_nontarget, 1.0)

    def rates(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        below = trials.at_or_below(ranks)
        p_miss = np.einsum("rg,rg->r", target_weights, below) / n_target
        p_fa = (n_nontarget - np.einsum("rg,rg->r", nontarget_weights, below)) / n_nontarget
        return p_fa, p_miss

    # First rank where false alarms drop below misses (n_thresholds when they never do).
    low = np.zeros(len(counts), dtype=np.int64)
    high = np.full(len(counts), trials.n_thresholds, dtype=np.int64)
    while np.any(low < high):
        mid = (low + high) // 2
        p_fa, p_miss = rates(np.minimum(mid, trials.n_thresholds - 1))
        crossed = (p_fa < p_miss) & (low < high)
        high = np.where(crossed, mid, high)
        low = np.where(~crossed & (low < high), mid + 1, low)
    after = np.minimum(low, trials.n_thresholds - 1)
    before = np.maximum(low - 1, 0)
    fa_after, miss_after = rates(after)
    fa_before, miss_before = rates(before)
    take_before = np.abs(fa_before - miss_before) <= np.abs(fa_after - miss_after)
    value = np.where(take_before, (fa_before + miss_before) / 2.0, (fa_after + miss_after) / 2.0)
    return np.where(valid, value, np.nan)


def percentile_interval(values: np.ndarray, level: float) -> Interval:
    """The central ``level`` percentile interval of the finite replicate values (NaN: undefined replicates)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Interval(None, None, 0)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(low), float(high), int(finite.size))


def eer_interval(
    scores: np.ndarray,
    speaker_a: np.ndarray,
    speaker_b: np.ndarray,
    *,
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Speaker-bootstrap interval of the EER of trials ``(speaker_a[i], speaker_b[i])`` scored ``scores[i]``.

    ``speaker_a``/``speaker_b`` are the speakers of each side (any labels); a trial is a target
    trial when both sides are one speaker. The speakers drawn are those that occur in the trials.
    """
    values = shared_draw_eers({"": scores}, speaker_a, speaker_b, replicates=replicates, seed=seed)[""]
    return percentile_interval(values, level)


def shared_draw_eers(
    score_sets: dict[str, np.ndarray], speaker_a: np.ndarray, speaker_b: np.ndarray, *, replicates: int, seed: int
) -> dict[str, np.ndarray]:
    """Replicate EERs of several systems scored on the same trials, all under one set of speaker draws.

    Each system's replicates are computed once, so any number of intervals (each system's own,
    differences, a mean over seeds) can be taken from them without resampling again. Empty arrays
    when there are no trials or ``replicates`` is 0.
    """
    names = list(score_sets)
    arrays, a, b = _trials([score_sets[n] for n in names], speaker_a, speaker_b)
    if a.size == 0 or replicates <= 0:
        return {n: np.zeros(0) for n in names}
    counts = speaker_counts(len(np.unique(np.concatenate([a, b]))), replicates, seed)
    return {n: replicate_eers(scores, a, b, counts) for n, scores in zip(names, arrays, strict=True)}


def _trials(
    score_sets: list[np.ndarray], speaker_a: np.ndarray, speaker_b: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The score arrays (float64) and both sides' speakers as flat arrays of one length, scores finite."""
    scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in score_sets]
    a, b = np.asarray(speaker_a).reshape(-1), np.asarray(speaker_b).reshape(-1)
    if len({s.size for s in scores} | {a.size, b.size}) != 1:
        sizes = ", ".join(str(s.size) for s in scores)
        raise ValueError(f"scores ({sizes}) and speakers ({a.size}, {b.size}) of the trials differ in length")
    if not all(np.all(np.isfinite(s)) for s in scores):
        raise ValueError("scores contain NaN or infinite values")
    return scores, a, b


def accuracy_interval(
    correct: np.ndarray, speaker: np.ndarray, *, replicates: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Speaker-bootstrap interval of the share of ``correct`` queries (``speaker``: each query's speaker, any labels)."""
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    speaker = np.asarray(speaker).reshape(-1)
    if correct.shape != speaker.shape:
        raise ValueError(f"correct and speaker differ in length: {correct.size} vs {speaker.size}")
    if correct.size == 0 or replicates <= 0:
        return Interval(None, None, 0)
    speaker = np.unique(speaker, return_inverse=True)[1]
    n_speakers = int(speaker.max()) + 1
    hits = np.bincount(speaker, weights=correct, minlength=n_speakers)
    queries = np.bincount(speaker, minlength=n_speakers).astype(np.float64)
    counts = speaker_counts(n_speakers, replicates, seed).astype(np.float64)
    total = counts @ queries
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(total > 0, (counts @ hits) / total, np.nan)
    return percentile_interval(values, level)


def paired_eer_difference(
    scores: np.ndarray,
    reference_scores: np.ndarray,
    speaker_a: np.ndarray,
    speaker_b: np.ndarray,
    *,
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Interval of ``EER(scores) - EER(reference_scores)`` on the same trials, both resampled by the same speaker draws.

    Why paired: two systems scored on the same ten speakers share those speakers' difficulty, so
    their difference varies far less than either EER; two overlapping intervals do not mean the
    difference is unresolved, nor do two disjoint ones that it is large. An interval of the
    difference below zero says ``scores`` has the lower EER on nearly every resample of the speakers.
    """
    eers = shared_draw_eers(
        {"system": scores, "reference": reference_scores}, speaker_a, speaker_b, replicates=replicates, seed=seed
    )
    return percentile_interval(eers["system"] - eers["reference"], level)

"""Speaker-level bootstrap intervals: a replicate is the EER of an explicitly resampled trial list."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from voiceprint.common.schema import l2_normalise
from voiceprint.evaluate.bootstrap import (
    accuracy_interval,
    eer_interval,
    paired_eer_difference,
    replicate_eers,
    speaker_counts,
)
from voiceprint.evaluate.metrics import eer
from voiceprint.evaluate.stage import all_pairs_scores, pair_speakers


def _speakers(
    rng: np.random.Generator, n_speakers: int, per_speaker: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    centres = l2_normalise(rng.normal(size=(n_speakers, 16)))
    x = l2_normalise(np.repeat(centres, per_speaker, axis=0) + noise * rng.normal(size=(n_speakers * per_speaker, 16)))
    return x, np.repeat([f"spk{s:02d}" for s in range(n_speakers)], per_speaker)


def test_unit_weights_give_the_plain_eer_ties_included() -> None:
    rng = np.random.default_rng(0)
    x, labels = _speakers(rng, 6, 5, noise=1.2)
    scores, same = all_pairs_scores(x, labels)
    scores = np.round(scores, 1)  # many exact ties: each distinct score must be one threshold
    a, b = pair_speakers(labels)
    value = replicate_eers(scores, a, b, np.ones((1, 6)))[0]
    assert value == pytest.approx(eer(scores, same)[0], abs=1e-12)
    assert 0.05 < value < 0.5  # the tied, noisy case, not a trivial 0
    # Untied scores, several sizes: the binary search lands on the same operating point as the scan.
    for n_speakers, per_speaker, noise in ((2, 3, 2.0), (7, 4, 0.8), (12, 9, 1.5)):
        x, labels = _speakers(np.random.default_rng(n_speakers), n_speakers, per_speaker, noise)
        scores, same = all_pairs_scores(x, labels)
        a, b = pair_speakers(labels)
        assert replicate_eers(scores, a, b, np.ones((1, n_speakers)))[0] == pytest.approx(
            eer(scores, same)[0], abs=1e-12
        )


def test_a_replicate_equals_the_eer_of_the_resampled_speakers_trials() -> None:
    """Materialise the resample: each drawn copy of a speaker is a separate person with the same
    utterances; trials are all pairs within a copy (targets) and across copies of different
    speakers (non-targets). Its plain EER must equal the weighted one."""
    rng = np.random.default_rng(1)
    x, labels = _speakers(rng, 5, 4, noise=0.9)
    scores, _ = all_pairs_scores(x, labels)
    a, b = pair_speakers(labels)
    sim = x @ x.T
    codes = np.unique(labels, return_inverse=True)[1]
    checked = 0
    draws = speaker_counts(5, 12, seed=3)
    weighted = replicate_eers(scores, a, b, draws)
    for counts, value in zip(draws, weighted, strict=True):
        copies = [(s, k) for s in range(5) for k in range(counts[s])]
        if len({s for s, _ in copies}) < 2:
            assert np.isnan(value)  # one speaker drawn: no non-target trial
            continue
        trial_scores, trial_same = [], []
        for (s1, k1), (s2, k2) in itertools.combinations_with_replacement(copies, 2):
            u1, u2 = np.flatnonzero(codes == s1), np.flatnonzero(codes == s2)
            if (s1, k1) == (s2, k2):
                for i, j in itertools.combinations(u1, 2):
                    trial_scores.append(sim[i, j])
                    trial_same.append(True)
            elif s1 != s2:
                for i in u1:
                    for j in u2:
                        trial_scores.append(sim[i, j])
                        trial_same.append(False)
        expected = eer(np.array(trial_scores), np.array(trial_same))[0]
        assert value == pytest.approx(expected, abs=1e-9)
        checked += 1
    assert checked >= 10


def test_interval_holds_the_estimate_and_narrows_with_more_speakers() -> None:
    widths = []
    for n_speakers in (10, 60):
        x, labels = _speakers(np.random.default_rng(2), n_speakers, 6, noise=1.0)
        scores, same = all_pairs_scores(x, labels)
        a, b = pair_speakers(labels)
        interval = eer_interval(scores, a, b, replicates=400, seed=0)
        point = eer(scores, same)[0]
        assert interval.low < point < interval.high
        assert interval.replicates == 400
        widths.append(interval.high - interval.low)
    assert widths[1] < 0.6 * widths[0]


def test_interval_is_seeded_and_labels_may_be_any_strings() -> None:
    x, labels = _speakers(np.random.default_rng(4), 8, 5, noise=1.0)
    scores, _ = all_pairs_scores(x, labels)
    rows, cols = np.triu_indices(len(labels), k=1)
    one = eer_interval(scores, labels[rows], labels[cols], replicates=200, seed=7)
    again = eer_interval(scores, labels[rows], labels[cols], replicates=200, seed=7)
    other = eer_interval(scores, labels[rows], labels[cols], replicates=200, seed=8)
    assert one == again and one != other


def test_perfect_separation_gives_a_zero_interval_and_empty_input_none() -> None:
    x, labels = _speakers(np.random.default_rng(5), 6, 4, noise=0.01)
    scores, _ = all_pairs_scores(x, labels)
    a, b = pair_speakers(labels)
    interval = eer_interval(scores, a, b, replicates=100)
    assert (interval.low, interval.high) == (0.0, 0.0)
    assert eer_interval(np.zeros(0), np.zeros(0), np.zeros(0)).low is None
    with pytest.raises(ValueError, match="NaN"):
        eer_interval(np.array([np.nan, 0.1]), np.array([0, 0]), np.array([0, 1]))


def test_accuracy_interval_weights_each_speakers_queries_by_its_draws() -> None:
    # Speaker A: 4 queries all right; speaker B: 2 queries, both wrong; C: 3 queries, 1 right.
    speaker = np.array(["A"] * 4 + ["B"] * 2 + ["C"] * 3)
    correct = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0], dtype=bool)
    counts = speaker_counts(3, 300, seed=0)
    expected = (counts @ np.array([4, 0, 1])) / (counts @ np.array([4, 2, 3]))
    tail = np.percentile(expected, [2.5, 97.5])
    interval = accuracy_interval(correct, speaker, replicates=300, seed=0)
    assert (interval.low, interval.high) == pytest.approx(tuple(tail))
    assert interval.low < correct.mean() < interval.high
    perfect = accuracy_interval(np.ones(9, dtype=bool), speaker, replicates=50)
    assert (perfect.low, perfect.high) == (1.0, 1.0)


def test_paired_difference_is_zero_for_one_system_and_resolves_a_clearly_better_one() -> None:
    x, labels = _speakers(np.random.default_rng(6), 10, 8, noise=1.1)
    scores, same = all_pairs_scores(x, labels)
    a, b = pair_speakers(labels)
    itself = paired_eer_difference(scores, scores, a, b, replicates=200)
    assert (itself.low, itself.high) == (0.0, 0.0)
    # A better system: the same trials with the speaker evidence doubled.
    better = scores + 0.5 * same
    interval = paired_eer_difference(better, scores, a, b, replicates=300)
    assert interval.high < 0.0
    assert interval.low <= eer(better, same)[0] - eer(scores, same)[0] <= interval.high
    with pytest.raises(ValueError, match="differ in length"):
        paired_eer_difference(scores[:-1], scores, a, b)


def test_pairing_removes_the_speakers_shared_difficulty() -> None:
    """Two systems that err on the same trials (one a slightly noisier copy of the other): each EER
    moves a lot with the speakers drawn, their difference much less. Unpaired intervals would
    overlap and say nothing; the paired one is several times narrower than either."""
    x, labels = _speakers(np.random.default_rng(7), 10, 8, noise=0.3)
    scores, _ = all_pairs_scores(x, labels)
    a, b = pair_speakers(labels)
    noisier = scores + 0.005 * np.random.default_rng(8).normal(size=scores.size)
    single = eer_interval(scores, a, b, replicates=300)
    paired = paired_eer_difference(noisier, scores, a, b, replicates=300)
    assert (paired.high - paired.low) < 0.3 * (single.high - single.low)

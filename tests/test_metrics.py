"""voiceprint.evaluate.metrics against SpeechBrain's reference EER/minDCF and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speechbrain.utils.metric_stats import EER as sb_eer
from speechbrain.utils.metric_stats import minDCF as sb_min_dcf

from voiceprint.evaluate.metrics import det_curve, eer, identification_accuracy, min_dcf


def _trials(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([pos, neg]).astype(np.float32)
    labels = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    return scores, labels


def _sb(pos: np.ndarray, neg: np.ndarray):
    return torch.from_numpy(pos.astype(np.float32)), torch.from_numpy(neg.astype(np.float32))


def _rates_at(pos: np.ndarray, neg: np.ndarray, t: float) -> tuple[float, float]:
    """(p_miss, p_fa) at threshold t, accept when score > t (float64, independent of the module)."""
    return float(np.mean(pos <= t)), float(np.mean(neg > t))


def _real_looking(rng: np.random.Generator, n_spk: int = 12, per_spk: int = 6, dim: int = 32):
    """All-pairs cosine scores of clustered embeddings, like the evaluate stage produces."""
    centres = rng.normal(size=(n_spk, dim))
    x = np.repeat(centres, per_spk, axis=0) + rng.normal(scale=1.1, size=(n_spk * per_spk, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    spk = np.repeat(np.arange(n_spk), per_spk)
    iu = np.triu_indices(len(x), k=1)
    scores = (x @ x.T)[iu].astype(np.float32)
    same = spk[iu[0]] == spk[iu[1]]
    return scores[same], scores[~same]


# Continuous scores with coprime trial counts: no two operating points tie, so results must be
# identical to SpeechBrain up to float32 rounding.
@pytest.mark.parametrize("seed", range(6))
def test_matches_speechbrain_on_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = rng.normal(0.55, 0.2, 97).astype(np.float32)
    neg = rng.normal(0.1, 0.2, 401).astype(np.float32)
    scores, labels = _trials(pos, neg)

    value, threshold = eer(scores, labels)
    ref_value, ref_threshold = sb_eer(*_sb(pos, neg))
    assert value == pytest.approx(ref_value, abs=1e-6)
    assert threshold == pytest.approx(ref_threshold, abs=1e-7)

    for p in (0.01, 0.05, 0.3):
        raw, raw_t = min_dcf(scores, labels, p, normalise=False)
        ref, ref_t = sb_min_dcf(*_sb(pos, neg), p_target=p)
        assert raw == pytest.approx(ref, abs=1e-6)
        assert raw_t == pytest.approx(ref_t, abs=1e-7)
        norm, _ = min_dcf(scores, labels, p)
        assert norm == pytest.approx(ref / min(p, 1 - p), rel=1e-5)


def test_matches_speechbrain_on_real_looking_scores() -> None:
    pos, neg = _real_looking(np.random.default_rng(7))
    assert len(pos) == 180 and len(neg) == 2376
    scores, labels = _trials(pos, neg)
    value, threshold = eer(scores, labels)
    ref_value, ref_threshold = sb_eer(*_sb(pos, neg))
    step = max(1 / len(pos), 1 / len(neg))
    assert 0.02 < value < 0.4  # overlapping clusters: a non-trivial EER
    assert abs(value - ref_value) <= step
    # Whatever threshold SpeechBrain chose is equally close to the diagonal under our rates.
    ours = _rates_at(pos, neg, threshold)
    theirs = _rates_at(pos, neg, ref_threshold)
    assert abs(ours[1] - ours[0]) == pytest.approx(abs(theirs[1] - theirs[0]), abs=1e-9)
    assert ref_value == pytest.approx(sum(theirs) / 2, abs=1e-6)

    for p in (0.01, 0.05):
        raw, _ = min_dcf(scores, labels, p, normalise=False)
        ref, _ = sb_min_dcf(*_sb(pos, neg), p_target=p)
        assert raw == pytest.approx(ref, abs=1e-6)


def test_ties_with_speechbrain_are_equally_good_operating_points() -> None:
    """Quantised scores tie: SpeechBrain's float32 tie-break may pick the other optimum."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        pos = (rng.integers(3, 10, rng.integers(2, 40)) / 10).astype(np.float32)
        neg = (rng.integers(0, 7, rng.integers(2, 80)) / 10).astype(np.float32)
        scores, labels = _trials(pos, neg)
        value, threshold = eer(scores, labels)
        ref_value, ref_threshold = sb_eer(*_sb(pos, neg))
        ours, theirs = _rates_at(pos, neg, threshold), _rates_at(pos, neg, ref_threshold)
        assert abs(ours[1] - ours[0]) == pytest.approx(abs(theirs[1] - theirs[0]), abs=1e-6)
        assert abs(value - ref_value) <= max(1 / len(pos), 1 / len(neg)) + 1e-9
        for p in (0.01, 0.05):
            raw, _ = min_dcf(scores, labels, p, normalise=False)
            ref, _ = sb_min_dcf(*_sb(pos, neg), p_target=p)
            assert raw == pytest.approx(ref, abs=1e-6)


def test_perfect_separation() -> None:
    scores, labels = _trials(np.array([0.6, 0.7, 0.8, 0.5]), np.array([0.4, 0.3, 0.2, 0.1]))
    value, threshold = eer(scores, labels)
    assert value == 0.0
    assert 0.4 <= threshold < 0.5
    assert min_dcf(scores, labels, 0.01)[0] == 0.0
    assert min_dcf(scores, labels, 0.05)[0] == 0.0


def test_fully_swapped_scores() -> None:
    scores, labels = _trials(np.array([0.1, 0.2, 0.3]), np.array([0.7, 0.8, 0.9, 0.95]))
    assert eer(scores, labels)[0] == 1.0
    # Nothing beats a trivial system: normalised minDCF is exactly 1.
    for p in (0.01, 0.05, 0.5, 0.9):
        assert min_dcf(scores, labels, p)[0] == pytest.approx(1.0)


def test_identical_scores_give_half() -> None:
    scores, labels = _trials(np.full(5, 0.3), np.full(7, 0.3))
    assert eer(scores, labels)[0] == pytest.approx(0.5)


def test_one_error_each_side() -> None:
    # 4 targets, 4 non-targets; one target below the threshold and one non-target above it.
    scores, labels = _trials(np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.75, 0.3, 0.1, 0.0]))
    assert eer(scores, labels) == (pytest.approx(0.25), pytest.approx(0.3))


def test_min_dcf_normalisation() -> None:
    scores, labels = _trials(np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.75, 0.3, 0.1, 0.0]))
    raw, threshold = min_dcf(scores, labels, 0.01, normalise=False)
    # Reject below-or-at 0.75: misses 0.7 and 0.2 (p_miss 1/2), no false alarm: 0.01 * 0.5.
    assert raw == pytest.approx(0.005) and threshold == pytest.approx(0.75)
    assert min_dcf(scores, labels, 0.01)[0] == pytest.approx(0.5)  # / c_def = 0.01
    # p_target 0.5: two optima cost 0.25 (t=0.1: two false alarms; t=0.3: one of each);
    # the lowest threshold wins the tie. c_def = 0.5.
    assert min_dcf(scores, labels, 0.5) == (pytest.approx(0.5), pytest.approx(0.1))
    # Costs scale: c_miss 10 at p 0.01 -> c_def = min(0.1, 0.99).
    raw10, _ = min_dcf(scores, labels, 0.01, c_miss=10, normalise=False)
    assert min_dcf(scores, labels, 0.01, c_miss=10)[0] == pytest.approx(raw10 / 0.1)


def test_min_dcf_considers_accept_all_unlike_speechbrain() -> None:
    """The documented difference: with p_target > 0.5, accepting everything can be optimal."""
    pos, neg = np.array([0.05, 0.9]), np.array([0.5, 0.6])
    scores, labels = _trials(pos, neg)
    raw, threshold = min_dcf(scores, labels, 0.99, normalise=False)
    assert threshold == -np.inf and raw == pytest.approx(0.01)
    assert min_dcf(scores, labels, 0.99)[0] == pytest.approx(1.0)
    ref, _ = sb_min_dcf(*_sb(pos, neg), p_target=0.99)
    assert ref > raw  # SpeechBrain never accepts the lowest score


def test_det_curve_is_monotone_and_ends_at_corners() -> None:
    rng = np.random.default_rng(0)
    scores, labels = _trials(rng.normal(1, 1, 50), rng.normal(0, 1, 80))
    fpr, fnr, thresholds = det_curve(scores, labels)
    assert (fpr[0], fnr[0], fpr[-1], fnr[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(fnr) >= 0)
    assert np.all(np.diff(thresholds) > 0)
    value, _ = eer(scores, labels)
    i = int(np.argmin(np.abs(fpr - fnr)))
    assert (fpr[i] + fnr[i]) / 2 == pytest.approx(value)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="target"):
        eer([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="length"):
        eer([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        eer([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf([0.1, 0.2], [True, False], 1.0)


def test_identification_accuracy() -> None:
    ranked = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"], ["b", "c"]]
    true = ["a", "a", "d", "c"]
    acc = identification_accuracy(ranked, true, ks=(1, 2, 5))
    assert acc == {"top1": 0.25, "top2": 0.75, "top5": 0.75}
    assert identification_accuracy(np.array([["x"], ["y"]]), ["x", "x"])["top1"] == 0.5
    with pytest.raises(ValueError):
        identification_accuracy([["a"]], ["a", "b"])

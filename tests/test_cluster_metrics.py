"""Cluster-separation metrics (OIIDD, CCR, silhouette, UMAP), AS-norm and the comparison plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import silhouette_score

from voiceprint.compare.cluster_metrics import (
    REPORT_KEYS,
    ccr,
    centroid_distances,
    cluster_analysis,
    cluster_report,
    kde_pair,
    oiidd,
    silhouette,
    umap_2d,
)
from voiceprint.compare.plots import plot_oiidd, plot_umap_scatter
from voiceprint.evaluate.metrics import eer
from voiceprint.evaluate.snorm import as_norm, as_norm_pairs, as_norm_scores, cohort_stats, upper_pairs
from voiceprint.evaluate.stage import all_pairs_scores

SQRT1_2 = 1.0 / math.sqrt(2.0)


def _speakers(
    rng: np.random.Generator, n_spk: int = 16, per_spk: int = 20, dim: int = 64, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered synthetic 'speakers': random unit centres plus isotropic noise of norm ~noise."""
    centres = rng.normal(size=(n_spk, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    jitter = rng.normal(scale=noise / math.sqrt(dim), size=(n_spk * per_spk, dim))
    x = np.repeat(centres, per_spk, axis=0) + jitter
    labels = np.repeat([f"spk{i:02d}" for i in range(n_spk)], per_spk)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def separated() -> tuple[np.ndarray, np.ndarray]:
    return _speakers(np.random.default_rng(1))


@pytest.fixture(scope="module")
def separated_analysis(separated):
    x, y = separated
    return cluster_analysis(x, y, seed=0)


# ----------------------------------------------------------------------------------------------
# centroid distances
# ----------------------------------------------------------------------------------------------


def test_centroid_distances_cosine_hand_example() -> None:
    # Speaker A: (3,0) and (0,1) -> normalised first, so the centroid is (1,1)/sqrt2 (the raw mean
    # (1.5, 0.5) would give a different direction). Speaker B: (-1,0) alone.
    x = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    own, other = centroid_distances(x, ["A", "A", "B"], "cosine")
    np.testing.assert_allclose(own, [1 - SQRT1_2, 1 - SQRT1_2, 0.0], atol=1e-12)
    np.testing.assert_allclose(other, [2.0, 1.0, 1 + SQRT1_2], atol=1e-12)


def test_centroid_distances_euclidean_hand_example() -> None:
    # A: (0,0), (2,0) -> centroid (1,0). B: (10,0), (11,0), (3,0) -> centroid (8,0).
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [11.0, 0.0], [3.0, 0.0]])
    y = np.array([0, 0, 1, 1, 1])  # non-string labels work too
    own, other = centroid_distances(x, y, "euclidean")
    np.testing.assert_allclose(own, [1, 1, 2, 3, 5])
    np.testing.assert_allclose(other, [8, 6, 9, 10, 2])
    # Leave-one-out: the own centroid without the point; Euclidean scales by n / (n - 1).
    loo, other_loo = centroid_distances(x, y, "euclidean", leave_one_out=True)
    np.testing.assert_allclose(loo, [2, 2, 3, 4.5, 7.5])
    np.testing.assert_allclose(other_loo, other)


def test_centroid_distances_leave_one_out_cosine_and_singletons() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    own, _ = centroid_distances(x, ["A", "A", "B"], "cosine", leave_one_out=True)
    np.testing.assert_allclose(own[:2], [1.0, 1.0], atol=1e-12)  # orthogonal partner
    assert math.isnan(own[2])  # singleton: no other utterance to form a centroid


def test_centroid_distances_needs_two_speakers() -> None:
    with pytest.raises(ValueError, match="two speakers"):
        centroid_distances(np.eye(3), ["a", "a", "a"], "cosine")
    with pytest.raises(ValueError, match="metric"):
        centroid_distances(np.eye(3), ["a", "b", "a"], "manhattan")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# CCR
# ----------------------------------------------------------------------------------------------


def test_ccr_counts_strict_confusions() -> None:
    count, rate = ccr([1.0, 2.0, 3.0, 0.5], [2.0, 1.0, 3.0, 0.1])  # rows 1 and 3 confused, 2 a tie
    assert (count, rate) == (2, 0.5)
    assert isinstance(count, int)
    assert ccr([], [])[0] == 0 and math.isnan(ccr([], [])[1])


def test_ccr_hand_configuration() -> None:
    # The Euclidean example above: only (3,0), labelled B, lies nearer A's centroid (1,0).
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [11.0, 0.0], [3.0, 0.0]])
    own, other = centroid_distances(x, list("AABBB"), "euclidean")
    assert ccr(own, other) == (1, 0.2)
    # Cosine: B's stray vector points almost along A; two such strays -> 2 confusions.
    xc = np.array([[1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [1, 0.05], [0.95, 0.0]], dtype=float)
    own, other = centroid_distances(xc, list("AABBBB"), "cosine")
    assert ccr(own, other) == (2, 2 / 6)


# ----------------------------------------------------------------------------------------------
# Silhouette
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_silhouette_matches_sklearn(metric: str) -> None:
    x, y = _speakers(np.random.default_rng(3), n_spk=5, per_spk=7, dim=16, noise=1.0)
    ref = silhouette_score(x.astype(np.float64), y, metric=metric)  # computed in float64 here too
    assert silhouette(x, y, metric) == pytest.approx(ref, abs=1e-12)


def test_silhouette_undefined_is_nan() -> None:
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(silhouette(np.eye(4), ["a"] * 4, "cosine"))


# ----------------------------------------------------------------------------------------------
# OIIDD
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [0.0, 2.0, 6.0])
def test_oiidd_matches_known_gaussian_overlap(d: float) -> None:
    """Two unit-variance normals ``d`` apart overlap by ``2 * Phi(-d / 2)``."""
    rng = np.random.default_rng(int(10 * d))
    a = rng.normal(0.0, 1.0, 4000)
    b = rng.normal(d, 1.0, 4000)
    expected = 2.0 * norm.cdf(-d / 2.0)  # 1, 0.3173, 0.0027
    value = oiidd(a, b)
    assert value == pytest.approx(expected, abs=0.03)
    assert oiidd(b, a) == pytest.approx(value, abs=1e-12)  # symmetric


def test_kde_pair_grid_holds_both_densities() -> None:
    rng = np.random.default_rng(0)
    xs, pa, pb = kde_pair(rng.normal(0, 1, 500), rng.normal(5, 0.2, 500))
    assert np.trapezoid(pa, xs) == pytest.approx(1.0, abs=0.01)
    assert np.trapezoid(pb, xs) == pytest.approx(1.0, abs=0.01)


def test_oiidd_degenerate_inputs() -> None:
    rng = np.random.default_rng(0)
    # Identical point masses: 1 up to the Gaussian mass beyond the grid's +-3 sigma (0.27 %).
    assert oiidd([0.3] * 10, [0.3] * 10) == pytest.approx(1.0, abs=0.005)
    assert oiidd([0.3] * 10, [0.7] * 10) == pytest.approx(0.0, abs=1e-9)  # distinct point masses
    wide = rng.normal(0.0, 1.0, 2000)
    inside = oiidd([0.0] * 50, wide)  # point mass in the middle, smoothed at the other's width
    far = oiidd([50.0] * 50, wide)
    assert 0.1 < inside < 1.0 and far < 1e-6
    assert oiidd(wide, [np.nan, 1.0, 2.0]) == pytest.approx(oiidd(wide, [1.0, 2.0]))  # NaN dropped
    with pytest.warns(RuntimeWarning, match="at least two finite values"):
        assert math.isnan(oiidd([1.0], wide))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(oiidd([], []))


# ----------------------------------------------------------------------------------------------
# UMAP and the report
# ----------------------------------------------------------------------------------------------


def test_umap_deterministic_with_seed(separated) -> None:
    x, _ = separated
    sub = x[::4]  # 80 points: fast after numba compiled in the fixture
    first, second = umap_2d(sub, seed=7), umap_2d(sub, seed=7)
    assert first.shape == (len(sub), 2) and first.dtype == np.float64
    np.testing.assert_array_equal(first, second)
    small = umap_2d(x[:10], seed=0, n_neighbors=15)  # n_neighbors clamped to N - 1
    assert small.shape == (10, 2) and np.all(np.isfinite(small))
    with pytest.raises(ValueError, match="at least 4"):
        umap_2d(x[:3])


_KERNEL_STATS = """
import importlib, json
import numpy as np
from voiceprint.compare.cluster_metrics import UMAP_KERNELS, umap_2d
coords = umap_2d(np.random.default_rng(0).normal(size=(40, 16)), seed=0)
stats = {}
for dotted in UMAP_KERNELS:
    module, _, name = dotted.rpartition(".")
    s = getattr(importlib.import_module(module), name).stats
    stats[dotted] = [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
print(json.dumps({"stats": stats, "coords": coords.tolist()}))
"""


def test_umap_kernels_load_from_numba_disk_cache_in_a_new_process() -> None:
    """Each comparison stage is a new process: the second one must load, not recompile, the kernels."""
    import subprocess
    import sys

    runs = [
        json.loads(
            subprocess.run([sys.executable, "-c", _KERNEL_STATS], check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(2)
    ]
    hits_misses = runs[1]["stats"]
    for kernel in (
        "umap.utils.fast_knn_indices",
        "umap.umap_.smooth_knn_dist",
        "umap.umap_.compute_membership_strengths",
    ):
        hits, misses = hits_misses[kernel]
        assert hits >= 1 and misses == 0, (kernel, hits_misses)
    # The cached kernels compute what freshly compiled ones did.
    np.testing.assert_allclose(runs[0]["coords"], runs[1]["coords"], rtol=0, atol=1e-6)


def test_cluster_report_well_separated(separated, separated_analysis) -> None:
    m = separated_analysis.metrics
    assert set(m) == set(REPORT_KEYS)
    json.dumps(m, allow_nan=False)  # JSON-able as it is
    assert m["cos_oiidd"] < 0.05
    assert m["cos_ccr"] == 0 and m["cos_ccr_rate"] == 0.0
    assert m["cos_silhouette"] > 0.5
    assert m["euc_ccr_umap"] == 0
    assert m["euc_silhouette_umap"] > 0.5
    assert m["euc_oiidd_umap"] < 0.2
    a = separated_analysis
    n = len(separated[0])
    assert a.umap_coords.shape == (n, 2)
    assert a.cos_own.shape == a.cos_other.shape == a.euc_own.shape == a.euc_other.shape == (n,)
    assert list(a.labels) == list(separated[1])


def test_cluster_report_random_labels_overlap(separated) -> None:
    x, y = separated
    shuffled = np.random.default_rng(0).permutation(y)
    m = cluster_report(x, shuffled, with_umap=False)
    assert m["cos_oiidd"] > 0.5
    assert m["cos_ccr_rate"] > 0.5
    assert m["cos_silhouette"] < 0.05  # no cluster structure left (random labels go negative)
    assert m["euc_oiidd_umap"] is None  # UMAP skipped -> null, not NaN


def test_cluster_report_single_speaker_is_all_none() -> None:
    m = cluster_report(np.eye(5), ["a"] * 5)
    assert m == dict.fromkeys(REPORT_KEYS)


# ----------------------------------------------------------------------------------------------
# AS-norm
# ----------------------------------------------------------------------------------------------


def _hub_speakers(
    rng: np.random.Generator, u: np.ndarray, n_spk: int, per_spk: int, dim: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Speakers with a speaker-dependent score offset: each centre leans by a random amount
    ``alpha`` towards a shared direction ``u``, so its cosine to *everyone* is raised by a
    speaker-specific amount (a "hub" voice / channel effect)."""
    spk = rng.normal(size=(n_spk, dim)) / math.sqrt(dim)
    alpha = rng.uniform(0.0, 2.0, size=n_spk)
    centres = spk + alpha[:, None] * u
    jitter = rng.normal(scale=1.0 / math.sqrt(dim), size=(n_spk * per_spk, dim))
    x = np.repeat(centres, per_spk, axis=0) + jitter
    return x.astype(np.float32), np.repeat(np.arange(n_spk), per_spk)


def test_as_norm_lowers_eer_with_speaker_offsets() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=64)
    u /= np.linalg.norm(u)
    x, y = _hub_speakers(rng, u, 40, 8)
    cohort, _ = _hub_speakers(rng, u, 300, 2)  # disjoint speakers, same offset mechanism
    raw, same = all_pairs_scores(x, y)
    normed, same_n = as_norm_pairs(x, y, cohort, top_k=100)
    np.testing.assert_array_equal(same_n, same)
    raw_eer, normed_eer = eer(raw, same)[0], eer(normed, same)[0]
    assert raw_eer > 0.04
    assert normed_eer < 0.5 * raw_eer


def test_as_norm_matrix_shape_symmetry_and_formula() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1100, 8)).astype(np.float32)  # > one 1024-row block
    cohort = rng.normal(size=(30, 8)).astype(np.float32)
    s = as_norm_scores(x, cohort, top_k=5)
    assert s.shape == (1100, 1100) and s.dtype == np.float32
    np.testing.assert_array_equal(s, s.T)

    # Reference: plain numpy, full sort.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    top = np.sort(xn @ cn.T, axis=1)[:, -5:].astype(np.float64)
    mu, sd = top.mean(1), top.std(1)
    raw = (xn @ xn.T).astype(np.float64)
    ref = 0.5 * ((raw - mu[:, None]) / sd[:, None] + (raw - mu[None, :]) / sd[None, :])
    np.testing.assert_allclose(s, ref, rtol=1e-4, atol=1e-4)
    # Rectangular enroll x test version agrees with the square one.
    np.testing.assert_allclose(as_norm(x[:7], x[1050:], cohort, top_k=5), s[:7, 1050:], rtol=1e-5, atol=1e-5)


def test_as_norm_top_k_clamped_to_cohort() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 8))
    cohort = rng.normal(size=(9, 8))
    np.testing.assert_array_equal(as_norm_scores(x, cohort, top_k=10_000), as_norm_scores(x, cohort, top_k=9))
    mu, sd = cohort_stats(x, cohort, top_k=10_000)  # = all cohort scores: plain S-norm statistics
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    np.testing.assert_allclose(mu, (xn @ cn.T).mean(1), atol=1e-6)
    np.testing.assert_allclose(sd, (xn @ cn.T).std(1), atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        as_norm_scores(x, cohort, top_k=1)
    with pytest.raises(ValueError, match="cohort"):
        as_norm_scores(x, cohort[:1])


def test_upper_pairs_matches_all_pairs_order() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1030, 6)).astype(np.float32)  # crosses the 1024-row block boundary
    y = rng.integers(0, 40, size=1030)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, same = upper_pairs(xn @ xn.T, y)
    ref_scores, ref_same = all_pairs_scores(x, y)
    np.testing.assert_array_equal(same, ref_same)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_written_atomically(tmp_path: Path, separated, separated_analysis) -> None:
    a = separated_analysis
    out = tmp_path / "plots"
    p1 = plot_umap_scatter(a.umap_coords, a.labels, out / "umap.png", "synthetic, 16 speakers")
    p2 = plot_oiidd(a.cos_own, a.cos_other, out / "oiidd_cos.png", "synthetic", "cosine distance")
    many = np.random.default_rng(0).normal(size=(60, 2))
    p3 = plot_umap_scatter(many, np.arange(60) % 30, out / "many.png", "30 speakers, no legend")
    p4 = plot_oiidd([1.0], [2.0, 3.0], out / "undefined.png", "too few", "cosine distance")
    for p in (p1, p2, p3, p4):
        assert p.exists() and _is_png(p)
    assert sorted(f.name for f in out.iterdir()) == ["many.png", "oiidd_cos.png", "umap.png", "undefined.png"]

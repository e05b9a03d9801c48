"""``evaluate.trials``: all pairs, a seeded balanced sample, or a trial file in the VoxCeleb format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.test_evaluate import _params, write_utterances
from voiceprint.common.layout import Layout
from voiceprint.common.schema import l2_normalise
from voiceprint.config import BackendParams, ConfigError, EvaluateParams, Params, load_params
from voiceprint.evaluate import trials as trials_module
from voiceprint.evaluate.bootstrap import eer_interval
from voiceprint.evaluate.metrics import eer, min_dcf
from voiceprint.evaluate.snorm import as_norm_pairs, as_norm_scores, as_norm_trials, cohort_stats
from voiceprint.evaluate.stage import all_pairs_scores, evaluate, pair_speakers
from voiceprint.evaluate.trials import sample_trials, score_trials

RAW = BackendParams(centre="none", lda_dim=None)  # the raw cosine, as the hand-made scores here


def _table(layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eval utterance ids, speakers and L2-normalised embeddings in the stage's order, and the train embeddings."""
    table = pq.read_table(layout.utterance_embeddings)
    table = table.sort_by([("speaker_id", "ascending"), ("utterance_id", "ascending")])
    ids = np.asarray(table.column("utterance_id").to_pylist()).astype(str)
    speakers = np.asarray(table.column("speaker_id").to_pylist()).astype(str)
    is_eval = np.asarray(table.column("split").to_pylist()) == "eval"
    x = l2_normalise(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32))
    return ids[is_eval], speakers[is_eval], x[is_eval], x[~is_eval]


def _flat(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Index of the unordered pair {i, j} in the all-pairs order (strict upper triangle, row-major)."""
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    return lo * n - lo * (lo + 1) // 2 + (hi - lo - 1)


def _write_trials(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# the streaming scorer
# ----------------------------------------------------------------------------------------------


def test_streaming_scorer_equals_the_dense_computation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) * rng.uniform(0.1, 5.0, size=(300, 1))  # unnormalised rows
    left, right = rng.integers(0, 300, size=5000), rng.integers(0, 300, size=5000)
    dense = (l2_normalise(x) @ l2_normalise(x).T)[left, right]
    for block in (7, 4096, 100_000):  # several blocks with a ragged last one, exactly one block, one partial
        got = score_trials(x, left, right, block=block)
        assert got.dtype == np.float32 and got.shape == (5000,)
        np.testing.assert_allclose(got, dense, atol=1e-6)

    cohort = rng.normal(size=(80, 16))
    normed = as_norm_trials(x, left, right, cohort, top_k=20, block=333)
    np.testing.assert_allclose(normed, as_norm_scores(x, cohort, top_k=20)[left, right], atol=1e-4)


def test_in_place_normalisation_gives_the_same_bits_as_the_copy() -> None:
    x = np.random.default_rng(4).normal(size=(50, 16)).astype(np.float32) * 3
    copy = l2_normalise(x)
    same = l2_normalise(x, out=x)
    assert same is x and np.array_equal(same, copy)


def test_cohort_statistics_hold_a_bounded_block_of_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cohort too large for 1,024 rows of scores within the budget is scored in fewer rows at a
    time: memory stays flat as the cohort grows, and the statistics do not change."""
    from voiceprint.evaluate import snorm

    assert snorm._cohort_block(100) == 1024  # small cohorts: the usual block
    assert snorm._cohort_block(1_000_000) == 16  # VoxCeleb-size cohorts: a floor of 16 rows
    rng = np.random.default_rng(3)
    x, cohort = rng.normal(size=(200, 16)), rng.normal(size=(500, 16))
    mu, sd = cohort_stats(x, cohort, top_k=50)
    monkeypatch.setattr(snorm, "_COHORT_SCORES", 17 * 500)  # 17 rows per block: a ragged last block
    assert snorm._cohort_block(500) == 17
    mu_b, sd_b = cohort_stats(x, cohort, top_k=50)
    np.testing.assert_allclose(mu_b, mu, atol=1e-6)
    np.testing.assert_allclose(sd_b, sd, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# trial files
# ----------------------------------------------------------------------------------------------


def test_trial_file_gives_the_all_pairs_metrics_of_the_same_pairs(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path / "project")
    write_utterances(layout, np.random.default_rng(11), n_train=6, n_eval=9, per_speaker=7, noise=0.8)
    ids, speakers, x, cohort = _table(layout)
    n = len(ids)
    rng = np.random.default_rng(12)
    i, j = np.triu_indices(n, k=1)
    keep = np.sort(rng.choice(len(i), size=len(i) * 3 // 5, replace=False))
    i, j = i[keep], j[keep]
    swap = rng.random(len(i)) < 0.5  # either side first: a trial file's pairs are ordered
    i, j = np.where(swap, j, i), np.where(swap, i, j)

    def name(k: int, form: int) -> str:  # the accepted forms, mixed
        return [f"{speakers[k]}/{ids[k]}.wav", f"{speakers[k]}/{ids[k]}", f"{ids[k]}.flac", str(ids[k])][form]

    forms = rng.integers(0, 4, size=(len(i), 2))
    lines = [
        f"{int(speakers[a] == speakers[b])} {name(a, fa)} {name(b, fb)}"
        for a, b, (fa, fb) in zip(i.tolist(), j.tolist(), forms.tolist(), strict=True)
    ]
    (layout.root / "lists").mkdir()
    _write_trials(layout.root / "lists" / "trials.txt", lines)

    # Raw cosine, to match the hand-made scores below (the back-end has tests of its own).
    params = _params(trials="lists/trials.txt", backend=RAW)  # relative: resolved against the project root
    metrics = evaluate(layout, params, out_metrics=tmp_path / "m.json", out_plots=tmp_path / "plots")

    scores, same = all_pairs_scores(x, speakers)
    flat = _flat(i, j, n)
    sub_scores, sub_same = scores[flat], same[flat]
    assert metrics["trials"] == "lists/trials.txt"
    assert json.loads((tmp_path / "m.json").read_text())["trials"] == "lists/trials.txt"
    assert metrics["n_trials"] == len(lines) < n * (n - 1) // 2
    assert metrics["n_target"] == int(sub_same.sum()) and metrics["n_nontarget"] == int((~sub_same).sum())
    assert 0.05 < metrics["eer"] < 0.45
    assert metrics["eer"] == pytest.approx(eer(sub_scores, sub_same)[0], abs=1e-12)
    assert metrics["eer"] != pytest.approx(eer(scores, same)[0], abs=1e-9)  # a different list, another number
    assert metrics["min_dcf_p0.01"] == pytest.approx(min_dcf(sub_scores, sub_same, 0.01)[0], abs=1e-9)

    # The bootstrap resamples the speakers of these trials only.
    a, b = pair_speakers(speakers)
    interval = eer_interval(sub_scores, a[flat], b[flat], replicates=1000, seed=0)
    assert (metrics["eer_ci_low"], metrics["eer_ci_high"]) == pytest.approx((interval.low, interval.high), abs=1e-12)

    # AS-norm is applied to the same trials.
    normed, normed_same = as_norm_pairs(x, speakers, cohort, top_k=params.evaluate.snorm_top_k)
    assert metrics["eer_snorm"] == pytest.approx(eer(normed[flat], normed_same[flat])[0], abs=1e-12)
    assert (tmp_path / "plots" / "det.png").exists() and (tmp_path / "plots" / "det.csv").read_text().count("\n") > 2


def test_real_project_trial_file_over_all_pairs_reproduces_all_pairs(
    small_project: Layout, excerpts_dir: Path, tmp_path: Path
) -> None:
    """On the real pipeline's embeddings, a trial file listing every pair (named as in the corpus) gives the
    all-pairs numbers: manifest paths relative to the split folder, and LibriSpeech's speaker/chapter/id."""
    manifest = pq.read_table(small_project.manifest).to_pylist()
    eval_rows = [r for r in manifest if r["split"] == "eval"]
    assert len(eval_rows) >= 10
    split_root = excerpts_dir / "test-other"  # the eval split's folder, read in place
    names = {}
    for k, row in enumerate(eval_rows):
        relative = small_project.resolve(row["path"]).relative_to(split_root).as_posix()  # <speaker>/<id>.flac
        speaker, chapter, _ = row["utterance_id"].split("-")
        librispeech = f"{speaker}/{chapter}/{row['utterance_id']}.flac"  # as inside test-other/
        names[row["utterance_id"]] = relative if k % 2 else librispeech
    lines = []
    for a in range(len(eval_rows)):
        for b in range(a + 1, len(eval_rows)):
            ra, rb = eval_rows[b], eval_rows[a]  # reversed order, on purpose
            label = int(ra["speaker_id"] == rb["speaker_id"])
            lines.append(f"{label} {names[ra['utterance_id']]} {names[rb['utterance_id']]}")
    trial_file = _write_trials(tmp_path / "all.txt", lines[::-1])

    default = load_params(small_project.params, {"index.use_gpu": "never", "evaluate.bootstrap": 200})
    listed = load_params(
        small_project.params, {"index.use_gpu": "never", "evaluate.bootstrap": 200, "evaluate.trials": str(trial_file)}
    )
    want = evaluate(small_project, default, out_metrics=tmp_path / "a.json", out_plots=tmp_path / "a")
    got = evaluate(small_project, listed, out_metrics=tmp_path / "b.json", out_plots=tmp_path / "b")
    assert want["trials"] == "all-pairs" and got["trials"] == str(trial_file)
    for key in ("n_trials", "n_target", "n_nontarget", "eer", "min_dcf_p0.01", "eer_ci_low", "eer_ci_high"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert want["eer"] is not None


@pytest.fixture()
def small_eval(tmp_path: Path) -> Layout:
    """Eval speakers eval006..eval009 (5 utterances each, ids like eval006-000), train speakers train000..005."""
    layout = Layout.at(tmp_path / "project")
    write_utterances(layout, np.random.default_rng(3), n_train=6, n_eval=4, per_speaker=5, noise=0.5)
    return layout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 eval006/eval006-000.wav", r"trials\.txt:3: malformed trial '1 eval006/eval006-000\.wav'"),
        ("2 eval006-000 eval006-001", r"trials\.txt:3: malformed trial '2 eval006-000 eval006-001'"),
        ("1 eval006-000 eval006/nobody.wav", r"trials\.txt:3: utterance 'eval006/nobody\.wav' is not in the eval"),
        ("0 eval006-000 train001/train001-002.wav", r"trials\.txt:3: utterance 'train001/train001-002\.wav' .*train"),
        ("0 eval006-000 eval006/eval006-003.wav", r"trials\.txt:3: label 0 \(different speakers\) contradicts"),
        ("1 eval006-000 eval007-000", r"trials\.txt:3: label 1 \(same speaker\) contradicts.*'eval006' and 'eval007'"),
        ("1 eval006-000 eval006/eval006-000.wav", r"trials\.txt:3: trial of utterance 'eval006-000' with itself"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_and_line(
    small_eval: Layout, tmp_path: Path, line: str, message: str
) -> None:
    good = ["1 eval006/eval006-000.wav eval006/eval006-001.wav", "", line, "0 eval006-002 eval008-004"]
    path = _write_trials(tmp_path / "trials.txt", good)
    with pytest.raises(ConfigError, match=message):
        evaluate(small_eval, _params(trials=str(path)))
    assert not small_eval.metrics.exists()  # refused before anything is written


def test_unknown_utterances_are_counted(small_eval: Layout, tmp_path: Path) -> None:
    lines = ["1 eval006-000 eval006-001", *(f"0 eval006-000 ghost{k}.wav" for k in range(8))]
    path = _write_trials(tmp_path / "trials.txt", lines)
    with pytest.raises(
        ConfigError, match=r"trials\.txt:2: utterance 'ghost0\.wav'.*7 more lines.*line 3 'ghost1\.wav'"
    ):
        evaluate(small_eval, _params(trials=str(path)))


def test_missing_or_empty_trial_file_is_an_error(small_eval: Layout, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trial file .*nowhere\.txt does not exist"):
        evaluate(small_eval, _params(trials="nowhere.txt"))
    empty = _write_trials(tmp_path / "empty.txt", [""])
    with pytest.raises(ConfigError, match=r"empty\.txt: no trials"):
        evaluate(small_eval, _params(trials=str(empty)))


# ----------------------------------------------------------------------------------------------
# sampled:N
# ----------------------------------------------------------------------------------------------


def _speakers() -> np.ndarray:
    rng = np.random.default_rng(5)
    labels = np.repeat([f"s{k:02d}" for k in range(12)], rng.integers(10, 30, size=12))
    return labels[rng.permutation(len(labels))]  # not grouped by speaker


def test_sampled_trials_are_reproducible_balanced_and_distinct() -> None:
    speakers = _speakers()
    first = sample_trials(speakers, 1001, seed=7)
    again = sample_trials(speakers, 1001, seed=7)
    other = sample_trials(speakers, 1001, seed=8)
    assert first.left is not None and first.right is not None and first.same is not None
    assert np.array_equal(first.left, again.left) and np.array_equal(first.right, again.right)
    assert np.array_equal(first.same, again.same)
    assert not (np.array_equal(first.left, other.left) and np.array_equal(first.right, other.right))

    assert len(first) == 1001 and first.spec == "sampled:1001"
    assert int(first.same.sum()) == 500 and int((~first.same).sum()) == 501
    assert np.array_equal(first.same, speakers[first.left] == speakers[first.right])
    assert not np.any(first.left == first.right)
    pairs = set(zip(np.minimum(first.left, first.right).tolist(), np.maximum(first.left, first.right).tolist()))
    assert len(pairs) == 1001


def test_sampling_every_target_pair_gives_exactly_the_target_pairs() -> None:
    speakers = _speakers()
    i, j = np.triu_indices(len(speakers), k=1)
    target = speakers[i] == speakers[j]
    n_target = int(target.sum())
    drawn = sample_trials(speakers, 2 * n_target, seed=1)
    assert drawn.left is not None and drawn.right is not None and drawn.same is not None
    got = {tuple(sorted(p)) for p in zip(drawn.left[drawn.same].tolist(), drawn.right[drawn.same].tolist())}
    assert got == set(zip(i[target].tolist(), j[target].tolist()))

    assert len(sample_trials(speakers, 2 * n_target + 1, seed=1)) == 2 * n_target + 1  # the most there can be
    with pytest.raises(
        ConfigError,
        match=rf"sampled:{2 * n_target + 2} asks for {n_target + 1:,} same-speaker.*"
        rf"at most sampled:{2 * n_target + 1} ",
    ):
        sample_trials(speakers, 2 * n_target + 2, seed=1)


def test_sampled_trials_in_the_stage(small_eval: Layout, tmp_path: Path) -> None:
    ids, speakers, x, _ = _table(small_eval)
    a = evaluate(small_eval, _params(trials="sampled:60", seed=3, backend=RAW), out_metrics=tmp_path / "a.json")
    b = evaluate(small_eval, _params(trials="sampled:60", seed=3, backend=RAW), out_metrics=tmp_path / "b.json")
    c = evaluate(small_eval, _params(trials="sampled:60", seed=4, backend=RAW), out_metrics=tmp_path / "c.json")
    assert a == b and a["trials"] == "sampled:60"
    assert (a["n_trials"], a["n_target"], a["n_nontarget"]) == (60, 30, 30)
    assert a["eer_ci_low"] is not None and a["eer_snorm"] is not None
    drawn = sample_trials(speakers, 60, seed=3)
    assert drawn.left is not None and drawn.right is not None and drawn.same is not None
    assert a["eer"] == pytest.approx(eer(score_trials(x, drawn.left, drawn.right), drawn.same)[0], abs=1e-12)
    assert c["eer_threshold"] != a["eer_threshold"]  # other trials


# ----------------------------------------------------------------------------------------------
# all-pairs and its size limit
# ----------------------------------------------------------------------------------------------


def test_all_pairs_above_the_limit_is_refused_with_a_suggestion(
    small_eval: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_trials = 20 * 19 // 2
    monkeypatch.setattr(trials_module, "MAX_ALL_PAIRS_TRIALS", n_trials)
    assert evaluate(small_eval, _params())["n_trials"] == n_trials  # at the limit: allowed

    monkeypatch.setattr(trials_module, "MAX_ALL_PAIRS_TRIALS", n_trials - 1)
    small_eval.metrics.unlink()
    with pytest.raises(ConfigError, match=r"all-pairs over 20 eval utterances is 190 trials.*sampled:N.*trial file"):
        evaluate(small_eval, _params())
    assert not small_eval.metrics.exists()
    with pytest.raises(ConfigError, match=r"sampled:1000 is more than"):
        evaluate(small_eval, _params(trials="sampled:1000"))


def test_default_is_all_pairs(small_eval: Layout) -> None:
    metrics = evaluate(small_eval, _params())
    assert metrics["trials"] == "all-pairs" and metrics["n_trials"] == 190
    assert json.loads(small_eval.metrics.read_text())["trials"] == "all-pairs"


# ----------------------------------------------------------------------------------------------
# the parameter
# ----------------------------------------------------------------------------------------------


def test_the_parameter_accepts_three_forms(tmp_path: Path, params_writer) -> None:
    assert Params().evaluate.trials == "all-pairs"
    assert EvaluateParams(trials="sampled:37611").trials == "sampled:37611"
    assert EvaluateParams(trials="lists/voxceleb1_o.txt").trials == "lists/voxceleb1_o.txt"
    for bad in ("sampled:", "sampled:1", "sampled:10k", "sampled:-5", "  "):
        with pytest.raises(ValueError, match="evaluate.trials"):
            EvaluateParams(trials=bad)

    with pytest.raises(ConfigError, match=r"evaluate\.trials: sampled:N needs|evaluate\.trials 'sampled:x'"):
        load_params(params_writer(tmp_path, {"evaluate.trials": "sampled:x"}))
    with pytest.raises(ConfigError, match=r"evaluate\.trials: trial file .*all-pair does not exist"):
        load_params(params_writer(tmp_path, {"evaluate.trials": "all-pair"}))  # a typo fails before any stage
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "o.txt").write_text("1 a b\n")
    assert load_params(params_writer(tmp_path, {"evaluate.trials": "lists/o.txt"})).evaluate.trials == "lists/o.txt"

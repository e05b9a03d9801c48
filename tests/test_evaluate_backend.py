"""The scoring back-end (evaluate.backend): in-domain centring and LDA, each checked on vectors whose
structure is known, so that what it should remove and what it should keep are both measurable."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_params
from voiceprint.common.schema import l2_normalise
from voiceprint.config import BackendParams, ConfigError, load_params
from voiceprint.evaluate.backend import _speaker_sample, fit_backend, in_domain_train
from voiceprint.evaluate.metrics import eer
from voiceprint.evaluate.stage import all_pairs_scores

DIM = 32


def _speakers(
    rng: np.random.Generator, n_speakers: int, per_speaker: int, prefix: str, *, scale: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``per_speaker`` noisy copies of a random unit direction per speaker, and their labels; each copy
    scaled by a factor in ``[1 - scale, 1 + scale]`` (embedding norms vary with the utterance)."""
    n = n_speakers * per_speaker
    centres = l2_normalise(rng.normal(size=(n_speakers, DIM)))
    x = np.repeat(centres, per_speaker, axis=0) + 0.6 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    x *= rng.uniform(1 - scale, 1 + scale, size=(n, 1))
    labels = np.repeat([f"{prefix}{i:03d}" for i in range(n_speakers)], per_speaker)
    return x.astype(np.float32), labels


def _eer(x: np.ndarray, labels: np.ndarray) -> float:
    scores, same = all_pairs_scores(l2_normalise(x), labels)
    return float(eer(scores, same)[0])


def test_centring_removes_the_offset_of_the_sets_own_domain():
    """Two domains, each a large offset shared by all its speakers: the cosine then mostly measures how
    far each utterance sits from the offset, which its norm decides, not its speaker. Centring on the
    domain's own train split removes the offset; the other domain's mean must not be used."""
    rng = np.random.default_rng(0)
    offset_b = 3.0 * l2_normalise(rng.normal(size=(1, DIM)))[0]
    offset_a = -offset_b  # another domain, far away: pooled with it, b's mean is about zero
    train_a, spk_train_a = _speakers(rng, 20, 4, "a", scale=0.7)
    train_b, spk_train_b = _speakers(rng, 20, 4, "btrain", scale=0.7)
    eval_b, spk_eval_b = _speakers(rng, 10, 6, "beval", scale=0.7)
    x = l2_normalise(np.concatenate([train_a + offset_a, train_b + offset_b, eval_b + offset_b]))
    speakers = np.concatenate([spk_train_a, spk_train_b, spk_eval_b])
    split = np.array(["train"] * (len(train_a) + len(train_b)) + ["eval"] * len(eval_b))
    ids = np.array([f"u{i}" for i in range(len(x))])
    sources = {u: ("a" if i < len(train_a) else "b") for i, u in enumerate(ids)}

    fit_rows = in_domain_train(ids, split, sources, "b")
    assert fit_rows.sum() == len(train_b) and not fit_rows[: len(train_a)].any() and not fit_rows[split == "eval"].any()
    backend = fit_backend(x, speakers, fit_rows, BackendParams(centre="source", lda_dim=None), name="b")
    np.testing.assert_allclose(backend.mean, x[fit_rows].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert backend.stats() == {
        "backend_centre_utterances": len(train_b),
        "backend_lda_dim": None,
        "backend_lda_speakers": 0,
    }

    is_eval = split == "eval"
    raw, centred = _eer(x[is_eval], speakers[is_eval]), _eer(backend.apply(x)[is_eval], speakers[is_eval])
    assert raw > 0.05 and centred < 0.5 * raw, (raw, centred)
    pooled = fit_backend(x, speakers, split == "train", BackendParams(centre="source", lda_dim=None))
    assert _eer(pooled.apply(x)[is_eval], speakers[is_eval]) > centred  # the wrong domain's mean helps less

    none = fit_backend(x, speakers, fit_rows, BackendParams(centre="none", lda_dim=None))
    assert none.apply(x) is x and none.stats()["backend_centre_utterances"] == 0


def test_lda_projects_out_a_nuisance_shared_by_every_speaker():
    """Each utterance carries a strong nuisance (say, the word said) in 8 fixed dimensions, shared across
    speakers: LDA fitted on other speakers learns that it says nothing about the speaker and drops it."""
    rng = np.random.default_rng(1)
    nuisance_basis = l2_normalise(rng.normal(size=(8, DIM)))

    def with_nuisance(n_speakers: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x, labels = _speakers(rng, n_speakers, 6, prefix)
        return x + 0.6 * rng.normal(size=(len(x), 8)).astype(np.float32) @ nuisance_basis, labels

    train, spk_train = with_nuisance(60, "t")
    test, spk_test = with_nuisance(20, "e")
    x = l2_normalise(np.concatenate([train, test]))
    speakers = np.concatenate([spk_train, spk_test])
    fit_rows = np.arange(len(x)) < len(train)

    centred = fit_backend(x, speakers, fit_rows, BackendParams(lda_dim=None))
    lda = fit_backend(x, speakers, fit_rows, BackendParams(lda_dim=16))
    assert lda.projection.shape == (DIM, 16) and lda.stats()["backend_lda_speakers"] == 60
    out = lda.apply(x)
    assert out.shape == (len(x), 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    before, after = _eer(centred.apply(x)[~fit_rows], spk_test), _eer(out[~fit_rows], spk_test)
    assert before > 0.1 and after < 0.25 * before, (before, after)


def test_lda_needs_more_speakers_than_dimensions(caplog):
    """One utterance per speaker (the LibriSpeech excerpts' train split) or too few speakers: no LDA, said."""
    rng = np.random.default_rng(2)
    x, speakers = _speakers(rng, 40, 1, "s")
    x2, speakers2 = _speakers(rng, 10, 3, "m")
    x, speakers = l2_normalise(np.concatenate([x, x2])), np.concatenate([speakers, speakers2])
    with caplog.at_level(logging.WARNING, logger="voiceprint.evaluate.backend"):
        backend = fit_backend(x, speakers, np.ones(len(x), bool), BackendParams(lda_dim=10), name="libri")
    assert backend.projection is None and backend.mean is not None
    assert backend.stats() == {"backend_centre_utterances": 70, "backend_lda_dim": None, "backend_lda_speakers": 0}
    assert "set libri: LDA to 10 dimensions needs 11 speakers" in caplog.text and "it has 10 and 32" in caplog.text

    with caplog.at_level(logging.WARNING, logger="voiceprint.evaluate.backend"):
        empty = fit_backend(x, speakers, np.zeros(len(x), bool), BackendParams(lda_dim=None), name="tel")
    assert empty.mean is None and empty.apply(x) is x
    assert "set tel: its source has no train-split utterances to centre on; scored uncentred" in caplog.text


def test_apply_in_place_overwrites_the_matrix_with_the_same_values():
    rng = np.random.default_rng(3)
    x, speakers = _speakers(rng, 12, 3, "s")
    x = l2_normalise(x)
    backend = fit_backend(x, speakers, np.ones(len(x), bool), BackendParams(lda_dim=None))
    copy = backend.apply(x)
    assert copy is not x
    same = backend.apply(x, in_place=True)
    assert same is x
    np.testing.assert_array_equal(same, copy)


def test_lda_sample_keeps_whole_speakers_within_the_limit():
    codes = np.repeat(np.arange(50), np.arange(1, 51))  # speaker k has k + 1 utterances
    rows = np.arange(len(codes)) + 1000
    kept_rows, kept_codes = _speaker_sample(rows, codes, 300, seed=0)
    assert len(kept_rows) <= 300 and len(kept_rows) > 200
    for code in np.unique(kept_codes):  # every kept speaker has all of its utterances
        assert (kept_codes == code).sum() == code + 1
    np.testing.assert_array_equal(kept_rows - 1000, np.flatnonzero(np.isin(codes, np.unique(kept_codes))))
    again = _speaker_sample(rows, codes, 300, seed=0)
    np.testing.assert_array_equal(again[0], kept_rows)


def test_backend_keys_are_validated(tmp_path: Path):
    write_params(tmp_path, {"evaluate.backend.lda_dim": 0})
    with pytest.raises(ConfigError, match="evaluate.backend.lda_dim"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"evaluate.backend.centre": "global"})
    with pytest.raises(ConfigError, match="evaluate.backend.centre"):
        load_params(tmp_path / "params.yaml")
    write_params(tmp_path, {"evaluate.backend.lda_dim": None, "evaluate.backend.centre": "none"})
    backend = load_params(tmp_path / "params.yaml").evaluate.backend
    assert backend.lda_dim is None and backend.centre == "none"

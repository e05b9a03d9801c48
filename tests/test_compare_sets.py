"""The comparison on two sources (LibriSpeech excerpts, Speech Commands): a table per eval set, each on its own trials."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_params
from voiceprint.common.layout import Layout
from voiceprint.compare.stage import compare_dir, paired_differences, set_trials
from voiceprint.config import eval_sets, load_params
from voiceprint.stages import run_stage

SETS = ["librispeech", "speech-commands"]
ENCODERS = ["a", "b"]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, excerpts_dir: Path) -> Layout:
    root = tmp_path_factory.mktemp("two-sources")
    write_params(
        root,
        {
            "data.mirror": str(excerpts_dir.parent),
            "data.max_speakers": 4,
            "data.max_utterances_per_speaker": 5,
            # One-second words: VAD rejects about a third of them (no 0.5 s segment), hence 10 a speaker.
            "data.sources": {
                "speech-commands": {"dataset": "speech-commands", "max_speakers": 4, "max_utterances_per_speaker": 10}
            },
            "model.channels": 32,
            "model.steps": 30,
            "model.batch_size": 8,
            "evaluate.enroll_per_speaker": 2,
            # LibriSpeech keeps evaluate.trials (all pairs); Speech Commands gets 50 sampled trials.
            "evaluate.sets": {"librispeech": None, "speech-commands": "sampled:50"},
            # LDA fits where the source's train split has 3+ speakers with 2+ utterances: Speech Commands
            # here, not the LibriSpeech excerpts (one train utterance a speaker).
            "evaluate.backend.lda_dim": 2,
            # The pipeline's own model twice: both items copy the embed stage's tables (no re-embedding).
            "compare.encoders": {"a": "ecapa", "b": "ecapa"},
        },
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        for stage in ("prepare", "segment", "model", "embed"):
            run_stage(stage, root)
        for name in ENCODERS:
            run_stage("compare-encoder", root, item=name)
        run_stage("compare", root)
    finally:
        mp.undo()
    return Layout.at(root)


def _eval_by_source(layout: Layout, name: str) -> tuple[set[str], set[str], set[str]]:
    """Eval speakers and utterances of source ``name`` by the manifest that encoder ``a`` embedded
    (the segment stage rejects clips without speech), and the manifest's eval speakers of it."""
    manifest = pq.read_table(layout.manifest).to_pylist()
    embedded = set(pq.read_table(compare_dir(layout, "a") / "utterances.parquet").column("utterance_id").to_pylist())
    rows = [r for r in manifest if r["split"] == "eval" and r["source"] == name]
    kept = [r for r in rows if r["utterance_id"] in embedded]
    return {r["speaker_id"] for r in kept}, {r["utterance_id"] for r in kept}, {r["speaker_id"] for r in rows}


def test_a_block_per_set_with_its_own_eval_speakers(two_sources: Layout):
    table = json.loads((two_sources.root / "compare.json").read_text())
    assert sorted(table["sets"]) == SETS and list(table["encoders"]) == ENCODERS
    for name in SETS:
        speakers, utterances, in_manifest = _eval_by_source(two_sources, name)
        assert len(speakers) >= 2 and speakers <= in_manifest, name
        for encoder in ENCODERS:
            m = table["sets"][name][encoder]
            assert m["n_eval_speakers"] == len(speakers) and m["n_eval_utterances"] == len(utterances), (name, encoder)
            assert 0 <= m["eer"] <= 1 and m["cos_ccr"] <= m["n_eval_utterances"], (name, encoder)
            stored = json.loads((compare_dir(two_sources, encoder) / "metrics.json").read_text())
            assert sorted(stored["sets"]) == SETS and stored["sets"][name]["eer"] == m["eer"]
            for plot in ("det.png", "umap.png", "oiidd_cos.png"):
                assert (compare_dir(two_sources, encoder) / "plots" / name / plot).is_file(), (name, encoder, plot)
    # Two sets, two sets of speakers: each block counts its own source's speakers only.
    assert not _eval_by_source(two_sources, SETS[0])[2] & _eval_by_source(two_sources, SETS[1])[2]

    text = (two_sources.root / "compare.md").read_text()
    assert text.index("\n## librispeech\n") < text.index("\n## speech-commands\n")
    assert sum(line.startswith(("| a |", "| b |")) for line in text.splitlines()) == 4
    assert "50 trials (sampled:50)" in text


def test_paired_differences_score_the_sets_own_trials(two_sources: Layout):
    table = json.loads((two_sources.root / "compare.json").read_text())
    commands = table["sets"]["speech-commands"]
    assert commands["a"]["trials"] == "sampled:50" and commands["a"]["n_trials"] == 50
    assert commands["a"]["eer_diff_reference"] == "a" and commands["a"]["eer_diff_n_trials"] == 50
    assert commands["b"]["eer_diff_n_trials"] == 50 and commands["b"]["eer_diff"] == pytest.approx(0.0, abs=1e-9)
    libri = table["sets"]["librispeech"]["b"]
    n = libri["n_eval_utterances"]
    assert libri["trials"] == "all-pairs" and libri["eer_diff_n_trials"] == libri["n_trials"] == n * (n - 1) // 2

    # The paired trials are evaluate's: the reference scored on them has the set's EER.
    from voiceprint.evaluate.metrics import eer
    from voiceprint.evaluate.stage import eval_sources

    params = load_params(two_sources.params)
    cfg = eval_sets(params)["speech-commands"]
    sources = eval_sources(two_sources)
    tables = {e: compare_dir(two_sources, e) / "utterances.parquet" for e in ENCODERS}
    scored, same, _, trials = set_trials(
        tables,
        cfg.trials,
        root=two_sources.root,
        seed=cfg.seed,
        sources=sources,
        eval_set="speech-commands",
        backend=cfg.backend,
    )
    assert len(trials) == 50 and same.sum() == 25
    assert float(eer(scored["a"], same)[0]) == pytest.approx(commands["a"]["eer"], abs=1e-6)
    raw, _, _, _ = set_trials(
        tables, cfg.trials, root=two_sources.root, seed=cfg.seed, sources=sources, eval_set="speech-commands"
    )
    assert not np.allclose(raw["a"], scored["a"])  # the set was scored centred, not on the raw cosine


def test_each_set_is_centred_on_its_own_sources_train_split(two_sources: Layout):
    """The back-end of a set is fitted on its source's train utterances only; LDA where they allow it."""
    table = json.loads((two_sources.root / "compare.json").read_text())
    manifest = pq.read_table(two_sources.manifest).to_pylist()
    embedded = set(
        pq.read_table(compare_dir(two_sources, "a") / "utterances.parquet").column("utterance_id").to_pylist()
    )
    for name in SETS:
        train = [r for r in manifest if r["split"] == "train" and r["source"] == name and r["utterance_id"] in embedded]
        m = table["sets"][name]["a"]
        assert m["backend_centre_utterances"] == len(train) > 0, name
        text = (two_sources.root / "compare.md").read_text()
        if name == "librispeech":
            assert m["backend_lda_dim"] is None and m["backend_lda_speakers"] == 0, name
            assert f"scored centred on {len(train)} train utterances of the source." in text
        else:
            speakers = Counter(r["speaker_id"] for r in train)
            assert (
                m["backend_lda_dim"] == 2 and m["backend_lda_speakers"] == sum(n >= 2 for n in speakers.values()) >= 3
            )
            assert (
                f"scored centred on {len(train)} train utterances of the source, then LDA to 2 dimensions "
                f"({m['backend_lda_speakers']} speakers)." in text
            )


def test_a_worse_encoder_is_measured_on_the_same_fifty_trials(two_sources: Layout, tmp_path: Path):
    """A noisier copy of the embeddings: its paired EER difference on speech-commands is the difference of
    the EERs evaluate gives both on that set's 50 trials."""
    from voiceprint.evaluate.stage import eval_sources, evaluate

    reference = compare_dir(two_sources, "a") / "utterances.parquet"
    source = pq.read_table(reference)
    vectors = np.asarray(source.column("embedding").to_pylist(), dtype=np.float32)
    rng = np.random.default_rng(0)
    noisy = vectors + 1.5 * rng.normal(size=vectors.shape).astype(np.float32) * np.linalg.norm(
        vectors, axis=1, keepdims=True
    ) / np.sqrt(vectors.shape[1])
    column = pa.FixedSizeListArray.from_arrays(pa.array(noisy.reshape(-1), pa.float32()), vectors.shape[1])
    index = source.schema.get_field_index("embedding")
    worse = tmp_path / "utterances.parquet"
    pq.write_table(
        source.set_column(index, source.schema.field(index), column.cast(source.schema.field(index).type)), worse
    )

    params = load_params(two_sources.params)
    cfg = eval_sets(params)["speech-commands"]
    differences = paired_differences(
        {"a": reference, "worse": worse},
        cfg,
        root=two_sources.root,
        sources=eval_sources(two_sources),
        eval_set="speech-commands",
    )
    set_params = params.model_copy(update={"evaluate": cfg})
    eers = {
        name: evaluate(
            two_sources,
            set_params,
            out_plots=tmp_path / name,
            embeddings=path,
            eval_source="speech-commands",
            write_metrics=False,
        )
        for name, path in (("a", reference), ("worse", worse))
    }
    assert eers["a"]["n_trials"] == eers["worse"]["n_trials"] == differences["worse"]["eer_diff_n_trials"] == 50
    assert differences["worse"]["eer_diff"] == pytest.approx(eers["worse"]["eer"] - eers["a"]["eer"], abs=1e-6)
    assert differences["worse"]["eer_diff"] != 0.0
    low, high = differences["worse"]["eer_diff_ci_low"], differences["worse"]["eer_diff_ci_high"]
    assert low <= differences["worse"]["eer_diff"] <= high


def test_mlflow_metric_names_carry_the_set(two_sources: Layout):
    from mlflow.tracking import MlflowClient

    table = json.loads((two_sources.root / "compare.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{two_sources.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("voiceprint")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith("compare:")]
    assert sorted(r.data.tags["encoder"] for r in children) == ENCODERS
    for child in children:
        encoder = child.data.tags["encoder"]
        for name in SETS:
            m = table["sets"][name][encoder]
            assert child.data.metrics[f"{name}/eer"] == pytest.approx(m["eer"]), (encoder, name)
            assert child.data.metrics[f"{name}/n_trials"] == m["n_trials"]

"""The evaluate stage on several eval sets: one metrics.json block per set, each scored on its own
trials against the shared train split, and MLflow metric names that carry the set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_evaluate import DIM, write_speakers
from voiceprint.common.layout import Layout
from voiceprint.common.schema import MANIFEST, l2_normalise
from voiceprint.config import Params, SourceParams
from voiceprint.evaluate.stage import evaluate_sets


def _two_sources(layout: Layout, rng: np.random.Generator) -> None:
    """6 train speakers, then 5 eval speakers of source ``clean`` (tight clusters) and 7 of ``noisy``
    (clusters as wide as the gaps between them); the manifest names each utterance's source."""
    spreads = [0.05] * 6 + [0.05] * 5 + [1.2] * 7
    vectors = [l2_normalise(rng.normal(size=DIM) + s * rng.normal(size=(6, DIM))) for s in spreads]
    write_speakers(layout, vectors, n_train=6)
    utterances = pq.read_table(layout.utterance_embeddings).to_pylist()
    rows = []
    for r in utterances:
        speaker = int(r["speaker_id"][-3:])
        source = "clean" if r["split"] == "train" or speaker < 11 else "noisy"
        rows.append(
            {
                **{f.name: None for f in MANIFEST},
                "utterance_id": r["utterance_id"],
                "speaker_id": r["speaker_id"],
                "split": r["split"],
                "source": source,
            }
        )
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST), layout.manifest)


def _params(sets: dict[str, str | None] | None) -> Params:
    params = Params()
    params.data.name = "clean"
    params.data.sources = {"noisy": SourceParams(dataset="folder", path="unused")}
    params.index.use_gpu = "never"
    params.evaluate.sets = sets
    params.evaluate.bootstrap = 50
    return params


def test_one_block_per_set_each_on_its_own_utterances(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _two_sources(layout, np.random.default_rng(0))
    metrics = evaluate_sets(layout, _params(None))
    assert list(metrics) == ["clean", "noisy"]
    assert json.loads(layout.metrics.read_text()) == json.loads(json.dumps(metrics))
    clean, noisy = metrics["clean"], metrics["noisy"]
    assert (clean["n_eval_speakers"], clean["n_eval_utterances"]) == (5, 30)
    assert (noisy["n_eval_speakers"], noisy["n_eval_utterances"]) == (7, 42)
    assert clean["n_trials"] == 30 * 29 // 2 and noisy["n_trials"] == 42 * 41 // 2
    assert clean["eer"] == 0.0 and noisy["eer"] > 0.05  # the sets are scored apart
    # both sets share the train split: the same distractors and cohort
    assert clean["n_train_speakers"] == noisy["n_train_speakers"] == 6
    for name in metrics:
        assert {p.name for p in (layout.plots / name).iterdir()} == {"det.csv", "det.png", "scores.png"}


def test_reading_the_embeddings_in_small_batches_changes_no_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate reads the embeddings a few rows at a time into a matrix sorted by speaker; batches
    that split speakers and sets across reads must give the same metrics.json bytes as one read."""
    from voiceprint.evaluate import stage

    layout = Layout(tmp_path)
    _two_sources(layout, np.random.default_rng(2))
    sets = {"noisy": "sampled:200", "clean": None}
    evaluate_sets(layout, _params(sets), out_metrics=tmp_path / "whole.json")
    monkeypatch.setattr(stage, "_READ_ROWS", 5)  # 108 rows: 22 reads, the last one short
    evaluate_sets(layout, _params(sets), out_metrics=tmp_path / "batched.json")
    assert (tmp_path / "whole.json").read_bytes() == (tmp_path / "batched.json").read_bytes()
    assert json.loads((tmp_path / "batched.json").read_text())["noisy"]["n_eval_utterances"] == 42


def test_each_set_has_its_own_trials(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _two_sources(layout, np.random.default_rng(1))
    metrics = evaluate_sets(layout, _params({"noisy": "sampled:200", "clean": None}))
    assert list(metrics) == ["noisy", "clean"]  # in evaluate.sets order
    assert metrics["noisy"]["trials"] == "sampled:200" and metrics["noisy"]["n_trials"] == 200
    assert metrics["clean"]["trials"] == "all-pairs" and metrics["clean"]["n_trials"] == 435


def test_a_set_missing_from_the_manifest_is_an_error(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _two_sources(layout, np.random.default_rng(2))
    params = _params(None)
    params.data.sources = {"noisy": SourceParams(dataset="folder", path="x"), "other": SourceParams()}
    with pytest.raises(ValueError, match=r"no utterances of source 'other'.*sources there: \['clean', 'noisy'\]"):
        evaluate_sets(layout, params)


def test_mlflow_metric_names_carry_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from voiceprint.evaluate.stage import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = Layout(tmp_path)
    _two_sources(layout, np.random.default_rng(3))
    result = run(_params(None), layout)
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert logged.data.metrics["clean/eer"] == 0.0
    assert logged.data.metrics["noisy/eer"] == pytest.approx(result["noisy"]["eer"])
    assert "eer" not in logged.data.metrics


def test_results_prints_one_row_per_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from voiceprint.cli import main

    layout = Layout.at(tmp_path)
    _two_sources(layout, np.random.default_rng(0))
    metrics = evaluate_sets(layout, _params({"noisy": "sampled:200", "clean": None}))
    assert main(["--project", str(tmp_path), "results"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    by_set = {r[0].removeprefix("| "): r for r in rows[2:]}
    assert sorted(by_set) == ["clean", "noisy"]
    noisy = by_set["noisy"]
    assert noisy[1].startswith(f"{100 * metrics['noisy']['eer']:.2f} (")
    assert noisy[5] == "200 (sampled:200)" and noisy[6] == "7 |"


def test_results_without_metrics_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from voiceprint.cli import main

    assert main(["--project", str(tmp_path), "results"]) == 2
    assert "run the evaluate stage first" in capsys.readouterr().err

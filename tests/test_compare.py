"""The comparison stage on a small real subset: per-encoder metrics, the table, MLflow nesting."""

from __future__ import annotations

import json

import pytest

from voiceprint.common.layout import Layout
from voiceprint.compare.stage import COLUMNS, compare_dir, compare_stats_path
from voiceprint.config import set_dotted
from voiceprint.stages import run_stage


@pytest.fixture(scope="module")
def compared(small_project: Layout, monkeypatch_module) -> Layout:
    import yaml

    raw = yaml.safe_load(small_project.params.read_text())
    # The pipeline's own model twice: once by name, once through the generic SpeechBrain-dir spec.
    set_dotted(raw, "compare.encoders", {"ecapa": "ecapa", "sbdir": f"speechbrain:{small_project.model_dir}"})
    small_project.params.write_text(yaml.safe_dump(raw))
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{small_project.root / 'mlflow-compare.db'}")
    for name in ("ecapa", "sbdir"):
        run_stage("compare-encoder", small_project.root, item=name)
    run_stage("compare", small_project.root)
    return small_project


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_each_encoder_gets_metrics_and_plots(compared: Layout):
    table = json.loads((compared.root / "compare.json").read_text())
    # One eval set (the primary source, librispeech); one row per encoder in it.
    assert list(table) == ["encoders", "sets"] and list(table["sets"]) == ["librispeech"]
    assert list(table["encoders"]) == ["ecapa", "sbdir"]
    rows = table["sets"]["librispeech"]
    assert list(rows) == ["ecapa", "sbdir"]
    for name, m in rows.items():
        own = table["encoders"][name]
        out = compare_dir(compared, name)
        stored = json.loads((out / "metrics.json").read_text())
        assert stored["sets"]["librispeech"] == {k: v for k, v in m.items() if not k.startswith("eer_diff")}
        assert {k: v for k, v in stored.items() if k != "sets"} == own
        for plot in ("umap.png", "oiidd_cos.png", "oiidd_euc_umap.png", "det.png"):
            assert (out / "plots" / "librispeech" / plot).stat().st_size > 1000, (name, plot)
        assert 0 <= m["eer"] <= 1 and 0 <= m["eer_snorm"] <= 1 and 0 <= m["cos_oiidd"] <= 1
        assert (
            0 <= m["cos_ccr"] <= m["n_eval_utterances"] and m["cos_ccr_rate"] == m["cos_ccr"] / m["n_eval_utterances"]
        )
        assert -1 <= m["cos_silhouette"] <= 1 and -1 <= m["euc_silhouette_umap"] <= 1
        assert own["num_parameters"] > 0 and m["embedding_dim"] == 192
        # Timings stay out of compare.json (a DVC metric in dvc.lock): they go to data/compare_stats/.
        assert not {"realtime_factor", "embed_seconds", "device"} & (set(m) | set(own) | set(stored)), name
        assert json.loads(compare_stats_path(compared, name).read_text())["realtime_factor"] > 0
    # The pipeline's own model copies the embed stage's tables; the SpeechBrain-dir spec embeds afresh.
    assert table["encoders"]["ecapa"]["embeddings_reused_from"] == "data/embeddings"
    assert table["encoders"]["sbdir"]["embeddings_reused_from"] is None
    # Same weights through two loaders: the same embeddings, hence the same verification numbers.
    assert table["encoders"]["ecapa"]["model_id"] == table["encoders"]["sbdir"]["model_id"]
    assert rows["ecapa"]["eer"] == pytest.approx(rows["sbdir"]["eer"], abs=1e-6)
    # Paired against the first encoder on the same trials: the same weights differ by nothing.
    assert rows["ecapa"]["eer_diff_reference"] == "ecapa" and "eer_diff" not in rows["ecapa"]
    assert rows["sbdir"]["eer_diff"] == pytest.approx(0.0, abs=1e-6)
    assert rows["sbdir"]["eer_diff_ci_low"] <= 0.0 <= rows["sbdir"]["eer_diff_ci_high"]
    assert rows["sbdir"]["eer_diff_n_trials"] == rows["sbdir"]["n_trials"]
    assert rows["ecapa"]["eer_ci_low"] <= rows["ecapa"]["eer"] <= rows["ecapa"]["eer_ci_high"]


def test_markdown_table_has_every_column(compared: Layout):
    text = (compared.root / "compare.md").read_text()
    assert "\n## librispeech\n" in text
    header = next(line for line in text.splitlines() if line.startswith("| encoder"))
    assert all(h in header for _, h, _ in COLUMNS)
    assert sum(line.startswith("| ecapa") or line.startswith("| sbdir") for line in text.splitlines()) == 2


def test_mlflow_parent_with_child_per_encoder(compared: Layout):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{compared.root / 'mlflow-compare.db'}")
    exp = client.get_experiment_by_name("voiceprint")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "compare"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["encoder"] for r in children) == ["ecapa", "sbdir"]
    table = json.loads((compared.root / "compare.json").read_text())
    for child in children:
        name = child.data.tags["encoder"]
        # The set's metrics carry its name; the encoder's own keys do not.
        assert child.data.metrics["librispeech/eer"] == pytest.approx(table["sets"]["librispeech"][name]["eer"])
        assert "eer" not in child.data.metrics
        assert child.data.metrics["num_parameters"] == table["encoders"][name]["num_parameters"]
        assert child.data.tags["model_id"] == table["encoders"][name]["model_id"]
        assert any(a.path == "plots" for a in client.list_artifacts(child.info.run_id))


def test_a_mixture_of_experts_embeds_again_to_report_its_gates(small_project: Layout, tmp_path, monkeypatch):
    """The gate statistics are measured while the mixture embeds, so its comparison item cannot
    copy the embed stage's tables as a single ECAPA's does: it embeds the segments again."""
    import shutil

    import yaml

    from voiceprint.embed.stage import EMBED_SUMMARY

    root = tmp_path / "moe-project"
    shutil.copytree(small_project.root, root, ignore=shutil.ignore_patterns("mlflow*", "compare*", ".stage.lock"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in {
        "model.arch": "moe",
        "model.moe.experts": 2,
        "model.moe.expert_channels": 16,
        "model.moe.gate_channels": 8,
        "model.steps": 10,
        "model.register_model": False,
        "compare.encoders": {"ecapa": "ecapa"},
    }.items():
        set_dotted(raw, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for stage in ("model", "embed"):
        run_stage(stage, root)
    m = run_stage("compare-encoder", root, item="ecapa")

    layout = Layout.at(root)
    utterances = json.loads((layout.embeddings / EMBED_SUMMARY).read_text())["utterances"]
    assert m["model_id"].startswith("ecapa-moe2x16-") and m["embeddings_reused_from"] is None
    # embed.utterance: file, every file under utterance_chunk_s: the gate saw one input per utterance,
    # and the comparison wrote no segment table of its own (its metrics are all utterance-level).
    assert m["gate_experts"] == 2 and m["gate_inputs"] == utterances
    assert list(m["sets"]) == ["librispeech"]
    assert not (root / "data" / "compare" / "ecapa" / "segments.parquet").exists()
    assert sum(m["gate_importance"]) == pytest.approx(1.0, abs=1e-3)
    run_stage("compare", root)
    assert "## Mixture-of-experts gate usage" in (root / "compare.md").read_text()

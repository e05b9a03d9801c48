"""The model stage's MLflow run: training curves per step, and the trained encoder registered as a
pyfunc that maps 16 kHz waveforms to the same L2-normalised embeddings as the encoder itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_train import _one_thread, _segments_table

from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.config import Params
from voiceprint.encoders.ecapa import load_ecapa
from voiceprint.tracking.pyfunc_model import REGISTERED_MODEL
from voiceprint.training import stage as model_stage

MODEL = dict(channels=32, steps=12, batch_size=8, crop_s=1.0, seed=0, device="cpu", log_every=5, checkpoint_every=0)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, excerpts_dir: Path) -> dict:
    """The model stage run once against a temporary SQLite tracking store, with registration on."""
    layout = Layout.at(tmp_path_factory.mktemp("project"))
    write_table(layout.segments, _segments_table(excerpts_dir))
    uri = f"sqlite:///{layout.root / 'mlflow-test.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        with _one_thread():
            summary = model_stage.run(Params.model_validate({"model": MODEL}), layout)
    return dict(layout=layout, uri=uri, summary=summary)


@pytest.fixture()
def tracking(staged: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """mlflow's process-wide default store (models:/ URIs) pointed at the test's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", staged["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", staged["uri"])
    return staged["uri"]


def test_model_stage_logs_training_curves_and_summary(staged: dict) -> None:
    from mlflow.tracking import MlflowClient

    summary = staged["summary"]
    client = MlflowClient(tracking_uri=staged["uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "model"
    assert run.data.tags["model_id"] == summary["model_id"] and run.data.tags["stage"] == "model"
    assert run.data.params["model.aam.scale"] == "30.0" and run.data.params["model.steps"] == "12"
    for name in ("train_loss", "train_acc", "lr"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [5, 10, 12], name  # every log_every steps, and the last
        assert all(np.isfinite(m.value) for m in history)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # cosine decay after warm-up
    assert run.data.metrics["loss_final"] == pytest.approx(summary["loss_final"])
    assert "train_accuracy" not in run.data.metrics  # one accuracy metric: the train_acc curve
    assert "training.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # a model-training experiment: the MLflow 3 UI opens it on its runs, not on GenAI traces
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "voiceprint"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_model_is_a_logged_model_with_a_signature(staged: dict, tracking: str) -> None:
    """The encoder is a logged model of the run (the experiment's Models page) with its schema."""
    import mlflow
    from mlflow.tracking import MlflowClient

    summary = staged["summary"]
    client = MlflowClient(tracking_uri=tracking)
    run = client.get_run(summary["mlflow_run_id"])
    outputs = run.outputs.model_outputs if run.outputs else []
    assert len(outputs) == 1
    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.name == "model" and logged.source_run_id == run.info.run_id
    assert logged.experiment_id == run.info.experiment_id and logged.tags["model_id"] == summary["model_id"]
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.model_id for m in found] == [logged.model_id]

    info = mlflow.models.get_model_info(f"models:/{REGISTERED_MODEL}/1")
    assert info.signature is not None and info.saved_input_example_info is not None
    inputs, outputs_schema = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs == [{"type": "array", "items": {"type": "double"}, "name": "waveform", "required": True}]
    assert outputs_schema[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 192)}  # model.lin_neurons


def test_registered_pyfunc_embeds_like_the_encoder(
    staged: dict, tracking: str, excerpts_dir: Path, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    summary, layout = staged["summary"], staged["layout"]
    assert summary["registered_model"] == f"models:/{REGISTERED_MODEL}/1"
    version = MlflowClient(tracking_uri=tracking).get_model_version(REGISTERED_MODEL, "1")
    assert version.tags["model_id"] == summary["model_id"] and version.run_id == summary["mlflow_run_id"]

    # The direct encoder first, then the project's model directory moved away: the registered model
    # must carry its own copy of the checkpoint.
    encoder = load_ecapa(layout.model_dir)
    shutil.move(layout.model_dir, tmp_path / "moved")
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1")
    # It also carries the code it imports (voiceprint.tracking and voiceprint.encoders), so it
    # loads where the project is not installed.
    stored = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL}/1"))
    code = stored / "code" / "voiceprint"
    assert (code / "tracking" / "pyfunc_model.py").is_file() and (code / "encoders" / "loader.py").is_file()

    files = sorted((excerpts_dir / "test-other").glob("*/*.flac"))
    long, short = audio.load(files[0], 0.0, 3.0), audio.load(files[1], 0.5, 2.0)
    got = model.predict(pd.DataFrame({"waveform": [long.tolist(), short.tolist(), long.tolist()]}))
    assert isinstance(got, np.ndarray) and got.shape == (3, encoder.dim) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for row, wav in zip(got, (long, short, long)):
        want = F.normalize(encoder.embed(torch.from_numpy(wav)[None], torch.ones(1)), dim=1)[0].numpy()
        assert float(row @ want) > 0.9999
    # One waveform as {"waveform": samples} (MLflow's dict form of a one-row request).
    assert np.allclose(model.predict({"waveform": long.tolist()}), got[[0]], atol=1e-6)


def test_registered_pyfunc_rejects_unusable_input(staged: dict, tracking: str) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1")
    with pytest.raises(Exception, match="at least 1600"):
        model.predict(pd.DataFrame({"waveform": [[0.0] * 800]}))
    with pytest.raises(Exception, match="NaN"):
        model.predict(pd.DataFrame({"waveform": [[float("nan")] * 16000]}))
    # the signature names the input: MLflow rejects a request without it before predict runs
    with pytest.raises(Exception, match=r"missing inputs \['waveform'\]"):
        model.predict(pd.DataFrame({"a": [[0.0] * 1000], "b": [[0.0] * 1000]}))


def test_model_stage_without_tracking_touches_no_store(
    tmp_path: Path, excerpts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout.at(tmp_path)
    write_table(layout.segments, _segments_table(excerpts_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params.model_validate({"model": {**MODEL, "steps": 2, "log_every": 0, "register_model": False}})
    with _one_thread():
        summary = model_stage.run(params, layout)
    assert "mlflow_run_id" not in summary and summary["model_id"].startswith("ecapa-c32-")
    assert not (layout.root / "mlflow.db").exists() and not (layout.root / "mlartifacts").exists()

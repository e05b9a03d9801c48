"""MLflow logging of an evaluation or a training run, with the lineage needed to reproduce it.

:func:`log_evaluation` logs an evaluation's params, metrics and plots; :func:`training_run` opens the
``model`` run (:class:`TrainingRun`: curves, summary, registered model). Runs carry lineage tags
(git commit, Prefect flow run; for evaluations the DVC data hash and model id) and are logged through
``MlflowClient``, which keeps no process-global state. Design: docs/orchestration.md#mlflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from voiceprint.common.layout import Layout
from voiceprint.config import Params, flatten_dotted

log = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "TrainingRun",
    "dvc_data_hash",
    "flatten_params",
    "git_commit",
    "log_evaluation",
    "prefect_flow_run_id",
    "tracking_uri",
    "training_run",
]

EXPERIMENT = "voiceprint"
#: The experiment tag MLflow 3's UI reads to pick an experiment's landing page, and the value for
#: "custom model development" (runs, metrics, models) as opposed to "genai_development" (traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
#: Summary statistics that repeat a training curve under another name; they stay in training.json.
_SUMMARY_DUPLICATES = frozenset({"train_accuracy"})  # the ``train_acc`` curve's last window
_EMBEDDINGS_OUT = "data/embeddings"
_REMOTE_SCHEMES = {"http", "https", "databricks", "databricks-uc", "uc"}


def _quiet_mlflow() -> None:
    """No run-URL banners on stdout, no alembic INFO chatter on the first SQLite migration."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tracking_uri(layout: Layout) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.root / 'mlflow.db'}"


def _artifact_location(layout: Layout, uri: str) -> str | None:
    """Artifacts beside the project for local stores; a server picks its own (proxied) location."""
    if urlparse(uri).scheme in _REMOTE_SCHEMES:
        return None
    return (layout.root / "mlartifacts").as_uri()


def flatten_params(params: Params | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"data": {"dataset": "x"}}`` -> ``{"data.dataset": "x"}``; values as MLflow strings."""
    raw = params.model_dump() if isinstance(params, Params) else params
    return {
        name: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        for name, value in flatten_dotted(raw, prefix).items()
    }


def git_commit(root: Path) -> str:
    """``git rev-parse HEAD`` in ``root``; ``"unknown"`` outside a repository or without git."""
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def dvc_data_hash(root: Path) -> str:
    """md5 DVC recorded for the ``data/embeddings`` output of the ``embed`` stage, or ``"none"``."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return "none"
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
        outs = doc.get("stages", {}).get("embed", {}).get("outs", []) or []
    except (yaml.YAMLError, AttributeError) as err:
        log.warning("%s: cannot read (%s); dvc_data_hash=none", lock, err)
        return "none"
    for out in outs:
        if isinstance(out, dict) and str(out.get("path", "")).rstrip("/") == _EMBEDDINGS_OUT:
            return str(out.get("md5") or "none")
    return "none"


def prefect_flow_run_id() -> str:
    """Id of the Prefect flow run this stage belongs to (env ``PREFECT__FLOW_RUN_ID``), else ``"none"``.

    The domain package never imports Prefect: stages run in a ``dvc repro`` subprocess, and the
    orchestration layer (``tasks.prefect_tasks``) puts the flow run id into that subprocess's
    environment, as a served deployment's runner does for its flow runs.
    """
    return os.environ.get("PREFECT__FLOW_RUN_ID") or "none"


def _numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of ``metrics``; a nested block (one eval set) is named ``<set>/<key>``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(_numeric_metrics(value, f"{prefix}{key}/"))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _create_run(
    layout: Layout, run_name: str, tags: Mapping[str, str], start_time_ms: int | None = None
) -> tuple[Any, str, str]:
    """A new run in experiment ``voiceprint``: ``(client, run id, tracking URI)``.

    Every run carries the same lineage tags (git commit, Prefect flow run, project root); ``tags``
    add to them and win on a clash. ``start_time_ms`` (epoch ms) backdates the run to when the
    stage's work began, so the UI's duration is the stage's, not the logging's.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(layout)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, layout, uri)
    commit = git_commit(layout.root)
    lineage = {"git_commit": commit, "prefect_flow_run_id": prefect_flow_run_id(), "project_root": str(layout.root)}
    if commit != "unknown":
        lineage["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, start_time=start_time_ms, run_name=run_name, tags={**lineage, **tags})
    return client, run.info.run_id, uri


def _experiment_id(client: Any, layout: Layout, uri: str) -> str:
    """Id of experiment ``voiceprint``, created (artifacts beside the project) if missing.

    The experiment is marked as a model-training one (:data:`EXPERIMENT_KIND_TAG`), so the MLflow 3
    UI opens it on its runs rather than on the (empty) GenAI traces page; an experiment created
    before the tag existed gets it on its next run.
    """
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        try:
            return client.create_experiment(
                EXPERIMENT, artifact_location=_artifact_location(layout, uri), tags=EXPERIMENT_TAGS
            )
        except Exception:
            # Another process created it between our lookup and create: use theirs.
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def log_evaluation(
    layout: Layout,
    params: Params,
    metrics: dict[str, Any],
    plots_dir: str | Path | None,
    *,
    run_name: str = "evaluate",
    extra_tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    extra_artifacts: Sequence[str | Path] = (),
    start_time_ms: int | None = None,
    end_time_ms: int | None = None,
) -> str:
    """Log one evaluation as an MLflow run in experiment ``voiceprint``; returns the run id.

    ``metrics`` is what :func:`voiceprint.evaluate.stage.evaluate` returned; it is logged both as MLflow
    metrics (numeric entries) and, verbatim, as the ``metrics.json`` artifact. Every file in
    ``plots_dir`` goes under the run's ``plots/`` artifacts. ``start_time_ms``/``end_time_ms``
    (epoch ms; default: now) are the run's start and end, i.e. the stage's, not the logging's.
    """
    _quiet_mlflow()
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.utils.time import get_current_time_millis

    blocks = [m for m in metrics.values() if isinstance(m, Mapping)] or [metrics]
    tags = {"dvc_data_hash": dvc_data_hash(layout.root), "model_id": str(blocks[0].get("model_id", "unknown"))}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under its parent in the UI
    tags.update(extra_tags or {})
    client, run_id, uri = _create_run(layout, run_name, tags, start_time_ms)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        now = get_current_time_millis()
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in _numeric_metrics(metrics).items()],
            params=[Param(k, v) for k, v in flatten_params(params).items()],
        )
        with tempfile.TemporaryDirectory(prefix="voiceprint-mlflow-") as tmp:
            metrics_file = Path(tmp) / "metrics.json"
            metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            client.log_artifact(run_id, str(metrics_file))
        for artifact in extra_artifacts:
            client.log_artifact(run_id, str(artifact))
        if plots_dir is not None and Path(plots_dir).is_dir():
            client.log_artifacts(run_id, str(plots_dir), artifact_path="plots")
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        client.set_terminated(run_id, status=status, end_time=end_time_ms)
    log.info("logged MLflow run %s to %s", run_id, uri)
    return run_id


# --------------------------------------------------------------------------------------------------
# Model stage: training curves and the model registry


class TrainingRun:
    """The model stage's MLflow run; :meth:`on_step` is the training loop's ``on_step`` callback."""

    def __init__(self, client: Any, run_id: str, uri: str):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.registered: dict[str, str] | None = None

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one point of each training curve (``train_loss``, ``train_acc``, ``lr``, ...) at ``step``."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in _numeric_metrics(metrics).items()]
        )

    def log_summary(self, stats: Mapping[str, Any]) -> None:
        """The stage's numeric statistics as metrics, its model id as a tag, all of them as ``training.json``.

        ``train_accuracy`` (the last window of the ``train_acc`` curve) is left out of the metrics,
        so the run has one accuracy metric.
        """
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        step = int(stats.get("steps") or 0)
        numeric = {k: v for k, v in _numeric_metrics(stats).items() if k not in _SUMMARY_DUPLICATES}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric.items()])
        if stats.get("model_id"):
            self.client.set_tag(self.run_id, "model_id", str(stats["model_id"]))
        with tempfile.TemporaryDirectory(prefix="voiceprint-mlflow-") as tmp:
            path = Path(tmp) / "training.json"
            path.write_text(json.dumps(dict(stats), indent=2, sort_keys=True, default=str) + "\n")
            self.client.log_artifact(self.run_id, str(path))

    def register_model(self, model_dir: str | Path, model_id: str, name: str | None = None) -> dict[str, str]:
        """Log ``model_dir`` as a pyfunc ``model`` of the run and register it as a new version.

        The pyfunc is logged with ``mlflow.pyfunc.log_model`` (signature and input example: see
        :mod:`voiceprint.tracking.pyfunc_model`), so it is a logged model of the run (the
        experiment's Models page) as well as a registered version. Returns ``{"name", "version",
        "uri"}`` (``uri`` is ``models:/<name>/<version>``); the version carries tags ``model_id``
        and ``run_id``.
        """
        from voiceprint.tracking.pyfunc_model import REGISTERED_MODEL, log_pyfunc

        name = name or REGISTERED_MODEL
        with _active_run(self.uri, self.run_id):
            info = log_pyfunc(model_dir, model_id=model_id, registered_model_name=name)
        version = str(info.registered_model_version)
        for key, value in {"model_id": model_id, "run_id": self.run_id}.items():
            self.client.set_model_version_tag(name, version, key, value)
        if not self.client.get_registered_model(name).description:
            self.client.update_registered_model(
                name, description="voiceprint ECAPA-TDNN: 16 kHz waveforms -> L2-normalised speaker embeddings"
            )
        self.registered = {"name": name, "version": version, "uri": f"models:/{name}/{version}"}
        self.client.set_tag(self.run_id, "registered_model", self.registered["uri"])
        log.info("registered %s as %s (logged model %s)", model_id, self.registered["uri"], info.model_id)
        return self.registered


@contextlib.contextmanager
def _active_run(uri: str, run_id: str) -> Iterator[None]:
    """``run_id`` as MLflow's active run on store ``uri``, for the fluent ``log_model`` only.

    MLflow's global tracking URI (and ``MLFLOW_TRACKING_URI``, which setting it overwrites) is put
    back afterwards. The run's final status is set by :func:`training_run`, which ends it again.
    """
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri), mlflow.start_run(run_id=run_id):
            yield
    finally:
        if env_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri


@contextlib.contextmanager
def training_run(layout: Layout, params: Params, *, run_name: str = "model") -> Iterator[TrainingRun]:
    """An MLflow run for the model stage in experiment ``voiceprint``, ended FINISHED or FAILED.

    Logs the ``model`` parameters and lineage tags (git commit, Prefect flow run, project root)
    up front; the caller passes :meth:`TrainingRun.on_step` to the training and calls
    :meth:`~TrainingRun.log_summary` / :meth:`~TrainingRun.register_model` at the end.
    """
    _quiet_mlflow()
    from mlflow.entities import Param, RunStatus

    client, run_id, uri = _create_run(layout, run_name, {"stage": "model", "init": params.model.init})
    tracked = TrainingRun(client, run_id, uri)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        model_params = flatten_params({"model": params.model.model_dump()})
        client.log_batch(tracked.run_id, params=[Param(k, v) for k, v in model_params.items()])
        yield tracked
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        client.set_terminated(tracked.run_id, status=status)
        log.info("logged MLflow run %s to %s", tracked.run_id, uri)

"""Prefect flows for the voiceprint pipeline: a thin layer over ``dvc repro``.

``voiceprint_pipeline`` turns its (UI-editable) parameters into ``params.yaml`` values, then runs
the six stages in ``dvc.yaml`` order, each as its own subflow so that every stage is also a
deployment of its own (rerun ``evaluate`` alone from the UI) and shows up as a separate node in
the run graph. DVC decides whether a stage actually runs, so Prefect and a terminal ``dvc repro``
always agree on what is up to date.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.params_file import apply_overrides
from tasks.prefect_tasks import publish_metrics, run_stage
from voiceprint.config import DatasetKind, IndexType, ModelArch, ModelInit

#: Environment variable naming the DVC project a served deployment works on.
PROJECT_DIR_ENV = "VOICEPRINT_PROJECT_DIR"


def resolve_project_dir(project_dir: str | None = None) -> Path:
    """The DVC project to work on: the argument, else ``$VOICEPRINT_PROJECT_DIR``, else the cwd.

    Flow runs of served deployments start in the directory ``python -m flows.serve`` was started
    from, which is not necessarily the project, hence the explicit parameter and variable.
    """
    root = Path(project_dir or os.environ.get(PROJECT_DIR_ENV) or Path.cwd()).expanduser().resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(
            f"{root} is not a voiceprint project (no dvc.yaml); pass project_dir or set {PROJECT_DIR_ENV}"
        )
    return root


# One flow per stage. They are spelled out rather than generated in a loop because a deployment's
# entrypoint must be an importable module-level name (``flows.pipeline.prepare_flow``), and
# because each docstring becomes the deployment's description in the UI.


@flow(name="voiceprint-prepare", flow_run_name="prepare")
def prepare_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Acquire the dataset (local mirror first) and write the manifest: `dvc repro --single-item prepare`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("prepare", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-segment", flow_run_name="segment")
def segment_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Voice-activity detection and segmentation of every utterance: `dvc repro --single-item segment`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("segment", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-model", flow_run_name="model")
def model_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Train (scratch) or fetch (pretrained) the ECAPA-TDNN encoder: `dvc repro --single-item model`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("model", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-embed", flow_run_name="embed")
def embed_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Compute segment and utterance embeddings: `dvc repro --single-item embed`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("embed", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-index", flow_run_name="index")
def index_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Build the FAISS speaker index: `dvc repro --single-item index`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("index", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-evaluate", flow_run_name="evaluate")
def evaluate_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Verification (EER, minDCF) and identification (top-1/5) metrics: `dvc repro --single-item evaluate`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("evaluate", str(resolve_project_dir(project_dir)))


def parse_encoders(encoders: list[str]) -> dict[str, str]:
    """``["ecapa", "mine=speechbrain:/models/x"]`` -> ``{"ecapa": "ecapa", "mine": "speechbrain:/models/x"}``."""
    out: dict[str, str] = {}
    for entry in encoders:
        name, sep, spec = entry.partition("=")
        out[name.strip()] = spec.strip() if sep else name.strip()
    return out


@flow(name="voiceprint-compare", flow_run_name="compare")
def compare_flow(encoders: list[str] | None = None, project_dir: str | None = None) -> dict[str, Any]:
    """Embed the same segments with several speaker encoders and tabulate EER, minDCF, top-k, OIIDD, CCR, silhouette.

    Runs `dvc repro --single-item compare-encoder@NAME` for each encoder, then `compare`.

    Args:
        encoders: Encoders to compare, each "NAME" (ecapa, campplus, ge2e) or "NAME=SPEC" with SPEC
            speechbrain:DIR or onnx:FILE (compare.encoders). Empty keeps params.yaml.
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    root = str(resolve_project_dir(project_dir))
    params = apply_params(root, {"compare.encoders": parse_encoders(encoders) if encoders else None})
    for name in params["compare"]["encoders"]:
        run_stage(f"compare-encoder@{name}", root)
    return run_stage("compare", root)


#: The stage subflows in ``dvc.yaml`` order (each stage depends on outputs of the ones before).
STAGE_FLOWS = (prepare_flow, segment_flow, model_flow, embed_flow, index_flow, evaluate_flow, compare_flow)


#: The pipeline flow's parameters and the ``params.yaml`` key each one sets, in form order.
PIPELINE_PARAMETERS: dict[str, str] = {
    "dataset": "data.dataset",
    "dataset_path": "data.path",
    "max_speakers": "data.max_speakers",
    "model_init": "model.init",
    "model_arch": "model.arch",
    "model_source": "model.source",
    "model_steps": "model.steps",
    "index_type": "index.type",
    "index_nlist": "index.nlist",
    "index_nprobe": "index.nprobe",
}


@task(name="apply-params", cache_policy=NO_CACHE)
def apply_params(project_dir: str, overrides: dict[str, Any], clear: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write the run's parameters into ``params.yaml`` (validated first) so DVC sees them.

    ``clear``: dotted keys set to null (a nullable setting emptied in the run form).
    """
    params = apply_overrides(Path(project_dir), overrides, clear=clear)
    applied = {key: value for key, value in overrides.items() if value is not None} | dict.fromkeys(clear)
    get_run_logger().info("params.yaml overrides: %s", applied or "none (using the file as is)")
    return params.model_dump(mode="json")


def deployment_defaults() -> dict[str, Any]:
    """The parameters stored on this run's deployment (its form's defaults), ``{}`` outside one.

    ``flows.serve`` stores each setting's value from ``params.yaml`` at serve time there, so a run
    parameter equal to it is one the user did not change.
    """
    from prefect import get_client
    from prefect.runtime import deployment

    deployment_id = deployment.id
    if not deployment_id:
        return {}
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(deployment_id).parameters or {})


def changed_settings(given: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(overrides, keys to clear)`` for ``params.yaml`` from the pipeline flow's ``given`` parameters.

    ``None`` keeps the file's value, unless the deployment's default was a value: then the user
    emptied a nullable setting (``data.max_speakers``) in the form, which clears it. A value equal
    to the deployment's default is not written, so ``params.yaml`` edited after ``flows.serve``
    started is not reverted by a run that changed something else.
    """
    overrides: dict[str, Any] = {}
    clear: list[str] = []
    for name, key in PIPELINE_PARAMETERS.items():
        value, default = given.get(name), defaults.get(name)
        if name in defaults and value == default and type(value) is type(default):
            continue
        if value is not None:
            overrides[key] = value
        elif name in defaults:
            clear.append(key)
    return overrides, tuple(clear)


def _summary_line(result: dict[str, Any] | None, metrics: dict[str, Any] | None = None) -> str:
    """``"evaluate: reproduced in 12.3 s (EER 4.10 %, top-1 91.2 %)"`` for the parent run's log."""
    if not result:
        return "?"
    outcome = "up to date (skipped)" if result.get("skipped") else f"reproduced in {result.get('wall_s', 0):.1f} s"
    return f"{result.get('stage')}: {outcome}" + (f" ({headline(metrics)})" if metrics else "")


def headline(metrics: dict[str, Any]) -> str:
    """The evaluation's headline numbers, as one short phrase (one per eval set, each named)."""
    blocks = {name: block for name, block in metrics.items() if isinstance(block, dict)}
    if blocks:
        return "; ".join(f"{name}: {headline(block)}" for name, block in blocks.items())
    parts = []
    for label, key in (("EER", "eer"), ("top-1", "top1"), ("top-1 via index", "index_top1")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {100 * value:.2f} %")
    if metrics.get("index_settings"):
        parts.append(f"index {metrics['index_settings']}")
    return ", ".join(parts) or "no headline metrics"


@flow(name="voiceprint-pipeline")
def voiceprint_pipeline(
    dataset: DatasetKind | None = None,
    dataset_path: str | None = None,
    max_speakers: int | None = None,
    model_init: ModelInit | None = None,
    model_arch: ModelArch | None = None,
    model_source: str | None = None,
    model_steps: int | None = None,
    index_type: IndexType | None = None,
    index_nlist: int | None = None,
    index_nprobe: int | None = None,
    project_dir: str | None = None,
) -> dict[str, Any]:
    """Run the whole voiceprint pipeline through DVC and publish the evaluation metrics.

    A served deployment's form starts from the values in params.yaml when `python -m flows.serve`
    started; change only what you mean to. Changed values are written into params.yaml before DVC
    runs, so DVC reruns exactly the stages they affect. Called directly, an empty (None) parameter
    keeps the file's value.

    Args:
        dataset: Which data to use (data.dataset). "folder" and "voxceleb" need dataset_path.
        dataset_path: Root of a SPEAKER/UTTERANCE.EXT tree for dataset "folder", of
            SPEAKER/VIDEO/UTTERANCE.EXT for "voxceleb" (data.path; EXT: wav, flac, m4a, mp3, ogg, opus).
        max_speakers: Keep only the first N speakers per split, for quick runs; empty: all (data.max_speakers).
        model_init: Train the ECAPA-TDNN encoder from scratch, use a pretrained one, or distil the
            bundled CAM++ into it (model.init).
        model_arch: One ECAPA-TDNN, or a gated mixture of ECAPA-TDNN experts (model.arch; moe
            trains from scratch or by distillation).
        model_source: Hugging Face repo id or local directory of the pretrained model (model.source).
        model_steps: Training steps when model_init is "scratch" or "distill" (model.steps).
        index_type: FAISS index: flat (exact cosine), ivf or hnsw (index.type). The evaluate stage
            reports identification through it beside exact search (index_top1, index_recall1).
        index_nlist: ivf: number of inverted lists, reduced when too few vectors (index.nlist).
        index_nprobe: ivf: lists scanned per query; small values trade recall for speed (index.nprobe).
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    root = str(resolve_project_dir(project_dir))
    log = get_run_logger()
    given = {name: value for name, value in locals().items() if name in PIPELINE_PARAMETERS}
    overrides, clear = changed_settings(given, deployment_defaults())
    apply_params(root, overrides, clear)
    results = {}
    for stage_flow in STAGE_FLOWS:
        results[stage_flow.name] = stage_flow(project_dir=root)
    metrics = publish_metrics(root)
    # One line per stage here, so the parent run's log tells the story without opening the subflows.
    for name, result in results.items():
        line = _summary_line(result, metrics if name == "voiceprint-evaluate" else None)
        log.info("%s", line)
    return metrics

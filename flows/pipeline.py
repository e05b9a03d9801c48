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


@flow(name="voiceprint-prepare")
def prepare_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Acquire the dataset (local mirror first) and write the manifest: `dvc repro --single-item prepare`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("prepare", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-segment")
def segment_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Voice-activity detection and segmentation of every utterance: `dvc repro --single-item segment`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("segment", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-model")
def model_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Train (scratch) or fetch (pretrained) the ECAPA-TDNN encoder: `dvc repro --single-item model`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("model", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-embed")
def embed_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Compute segment and utterance embeddings: `dvc repro --single-item embed`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("embed", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-index")
def index_flow(project_dir: str | None = None) -> dict[str, Any]:
    """Build the FAISS speaker index: `dvc repro --single-item index`.

    Args:
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    return run_stage("index", str(resolve_project_dir(project_dir)))


@flow(name="voiceprint-evaluate")
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


@flow(name="voiceprint-compare")
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


@task(name="apply-params", cache_policy=NO_CACHE)
def apply_params(project_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Write the run's parameters into ``params.yaml`` (validated first) so DVC sees them."""
    params = apply_overrides(Path(project_dir), overrides)
    applied = {key: value for key, value in overrides.items() if value is not None}
    get_run_logger().info("params.yaml overrides: %s", applied or "none (using the file as is)")
    return params.model_dump(mode="json")


@flow(name="voiceprint-pipeline")
def voiceprint_pipeline(
    dataset: DatasetKind | None = None,
    dataset_path: str | None = None,
    model_init: ModelInit | None = None,
    model_arch: ModelArch | None = None,
    model_source: str | None = None,
    index_type: IndexType | None = None,
    max_speakers: int | None = None,
    model_steps: int | None = None,
    project_dir: str | None = None,
) -> dict[str, Any]:
    """Run the whole voiceprint pipeline through DVC and publish the evaluation metrics.

    Parameters left empty keep the value already in params.yaml; the ones given are written into
    params.yaml before DVC runs, so DVC reruns exactly the stages they affect.

    Args:
        dataset: Which data to use (data.dataset). "folder" and "voxceleb" need dataset_path.
        dataset_path: Root of a <speaker>/<utterance>.<ext> tree for dataset "folder", of
            <speaker>/<video>/<utterance>.<ext> for "voxceleb" (data.path; ext: wav, flac, m4a, mp3, ogg, opus).
        model_init: Train the ECAPA-TDNN encoder from scratch, use a pretrained one, or distil the
            bundled CAM++ into it (model.init).
        model_arch: One ECAPA-TDNN, or a gated mixture of ECAPA-TDNN experts (model.arch; moe
            trains from scratch or by distillation).
        model_source: Hugging Face repo id or local directory of the pretrained model (model.source).
        index_type: FAISS index: flat (exact cosine), ivf or hnsw (index.type).
        max_speakers: Keep only the first N speakers per split, for quick runs (data.max_speakers).
        model_steps: Training steps when model_init is "scratch" or "distill" (model.steps).
        project_dir: DVC project directory; default: $VOICEPRINT_PROJECT_DIR, else the working directory.
    """
    root = str(resolve_project_dir(project_dir))
    apply_params(
        root,
        {
            "data.dataset": dataset,
            "data.path": dataset_path,
            "model.init": model_init,
            "model.arch": model_arch,
            "model.source": model_source,
            "index.type": index_type,
            "data.max_speakers": max_speakers,
            "model.steps": model_steps,
        },
    )
    for stage_flow in STAGE_FLOWS:
        stage_flow(project_dir=root)
    return publish_metrics(root)

"""Stage entry points: bind validated params and the data layout to the domain code.

These functions are what ``dvc.yaml`` runs (through ``python -m tasks.run STAGE``) and what the
Prefect flows ultimately execute, so the same code path produces the same outputs either way.
Each returns a small JSON-able summary that the caller can log or show as an artifact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from voiceprint.config import Params, load_params
from voiceprint.layout import Layout

log = logging.getLogger("voiceprint.stages")


def prepare(params: Params, layout: Layout) -> dict[str, Any]:
    from dataclasses import asdict

    from voiceprint.datasets.prepare import prepare as run

    return asdict(run(params.data, layout))


def segment(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.segment import segment_manifest

    return segment_manifest(layout, params.vad)


def model(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.train import build_model

    return build_model(params.model, layout)


def embed(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.embed import embed_segments

    return embed_segments(layout, params.embed)


def index(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.index import build_indexes

    return build_indexes(layout, params.index)


def evaluate(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.evaluate import evaluate as run
    from voiceprint.tracking import log_evaluation

    metrics = run(layout, params)
    run_id = log_evaluation(layout, params, metrics, layout.plots)
    return {**metrics, "mlflow_run_id": run_id}


def compare_encoder(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    from voiceprint.compare import compare_encoder as run

    return run(layout, params, name)


def compare(params: Params, layout: Layout) -> dict[str, Any]:
    from voiceprint.compare import compare_report

    return compare_report(layout, params)


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "prepare": prepare,
    "segment": segment,
    "model": model,
    "embed": embed,
    "index": index,
    "evaluate": evaluate,
    "compare-encoder": compare_encoder,  # takes the encoder name (DVC foreach item)
    "compare": compare,
}
ITEM_STAGES = {"compare-encoder"}


def run_stage(
    name: str, root: str | Path = ".", overrides: dict[str, Any] | None = None, item: str | None = None
) -> dict[str, Any]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    if (name in ITEM_STAGES) != (item is not None):
        raise ValueError(f"stage {name!r} {'needs' if name in ITEM_STAGES else 'takes no'} item argument")
    layout = Layout.at(root)
    params = load_params(layout.params, overrides)
    started = time.perf_counter()
    summary = STAGES[name](params, layout, *([item] if item is not None else []))
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    log.info("stage %s done in %.1f s", name, summary["wall_s"])
    return summary

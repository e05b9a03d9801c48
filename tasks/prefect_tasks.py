"""Prefect tasks that delegate every decision about *what* to run to DVC.

:func:`run_stage` runs ``dvc repro --single-item STAGE`` (through :mod:`tasks.dvc_runner`), sends its
lines to the run logger and passes the flow run id down to the stage; :func:`publish_metrics`
publishes ``metrics.json`` as an artifact. Design: docs/orchestration.md#prefect.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from tasks.dvc_runner import dvc_repro_command, run_dvc_repro, stage_environment
from voiceprint.config import flatten_dotted

METRICS_ARTIFACT_KEY = "voiceprint-metrics"

_fallback_log = logging.getLogger("voiceprint.prefect")


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow/task run; a plain logger when called via ``.fn``.

    The fallback keeps :func:`run_stage` usable from scripts and unit tests without a Prefect API.
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_log


def _with_flow_run_id(env: dict[str, str]) -> dict[str, str]:
    """Pass the Prefect flow run id down to the stage process for lineage.

    The stage runs in a plain subprocess of ``dvc`` with no Prefect context; ``voiceprint.tracking.runs``
    reads ``PREFECT__FLOW_RUN_ID`` from the environment to tag the MLflow run. A served deployment's
    runner already sets it to the triggered (top-level) run; a flow called directly gets the id of
    the enclosing flow run.
    """
    if not env.get("PREFECT__FLOW_RUN_ID"):
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            env["PREFECT__FLOW_RUN_ID"] = str(ctx.flow_run.id)
    return env


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str) -> dict[str, Any]:
    """Reproduce one DVC stage with ``dvc repro --single-item STAGE``, streaming its output to the run log.

    ``--single-item`` keeps the decision per stage (the flow runs the stages in order, each as its
    own subflow), while DVC still skips the stage when its deps, params and outs are unchanged.
    The subprocess and its output are handled by :func:`tasks.dvc_runner.run_dvc_repro`.

    Returns:
        ``{"stage", "wall_s", "skipped"}``; ``skipped`` is True when DVC reported that the stage
        did not change and ran nothing.

    Raises:
        tasks.dvc_runner.DvcRepoLocked: another DVC process holds the repository lock.
        tasks.dvc_runner.StageFailed: any other non-zero exit (a ``RuntimeError``, with the output tail).
    """
    log = _run_logger()
    log.info("$ %s  (in %s)", shlex.join(dvc_repro_command(stage)), project_dir)
    result = run_dvc_repro(
        stage,
        project_dir,
        lambda line: log.info("%s", line),
        env=_with_flow_run_id(stage_environment()),
    )
    outcome = "unchanged, skipped" if result["skipped"] else "reproduced"
    log.info("stage %s %s in %.1f s", stage, outcome, result["wall_s"])
    return result


# --------------------------------------------------------------------------------------------
# Metrics artifact

#: Headline metrics, matched at the start of a flattened metrics.json key or of one of its
#: segments, so the table survives nested keys (``verification.eer``) and per-operating-point
#: suffixes (``min_dcf_p0.01``); the ``*_threshold`` companions are not headlines.
_HEADLINES: tuple[tuple[str, re.Pattern[str], bool], ...] = (
    # (label, pattern, is a rate worth showing as a percentage)
    ("EER", re.compile(r"(?:^|\.)eer(?:_pct|_percent)?(?:_ci_low|_ci_high)?$"), True),
    ("EER s-norm", re.compile(r"(?:^|\.)eer_snorm(?:_ci_low|_ci_high)?$"), True),
    ("minDCF", re.compile(r"(?:^|\.)min[_\-]?dcf(?!.*threshold)"), False),
    ("top-1", re.compile(r"(?:^|\.)top[_\-]?1(?!\d)(?!.*threshold)"), True),
    ("top-5", re.compile(r"(?:^|\.)top[_\-]?5(?!\d)(?!.*threshold)"), True),
    # identification through an index built with the pipeline's index settings, and its recall
    ("top-1 via index", re.compile(r"(?:^|\.)index_top1$"), True),
    ("top-5 via index", re.compile(r"(?:^|\.)index_top5$"), True),
    ("index recall", re.compile(r"(?:^|\.)index_recall\d+$"), True),
    ("index", re.compile(r"(?:^|\.)index_settings$"), False),
)


def _fmt(value: Any, *, rate: bool = False) -> str:
    if value is None:
        return "n/a"  # the evaluate stage writes null for metrics a tiny subset cannot support
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
        return f"{text} ({100 * value:.2f} %)" if rate and 0.0 <= value <= 1.0 else text
    return str(value).replace("|", "\\|")


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A headline table (EER with its interval, s-norm EER, minDCF, top-1/5 exact and through the
    index, the index's recall and settings) followed by every scalar in ``metrics.json``."""
    flat = flatten_dotted(metrics)
    scalars = {k: v for k, v in flat.items() if v is None or isinstance(v, (int, float, str, bool))}
    lines = ["# voiceprint evaluation", "", "| Metric | Key | Value |", "|---|---|---:|"]
    found = 0
    for label, pattern, rate in _HEADLINES:
        for key, value in scalars.items():
            shown = (
                value is None
                or isinstance(value, str)
                or (isinstance(value, (int, float)) and not isinstance(value, bool))
            )
            if shown and pattern.search(key.lower()):
                lines.append(f"| {label} | `{key}` | {_fmt(value, rate=rate)} |")
                found += 1
    if not found:
        lines.append("| _none found_ | | |")
    lines += ["", "<details><summary>All metrics</summary>", "", "| Key | Value |", "|---|---:|"]
    lines += [f"| `{key}` | {_fmt(value)} |" for key, value in sorted(scalars.items())]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(project_dir: str) -> dict[str, Any]:
    """Show ``metrics.json`` (written by the ``evaluate`` stage) as a keyed markdown artifact.

    The fixed key makes the Artifacts page keep one history of the metrics across runs, so a
    parameter change (``index_type=ivf``, ``index_nprobe=1``: lower ``index_top1`` and
    ``index_recall1``) can be compared with the previous run at a glance.
    """
    path = Path(project_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the evaluate stage should have written it")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    create_markdown_artifact(
        markdown=metrics_markdown(metrics),
        key=METRICS_ARTIFACT_KEY,
        description=f"metrics.json of {project_dir}",
    )
    _run_logger().info("published %s (%d values)", METRICS_ARTIFACT_KEY, len(flatten_dotted(metrics)))
    return metrics

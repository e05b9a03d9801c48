"""Encoder comparison: the same utterances through several speaker encoders, one table out.

:func:`run_encoder` (DVC ``compare-encoder@NAME``, through :func:`compare_encoder`) embeds with one
encoder into ``data/compare/NAME/`` and measures verification, identification, cluster separation
and throughput; :func:`run` (DVC ``compare``, through :func:`compare_report`) gathers them into
``compare.json``/``compare.md`` and MLflow. Design: docs/stages.md#compare-encodername-and-compare.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from voiceprint.common import atomic
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embeddings_matrix, l2_normalise
from voiceprint.config import EvaluateParams, Params

log = logging.getLogger(__name__)

#: Table columns: (metrics key, header, format). Lower is better for EER/minDCF/OIIDD/CCR.
COLUMNS: list[tuple[str, str, str]] = [
    ("eer", "EER %", "pct"),
    ("eer_ci", "EER % CI", "pct_range"),
    ("eer_diff", "EER % vs first (paired CI)", "pct_delta"),
    ("eer_snorm", "EER % (s-norm)", "pct"),
    ("min_dcf_p0.01", "minDCF 0.01", "f3"),
    ("min_dcf_p0.01_snorm", "minDCF 0.01 (s-norm)", "f3"),
    ("top1", "top-1 %", "pct"),
    ("top1_ci", "top-1 % CI", "pct_range"),
    ("top5", "top-5 %", "pct"),
    ("cos_oiidd", "cos OIIDD", "f3"),
    ("cos_ccr", "cos CCR", "int"),
    ("cos_ccr_rate", "cos CCR rate %", "pct"),
    ("cos_silhouette", "cos silhouette", "f3"),
    ("euc_oiidd_umap", "euc OIIDD (UMAP)", "f3"),
    ("euc_ccr_umap", "euc CCR (UMAP)", "int"),
    ("euc_ccr_rate_umap", "euc CCR rate % (UMAP)", "pct"),
    ("euc_silhouette_umap", "euc silhouette (UMAP)", "f3"),
    ("embedding_dim", "dim", "int"),
    ("num_parameters", "params (M)", "mparams"),
]
#: Measured per run, so kept out of the DVC outputs (data/compare/NAME/metrics.json, compare.md).
TIMING = ("realtime_factor", "embed_seconds", "device")


def compare_dir(layout: Layout, name: str) -> Path:
    return layout.data / "compare" / name


def compare_stats_path(layout: Layout, name: str) -> Path:
    """The ``compare-encoder@NAME`` stage's timing (DVC metrics), outside its output directory."""
    return layout.data / "compare_stats" / f"{name}.json"


def _eval_matrix(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalised utterance embeddings, speakers, splits and utterance ids, sorted by speaker then utterance."""
    table = pq.read_table(path, columns=["utterance_id", "speaker_id", "split", "embedding"])
    table = table.sort_by([("speaker_id", "ascending"), ("utterance_id", "ascending")])
    x = l2_normalise(embeddings_matrix(table))
    speakers = np.asarray(table.column("speaker_id").to_pylist(), dtype=object).astype(str)
    split = np.asarray(table.column("split").to_pylist(), dtype=object).astype(str)
    ids = np.asarray(table.column("utterance_id").to_pylist(), dtype=object).astype(str)
    return x, speakers, split, ids


def common_eval_trials(tables: dict[str, Path]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """All-pairs cosine scores of the eval utterances that every table holds, one array per table.

    Returns ``(scores by name, same-speaker flag, speakers of those utterances)``; element ``k`` of
    every score array is the same trial (rows sorted by speaker, then utterance).
    """
    from voiceprint.evaluate.stage import all_pairs_scores

    eval_rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, path in tables.items():
        x, speakers, split, ids = _eval_matrix(path)
        keep = split == "eval"
        eval_rows[name] = (x[keep], speakers[keep], ids[keep])
    common = sorted(set.intersection(*(set(ids.tolist()) for _, _, ids in eval_rows.values())))
    scored: dict[str, np.ndarray] = {}
    same, labels = np.zeros(0, bool), np.zeros(0, str)
    for name, (x, speakers, ids) in eval_rows.items():
        keep = np.isin(ids, common)
        scored[name], same = all_pairs_scores(x[keep], speakers[keep])
        labels = speakers[keep]
    return scored, same, labels


def paired_differences(tables: dict[str, Path], cfg: EvaluateParams) -> dict[str, dict[str, Any]]:
    """EER of each utterance-embeddings table minus the first one's, with a paired speaker-bootstrap interval.

    ``tables`` maps a name (an encoder, a run) to its ``utterances.parquet``. All are scored on the
    eval utterances every table holds (an encoder that rejected a file would otherwise be compared
    on other trials), and each replicate resamples the speakers once for all of them
    (:func:`voiceprint.evaluate.bootstrap.shared_draw_eers`; each table's replicates computed once). Keys
    ``eer_diff``, ``eer_diff_ci_low``, ``eer_diff_ci_high`` and ``eer_diff_reference`` (the first
    name); nothing with ``evaluate.bootstrap: 0`` or a single table.
    """
    from voiceprint.evaluate.bootstrap import percentile_interval, shared_draw_eers
    from voiceprint.evaluate.metrics import eer
    from voiceprint.evaluate.stage import pair_speakers

    names = list(tables)
    if cfg.bootstrap == 0 or len(names) < 2:
        return {}
    scored, same, labels = common_eval_trials(tables)
    if same.all() or not same.any():
        log.warning("paired EER differences skipped: the common eval utterances give no target/non-target trials")
        return {}
    reference = names[0]
    out: dict[str, dict[str, Any]] = {reference: {"eer_diff_reference": reference}}
    a, b = pair_speakers(labels)
    eers = shared_draw_eers(scored, a, b, replicates=cfg.bootstrap, seed=cfg.seed)
    for name in names[1:]:
        interval = percentile_interval(eers[name] - eers[reference], cfg.bootstrap_level)
        out[name] = {
            "eer_diff_reference": reference,
            "eer_diff": float(eer(scored[name], same)[0] - eer(scored[reference], same)[0]),
            "eer_diff_ci_low": interval.low,
            "eer_diff_ci_high": interval.high,
        }
    return out


def compare_encoder(layout: Layout, params: Params, name: str, *, progress: bool = True) -> dict[str, Any]:
    from voiceprint.compare.cluster_metrics import cluster_analysis
    from voiceprint.compare.plots import plot_oiidd, plot_umap_scatter
    from voiceprint.embed.engine import pick_device
    from voiceprint.embed.stage import embed_segments, reuse_embeddings
    from voiceprint.encoders.loader import load_encoder
    from voiceprint.evaluate.stage import evaluate

    if name not in params.compare.encoders:
        raise ValueError(f"unknown encoder {name!r}; compare.encoders has {sorted(params.compare.encoders)}")
    spec = params.compare.encoders[name]
    out = compare_dir(layout, name)
    plots = out / "plots"
    device = pick_device(params.embed.device)
    encoder = load_encoder(spec, model_dir=layout.model_dir, device=str(device))

    # The pipeline's own model, loaded as the embed stage loads it: its tables are already there.
    # Not for a mixture of experts: its gate usage is measured while it embeds, so it embeds again.
    reports_gates = hasattr(encoder, "gate_usage")
    embedded = reuse_embeddings(layout, params.embed, encoder, out) if spec == "ecapa" and not reports_gates else None
    if embedded is None:
        embedded = embed_segments(
            layout, params.embed, encoder=encoder, progress=progress, out_dir=out, utterances_only=True
        )
    gate_usage = encoder.gate_usage() if reports_gates else {}
    utterances = out / layout.utterance_embeddings.name
    metrics = evaluate(layout, params, out_metrics=out / "evaluate.json", out_plots=plots, embeddings=utterances)

    x, speakers, split, _ = _eval_matrix(utterances)
    is_eval = split == "eval"
    detail = cluster_analysis(
        x[is_eval], speakers[is_eval], seed=params.compare.seed, n_neighbors=params.compare.umap_neighbors
    )
    metrics.update(detail.metrics)
    plot_umap_scatter(detail.umap_coords, speakers[is_eval], plots / "umap.png", f"{name}: UMAP of eval utterances")
    plot_oiidd(detail.cos_own, detail.cos_other, plots / "oiidd_cos.png", f"{name}: cosine distance", "1 - cos")
    plot_oiidd(
        detail.euc_own,
        detail.euc_other,
        plots / "oiidd_euc_umap.png",
        f"{name}: Euclidean after UMAP",
        "Euclidean (UMAP 2-D)",
    )
    metrics.update(gate_usage)
    metrics.update(
        encoder=name,
        spec=spec,
        model_id=encoder.model_id,
        num_parameters=int(encoder.num_parameters()),
        embeddings_reused_from=embedded.get("reused_from"),
    )
    timing = {
        "realtime_factor": embedded["realtime_factor"],
        "embed_seconds": embedded["seconds"],
        "device": str(device),
    }
    atomic.write_json(out / "metrics.json", _jsonable(metrics))
    stats_path = compare_stats_path(layout, name)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stats_path, _jsonable(timing))
    return {**metrics, **timing}


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, (np.floating, float)):
            return None if not math.isfinite(float(v)) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v

    return {k: fix(v) for k, v in metrics.items()}


def _column_value(metrics: dict[str, Any], key: str, fmt: str) -> Any:
    """A metric for a table cell: ``pct_range`` joins ``<key>_low`` and ``<key>_high``; ``pct_delta`` is
    ``<key>`` with ``<key>_ci_low`` / ``<key>_ci_high``, or "reference" on the row it is measured against."""
    if fmt == "pct_delta":
        if metrics.get(f"{key}_reference") == metrics.get("encoder"):
            return "reference"
        value, low, high = (metrics.get(f"{key}{end}") for end in ("", "_ci_low", "_ci_high"))
        return None if value is None or low is None or high is None else (value, low, high)
    if fmt != "pct_range":
        return metrics.get(key)
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    return None if low is None or high is None else (low, high)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if fmt == "pct_range":
        return f"{100 * value[0]:.2f}-{100 * value[1]:.2f}"
    if fmt == "pct_delta":
        return (
            value
            if isinstance(value, str)
            else f"{100 * value[0]:+.2f} ({100 * value[1]:+.2f} to {100 * value[2]:+.2f})"
        )
    if fmt == "pct":
        return f"{100 * value:.2f}"
    if fmt == "int":
        return f"{int(value)}"
    if fmt == "mparams":
        return f"{value / 1e6:.2f}"
    if fmt == "f0":
        return f"{value:.0f}"
    return f"{value:.3f}"


def render_markdown(rows: dict[str, dict[str, Any]]) -> str:
    header = "| encoder | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [header, rule]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(_column_value(m, k, f), f) for k, _, f in COLUMNS) + " |")
    any_row = next(iter(rows.values()), {})
    notes = (
        f"\n{any_row.get('n_eval_speakers', '?')} eval speakers, {any_row.get('n_eval_utterances', '?')} utterances, "
        f"{any_row.get('n_trials', '?')} trials; identification: {any_row.get('n_queries', '?')} queries against "
        f"{any_row.get('n_gallery_speakers', '?')} speakers; s-norm cohort: {any_row.get('n_cohort', '?')} train-split "
        "utterances. CI: speaker-level bootstrap interval (evaluate.bootstrap_level; n/a with evaluate.bootstrap: 0); "
        f"'vs first': EER minus {next(iter(rows), '?')}'s on the same trials, the interval from the same speaker draws "
        "for both (below 0 throughout: lower EER on nearly every resample). "
        "Lower is better for EER, minDCF, OIIDD and CCR; higher for silhouette and top-k. "
        "Throughput (realtime_factor, audio s/s) is in data/compare_stats/ and MLflow: no timing enters this file.\n"
    )
    return "\n".join(lines) + "\n" + notes + render_gate_usage(rows)


def render_gate_usage(rows: dict[str, dict[str, Any]]) -> str:
    """A second table for the mixtures of experts among ``rows`` (empty when there are none)."""
    mixtures = {name: m for name, m in rows.items() if m.get("gate_experts")}
    if not mixtures:
        return ""
    lines = [
        "\n## Mixture-of-experts gate usage\n",
        "| encoder | experts | mean gate weight per expert | share of segments led by each expert "
        "| balance (1 = even) | sharpness (0 = uniform mix, 1 = one expert per segment) | segments |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in mixtures.items():
        importance = " / ".join(f"{v:.2f}" for v in m["gate_importance"])
        load = " / ".join(f"{100 * v:.0f} %" for v in m["gate_load"])
        lines.append(
            f"| {name} | {m['gate_experts']} | {importance} | {load} | {m['gate_balance']:.3f} "
            f"| {m['gate_sharpness']:.3f} | {m['gate_inputs']} |"
        )
    return "\n".join(lines) + "\n"


def compare_report(layout: Layout, params: Params, *, log_mlflow: bool = True) -> dict[str, Any]:
    from voiceprint.tracking.runs import log_evaluation

    rows: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}  # MLflow and the summary only: compare.json stays deterministic
    for name in params.compare.encoders:
        path = compare_dir(layout, name) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run `dvc repro compare-encoder@{name}` first")
        rows[name] = json.loads(path.read_text())
        stats = compare_stats_path(layout, name)
        timing = json.loads(stats.read_text()) if stats.exists() else {}
        timings[name] = {k: timing.get(k) for k in TIMING}
    tables = {name: compare_dir(layout, name) / layout.utterance_embeddings.name for name in rows}
    for name, differences in paired_differences(tables, params.evaluate).items():
        rows[name].update(differences)
    table_json = layout.root / "compare.json"
    table_md = layout.root / "compare.md"
    atomic.write_json(table_json, rows)
    atomic.write_text(table_md, "# Encoder comparison\n\n" + render_markdown(rows))

    run_ids: dict[str, str] = {}
    if log_mlflow:
        parent = log_evaluation(
            layout,
            params,
            {"n_encoders": len(rows)},
            None,
            run_name="compare",
            extra_artifacts=[table_json, table_md],
            extra_tags={"voiceprint.kind": "compare"},
        )
        run_ids["parent"] = parent
        for name, metrics in rows.items():
            run_ids[name] = log_evaluation(
                layout,
                params,
                {**metrics, **timings[name]},
                compare_dir(layout, name) / "plots",
                run_name=f"compare:{name}",
                parent_run_id=parent,
                extra_tags={"encoder": name, "encoder_spec": str(metrics.get("spec"))},
            )
    return {"encoders": list(rows), "table": str(table_md), "throughput": timings, "mlflow_run_ids": run_ids}


def run_encoder(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    """The ``compare-encoder@NAME`` stage: :func:`compare_encoder` for one encoder."""
    return compare_encoder(layout, params, name)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``compare`` stage: :func:`compare_report` over every encoder's results."""
    return compare_report(layout, params)

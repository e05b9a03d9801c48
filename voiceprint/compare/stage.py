"""Encoder comparison: the same utterances through several speaker encoders, one table per eval set.

:func:`run_encoder` (DVC ``compare-encoder@NAME``, through :func:`compare_encoder`) embeds with one
encoder into ``data/compare/NAME/`` and measures verification, identification and cluster separation
on each eval set (:func:`voiceprint.config.eval_sets`: a source's eval split), throughput apart;
:func:`run` (DVC ``compare``, through :func:`compare_report`) gathers them into ``compare.json`` /
``compare.md`` (a table per set, paired EER differences on the set's own trials) and MLflow. The
file layouts are in :func:`compare_encoder` and :func:`compare_report`. Design:
docs/stages.md#compare-encodername-and-compare.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from voiceprint.common import atomic
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embeddings_matrix, l2_normalise
from voiceprint.config import BackendParams, EvaluateParams, Params, eval_sets

if TYPE_CHECKING:
    from voiceprint.evaluate.trials import TrialList

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


def set_sources(layout: Layout, params: Params) -> tuple[dict[str, EvaluateParams], dict[str, str], bool]:
    """``(eval sets, {utterance_id: source}, by_source)``, as :func:`voiceprint.evaluate.stage.evaluate_sets` reads them.

    ``by_source`` is False for a manifest that names no sources (one that predates them): then
    every set is every eval utterance. A set whose source the manifest does not hold is an error.
    """
    from voiceprint.evaluate.stage import eval_sources

    sets = eval_sets(params)
    sources = eval_sources(layout) if layout.manifest.exists() else {}
    present = set(sources.values())
    by_source = bool(present - {""})
    missing = [name for name in sets if by_source and name not in present]
    if missing:
        raise ValueError(
            f"evaluate.sets: no utterances of source(s) {missing} in {layout.manifest} "
            f"(sources there: {sorted(present)}); run the prepare stage"
        )
    return sets, sources, by_source


def set_trials(
    tables: dict[str, Path],
    trials: str,
    *,
    root: Path,
    seed: int,
    sources: dict[str, str] | None = None,
    eval_set: str | None = None,
    backend: BackendParams | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, TrialList]:
    """One eval set's trials (``trials``: an ``evaluate.trials`` spec), scored with every table.

    ``tables`` maps a name to its ``utterances.parquet``. The rows are those :func:`evaluate` keeps
    for the set (:func:`voiceprint.evaluate.stage.in_set`: the train split and ``eval_set``'s eval utterances by ``sources``;
    all when ``eval_set`` is None), restricted to the utterances every table holds, and the trial
    list is drawn over them as evaluate draws it (:func:`voiceprint.evaluate.trials.load_trials`
    with ``seed``; a relative trial file resolved against ``root``). So when every encoder embedded
    every file these are exactly the trials evaluate scored for each of them.

    Each table is scored through its own ``backend`` (:mod:`voiceprint.evaluate.backend`, fitted on
    its rows of the set's source train split), as evaluate scores it; None: the raw cosine.

    Returns ``(scores by name, same-speaker flag, speakers of the set's eval rows, trials)``; the
    trials index those eval rows (sorted by speaker, then utterance).
    """
    from voiceprint.evaluate.backend import fit_backend, in_domain_train
    from voiceprint.evaluate.stage import in_set, trial_scores
    from voiceprint.evaluate.trials import load_trials

    rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, path in tables.items():
        x, speakers, split, ids = _eval_matrix(path)
        keep = in_set(ids, split, sources or {}, eval_set)
        rows[name] = (x[keep], speakers[keep], split[keep], ids[keep])
    common = np.asarray(sorted(set.intersection(*(set(r[3].tolist()) for r in rows.values()))), dtype=str)
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, (x, speakers, split, ids) in rows.items():
        keep = np.isin(ids, common)
        if not keep.all():
            log.warning(
                "paired differences on set %s: %s lacks %d of its utterances in another table; scoring the %d "
                "every table holds",
                eval_set,
                name,
                int((~keep).sum()),
                len(common),
            )
        kept[name] = (x[keep], speakers[keep], split[keep], ids[keep])
    _, speakers, split, ids = next(iter(kept.values()))
    for name, (_, other_speakers, other_split, other_ids) in kept.items():
        if not (
            np.array_equal(ids, other_ids)
            and np.array_equal(speakers, other_speakers)
            and np.array_equal(split, other_split)
        ):
            raise ValueError(f"{tables[name]}: speakers or splits of the common utterances differ from the others'")
    is_eval = split == "eval"
    trial_list = load_trials(trials, ids, speakers, is_eval, root=root, seed=seed)
    scored: dict[str, np.ndarray] = {}
    same = np.zeros(0, dtype=bool)
    fit_rows = in_domain_train(ids, split, sources or {}, eval_set)
    for name, (x, _, _, _) in kept.items():
        if backend is not None:
            x = fit_backend(x, speakers, fit_rows, backend, seed=seed, name=f"{eval_set or 'eval'} ({name})").apply(x)
        scored[name], same = trial_scores(x[is_eval], speakers[is_eval], trial_list)
    return scored, np.asarray(same, dtype=bool), speakers[is_eval], trial_list


def paired_differences(
    tables: dict[str, Path],
    cfg: EvaluateParams,
    *,
    root: Path | None = None,
    sources: dict[str, str] | None = None,
    eval_set: str | None = None,
) -> dict[str, dict[str, Any]]:
    """EER of each utterance-embeddings table minus the first one's, with a paired speaker-bootstrap interval.

    ``tables`` maps a name (an encoder, a run) to its ``utterances.parquet``. All are scored on one
    eval set's trials, ``cfg.trials`` (the set's evaluate section, :func:`voiceprint.config.eval_sets`),
    drawn as evaluate draws them (:func:`set_trials`: ``eval_set``'s eval utterances by ``sources``,
    or every eval utterance when ``eval_set`` is None; only those every table holds, since an
    encoder that rejected a file would otherwise be compared on other trials; a relative trial file
    resolved against ``root``, default the working directory). Each replicate resamples the
    speakers once for all of them (:func:`voiceprint.evaluate.bootstrap.shared_draw_eers`; each
    table's replicates computed once). Keys ``eer_diff``, ``eer_diff_ci_low``, ``eer_diff_ci_high``,
    ``eer_diff_reference`` (the first name) and ``eer_diff_n_trials``; nothing with
    ``evaluate.bootstrap: 0`` or a single table.
    """
    from voiceprint.evaluate.bootstrap import percentile_interval, shared_draw_eers
    from voiceprint.evaluate.metrics import eer
    from voiceprint.evaluate.stage import trial_speakers

    names = list(tables)
    if cfg.bootstrap == 0 or len(names) < 2:
        return {}
    scored, same, labels, trials = set_trials(
        tables,
        cfg.trials,
        root=root if root is not None else Path.cwd(),
        seed=cfg.seed,
        sources=sources,
        eval_set=eval_set,
        backend=cfg.backend,
    )
    if same.all() or not same.any():
        log.warning(
            "paired EER differences skipped on set %s: its trials over the common eval utterances have no "
            "target or no non-target trial",
            eval_set,
        )
        return {}
    reference = names[0]
    n_trials = int(same.size)
    out: dict[str, dict[str, Any]] = {reference: {"eer_diff_reference": reference, "eer_diff_n_trials": n_trials}}
    a, b = trial_speakers(labels, trials)
    eers = shared_draw_eers(scored, a, b, replicates=cfg.bootstrap, seed=cfg.seed)
    for name in names[1:]:
        interval = percentile_interval(eers[name] - eers[reference], cfg.bootstrap_level)
        out[name] = {
            "eer_diff_reference": reference,
            "eer_diff_n_trials": n_trials,
            "eer_diff": float(eer(scored[name], same)[0] - eer(scored[reference], same)[0]),
            "eer_diff_ci_low": interval.low,
            "eer_diff_ci_high": interval.high,
        }
    return out


def _plot_clusters(detail: Any, speakers: np.ndarray, plots: Path, title: str) -> None:
    from voiceprint.compare.plots import plot_oiidd, plot_umap_scatter

    # UMAP is skipped under four embeddings (no coordinates): an empty scatter says so.
    labels = speakers if len(detail.umap_coords) == len(speakers) else np.zeros(0, dtype=str)
    plot_umap_scatter(detail.umap_coords, labels, plots / "umap.png", f"{title}: UMAP of eval utterances")
    plot_oiidd(detail.cos_own, detail.cos_other, plots / "oiidd_cos.png", f"{title}: cosine distance", "1 - cos")
    plot_oiidd(
        detail.euc_own,
        detail.euc_other,
        plots / "oiidd_euc_umap.png",
        f"{title}: Euclidean after UMAP",
        "Euclidean (UMAP 2-D)",
    )


def compare_encoder(layout: Layout, params: Params, name: str, *, progress: bool = True) -> dict[str, Any]:
    """Embed with encoder ``name`` into ``data/compare/NAME/`` and measure it on every eval set.

    Each set (:func:`voiceprint.config.eval_sets`) is evaluated as the evaluate stage evaluates it
    (its own trials; the train split whole, as distractors and AS-norm cohort) and its eval
    utterances' clusters measured (:func:`voiceprint.compare.cluster_metrics.cluster_analysis`);
    plots go to ``plots/<set>/``. Writes ``data/compare_stats/NAME.json`` (timing) and, without
    timing so that DVC sees the same bytes for the same inputs, ``metrics.json``::

        {"encoder": NAME, "spec": ..., "model_id": ..., "num_parameters": ..., "embeddings_reused_from": ...,
         "gate_*": ... (a mixture of experts only),
         "sets": {SET: {evaluate's metrics of the set and the cluster metrics}, ...}}

    Returns both merged.
    """
    from voiceprint.compare.cluster_metrics import cluster_analysis
    from voiceprint.embed.engine import pick_device
    from voiceprint.embed.stage import embed_segments, reuse_embeddings
    from voiceprint.encoders.loader import load_encoder
    from voiceprint.evaluate.stage import evaluate, in_set

    if name not in params.compare.encoders:
        raise ValueError(f"unknown encoder {name!r}; compare.encoders has {sorted(params.compare.encoders)}")
    spec = params.compare.encoders[name]
    sets, sources, by_source = set_sources(layout, params)
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
    # Left by an earlier run (the flat layout's plots, its evaluate.json): not outputs of this one.
    shutil.rmtree(plots, ignore_errors=True)
    (out / "evaluate.json").unlink(missing_ok=True)

    x, speakers, split, ids = _eval_matrix(utterances)
    blocks: dict[str, dict[str, Any]] = {}
    for set_name, set_params in sets.items():
        only = set_name if by_source else None
        set_plots = plots / set_name
        metrics = evaluate(
            layout,
            params.model_copy(update={"evaluate": set_params}),
            out_plots=set_plots,
            embeddings=utterances,
            eval_source=only,
            write_metrics=False,
        )
        rows = (split == "eval") & in_set(ids, split, sources, only)
        detail = cluster_analysis(
            x[rows], speakers[rows], seed=params.compare.seed, n_neighbors=params.compare.umap_neighbors
        )
        metrics.update(detail.metrics)
        _plot_clusters(detail, speakers[rows], set_plots, f"{name}, {set_name}")
        blocks[set_name] = metrics

    result: dict[str, Any] = {
        **gate_usage,
        "encoder": name,
        "spec": spec,
        "model_id": encoder.model_id,
        "num_parameters": int(encoder.num_parameters()),
        "embeddings_reused_from": embedded.get("reused_from"),
        "sets": blocks,
    }
    timing = {
        "realtime_factor": embedded["realtime_factor"],
        "embed_seconds": embedded["seconds"],
        "device": str(device),
    }
    result = _jsonable(result)
    atomic.write_json(out / "metrics.json", result)
    stats_path = compare_stats_path(layout, name)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stats_path, _jsonable(timing))
    return {**result, **timing}


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: numpy scalars as Python numbers, NaN and infinities as None, nested blocks too."""

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
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


def render_table(rows: dict[str, dict[str, Any]]) -> str:
    """One set's table: a row per encoder (``rows``: encoder -> its keys and the set's metrics)."""
    header = "| encoder | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    lines = [header, rule]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(_column_value(m, k, f), f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _set_notes(rows: dict[str, dict[str, Any]]) -> str:
    """What one set's table was measured on: its speakers, utterances, trials, queries and cohort."""
    m = next(iter(rows.values()), {})
    paired = m.get("eer_diff_n_trials")
    return (
        f"{m.get('n_eval_speakers', '?')} eval speakers, {m.get('n_eval_utterances', '?')} utterances, "
        f"{m.get('n_trials', '?')} trials ({m.get('trials', '?')}); identification: {m.get('n_queries', '?')} "
        f"queries against {m.get('n_gallery_speakers', '?')} speakers; s-norm cohort: {m.get('n_cohort', '?')} "
        "train-split utterances"
        + (f"; paired differences on {paired} trials" if paired is not None else "")
        + "; "
        + _backend_note(m)
        + ".\n"
    )


def _backend_note(m: dict[str, Any]) -> str:
    """How the set's embeddings were scored (the ``backend_*`` keys, :mod:`voiceprint.evaluate.backend`)."""
    steps = []
    if m.get("backend_centre_utterances"):
        steps.append(f"centred on {m['backend_centre_utterances']} train utterances of the source")
    if m.get("backend_lda_dim"):
        steps.append(f"LDA to {m['backend_lda_dim']} dimensions ({m['backend_lda_speakers']} speakers)")
    return "scored " + (", then ".join(steps) if steps else "on the raw cosine")


def render_markdown(sets: dict[str, dict[str, dict[str, Any]]], encoders: dict[str, dict[str, Any]]) -> str:
    """``compare.md`` after its title: a ``## <set>`` table per eval set, the legend, the gate usage.

    ``sets``: set -> encoder -> that set's metrics (compare.json's ``sets``); ``encoders``: encoder ->
    its own keys (``num_parameters``, ``gate_*``), merged into every row.
    """
    parts = []
    for set_name, rows in sets.items():
        merged = {name: {**encoders.get(name, {}), **m} for name, m in rows.items()}
        parts.append(f"## {set_name}\n\n" + render_table(merged) + "\n" + _set_notes(merged))
    reference = next(iter(encoders), "?")
    parts.append(
        "Each set is one source's eval split, scored on its own trials; the train split of every source is "
        "the identification distractors and the s-norm cohort. "
        "CI: speaker-level bootstrap interval (evaluate.bootstrap_level; n/a with evaluate.bootstrap: 0); "
        f"'vs first': EER minus {reference}'s on the same trials of the set, the interval from the same speaker "
        "draws for both (below 0 throughout: lower EER on nearly every resample). "
        "Lower is better for EER, minDCF, OIIDD and CCR; higher for silhouette and top-k. "
        "Throughput (realtime_factor, audio s/s) is in data/compare_stats/ and MLflow: no timing enters this file.\n"
    )
    return "\n".join(parts) + render_gate_usage(encoders)


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


def _read_encoder(layout: Layout, name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(the encoder's keys, {set: metrics})`` of ``data/compare/NAME/metrics.json``."""
    path = compare_dir(layout, name) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro compare-encoder@{name}` first")
    data = json.loads(path.read_text())
    if not isinstance(data.get("sets"), dict):
        raise ValueError(
            f"{path}: no per-set blocks (written before eval sets); run `dvc repro compare-encoder@{name}` again"
        )
    blocks = data.pop("sets")
    return data, blocks


def _set_order(params: Params, blocks: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The sets every encoder was measured on, in ``evaluate.sets`` order (the rest sorted); an error
    when the encoders were measured on different sets (one of them is stale)."""
    found = {name: sorted(b) for name, b in blocks.items()}
    first = next(iter(found.values()), [])
    stale = {name: names for name, names in found.items() if names != first}
    if stale:
        raise ValueError(
            f"the encoders were measured on different eval sets ({found}); rerun `dvc repro` for the "
            "compare-encoder items"
        )
    ordered = [name for name in eval_sets(params) if name in first]
    return ordered + [name for name in first if name not in ordered]


def compare_report(layout: Layout, params: Params, *, log_mlflow: bool = True) -> dict[str, Any]:
    """``compare.json`` and ``compare.md`` from every encoder's metrics, with paired EER differences per set.

    Each set's rows get the paired differences (:func:`paired_differences`) on the trials its
    blocks were evaluated with (``trials``), drawn with ``evaluate.seed``; the set's utterances are
    those of its source in the manifest. ``compare.json``::

        {"sets": {SET: {NAME: {the set's block of NAME's metrics.json, eer_diff*}, ...}, ...},
         "encoders": {NAME: {the keys of NAME's metrics.json but its sets}, ...}}

    MLflow: a parent run ``compare``, a child per encoder whose metrics are named ``<set>/<key>``
    (the encoder's own, ``num_parameters``, and the timing unprefixed).
    """
    from voiceprint.evaluate.stage import eval_sources
    from voiceprint.tracking.runs import log_evaluation

    encoders: dict[str, dict[str, Any]] = {}
    blocks: dict[str, dict[str, dict[str, Any]]] = {}
    timings: dict[str, dict[str, Any]] = {}  # MLflow and the summary only: compare.json stays deterministic
    for name in params.compare.encoders:
        encoders[name], blocks[name] = _read_encoder(layout, name)
        stats = compare_stats_path(layout, name)
        timing = json.loads(stats.read_text()) if stats.exists() else {}
        timings[name] = {k: timing.get(k) for k in TIMING}
    set_names = _set_order(params, blocks)
    sources = eval_sources(layout) if layout.manifest.exists() else {}
    by_source = bool(set(sources.values()) - {""})
    tables = {name: compare_dir(layout, name) / layout.utterance_embeddings.name for name in encoders}
    sets: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name in set_names:
        rows = {name: dict(blocks[name][set_name]) for name in encoders}
        specs = sorted({str(m.get("trials")) for m in rows.values()})
        if len(specs) > 1:
            raise ValueError(
                f"set {set_name}: the encoders were evaluated on different trials {specs}; rerun `dvc repro` "
                "for the compare-encoder items"
            )
        trials = next(iter(rows.values())).get("trials") or params.evaluate.trials
        cfg = params.evaluate.model_copy(update={"trials": trials, "sets": None})
        differences = paired_differences(
            tables, cfg, root=layout.root, sources=sources, eval_set=set_name if by_source else None
        )
        for name, diff in differences.items():
            rows[name].update(diff)
        sets[set_name] = rows
    table_json = layout.root / "compare.json"
    table_md = layout.root / "compare.md"
    atomic.write_json(table_json, _jsonable({"sets": sets, "encoders": encoders}))
    atomic.write_text(table_md, "# Encoder comparison\n\n" + render_markdown(sets, encoders))

    run_ids: dict[str, str] = {}
    if log_mlflow:
        parent = log_evaluation(
            layout,
            params,
            {"n_encoders": len(encoders), "n_sets": len(sets)},
            None,
            run_name="compare",
            extra_artifacts=[table_json, table_md],
            extra_tags={"voiceprint.kind": "compare"},
        )
        run_ids["parent"] = parent
        for name, own in encoders.items():
            # Nested set blocks are logged as <set>/<key> (voiceprint.tracking.runs._numeric_metrics).
            metrics = {**own, **timings[name], **{set_name: sets[set_name][name] for set_name in sets}}
            run_ids[name] = log_evaluation(
                layout,
                params,
                metrics,
                compare_dir(layout, name) / "plots",
                run_name=f"compare:{name}",
                parent_run_id=parent,
                extra_tags={"encoder": name, "encoder_spec": str(own.get("spec"))},
            )
    return {
        "encoders": list(encoders),
        "sets": list(sets),
        "table": str(table_md),
        "throughput": timings,
        "mlflow_run_ids": run_ids,
    }


def run_encoder(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    """The ``compare-encoder@NAME`` stage: :func:`compare_encoder` for one encoder."""
    return compare_encoder(layout, params, name)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``compare`` stage: :func:`compare_report` over every encoder's results."""
    return compare_report(layout, params)

"""The ``evaluate`` stage: verification and closed-set identification on each eval set.

:func:`run` (through :func:`evaluate_sets`) evaluates every set of ``evaluate.sets`` (a source's
eval split, :func:`voiceprint.config.eval_sets`) with :func:`evaluate`: it scores the set's trials
(:mod:`voiceprint.evaluate.trials`), raw and AS-normalised, with speaker-bootstrap intervals, runs
identification against a gallery with train-speaker distractors and counts rejects. It writes
``metrics.json`` (one block per set) and ``plots/<set>/`` atomically, and logs to MLflow.
Design: docs/design/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from voiceprint.common.atomic import atomic_path, write_json, write_text
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embeddings_matrix, l2_normalise
from voiceprint.config import IndexParams, Params, eval_sets
from voiceprint.evaluate.backend import (
    backend_dir,
    backend_path,
    fit_backend,
    in_domain_train,
    of_source,
    write_backend,
)
from voiceprint.evaluate.bootstrap import accuracy_interval, eer_interval
from voiceprint.evaluate.metrics import det_curve, eer, min_dcf
from voiceprint.evaluate.snorm import as_norm_pairs, as_norm_trials
from voiceprint.evaluate.trials import TrialList, load_trials, score_trials
from voiceprint.index.faiss_index import build_index, speaker_centroids

log = logging.getLogger(__name__)

__all__ = [
    "all_pairs_scores",
    "dcf_key",
    "evaluate",
    "evaluate_sets",
    "eval_sources",
    "in_set",
    "pair_speakers",
    "reject_counts",
    "snorm_metrics",
    "trial_scores",
    "trial_speakers",
]

TOP_KS = (1, 5)
DET_CSV_POINTS = 600  # DET rows kept for dvc plots; millions of trials would make it unusable
_PAIR_BLOCK = 1024
_READ_ROWS = 4096  # embeddings read at a time (the embed stage's row group)
_QUERY_BLOCK = 16 * 4096  # identification queries per faiss search: bounds the query copy
REJECT_STAGES = ("prepare", "segment", "embed")  # always reported, 0 when clean: stable metric keys


def dcf_key(p_target: float) -> str:
    """Metric name for a ``p_target``: 0.01 -> ``min_dcf_p0.01``."""
    return f"min_dcf_p{p_target:g}"


def all_pairs_scores(vectors: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score and same-label flag of every unordered pair ``i < j``.

    Computed in row blocks so peak memory is ``block x N`` on top of the ``N(N-1)/2`` results,
    instead of a full ``N x N`` matrix.
    """
    x = l2_normalise(np.asarray(vectors, dtype=np.float32))
    codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]
    n = len(x)
    scores: list[np.ndarray] = []
    same: list[np.ndarray] = []
    for start in range(0, n, _PAIR_BLOCK):
        stop = min(n, start + _PAIR_BLOCK)
        block = x[start:stop] @ x[start:].T  # row r is item start+r, column c is item start+c
        upper = np.triu(np.ones(block.shape, dtype=bool), k=1)  # c > r  <=>  j > i
        scores.append(block[upper])
        same.append((codes[start:stop, None] == codes[None, start:])[upper])
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(scores).astype(np.float32), np.concatenate(same)


def pair_speakers(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speaker codes of both sides of every pair ``i < j``, in the order of :func:`all_pairs_scores`."""
    codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)[1].astype(np.int32)
    rows, cols = np.triu_indices(len(codes), k=1)
    return codes[rows], codes[cols]


def trial_scores(x_eval: np.ndarray, speakers_eval: np.ndarray, trials: TrialList) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, same)`` of the chosen trials: :func:`all_pairs_scores` for ``all-pairs``, else the
    trial list scored a block at a time by index gathering (:func:`voiceprint.evaluate.trials.score_trials`)."""
    if trials.all_pairs:
        return all_pairs_scores(x_eval, speakers_eval)
    assert trials.left is not None and trials.right is not None and trials.same is not None
    return score_trials(x_eval, trials.left, trials.right), trials.same


def trial_speakers(speakers_eval: np.ndarray, trials: TrialList) -> tuple[np.ndarray, np.ndarray]:
    """Speaker codes of both sides of every trial, in the order of :func:`trial_scores` (for the bootstrap)."""
    if trials.all_pairs:
        return pair_speakers(speakers_eval)
    codes = np.unique(np.asarray(speakers_eval).astype(str), return_inverse=True)[1].reshape(-1).astype(np.int32)
    return codes[trials.left], codes[trials.right]


def _absent_interval(name: str, params: Params) -> dict[str, Any]:
    """The interval keys as None, so metrics.json has the same keys when a metric cannot be computed."""
    return {f"{name}_ci_low": None, f"{name}_ci_high": None} if params.evaluate.bootstrap else {}


def _interval_keys(
    name: str, params: Params, scores: np.ndarray, labels: np.ndarray, trials: TrialList | None = None
) -> dict[str, Any]:
    """``<name>_ci_low`` / ``<name>_ci_high``: the speaker-bootstrap interval of the EER of the trials
    (all pairs of ``labels`` when ``trials`` is None), trials grouped by the speakers of their sides."""
    cfg = params.evaluate
    if cfg.bootstrap == 0:
        return {}
    a, b = trial_speakers(labels, trials) if trials is not None else pair_speakers(labels)
    interval = eer_interval(scores, a, b, replicates=cfg.bootstrap, level=cfg.bootstrap_level, seed=cfg.seed)
    return {f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high}


def reject_counts(layout: Layout) -> dict[str, int]:
    """``rejects_total`` and ``rejects_<stage>`` over every rejects table the stages wrote.

    The files are the ones the DuckDB ``rejects`` view unions (:meth:`Layout.reject_tables`):
    ``data/rejects/*.parquet`` plus the embed stage's ``data/embeddings/rejects.parquet``. Rows are
    counted by their ``stage`` column, so the numbers match ``SELECT stage, count(*) FROM rejects``.
    """
    counts = dict.fromkeys(REJECT_STAGES, 0)
    for path in layout.reject_tables():
        for stage in pq.read_table(path, columns=["stage"]).column("stage").to_pylist():
            counts[str(stage)] = counts.get(str(stage), 0) + 1
    return {"rejects_total": sum(counts.values()), **{f"rejects_{stage}": n for stage, n in counts.items()}}


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf; ``None`` (null) marks a metric that could not be computed."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _verification(
    scores: np.ndarray, same: np.ndarray, labels: np.ndarray, params: Params, trials: TrialList | None = None
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    n_target = int(same.sum())
    out: dict[str, Any] = {
        "n_trials": int(same.size),
        "n_target": n_target,
        "n_nontarget": int(same.size - n_target),
        "eer": None,
        "eer_threshold": None,
        **_absent_interval("eer", params),
    }
    for p in params.evaluate.p_targets:
        out[dcf_key(p)] = None
        out[f"{dcf_key(p)}_threshold"] = None
    if out["n_target"] == 0 or out["n_nontarget"] == 0:
        log.warning(
            "verification skipped: %d target and %d non-target trials (need both; at least two "
            "eval speakers, one of them with two utterances)",
            out["n_target"],
            out["n_nontarget"],
        )
        return out, None
    out["eer"], out["eer_threshold"] = eer(scores, same)
    out.update(_interval_keys("eer", params, scores, labels, trials))
    for p in params.evaluate.p_targets:
        value, threshold = min_dcf(scores, same, p, params.evaluate.c_miss, params.evaluate.c_fa)
        out[dcf_key(p)] = value
        out[f"{dcf_key(p)}_threshold"] = _finite_or_none(threshold)
    out["score_mean_target"] = float(scores[same].mean())
    out["score_mean_nontarget"] = float(scores[~same].mean())
    fpr, fnr, _ = det_curve(scores, same)
    return out, (fpr, fnr)


def snorm_metrics(
    x_eval: np.ndarray,
    speakers_eval: np.ndarray,
    cohort: np.ndarray,
    params: Params,
    trials: TrialList | None = None,
) -> dict[str, Any]:
    """EER / minDCF of the eval trials after AS-norm against ``cohort`` (train-split utterances).

    ``trials``: the chosen trial list; None (or ``all-pairs``) normalises every pair.

    Keys ``eer_snorm``, ``min_dcf_p<P>_snorm`` and ``n_cohort``; the metrics are None (with a
    warning) when there is no cohort or no target/non-target trials, and absent with
    ``evaluate.snorm_top_k: 0``.
    """
    top_k = params.evaluate.snorm_top_k
    if top_k == 0:
        return {}
    out: dict[str, Any] = {"eer_snorm": None, **_absent_interval("eer_snorm", params), "n_cohort": int(len(cohort))}
    for p in params.evaluate.p_targets:
        out[f"{dcf_key(p)}_snorm"] = None
    if len(cohort) == 0:
        log.warning("s-norm skipped: no train-split utterances to form the impostor cohort")
        return out
    if trials is None or trials.all_pairs:
        scores, same = as_norm_pairs(x_eval, speakers_eval, cohort, top_k=top_k)
    else:
        assert trials.left is not None and trials.right is not None and trials.same is not None
        scores, same = as_norm_trials(x_eval, trials.left, trials.right, cohort, top_k=top_k), trials.same
    if same.all() or not same.any():
        return out  # _verification has already warned about the missing trials
    out["eer_snorm"] = float(eer(scores, same)[0])
    out.update(_interval_keys("eer_snorm", params, scores, speakers_eval, trials))
    for p in params.evaluate.p_targets:
        out[f"{dcf_key(p)}_snorm"] = float(min_dcf(scores, same, p, params.evaluate.c_miss, params.evaluate.c_fa)[0])
    return out


def _speaker_groups(labels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Group rows by label in O(N log N): ``(names sorted, row order, bounds)``.

    ``order[bounds[i]:bounds[i + 1]]`` are the rows of ``names[i]`` in ascending row order (the
    sort is stable), which is the order ``np.flatnonzero(labels == names[i])`` gives.
    """
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    starts = np.flatnonzero(ranked[1:] != ranked[:-1]) + 1
    bounds = np.concatenate([[0] if len(ranked) else [], starts, [len(ranked)]]).astype(np.int64)
    names = [str(n) for n in ranked[bounds[:-1]]]
    return names, order, bounds


def _query_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """``[start, stop)`` query blocks of ``block`` rows; a tail under half a block joins the last one.

    ``block`` is a multiple of faiss's 4096-row BLAS tile, and no block is small enough for faiss to
    switch from BLAS to its per-query kernel, so every score (and hence every tie-break) is the one
    a single search of all queries gives.
    """
    edges = list(range(0, n, block)) + [n]
    if len(edges) > 2 and edges[-1] - edges[-2] < block // 2:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _enrolled_centroids(x: np.ndarray, enroll_rows: np.ndarray, block: int = 8192) -> np.ndarray:
    """``l2_normalise(x[rows].mean(axis=0))`` of each row of ``enroll_rows`` (S, k), ``block`` speakers at a time."""
    out = np.empty((len(enroll_rows), x.shape[1]), dtype=np.float32)
    for start in range(0, len(enroll_rows), block):
        rows = enroll_rows[start : start + block]
        out[start : start + len(rows)] = l2_normalise(x[rows].mean(axis=1))
    return out


def _index_settings(index: faiss.Index, kind: str) -> str:
    """The search settings in effect after clamping: ``"flat"``, ``"ivf nlist=7 nprobe=1"``, ``"hnsw M=32 ef_search=128"``."""
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        return f"ivf nlist={int(ivf.nlist)} nprobe={int(ivf.nprobe)}"
    if kind == "hnsw":
        return f"hnsw M={int(index.hnsw.nb_neighbors(1))} ef_search={int(index.hnsw.efSearch)}"
    return kind


def _search_ranks(
    index: faiss.Index, x: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, top-k rows)``: position of gallery row ``truth[q]`` in query ``q``'s results (``max(TOP_KS)``: absent)."""
    rank = np.full(len(queries), max(TOP_KS), dtype=np.int64)
    found = np.full((len(queries), k), -1, dtype=np.int64)
    for start, stop in _query_blocks(len(queries), _QUERY_BLOCK):
        _, rows = index.search(np.ascontiguousarray(x[queries[start:stop]]), k)
        hit = rows == truth[start:stop, None]
        rank[start:stop] = np.where(hit.any(axis=1), hit.argmax(axis=1), max(TOP_KS))
        found[start:stop] = rows
    return rank, found


def _index_identification(
    gallery: np.ndarray,
    x: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    exact_rows: np.ndarray,
    index: IndexParams,
) -> dict[str, Any]:
    """Top-k through an index built with the pipeline's ``index`` settings, and its recall vs exact search.

    ``index_recall<k>``: fraction of queries whose exact top-1 gallery speaker is among the index's
    first k results (1.0 for ``flat``). ``index_top<k>``: identification accuracy through the index.
    """
    k = exact_rows.shape[1]
    approx = build_index(gallery, index)
    rank, rows = _search_ranks(approx, x, queries, truth, k)
    exact_top1 = exact_rows[:, :1]
    out: dict[str, Any] = {"index_type": index.type, "index_settings": _index_settings(approx, index.type)}
    out.update({f"index_top{top}": float(np.mean(rank < top)) for top in TOP_KS})
    out.update({f"index_recall{top}": float(np.mean((rows[:, :top] == exact_top1).any(axis=1))) for top in TOP_KS})
    return out


def _identification(
    x: np.ndarray,
    speakers: np.ndarray,
    is_eval: np.ndarray,
    params: Params,
    *,
    index_search: bool = False,
) -> dict[str, Any]:
    """Closed-set top-k identification of held-out eval utterances against a speaker gallery.

    Each eval speaker with more than ``enroll_per_speaker`` utterances enrolls that many, drawn by
    one seeded permutation per speaker (speakers in sorted order, rows in table order); the rest
    are queries. Train speakers not in eval are distractor centroids. ``top1``/``top5`` come from
    an exact flat inner-product index searched in blocks of :data:`_QUERY_BLOCK` queries, so the
    cost is O(N log N) grouping plus O(queries x gallery) scoring, and memory past the embeddings
    is the gallery plus one block.

    With ``index_search`` the same gallery is also indexed with ``params.index`` (the settings the
    ``index`` stage builds ``data/index`` with: flat, ivf with nlist/nprobe, hnsw) and searched
    again: ``index_top1``/``index_top5`` and ``index_recall1``/``index_recall5`` (the exact top-1
    among the index's top 1 / top 5), see :func:`_index_identification`.
    """
    cfg = params.evaluate
    rng = np.random.default_rng(cfg.seed)
    eval_idx = np.flatnonzero(is_eval)
    eval_speakers, order, bounds = _speaker_groups(speakers[eval_idx])
    rows_by_speaker = eval_idx[order]

    k_enroll = cfg.enroll_per_speaker
    gallery_labels: list[str] = []
    enroll_rows: list[np.ndarray] = []
    query_idx: list[np.ndarray] = []
    skipped: list[str] = []
    for i, spk in enumerate(eval_speakers):
        idx = rows_by_speaker[bounds[i] : bounds[i + 1]]
        if len(idx) <= k_enroll:
            skipped.append(spk)
            continue
        perm = rng.permutation(len(idx))
        enroll_rows.append(idx[perm[:k_enroll]])
        query_idx.append(idx[perm[k_enroll:]])
        gallery_labels.append(spk)
    if skipped:
        log.warning(
            "identification: %d eval speaker(s) have <= %d utterances (enroll_per_speaker) and are left out: %s",
            len(skipped),
            k_enroll,
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    n_eval_in_gallery = len(gallery_labels)
    gallery = [_enrolled_centroids(x, np.stack(enroll_rows))] if enroll_rows else []
    n_distractors = 0
    if cfg.train_distractors and n_eval_in_gallery:
        train_idx = np.flatnonzero(~is_eval)
        # A speaker also present in eval is not a distractor (it would duplicate the true label).
        train_idx = train_idx[~np.isin(speakers[train_idx], eval_speakers)]
        if len(train_idx):
            names, centroids, _ = speaker_centroids(x[train_idx], speakers[train_idx])
            gallery.append(centroids)
            gallery_labels.extend(names)
            n_distractors = len(names)

    queries = np.concatenate(query_idx) if query_idx else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {
        "n_queries": int(len(queries)),
        "n_gallery_speakers": len(gallery_labels),
        "n_gallery_eval_speakers": n_eval_in_gallery,
        "n_gallery_distractors": n_distractors,
        "n_identification_skipped_speakers": len(skipped),
    }
    for k in TOP_KS:
        out[f"top{k}"] = None
    out.update(_absent_interval("top1", params))
    if index_search:
        out.update(index_type=params.index.type, index_settings=None)
        out.update({f"index_{name}{k}": None for name in ("top", "recall") for k in TOP_KS})
    if len(gallery_labels) < 2 or len(queries) == 0:
        log.warning(
            "identification skipped: %d gallery speaker(s), %d queries (need >= 2 and >= 1)",
            len(gallery_labels),
            len(queries),
        )
        out["n_queries"] = 0
        return out

    gallery_matrix = np.concatenate(gallery)
    flat = IndexParams(type="flat", use_gpu=params.index.use_gpu)
    index = build_index(gallery_matrix, flat)
    k = min(max(TOP_KS), len(gallery_labels))
    # Gallery rows are unique labels and eval speaker i is gallery row i, so a query is right at k
    # when gallery row ``truth[q]`` is among its first k results.
    truth = np.repeat(np.arange(n_eval_in_gallery, dtype=np.int64), [len(q) for q in query_idx])
    rank, exact_rows = _search_ranks(index, x, queries, truth, k)
    out.update({f"top{top}": float(np.mean(rank < top)) for top in TOP_KS})
    if index_search:
        out.update(_index_identification(gallery_matrix, x, queries, truth, exact_rows, params.index))
    if cfg.bootstrap:
        # Speaker codes in gallery order sort like the speaker ids, so the draws are those of the ids.
        interval = accuracy_interval(
            rank == 0, truth, replicates=cfg.bootstrap, level=cfg.bootstrap_level, seed=cfg.seed
        )
        out["top1_ci_low"], out["top1_ci_high"] = interval.low, interval.high
    return out


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _probit(p: np.ndarray, eps: float) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf(np.clip(p, eps, 1.0 - eps))


def _thin_curve(fpr: np.ndarray, fnr: np.ndarray, max_points: int = DET_CSV_POINTS) -> np.ndarray:
    """Indices of at most ~``max_points`` DET points, evenly spaced along the curve in probit space.

    Even spacing along the drawn curve (not in threshold) keeps the shape in the tails, where the
    interesting low-error points are, while dropping the near-duplicate points in the middle.
    """
    n = len(fpr)
    if n <= max_points:
        return np.arange(n)
    x, y = _probit(fpr, 1e-6), _probit(fnr, 1e-6)
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    step = length[-1] / (max_points - 1) if length[-1] > 0 else 1.0
    bins = np.floor(length / step)
    keep = np.concatenate([[True], bins[1:] != bins[:-1]])
    keep[-1] = True
    return np.flatnonzero(keep)


def _save_figure(fig: Figure, target: Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend switch
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _plot_det(curve: tuple[np.ndarray, np.ndarray] | None, metrics: dict[str, Any], target: Path) -> None:
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    ticks = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    eps = 0.0005
    if curve is None:
        ax.text(0.5, 0.5, "not enough trials for a DET curve", ha="center", va="center")
    else:
        fpr, fnr = curve
        ax.plot(_probit(fpr, eps), _probit(fnr, eps), lw=1.5, label="DET")
        if metrics.get("eer") is not None:
            e = _probit(np.array([metrics["eer"]]), eps)[0]
            ax.plot([e], [e], "o", color="C3", label=f"EER {100 * metrics['eer']:.2f}%")
        lo, hi = _probit(np.array([eps, 0.6]), eps)
        ax.plot([lo, hi], [lo, hi], ":", color="grey", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xticks(_probit(ticks, eps), [f"{100 * t:g}" for t in ticks])
        ax.set_yticks(_probit(ticks, eps), [f"{100 * t:g}" for t in ticks])
        ax.legend(loc="upper right")
    ax.set_xlabel("False acceptance rate (%)")
    ax.set_ylabel("False rejection rate (%)")
    ax.set_title("DET curve (probit axes), eval split")
    ax.grid(True, alpha=0.3)
    _save_figure(fig, target)


def _plot_scores(
    scores: np.ndarray, same: np.ndarray, metrics: dict[str, Any], target: Path, trials: str = "all pairs"
) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if same.any() and (~same).any():
        bins = np.linspace(float(scores.min()), float(scores.max()), 80)
        ax.hist(scores[~same], bins=bins, density=True, alpha=0.55, label=f"non-target ({(~same).sum():,})")
        ax.hist(scores[same], bins=bins, density=True, alpha=0.55, label=f"target ({same.sum():,})")
        if metrics.get("eer_threshold") is not None:
            ax.axvline(
                metrics["eer_threshold"],
                color="k",
                ls="--",
                lw=1,
                label=f"EER threshold {metrics['eer_threshold']:.3f}",
            )
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not enough trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(f"Verification scores, eval split ({trials})")
    _save_figure(fig, target)


def _trials_title(trials: TrialList) -> str:
    if trials.all_pairs:
        return "all pairs"
    if trials.spec.startswith("sampled:"):
        return f"{len(trials):,} sampled trials"
    return f"trial file {Path(trials.spec).name}"


def _write_det_csv(curve: tuple[np.ndarray, np.ndarray] | None, target: Path) -> None:
    lines = ["fpr,fnr"]
    if curve is not None:
        fpr, fnr = curve
        for i in _thin_curve(fpr, fnr):
            lines.append(f"{fpr[i]:.8g},{fnr[i]:.8g}")
    write_text(target, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------


def evaluate(
    layout: Layout,
    params: Params,
    *,
    out_metrics: str | Path | None = None,
    out_plots: str | Path | None = None,
    embeddings: str | Path | None = None,
    trials_root: str | Path | None = None,
    index_search: bool = False,
    eval_source: str | None = None,
    write_metrics: bool = True,
    out_backend: str | Path | None = None,
) -> dict[str, Any]:
    """Compute verification and identification metrics of one eval set; write metrics.json and plots.

    Returns the metrics dictionary written to ``out_metrics`` (default ``layout.metrics``).
    Metrics that cannot be computed (too few speakers or utterances) are ``None`` with a warning
    in the log, never an exception, so a small ``folder`` dataset still gets a report. A trial
    list that cannot be used (``evaluate.trials``: a bad trial file, all pairs of too many
    utterances, more samples than pairs) is a :class:`voiceprint.config.ConfigError`, raised
    before anything is written. A relative trial-file path is resolved against ``trials_root``
    (default ``layout.root``, the project). ``index_search`` adds identification through an index
    built with ``params.index`` (``index_*`` keys, :func:`_identification`); the ``evaluate`` stage
    sets it, the encoder comparison does not (its outputs do not depend on ``index``).
    ``eval_source`` keeps only that source's eval utterances (by the manifest; the train split
    stays whole); None: every eval utterance. ``write_metrics=False`` writes the plots only.
    ``out_backend``: where to write the fitted scoring back-end (:mod:`voiceprint.evaluate.backend`).
    """
    started = time.perf_counter()
    out_metrics = Path(out_metrics) if out_metrics is not None else layout.metrics
    out_plots = Path(out_plots) if out_plots is not None else layout.plots

    path = Path(embeddings) if embeddings is not None else layout.utterance_embeddings
    if not path.exists():
        raise FileNotFoundError(f"{path}: utterance embeddings not found; run the embed stage first")
    sources = eval_sources(layout) if eval_source is not None else {}
    table, x = _read_sorted(path, sources, eval_source)
    model_ids = sorted({m for m in table.column("model_id").unique().to_pylist() if m is not None})
    if len(model_ids) > 1:
        raise ValueError(f"{path}: embeddings from several models {model_ids}; re-run the embed stage")
    speakers = np.asarray(table.column("speaker_id").to_pylist(), dtype=object).astype(str)
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    is_eval = split == "eval"
    ids = np.asarray(table.column("utterance_id").to_pylist(), dtype=object).astype(str)
    n_eval_speakers = len(set(speakers[is_eval]))
    if n_eval_speakers < 2:
        log.warning("only %d eval speaker(s): need at least 2 to evaluate", n_eval_speakers)
    backend = fit_backend(
        x,
        speakers,
        in_domain_train(ids, split, sources, eval_source),
        params.evaluate.backend,
        seed=params.evaluate.seed,
        name=eval_source or "eval",
    )
    embedding_dim = int(x.shape[1])  # the encoder's; LDA scores in fewer
    x = backend.apply(x, in_place=True)
    if out_backend is not None:
        write_backend(Path(out_backend), backend)
    trials = load_trials(
        params.evaluate.trials,
        ids,
        speakers,
        is_eval,
        root=Path(trials_root) if trials_root is not None else layout.root,
        seed=params.evaluate.seed,
    )

    scores, same = trial_scores(x[is_eval], speakers[is_eval], trials)
    verification, curve = _verification(scores, same, speakers[is_eval], params, trials)
    normalised = snorm_metrics(x[is_eval], speakers[is_eval], x[~is_eval], params, trials)
    identification = _identification(x, speakers, is_eval, params, index_search=index_search)

    metrics: dict[str, Any] = {
        "trials": trials.spec,
        **verification,
        **normalised,
        **identification,
        "n_eval_speakers": n_eval_speakers,
        "n_eval_utterances": int(is_eval.sum()),
        "n_train_speakers": len(set(speakers[~is_eval])),
        "embedding_dim": embedding_dim,
        **backend.stats(),
        "model_id": model_ids[0] if model_ids else "unknown",
        **reject_counts(layout),
    }
    metrics = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()}

    out_plots.mkdir(parents=True, exist_ok=True)
    _plot_det(curve, metrics, out_plots / "det.png")
    _plot_scores(scores, same, metrics, out_plots / "scores.png", _trials_title(trials))
    _write_det_csv(curve, out_plots / "det.csv")
    if write_metrics:
        write_json(out_metrics, metrics)
    log.info(
        "evaluated %d trials, %d queries in %.1fs: %s",
        metrics["n_trials"],
        metrics["n_queries"],
        time.perf_counter() - started,
        json.dumps({k: metrics.get(k) for k in ("eer", "eer_snorm", "top1", "top5", "index_top1", "index_recall1")}),
    )
    return metrics


def _read_sorted(path: Path, sources: dict[str, str], eval_source: str | None) -> tuple[pa.Table, np.ndarray]:
    """The utterances :func:`evaluate` keeps (:func:`in_set`), sorted by speaker then utterance: their
    id columns, and their L2-normalised embeddings as a float32 matrix in the same order.

    The embeddings are read :data:`_READ_ROWS` rows at a time straight into the matrix: read whole,
    the ``fixed_size_list`` column costs several times the matrix, and sorting the table another copy.
    """
    file = pq.ParquetFile(path, pre_buffer=False)
    table = file.read(columns=["utterance_id", "speaker_id", "split", "model_id"])
    rows = np.arange(table.num_rows)
    if eval_source is not None:
        ids = np.asarray(table.column("utterance_id").to_pylist(), dtype=object)
        split = np.asarray(table.column("split").to_pylist(), dtype=object)
        keep = in_set(ids, split, sources, eval_source)
        table, rows = table.filter(keep), rows[keep]
    order = pc.sort_indices(table, sort_keys=[("speaker_id", "ascending"), ("utterance_id", "ascending")])
    table, rows = table.take(order), rows[order.to_numpy()]
    position = np.full(file.metadata.num_rows, -1, dtype=np.int64)  # file row -> matrix row (-1: dropped)
    position[rows] = np.arange(len(rows))
    x = np.empty((len(rows), file.schema_arrow.field("embedding").type.list_size), dtype=np.float32)
    start = 0
    for batch in file.iter_batches(batch_size=_READ_ROWS, columns=["embedding"]):
        vectors = embeddings_matrix(batch)
        at = position[start : start + len(vectors)]
        x[at[at >= 0]] = vectors[at >= 0]
        start += len(vectors)
    return table, l2_normalise(x, out=x)


def in_set(ids: np.ndarray, split: np.ndarray, sources: dict[str, str], eval_set: str | None) -> np.ndarray:
    """The rows :func:`evaluate` keeps for ``eval_set``: the whole train split and that source's eval
    utterances by ``sources`` (:func:`eval_sources`; every row when ``eval_set`` is None)."""
    if eval_set is None:
        return np.ones(len(ids), dtype=bool)
    return (np.asarray(split) == "train") | of_source(ids, sources, eval_set)


def eval_sources(layout: Layout) -> dict[str, str]:
    """``{utterance_id: source}`` from the manifest (every utterance of the primary source when the
    manifest predates sources)."""
    table = pq.read_table(layout.manifest)
    utterances = table.column("utterance_id").to_pylist()
    if "source" not in table.column_names:
        return dict.fromkeys(utterances, "")
    return dict(zip(utterances, table.column("source").to_pylist()))


def evaluate_sets(
    layout: Layout,
    params: Params,
    *,
    out_metrics: str | Path | None = None,
    out_plots: str | Path | None = None,
    embeddings: str | Path | None = None,
    index_search: bool = False,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` on each set of :func:`voiceprint.config.eval_sets`, with its own trials.

    Returns and writes ``{set: metrics}`` to ``out_metrics`` (default ``layout.metrics``), one block
    per set so that ``dvc metrics diff`` lines them up; each set's plots go to ``out_plots/<set>/``
    and its scoring back-end to ``data/backend/<set>.json``.
    A set without eval utterances is an error naming the sources that have some.
    """
    out_metrics = Path(out_metrics) if out_metrics is not None else layout.metrics
    out_plots = Path(out_plots) if out_plots is not None else layout.plots
    sets = eval_sets(params)
    present = set(eval_sources(layout).values()) if layout.manifest.exists() else set()
    by_source = bool(present - {""})  # a manifest that names sources (else: one set, every eval utterance)
    blocks: dict[str, dict[str, Any]] = {}
    for stale in backend_dir(layout).glob("*.json"):  # a set no longer evaluated
        stale.unlink()
    for name, evaluate_params in sets.items():
        if by_source and name not in present:
            raise ValueError(
                f"evaluate.sets: no utterances of source {name!r} in {layout.manifest} "
                f"(sources there: {sorted(present)}); run the prepare stage"
            )
        only = name if by_source else None
        blocks[name] = evaluate(
            layout,
            params.model_copy(update={"evaluate": evaluate_params}),
            out_plots=out_plots / name,
            embeddings=embeddings,
            index_search=index_search,
            eval_source=only,
            write_metrics=False,
            out_backend=backend_path(layout, name),
        )
    write_json(out_metrics, blocks)
    return blocks


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``evaluate`` stage: :func:`evaluate_sets`, logged to MLflow with its plots."""
    from voiceprint.tracking.runs import log_evaluation

    # The MLflow run spans the stage's work (its duration in the UI), not just the logging at the end.
    started_ms = int(time.time() * 1000)
    metrics = evaluate_sets(layout, params, index_search=True)
    run_id = log_evaluation(layout, params, metrics, layout.plots, start_time_ms=started_ms)
    return {**metrics, "mlflow_run_id": run_id}

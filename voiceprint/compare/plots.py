"""Plots for the cluster-separation comparison: UMAP scatter and OIIDD density overlap.

Like :mod:`voiceprint.evaluate.stage`, figures are built with :class:`matplotlib.figure.Figure` and an
explicit Agg canvas, never ``pyplot``: no global backend switch or figure registry, so plotting is
safe inside Prefect workers and threads and leaks no figures. Every PNG is written through
:func:`voiceprint.common.atomic.atomic_path`, so a reader (DVC, MLflow artefact upload) never sees a
half-written file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from voiceprint.common.atomic import atomic_path
from voiceprint.compare.cluster_metrics import kde_pair, overlap_area

__all__ = ["plot_oiidd", "plot_umap_scatter"]

MAX_LEGEND_SPEAKERS = 20


def _save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    target = Path(path)
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend switch
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return target


def _speaker_colours(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours: ``tab20`` up to 20 speakers (distinct, legend-friendly), else
    evenly spaced hues of ``hsv`` (a legend is not drawn then, so only "different speakers look
    different" matters)."""
    from matplotlib import colormaps

    if n <= 20:
        return colormaps["tab20"](np.arange(n) % 20)
    # hsv wraps around (0 and 1 are both red), so stop short of 1; a fixed permutation puts
    # neighbouring hues on non-neighbouring speaker indices.
    hues = np.linspace(0.0, 1.0, n, endpoint=False)
    order = np.random.default_rng(0).permutation(n)
    return colormaps["hsv"](hues[order])


def plot_umap_scatter(
    coords: ArrayLike,
    labels: ArrayLike | Sequence[Any],
    path: str | Path,
    title: str,
) -> Path:
    """Scatter of 2-D (UMAP) coordinates coloured by speaker; legend only for <= 20 speakers.

    Returns the written path. Point size and opacity shrink with ``N`` so dense plots stay
    readable.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got shape {xy.shape}")
    y = np.asarray(labels, dtype=object).reshape(-1).astype(str)
    if len(y) != len(xy):
        raise ValueError(f"{len(xy)} points for {len(y)} labels")

    names, codes = np.unique(y, return_inverse=True)
    colours = _speaker_colours(len(names))
    n = len(xy)
    size = float(np.clip(2000.0 / max(n, 1), 3.0, 30.0))
    alpha = 0.85 if n < 2000 else 0.6

    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    if n == 0:
        ax.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax.transAxes)
    elif len(names) <= MAX_LEGEND_SPEAKERS:
        for i, name in enumerate(names):
            m = codes == i
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colours[i], alpha=alpha, lw=0, label=name)
        ax.legend(
            title="speaker",
            fontsize="small",
            markerscale=max(1.0, 20.0 / size) ** 0.5,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
        )
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colours[codes], alpha=alpha, lw=0)
    ax.set_title(f"{title}\n{n:,} embeddings, {len(names)} speakers")
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.2)
    return _save(fig, path)


def plot_oiidd(
    a: ArrayLike,
    b: ArrayLike,
    path: str | Path,
    title: str,
    metric_label: str,
) -> Path:
    """Both KDE densities with their overlap shaded and the OIIDD value in the title.

    ``a`` are the distances to the own speaker's centroid (intra), ``b`` to the nearest other
    speaker's centroid (inter); ``metric_label`` names the x axis (e.g. "cosine distance").
    The densities come from :func:`voiceprint.compare.cluster_metrics.kde_pair`, the same estimate
    :func:`~voiceprint.compare.cluster_metrics.oiidd` integrates, so the shaded area *is* the number in
    the title. With too few values a placeholder figure explains why instead of raising.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    try:
        xs, pa, pb = kde_pair(a, b)
    except ValueError as exc:
        ax.text(0.5, 0.5, f"OIIDD undefined:\n{exc}", ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_title(f"{title}\nOIIDD = n/a")
    else:
        overlap_curve = np.minimum(pa, pb)
        value = overlap_area(xs, pa, pb)
        n_a = int(np.isfinite(np.asarray(a, dtype=np.float64)).sum())
        n_b = int(np.isfinite(np.asarray(b, dtype=np.float64)).sum())
        ax.plot(xs, pa, color="C0", lw=1.5, label=f"own centroid (intra), n={n_a:,}")
        ax.plot(xs, pb, color="C3", lw=1.5, label=f"nearest other centroid (inter), n={n_b:,}")
        ax.fill_between(xs, overlap_curve, color="C4", alpha=0.35, lw=0, label="overlap")
        ax.set_ylim(bottom=0.0)
        ax.legend(fontsize="small")
        shown = "n/a" if math.isnan(value) else f"{value:.4f}"
        ax.set_title(f"{title}\nOIIDD = {shown}")
    ax.set_xlabel(metric_label)
    ax.set_ylabel("density")
    ax.grid(True, alpha=0.2)
    return _save(fig, path)

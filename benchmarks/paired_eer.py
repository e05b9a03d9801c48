"""Did recipe B train a better model than recipe A, on these speakers? Paired EER differences of finished runs.

Two runs of the pipeline (two seeds, two recipes) evaluated on the same eval split share its
speakers, so the question "is B better" is about the difference of their EERs on the same
trials, not about whether their own intervals overlap. This prints, for each project after the
first, its EER minus the first one's with a paired speaker-bootstrap interval (as the compare
stage reports for encoders), next to each run's own interval, and last the mean EER of all the
runs (several seeds of one recipe) with its interval: the runs' EERs averaged per replicate. All
of these come from one set of speaker draws and each run's replicates, computed once
(:func:`voiceprint.evaluate.bootstrap.shared_draw_eers`).

    python benchmarks/paired_eer.py PROJECT_A PROJECT_B [PROJECT_C ...] [--replicates 1000]
        [--set speech-commands] [--trials sampled:200000] [--centre none] [--lda-dim none]

Each PROJECT is a project directory whose ``data/embeddings/utterances.parquet`` the embed stage
wrote (``dvc repro evaluate`` done). Projects must hold the same eval utterances; only those all
of them hold are scored. ``--set`` keeps one eval set (a source of the first project's manifest),
``--trials`` draws that set's trials as the evaluate stage does (default: all pairs).
``--centre`` and ``--lda-dim`` set the scoring back-end (``evaluate.backend``) of every project.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from voiceprint.common.layout import Layout  # noqa: E402
from voiceprint.compare.stage import set_trials  # noqa: E402
from voiceprint.config import BackendParams  # noqa: E402
from voiceprint.evaluate.bootstrap import percentile_interval, shared_draw_eers  # noqa: E402
from voiceprint.evaluate.metrics import eer  # noqa: E402
from voiceprint.evaluate.stage import eval_sources, trial_speakers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path, help="project directories; the first is the reference")
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set", dest="eval_set", default=None, help="one eval set (source name); default: every eval utterance"
    )
    ap.add_argument("--trials", default="all-pairs", help="an evaluate.trials spec for the set (default all-pairs)")
    default = BackendParams()
    ap.add_argument(
        "--centre",
        choices=["none", "source"],
        default=default.centre,
        help=f"evaluate.backend.centre for every project (default {default.centre})",
    )
    ap.add_argument(
        "--lda-dim",
        type=lambda v: None if v == "none" else int(v),
        default=default.lda_dim,
        help=f"evaluate.backend.lda_dim, or 'none' (default {default.lda_dim})",
    )
    args = ap.parse_args(argv)
    backend = BackendParams(centre=args.centre, lda_dim=args.lda_dim)
    if len(args.projects) < 2:
        ap.error("give at least two projects")
    tables: dict[str, Path] = {}
    for project in args.projects:
        path = Layout.at(project).utterance_embeddings
        if not path.exists():
            ap.error(f"{path}: no utterance embeddings (run the embed stage in {project})")
        name = str(project)
        if name in tables:
            ap.error(f"{project} given twice")
        tables[name] = path
    sources = None
    if args.eval_set is not None:
        sources = eval_sources(Layout.at(args.projects[0]))
        if args.eval_set not in set(sources.values()):
            ap.error(f"no eval set {args.eval_set!r} in {args.projects[0]} (sets: {sorted(set(sources.values()))})")
    scored, same, labels, trials = set_trials(
        tables, args.trials, root=Path.cwd(), seed=args.seed, sources=sources, eval_set=args.eval_set, backend=backend
    )
    a, b = trial_speakers(labels, trials)
    eers = shared_draw_eers(scored, a, b, replicates=args.replicates, seed=args.seed)
    point = {name: eer(scores, same)[0] for name, scores in scored.items()}
    reference = next(iter(scored))

    def bounds(values: np.ndarray, fmt: str) -> tuple[str, str]:
        interval = percentile_interval(values, args.level)
        return format(100 * interval.low, fmt), format(100 * interval.high, fmt)

    print(f"{'project':<40} {'EER %':>7} {'own CI':>13} {'minus the first (paired CI)':>32}")
    for name in scored:
        low, high = bounds(eers[name], ".2f")
        paired = "reference"
        if name != reference:
            d_low, d_high = bounds(eers[name] - eers[reference], "+.2f")
            paired = f"{100 * (point[name] - point[reference]):+.2f} ({d_low} to {d_high})"
        print(f"{name:<40} {100 * point[name]:>7.2f} {low:>6}-{high:<6} {paired:>32}")
    low, high = bounds(np.mean([eers[name] for name in scored], axis=0), ".2f")
    mean = np.mean(list(point.values()))
    print(f"{'mean of the ' + str(len(scored)) + ' runs':<40} {100 * mean:>7.2f} {low:>6}-{high:<6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

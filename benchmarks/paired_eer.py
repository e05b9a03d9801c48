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

Each PROJECT is a project directory whose ``data/embeddings/utterances.parquet`` the embed stage
wrote (``dvc repro evaluate`` done). Projects must hold the same eval utterances; only those all
of them hold are scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from voiceprint.common.layout import Layout  # noqa: E402
from voiceprint.compare.stage import common_eval_trials  # noqa: E402
from voiceprint.evaluate.bootstrap import percentile_interval, shared_draw_eers  # noqa: E402
from voiceprint.evaluate.metrics import eer  # noqa: E402
from voiceprint.evaluate.stage import pair_speakers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path, help="project directories; the first is the reference")
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
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
    scored, same, labels = common_eval_trials(tables)
    a, b = pair_speakers(labels)
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

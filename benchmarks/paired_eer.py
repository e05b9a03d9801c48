"""Did recipe B train a better model than recipe A, on these speakers? Paired EER differences of finished runs.

Two runs of the pipeline (two seeds, two recipes) evaluated on the same eval split share its
speakers, so the question "is B better" is about the difference of their EERs on the same
trials, not about whether their own intervals overlap. This prints, for each project after the
first, its EER minus the first one's with a paired speaker-bootstrap interval (one set of speaker
draws for both; :func:`voiceprint.compare.paired_differences`, as the compare stage reports for
encoders), next to each run's own interval, and last the mean EER of all the runs (several seeds
of one recipe) with its interval: the runs' EERs averaged per replicate, one set of draws for all.

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

from voiceprint.bootstrap import eer_interval, percentile_interval, replicate_eers, speaker_counts  # noqa: E402
from voiceprint.compare import _eval_matrix, common_eval_trials, paired_differences  # noqa: E402
from voiceprint.config import EvaluateParams  # noqa: E402
from voiceprint.evaluate import all_pairs_scores, pair_speakers  # noqa: E402
from voiceprint.layout import Layout  # noqa: E402
from voiceprint.metrics import eer  # noqa: E402


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
    cfg = EvaluateParams(bootstrap=args.replicates, bootstrap_level=args.level, seed=args.seed)
    differences = paired_differences(tables, cfg)
    print(f"{'project':<40} {'EER %':>7} {'own CI':>13} {'minus the first (paired CI)':>32}")
    for name, path in tables.items():
        x, speakers, split, _ = _eval_matrix(path)
        keep = split == "eval"
        scores, same = all_pairs_scores(x[keep], speakers[keep])
        a, b = pair_speakers(speakers[keep])
        own = eer_interval(scores, a, b, replicates=args.replicates, level=args.level, seed=args.seed)
        d = differences.get(name, {})
        paired = (
            "reference" if "eer_diff" not in d
            else f"{100 * d['eer_diff']:+.2f} ({100 * d['eer_diff_ci_low']:+.2f} to {100 * d['eer_diff_ci_high']:+.2f})"
        )
        print(f"{name:<40} {100 * eer(scores, same)[0]:>7.2f} {100 * own.low:>6.2f}-{100 * own.high:<6.2f} {paired:>32}")
    scored, same, labels = common_eval_trials(tables)
    a, b = pair_speakers(labels)
    counts = speaker_counts(len(np.unique(labels)), args.replicates, args.seed)
    mean = np.mean([replicate_eers(s, a, b, counts) for s in scored.values()], axis=0)
    interval = percentile_interval(mean, args.level)
    point = np.mean([eer(s, same)[0] for s in scored.values()])
    print(f"{'mean of the ' + str(len(scored)) + ' runs':<40} {100 * point:>7.2f} "
          f"{100 * interval.low:>6.2f}-{100 * interval.high:<6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scoring a VoxCeleb1-O-sized trial file (``evaluate.trials: <path>``), not a timed test.

A synthetic eval split shaped like VoxCeleb1's test set (40 speakers, ~4,700 utterances, 192-d
embeddings: one random direction per speaker plus noise) is written as the evaluate stage reads it
(``data/embeddings/utterances.parquet`` of a scratch project, with a train split of 100 speakers
for the AS-norm cohort), and a trial file of 37,611 lines in the VoxCeleb format
(``1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav``), half target and half
non-target, next to it. Timed:

* ``scoring_s``: read and resolve the trial file, score every trial (index gathering, blockwise),
  EER and minDCF at both priors and the DET curve: the verification path, target < 5 s;
* ``stage_s``: the whole ``evaluate`` stage with that file (AS-norm against the cohort, 1,000
  speaker-bootstrap replicates, identification, plots, metrics.json).

    python benchmarks/bench_trials.py [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import emit, hardware, peak_rss_mb  # noqa: E402
from voiceprint.common.layout import Layout  # noqa: E402
from voiceprint.common.schema import embedding_column, embedding_schema, l2_normalise  # noqa: E402
from voiceprint.config import EvaluateParams, Params  # noqa: E402
from voiceprint.evaluate.metrics import det_curve, eer, min_dcf  # noqa: E402
from voiceprint.evaluate.stage import evaluate  # noqa: E402
from voiceprint.evaluate.trials import read_trial_file, sample_trials, score_trials  # noqa: E402

N_TRIALS = 37_611  # VoxCeleb1-O (cleaned): 37,611 trials over 4,708 utterances of 40 speakers
N_SPEAKERS = 40
N_UTTERANCES = 4_708
DIM = 192
TARGET_S = 5.0


def write_project(root: Path, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The scratch project's utterance embeddings and trial file; returns (trial file, ids, speakers, is_eval)."""
    rng = np.random.default_rng(seed)
    per = rng.multinomial(N_UTTERANCES - 2 * N_SPEAKERS, np.full(N_SPEAKERS, 1 / N_SPEAKERS)) + 2
    rows: list[tuple[str, str, str, str]] = []  # utterance_id, speaker_id, split, trial name
    vectors = []
    for s, count in enumerate(per.tolist()):
        speaker = f"id{10270 + s}"
        centre = rng.normal(size=DIM)
        for u in range(count):
            video, clip = f"v{u // 8:010d}", f"{u % 8 + 1:05d}"
            rows.append((f"{speaker}-{video}-{clip}", speaker, "eval", f"{speaker}/{video}/{clip}.wav"))
            vectors.append(centre + 2.2 * rng.normal(size=DIM))
    for s in range(100):  # the AS-norm cohort and identification distractors
        speaker, centre = f"id{20000 + s}", rng.normal(size=DIM)
        for u in range(10):
            rows.append((f"{speaker}-c-{u:05d}", speaker, "train", ""))
            vectors.append(centre + 2.2 * rng.normal(size=DIM))

    schema = embedding_schema(DIM, utterance_level=True)
    n = len(rows)
    table = pa.table(
        {
            "utterance_id": [r[0] for r in rows],
            "speaker_id": [r[1] for r in rows],
            "split": [r[2] for r in rows],
            "start_s": np.zeros(n),
            "end_s": np.full(n, 8.0),
            "num_segments": np.ones(n, dtype=np.int32),
            "model_id": ["bench@0001"] * n,
            "embedding": embedding_column(l2_normalise(np.asarray(vectors, dtype=np.float32))),
        },
        schema=schema,
    )
    layout = Layout.at(root)
    layout.utterance_embeddings.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, layout.utterance_embeddings)

    # The stage's row order (speaker, then utterance id) is the order the sampled indices refer to.
    order = sorted(range(n), key=lambda k: (rows[k][1], rows[k][0]))
    ids = np.array([rows[k][0] for k in order])
    speakers = np.array([rows[k][1] for k in order])
    is_eval = np.array([rows[k][2] == "eval" for k in order])
    names = np.array([rows[k][3] for k in order])[is_eval]
    drawn = sample_trials(speakers[is_eval], N_TRIALS, seed)
    assert drawn.left is not None and drawn.right is not None and drawn.same is not None
    path = root / "voxceleb1_o_synthetic.txt"
    lines = (
        f"{int(t)} {names[a]} {names[b]}"
        for t, a, b in zip(drawn.same.tolist(), drawn.left.tolist(), drawn.right.tolist(), strict=True)
    )
    path.write_text("\n".join(lines) + "\n")
    return path, ids, speakers, is_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append the JSON record to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="voiceprint-bench-trials-") as tmp:
        root = Path(tmp)
        trial_file, ids, speakers, is_eval = write_project(root)
        layout = Layout.at(root)
        table = pq.read_table(layout.utterance_embeddings).sort_by(
            [("speaker_id", "ascending"), ("utterance_id", "ascending")]
        )
        x_all = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        x_eval = l2_normalise(x_all[is_eval])

        started = time.perf_counter()
        trials = read_trial_file(trial_file, ids, speakers, is_eval)
        parsed = time.perf_counter()
        assert trials.left is not None and trials.right is not None and trials.same is not None
        scores = score_trials(x_eval, trials.left, trials.right)
        scored = time.perf_counter()
        value, _ = eer(scores, trials.same)
        dcf = {p: min_dcf(scores, trials.same, p)[0] for p in (0.01, 0.05)}
        det_curve(scores, trials.same)
        done = time.perf_counter()

        params = Params()
        params.index.use_gpu = "never"
        params.evaluate = EvaluateParams(trials=trial_file.name)  # relative: resolved against the project root
        stage_started = time.perf_counter()
        metrics = evaluate(layout, params)
        stage_s = time.perf_counter() - stage_started

    assert metrics["n_trials"] == N_TRIALS and abs(metrics["eer"] - value) < 1e-12
    record = {
        "bench": "trials",
        "n_trials": N_TRIALS,
        "n_target": int(trials.same.sum()),
        "n_eval_utterances": int(is_eval.sum()),
        "n_speakers": N_SPEAKERS,
        "dim": DIM,
        "parse_s": round(parsed - started, 4),
        "score_s": round(scored - parsed, 4),
        "metrics_s": round(done - scored, 4),
        "scoring_s": round(done - started, 4),
        "target_s": TARGET_S,
        "stage_s": round(stage_s, 3),
        "eer": round(float(value), 5),
        "min_dcf_p0.01": round(float(dcf[0.01]), 5),
        "eer_snorm": metrics["eer_snorm"],
        "eer_ci": [metrics["eer_ci_low"], metrics["eer_ci_high"]],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "hardware": hardware(),
    }
    emit(record, args.out)
    print(
        f"scored {N_TRIALS:,} trials from a VoxCeleb-format file in {record['scoring_s']:.2f} s "
        f"(parse {record['parse_s']:.2f} s, score {record['score_s']:.3f} s, metrics {record['metrics_s']:.2f} s; "
        f"target < {TARGET_S:g} s); whole evaluate stage {stage_s:.1f} s",
        file=sys.stderr,
    )
    return 0 if record["scoring_s"] < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())

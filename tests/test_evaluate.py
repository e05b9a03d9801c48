"""The evaluate stage on synthetic embeddings, and its MLflow record."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voiceprint.common.layout import Layout
from voiceprint.common.schema import embedding_column, embedding_schema, l2_normalise
from voiceprint.config import BackendParams, EvaluateParams, Params
from voiceprint.evaluate.stage import all_pairs_scores, evaluate

DIM = 24
MODEL = "ecapa-test@0001"


def write_utterances(
    layout: Layout,
    rng: np.random.Generator,
    *,
    n_train: int,
    n_eval: int,
    per_speaker: int | list[int],
    noise: float,
) -> None:
    """Utterance embeddings around one random direction per speaker (noise 0 = identical)."""
    counts = per_speaker if isinstance(per_speaker, list) else [per_speaker] * (n_train + n_eval)
    centres = l2_normalise(rng.normal(size=(n_train + n_eval, DIM)))
    write_speakers(
        layout,
        [l2_normalise(centre + noise * rng.normal(size=(n, DIM))) for centre, n in zip(centres, counts, strict=True)],
        n_train,
    )


def write_speakers(layout: Layout, vectors: list[np.ndarray], n_train: int) -> None:
    """The utterances table: ``vectors[s]`` are speaker s's utterance embeddings, the first
    ``n_train`` speakers in the train split and the rest in eval."""
    rows, vecs = [], []
    for s, v in enumerate(vectors):
        split = "train" if s < n_train else "eval"
        spk = f"{split}{s:03d}"
        for u in range(len(v)):
            rows.append(
                dict(
                    utterance_id=f"{spk}-{u:03d}",
                    speaker_id=spk,
                    split=split,
                    start_s=0.0,
                    end_s=3.0,
                    num_segments=1,
                    model_id=MODEL,
                )
            )
            vecs.append(v[u])
    schema = embedding_schema(DIM, utterance_level=True)
    cols = {f.name: [r[f.name] for r in rows] for f in schema if f.name != "embedding"}
    cols["embedding"] = embedding_column(np.stack(vecs))
    layout.utterance_embeddings.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), layout.utterance_embeddings)


def _params(**evaluate: object) -> Params:
    params = Params()
    params.index.use_gpu = "never"
    params.evaluate = EvaluateParams(**evaluate)
    return params


def test_all_pairs_scores_matches_dense_matrix() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalise(rng.normal(size=(1100, 8)))  # more than one block of rows
    labels = np.repeat(np.arange(110), 10).astype(str)
    scores, same = all_pairs_scores(x, labels)
    iu = np.triu_indices(len(x), k=1)
    assert np.allclose(scores, (x @ x.T)[iu], atol=1e-6)
    assert np.array_equal(same, labels[iu[0]] == labels[iu[1]])


def test_separated_speakers_are_perfect(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    write_utterances(layout, np.random.default_rng(1), n_train=6, n_eval=8, per_speaker=6, noise=0.05)
    metrics = evaluate(layout, _params())

    on_disk = json.loads(layout.metrics.read_text())
    assert on_disk == metrics
    for key in (
        "eer",
        "eer_threshold",
        "min_dcf_p0.01",
        "min_dcf_p0.05",
        "top1",
        "top5",
        "n_trials",
        "n_target",
        "n_nontarget",
        "n_queries",
        "n_gallery_speakers",
        "n_eval_speakers",
        "embedding_dim",
        "model_id",
    ):
        assert key in metrics, key
    n = 8 * 6
    assert metrics["n_trials"] == n * (n - 1) // 2
    assert metrics["n_target"] == 8 * (6 * 5 // 2)
    assert metrics["n_target"] + metrics["n_nontarget"] == metrics["n_trials"]
    assert metrics["eer"] == 0.0
    assert metrics["min_dcf_p0.01"] == 0.0 and metrics["min_dcf_p0.05"] == 0.0
    assert metrics["top1"] == 1.0 and metrics["top5"] == 1.0
    assert metrics["n_queries"] == 8 * (6 - 3)
    assert metrics["n_gallery_speakers"] == 8 + 6  # eval centroids + train distractors
    assert metrics["n_eval_speakers"] == 8
    assert metrics["embedding_dim"] == DIM and metrics["model_id"] == MODEL

    for name in ("det.png", "scores.png", "det.csv"):
        assert (layout.plots / name).stat().st_size > 0
    assert (layout.plots / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(layout.plots / "det.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["fpr", "fnr"] and len(rows) >= 2
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_random_embeddings_give_chance_level(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    # Pure noise: "speakers" are arbitrary labels on random vectors.
    write_utterances(layout, np.random.default_rng(2), n_train=0, n_eval=20, per_speaker=8, noise=50.0)
    out = tmp_path / "elsewhere"
    metrics = evaluate(layout, _params(train_distractors=False), out_metrics=out / "m.json", out_plots=out / "plots")
    assert abs(metrics["eer"] - 0.5) < 0.06
    assert metrics["min_dcf_p0.01"] > 0.9
    assert metrics["top1"] < 0.25  # chance is 1/20
    assert metrics["n_gallery_speakers"] == 20
    assert (out / "m.json").exists() and (out / "plots" / "det.png").exists()
    assert not layout.metrics.exists() and not layout.plots.exists()


def test_seeded_enrollment_is_reproducible(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    write_utterances(layout, np.random.default_rng(3), n_train=3, n_eval=10, per_speaker=7, noise=0.9)
    a = evaluate(layout, _params(seed=5))
    b = evaluate(layout, _params(seed=5))
    assert a == b
    assert 0.0 < a["eer"] < 0.5 and 0.0 < a["top1"] <= 1.0


def test_small_speakers_are_skipped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = Layout.at(tmp_path)
    # eval speakers with 5, 2 and 3 utterances; enroll_per_speaker=3 leaves only the first.
    write_utterances(layout, np.random.default_rng(4), n_train=2, n_eval=3, per_speaker=[4, 4, 5, 2, 3], noise=0.05)
    with caplog.at_level(logging.WARNING, logger="voiceprint.evaluate.stage"):
        metrics = evaluate(layout, _params(enroll_per_speaker=3))
    assert "left out" in caplog.text
    assert metrics["n_identification_skipped_speakers"] == 2
    assert metrics["n_queries"] == 2
    assert metrics["n_gallery_speakers"] == 1 + 2
    assert metrics["top1"] == 1.0
    assert metrics["eer"] == 0.0  # verification still uses every eval utterance


def test_single_eval_speaker_reports_nulls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = Layout.at(tmp_path)
    write_utterances(layout, np.random.default_rng(5), n_train=0, n_eval=1, per_speaker=5, noise=0.1)
    with caplog.at_level(logging.WARNING, logger="voiceprint.evaluate.stage"):
        metrics = evaluate(layout, _params())
    assert metrics["eer"] is None and metrics["min_dcf_p0.01"] is None and metrics["top1"] is None
    assert metrics["n_nontarget"] == 0 and metrics["n_queries"] == 0
    assert "verification skipped" in caplog.text and "identification skipped" in caplog.text
    assert json.loads(layout.metrics.read_text())["eer"] is None
    assert (layout.plots / "det.png").exists() and (layout.plots / "det.csv").read_text() == "fpr,fnr\n"


def test_mlflow_run_holds_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from voiceprint.tracking.runs import EXPERIMENT, log_evaluation

    layout = Layout.at(tmp_path / "project")
    write_utterances(layout, np.random.default_rng(6), n_train=3, n_eval=5, per_speaker=6, noise=0.5)
    (layout.root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  embed:\n    cmd: voiceprint embed\n    outs:\n"
        "    - path: data/embeddings\n      hash: md5\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
        "      size: 1\n      nfiles: 2\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-42")
    params = _params()
    metrics = evaluate(layout, params)
    run_id = log_evaluation(layout, params, metrics, layout.plots, extra_tags={"trigger": "test"})

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    assert run.data.metrics == pytest.approx({k: float(v) for k, v in numeric.items()})
    assert run.data.metrics["eer"] == pytest.approx(metrics["eer"])
    assert run.data.params["data.dataset"] == params.data.dataset
    assert run.data.params["model.init"] == params.model.init
    assert run.data.params["evaluate.p_targets"] == "[0.01, 0.05]"
    tags = run.data.tags
    assert tags["git_commit"] == "unknown"  # tmp_path is not a git repository
    assert tags["dvc_data_hash"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["prefect_flow_run_id"] == "flow-run-42"
    assert tags["model_id"] == MODEL and tags["trigger"] == "test"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {
        "plots/det.png",
        "plots/scores.png",
        "plots/det.csv",
    }
    local = client.download_artifacts(run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == metrics

    # A second run reuses the experiment.
    second = log_evaluation(layout, params, metrics, None, run_name="again")
    assert client.get_run(second).info.experiment_id == run.info.experiment_id


def test_default_store_is_sqlite_in_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from voiceprint.tracking.runs import git_commit, log_evaluation, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    layout = Layout.at(tmp_path)
    metrics = {"eer": 0.1, "top1": 0.9, "n_trials": 10, "model_id": MODEL, "top5": None}
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "det.csv").write_text("fpr,fnr\n1,0\n")
    run_id = log_evaluation(layout, Params(), metrics, plots)

    assert tracking_uri(layout) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "mlartifacts").is_dir() and list((tmp_path / "mlartifacts").rglob("det.csv"))
    run = MlflowClient(tracking_uri=tracking_uri(layout)).get_run(run_id)
    assert run.data.metrics == {"eer": 0.1, "top1": 0.9, "n_trials": 10.0}
    assert run.data.tags["prefect_flow_run_id"] == "none" and run.data.tags["dvc_data_hash"] == "none"
    assert "🏃" not in capfd.readouterr().out

    commit = git_commit(Path(__file__).resolve().parents[1])
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


def test_snorm_is_reported_beside_raw_scores_and_corrects_a_hub_speaker(tmp_path: Path) -> None:
    """Eval speakers share a common direction in proportion to a per-speaker offset, so some
    speakers' impostor scores run high (a "hub"): raw cosine confuses them, while AS-norm against
    the train cohort (which shares that direction too) puts each trial on its sides' own scale."""
    rng = np.random.default_rng(11)
    n_train, n_eval, per = 40, 8, 6
    hub = l2_normalise(rng.normal(size=(1, DIM)))[0]
    vectors = []
    for _ in range(n_train + n_eval):
        weight = rng.uniform(0.0, 3.0)  # how far this speaker sits towards the hub direction
        centre = l2_normalise(rng.normal(size=(1, DIM)))[0] + weight * hub
        vectors.append(l2_normalise(centre + 0.15 * rng.normal(size=(per, DIM))))
    layout = Layout.at(tmp_path)
    write_speakers(layout, vectors, n_train)

    raw = BackendParams(centre="none", lda_dim=None)
    metrics = evaluate(layout, _params(backend=raw))
    assert metrics["n_cohort"] == n_train * per
    assert set(metrics) >= {"eer_snorm", "min_dcf_p0.01_snorm", "min_dcf_p0.05_snorm"}
    assert metrics["eer"] > 0.05  # the hub confuses raw cosine
    assert metrics["eer_snorm"] < 0.5 * metrics["eer"]
    assert json.loads(layout.metrics.read_text())["eer_snorm"] == metrics["eer_snorm"]
    assert metrics["backend_centre_utterances"] == 0 and metrics["backend_lda_dim"] is None

    off = evaluate(layout, _params(snorm_top_k=0, backend=raw))
    assert "eer_snorm" not in off and off["eer"] == metrics["eer"]

    # The default back-end centres on the train split (one source here): the shared direction is
    # part of the mean, so centring alone removes much of the confusion.
    centred = evaluate(layout, _params())
    assert centred["backend_centre_utterances"] == n_train * per and centred["backend_lda_dim"] is None
    assert centred["eer"] < 0.6 * metrics["eer"]


def test_snorm_without_a_cohort_reports_nulls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = Layout.at(tmp_path)
    write_utterances(layout, np.random.default_rng(12), n_train=0, n_eval=4, per_speaker=4, noise=0.3)
    with caplog.at_level(logging.WARNING, logger="voiceprint.evaluate.stage"):
        metrics = evaluate(layout, _params(train_distractors=False))
    assert metrics["eer"] is not None
    assert metrics["eer_snorm"] is None and metrics["min_dcf_p0.01_snorm"] is None and metrics["n_cohort"] == 0
    assert "s-norm skipped" in caplog.text


def _brute_force_identification(
    x: np.ndarray, speakers: np.ndarray, is_eval: np.ndarray, enroll: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: per-speaker loops and a dense score matrix. Returns (rank of the truth, its speaker)."""
    rng = np.random.default_rng(seed)
    eval_speakers = sorted(set(speakers[is_eval].tolist()))
    gallery, labels, queries = [], [], []
    for spk in eval_speakers:
        idx = np.flatnonzero(is_eval & (speakers == spk))
        if len(idx) <= enroll:
            continue
        perm = rng.permutation(len(idx))
        gallery.append(l2_normalise(x[idx[perm[:enroll]]].mean(axis=0, keepdims=True))[0])
        labels.append(spk)
        queries.extend(idx[perm[enroll:]])
    for spk in sorted(set(speakers[~is_eval].tolist()) - set(eval_speakers)):
        gallery.append(l2_normalise(x[~is_eval & (speakers == spk)].mean(axis=0, keepdims=True))[0])
        labels.append(spk)
    scores = x[queries] @ np.stack(gallery).T
    ranked = np.asarray(labels)[np.argsort(-scores, axis=1, kind="stable")]
    truth = speakers[queries]
    hit = ranked == truth[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), len(labels)), truth


@pytest.mark.parametrize(
    ("n_eval", "n_train", "per_speaker", "block"),
    [(1100, 150, (2, 16), 4096), (2, 1, (4, 6), 4096), (40, 0, (1, 9), 65536)],
)
def test_identification_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch, n_eval: int, n_train: int, per_speaker: tuple[int, int], block: int
) -> None:
    """Grouped enrollment, distractor centroids and blocked FAISS search give the dense reference's top-k.

    Rows are shuffled (the grouping must not rely on table order), some speakers are too small to
    enroll, some train speakers are also eval speakers, and the first case has more queries than a
    search block, so blocks and the merged tail are exercised; the second has a 3-speaker gallery (k < 5).
    """
    from voiceprint.evaluate import stage
    from voiceprint.evaluate.bootstrap import accuracy_interval

    monkeypatch.setattr(stage, "_QUERY_BLOCK", block)
    rng = np.random.default_rng(11)
    n_spk = n_eval + n_train
    counts = rng.integers(per_speaker[0], per_speaker[1] + 1, n_spk)
    names = np.array([f"spk{i:05d}" for i in range(n_spk)])
    names[n_eval : n_eval + min(n_train, 3)] = names[: min(n_train, 3)]  # train rows of eval speakers
    speakers = np.repeat(names, counts)
    is_eval = np.repeat(np.arange(n_spk) < n_eval, counts)
    centres = l2_normalise(rng.normal(size=(n_spk, DIM)))
    x = l2_normalise(np.repeat(centres, counts, axis=0) + 0.2 * rng.normal(size=(len(speakers), DIM)))
    order = rng.permutation(len(speakers))
    x, speakers, is_eval = x[order], speakers[order], is_eval[order]

    params = _params(enroll_per_speaker=3, seed=4, bootstrap=200)
    got = stage._identification(x, speakers, is_eval, params)
    rank, truth = _brute_force_identification(x, speakers, is_eval, enroll=3, seed=4)

    assert got["n_queries"] == len(rank)
    assert got["top1"] == float(np.mean(rank < 1)) and got["top5"] == float(np.mean(rank < 5))
    interval = accuracy_interval(rank == 0, truth, replicates=200, level=params.evaluate.bootstrap_level, seed=4)
    assert (got["top1_ci_low"], got["top1_ci_high"]) == (interval.low, interval.high)
    if n_eval > 100:
        assert got["n_queries"] > block and 0.1 < got["top1"] < 0.95  # several blocks, not trivially separable


def test_identification_through_the_pipeline_index_settings(tmp_path: Path) -> None:
    """``evaluate`` (as the stage runs it) also searches a gallery index built with ``params.index``:
    an IVF index scanning one list of many misses speakers the exact search finds, so the reported
    metrics change with ``index.type``/``index.nprobe``; a flat index reproduces exact search."""
    layout = Layout.at(tmp_path / "project")
    # 600 train + 60 eval speakers: a 660-centroid gallery supports 16 IVF lists (>= 39 per list).
    write_utterances(layout, np.random.default_rng(8), n_train=600, n_eval=60, per_speaker=4, noise=0.6)

    def run(**index: object) -> dict:
        params = _params(enroll_per_speaker=2, bootstrap=0)
        for key, value in index.items():
            setattr(params.index, key, value)
        return evaluate(layout, params, out_metrics=tmp_path / "m.json", out_plots=tmp_path / "p", index_search=True)

    flat = run(type="flat")
    assert flat["index_type"] == "flat" and flat["index_settings"] == "flat"
    assert (flat["index_top1"], flat["index_top5"]) == (flat["top1"], flat["top5"])
    assert flat["index_recall1"] == flat["index_recall5"] == 1.0

    coarse = run(type="ivf", nlist=16, nprobe=1)
    assert coarse["index_settings"] == "ivf nlist=16 nprobe=1"
    # exact metrics keep their meaning; the approximate search loses queries
    assert (coarse["top1"], coarse["top5"]) == (flat["top1"], flat["top5"])
    assert coarse["index_recall1"] < 0.9 and coarse["index_top1"] < flat["top1"]
    assert coarse["index_recall1"] <= coarse["index_recall5"]
    assert json.loads((tmp_path / "m.json").read_text())["index_top1"] == coarse["index_top1"]

    every_list = run(type="ivf", nlist=16, nprobe=16)  # scans all lists: exact again
    assert every_list["index_recall1"] == 1.0 and every_list["index_top1"] == flat["top1"]
    hnsw = run(type="hnsw")
    assert hnsw["index_settings"] == "hnsw M=32 ef_search=128" and 0.0 <= hnsw["index_recall5"] <= 1.0

    # without index_search (the encoder comparison's use) there are no index keys
    plain = evaluate(layout, _params(enroll_per_speaker=2, bootstrap=0), out_metrics=tmp_path / "m2.json")
    assert not any(key.startswith("index_") for key in plain)

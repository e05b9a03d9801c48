"""The six stages end to end on a small real subset, then the user-facing CLI on its outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from voiceprint.cli import main as cli
from voiceprint.common.layout import Layout
from voiceprint.common.schema import embeddings_matrix, l2_normalise
from voiceprint.stages import run_stage


@pytest.fixture(scope="module")
def project(small_project: Layout) -> Layout:
    return small_project


def test_stages_produce_the_documented_layout(project: Layout, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.root / 'mlflow.db'}")
    summary = run_stage("evaluate", project.root)
    manifest = pq.read_table(project.manifest)
    assert manifest.num_rows == 4 * 5 + 4  # 4 eval speakers x 5, 4 train speakers x 1
    assert (project.model_dir / "hyperparams.yaml").exists() and (project.model_dir / "embedding_model.ckpt").exists()
    utt = pq.read_table(project.utterance_embeddings)
    assert set(utt.column("split").to_pylist()) == {"train", "eval"}
    assert (project.index_dir / "speakers.faiss").exists()
    (metrics,) = json.loads(project.metrics.read_text()).values()  # one source: one eval set
    assert 0.0 <= metrics["eer"] <= 1.0 and metrics["n_trials"] == 20 * 19 // 2
    assert metrics["n_queries"] == 4 * 3 and metrics["n_gallery_speakers"] == 8
    # Speaker-bootstrap intervals around the point estimates (voiceprint.evaluate.bootstrap), on real audio.
    assert 0.0 <= metrics["eer_ci_low"] <= metrics["eer"] <= metrics["eer_ci_high"] <= 1.0
    assert 0.0 <= metrics["top1_ci_low"] <= metrics["top1"] <= metrics["top1_ci_high"] <= 1.0
    assert summary["mlflow_run_id"]
    assert (project.plots / "librispeech" / "det.png").exists()

    # The set was scored centred on its train split, and the stage kept that mean for verify.
    stored = json.loads((project.data / "backend" / "librispeech.json").read_text())
    train = l2_normalise(embeddings_matrix(utt.filter(pc.equal(utt.column("split"), "train"))))
    assert stored["backend_centre_utterances"] == metrics["backend_centre_utterances"] == len(train) == 4
    assert stored["projection"] is None and metrics["backend_lda_dim"] is None
    np.testing.assert_allclose(stored["mean"], train.mean(axis=0), atol=1e-6)


def test_verify_scores_through_the_back_end_its_threshold_was_measured_with(project: Layout):
    from voiceprint.verify import Verifier

    if not (project.data / "backend" / "librispeech.json").exists():
        run_stage("evaluate", project.root)
    mean = np.asarray(json.loads((project.data / "backend" / "librispeech.json").read_text())["mean"], np.float32)
    manifest = pq.read_table(project.manifest).to_pylist()
    first, second = sorted(project.resolve(r["path"]) for r in manifest if r["split"] == "eval")[:2]
    verifier = Verifier(project)
    a, b = verifier.embed(first), verifier.embed(second)
    centred = l2_normalise(np.stack([a - mean, b - mean]))
    assert verifier.score(first, second) == pytest.approx(float(centred[0] @ centred[1]), abs=1e-5)
    assert float(centred[0] @ centred[1]) != pytest.approx(float(a @ b), abs=1e-3)  # not the raw cosine


def test_verify_identify_enroll(project: Layout, excerpts_dir: Path, capsys):
    manifest = pq.read_table(project.manifest).to_pylist()
    files = sorted(project.resolve(r["path"]) for r in manifest if r["split"] == "eval")  # read in place
    same = [f for f in files if f.parent.name == files[0].parent.name]
    rc = cli(["--project", str(project.root), "verify", str(same[0]), str(same[1]), "--threshold", "-1"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["same_speaker"] is True and -1.0 <= out["score"] <= 1.0

    assert cli(["--project", str(project.root), "identify", str(same[0]), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[0] == "1"

    newcomer = sorted(p for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())[
        -1
    ]  # beyond max_speakers=4: not indexed
    clips = sorted(newcomer.glob("*.flac"))
    # One enrollment clip queried again: its centroid is its own embedding (cosine 1), so this checks
    # enroll -> index -> identify whatever the tiny 30-step model's accuracy on other clips.
    assert cli(["--project", str(project.root), "enroll", "newcomer", str(clips[0])]) == 0
    capsys.readouterr()
    assert cli(["--project", str(project.root), "identify", str(clips[0]), "-k", "1"]) == 0
    hit = capsys.readouterr().out.strip().split("\t")
    assert hit[1] == "newcomer" and float(hit[2]) > 0.999, hit


def test_query_and_bad_input_errors(project: Layout, capsys):
    assert (
        cli(
            [
                "--project",
                str(project.root),
                "query",
                "--format",
                "json",
                "SELECT count(*) AS n FROM utterances WHERE split = 'eval'",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == 20
    assert cli(["--project", str(project.root), "query", f"COPY utterances TO '{project.root / 'x.parquet'}'"]) == 2
    assert "query failed" in capsys.readouterr().err and not (project.root / "x.parquet").exists()
    assert cli(["--project", str(project.root), "verify", "/nonexistent.wav", "/nonexistent.wav"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_evaluate_folder_leaves_project_outputs_alone(project: Layout, excerpts_dir: Path, tmp_path: Path, capsys):
    folder = tmp_path / "speakers"
    for spk in sorted((excerpts_dir / "test-other").iterdir())[:3]:
        if spk.is_dir():
            (folder / spk.name).mkdir(parents=True)
            for f in sorted(spk.glob("*.flac"))[:4]:
                shutil.copy(f, folder / spk.name / f.name)
    before = {p: p.stat().st_mtime_ns for p in project.data.rglob("*") if p.is_file()}
    rc = cli(
        [
            "--project",
            str(project.root),
            "evaluate",
            "--dataset",
            f"folder:{folder}",
            "--workdir",
            str(tmp_path / "work"),
            "--no-mlflow",
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0 and last.startswith("EER=") and "minDCF(0.01)=" in last and "top1=" in last
    assert before == {p: p.stat().st_mtime_ns for p in project.data.rglob("*") if p.is_file()}

"""Bad audio: a ``folder`` dataset seeded with every kind of broken or odd file goes through
prepare -> segment -> embed -> evaluate; each unusable file becomes exactly one reject with a
reason in words, every usable one is embedded, the counts reach ``metrics.json`` and MLflow, and
the 60-minute file is processed in bounded memory.

What counts as usable, and which stage rejects what (the dataset is built in conftest.py):

============================  ==========  ===============================================
file                          verdict     why / where
============================  ==========  ===============================================
clipping, stereo, 8 / 44.1 /  embedded    odd but real speech: ``audio.load`` downmixes
48 kHz, 24-bit, float WAV,                and resamples to 16 kHz mono; clipping is
spaces + non-ASCII in path,               distortion, not a reason to drop a speaker
60-minute file
zero-byte file                prepare     "zero-byte file"
truncated FLAC                prepare     libsndfile decodes a prefix and then loses sync;
                                          rejected, not shortened: the copy is damaged and
                                          should be fetched again ("truncated or corrupt")
random bytes as ``.wav``      prepare     "not a readable audio file"
text as ``.flac``             prepare     "not a readable audio file: it holds text ..."
NaN samples, Inf samples      prepare     "non-finite samples (NaN/Inf)" (full decode)
digital silence               prepare     "digital silence" (all samples exactly zero)
symlink loops (a file link    prepare     "symlink loop"; the scan neither hangs nor
to itself, a folder link to               silently drops them
its own folder, a speaker-
level link to itself)
0.05 s clip                   segment     "too short: 0.05 s < vad.min_segment_s" (only
                                          the segment stage knows the VAD parameters)
============================  ==========  ===============================================

Reject paths name the file a person has to fix, the dataset's own file: prepare reads the dataset
in place (nothing is copied), so the manifest, and segment's rejects, name the source file too.

The stages run as they do under DVC: prepare and segment in a child process (through
``voiceprint.stages.run_stage``), which also measures its own peak RSS; embed and evaluate in this
process with a tiny random-init ECAPA. Measured on the 2-core dev machine: the whole module takes
about a minute.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from voiceprint.common import schema
from voiceprint.common.layout import Layout
from voiceprint.config import VadParams, load_params
from voiceprint.embed.stage import embed_segments
from voiceprint.evaluate.stage import reject_counts
from voiceprint.query import run_query
from voiceprint.segment.stage import SegmentError, segment_manifest

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
# The 60-minute file decoded at once as float32 (16 kHz mono): what a non-windowed reader holds.
DECODED_MIB = 3600 * 16_000 * 4 / 2**20  # 220 MiB
# A windowed reader measured +45..65 MiB here (one 300 s VAD window plus Silero's buffers), a
# whole-file one +250 MiB or more; half the decoded size separates the two with room either way.
MEMORY_LIMIT_MIB = DECODED_MIB / 2

# Runs prepare on a one-file baseline project and then on the bad-audio project, then segment on
# both, recording the process's peak RSS (a high-water mark) after each; so each stage's growth on
# the bad-audio project is measured against the same stage on one 15 s file (imports and the Silero
# model already loaded). Finally, as a calibration of the measurement itself, it scores the long
# file in a single VAD window, which is what a reader without windows would do.
DRIVER = r"""
import json, resource, sys
from voiceprint.stages import run_stage
from voiceprint.common import audio
from voiceprint.segment import vad

def peak_mib():
    # VmHWM is this process's own high-water mark. ru_maxrss is not: Linux carries the parent's
    # peak over through fork/vfork + exec, so after tests that made the pytest process large
    # every reading here was that size and no growth could be seen.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

baseline, project, long_file = sys.argv[1:4]
report = {}
for stage in ("prepare", "segment"):
    for name, root in (("baseline", baseline), ("project", project)):
        report[f"{name}.{stage}"] = run_stage(stage, root)
        report[f"{name}.{stage}.peak_mib"] = peak_mib()
vad.WINDOW_S = float("inf")
vad.speech_probabilities(long_file, audio.probe(long_file).duration_s)
report["whole_file.peak_mib"] = peak_mib()
print(json.dumps(report))
"""


@dataclass(frozen=True)
class Run:
    layout: Layout
    driver: dict[str, Any]  # the child's stage summaries and peak RSS values
    embed: dict[str, Any]
    evaluate: dict[str, Any]
    mlflow_uri: str


def _project(root: Path, data_path: Path) -> Path:
    """A project whose params.yaml reads a folder dataset; every other parameter is the default."""
    root.mkdir(parents=True)
    params = {"data": {"dataset": "folder", "path": str(data_path)}, "index": {"use_gpu": "never"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    return root


@pytest.fixture(scope="module")
def run(bad_audio_dataset, tiny_encoder, excerpts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("bad-audio-run")
    one = tmp / "one-file" / "spk"
    one.mkdir(parents=True)
    shutil.copyfile(sorted((excerpts_dir / "test-other").glob("*/*.flac"))[0], one / "utt.flac")
    baseline = _project(tmp / "baseline", one.parent)
    project = _project(tmp / "project", bad_audio_dataset.root)

    child = subprocess.run(
        [sys.executable, "-c", DRIVER, str(baseline), str(project), str(bad_audio_dataset.long_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    driver = json.loads(child.stdout.strip().splitlines()[-1])

    layout = Layout.at(project)
    embedded = embed_segments(layout, load_params(layout.params).embed, encoder=tiny_encoder, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    from voiceprint.stages import run_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        evaluated = run_stage("evaluate", project)
    return Run(layout, driver, embedded, evaluated, uri)


def _rejects_by_name(layout: Layout) -> dict[str, list[dict[str, str]]]:
    """Every row of the DuckDB ``rejects`` view (all stages' tables), grouped by file name."""
    rows = run_query(layout, "SELECT path, stage, reason FROM rejects").to_pylist()
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(Path(row["path"]).name, []).append(row)
    return grouped


def test_each_unusable_file_is_one_reject_with_a_reason(run: Run, bad_audio_dataset) -> None:
    rejects = _rejects_by_name(run.layout)

    assert set(rejects) == set(bad_audio_dataset.unusable), "rejected files differ from the unusable ones"
    for name, (stage, words) in bad_audio_dataset.unusable.items():
        assert len(rejects[name]) == 1, f"{name} rejected {len(rejects[name])} times: {rejects[name]}"
        (row,) = rejects[name]
        assert row["stage"] == stage, row
        assert words in row["reason"], row
    # prepare and segment both name the source file in the dataset (read in place, never copied).
    root = bad_audio_dataset.root.as_posix()
    assert rejects["zero.wav"][0]["path"] == f"{root}/mallory/zero.wav"
    assert rejects["ghost"][0]["path"] == f"{root}/ghost"
    assert rejects["short.wav"][0]["path"] == f"{root}/mallory/short.wav"
    # Reasons carry the specifics a person needs, not just a category.
    assert "first at 1.00 s" in rejects["nan.wav"][0]["reason"]
    assert "first at 2.00 s" in rejects["inf.wav"][0]["reason"]
    assert "the header announces" in rejects["truncated.flac"][0]["reason"]
    assert "lost sync" in rejects["truncated.flac"][0]["reason"]  # libsndfile's own words, kept


def test_every_usable_file_is_embedded(run: Run, bad_audio_dataset) -> None:
    manifest = {r["utterance_id"]: r for r in pq.read_table(run.layout.manifest).to_pylist()}
    usable = {Path(name).stem for name in bad_audio_dataset.usable}
    assert set(manifest) == usable | {"short"}  # the 0.05 s clip is decodable; segment rejects it

    utterances = pq.read_table(run.layout.utterance_embeddings)
    assert set(utterances.column("utterance_id").to_pylist()) == usable
    vectors = schema.embeddings_matrix(utterances)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert min(utterances.column("num_segments").to_pylist()) >= 1

    # The odd formats went in as what they are; load() downmixed and resampled them.
    facts = {u: (r["sample_rate"], r["channels"]) for u, r in manifest.items()}
    assert facts["rate8k"] == (8_000, 1) and facts["rate44k1"] == (44_100, 1)
    assert facts["rate48k"] == (48_000, 1) and facts["stereo"] == (16_000, 2)
    assert manifest["ütt ñ 1"]["path"] == f"{bad_audio_dataset.root.as_posix()}/bob ø/ütt ñ 1.flac"
    assert manifest["ütt ñ 1"]["speaker_id"] == "bob ø"
    assert manifest["long"]["duration_s"] == pytest.approx(3600.0)

    # Every segment the VAD found was embedded, the hour of speech included.
    segments = pq.read_table(run.layout.segments)
    embedded = pq.read_table(run.layout.segment_embeddings)
    assert sorted(embedded.column("segment_id").to_pylist()) == sorted(segments.column("segment_id").to_pylist())
    long_speech = sum(r["end_s"] - r["start_s"] for r in segments.to_pylist() if r["utterance_id"] == "long")
    assert long_speech > 0.5 * 3600  # tiled read speech: VAD finds most of the hour


def test_the_run_goes_on_and_every_stage_counts_its_rejects(run: Run, bad_audio_dataset) -> None:
    expected = {"prepare": 0, "segment": 0, "embed": 0}
    for stage, _ in bad_audio_dataset.unusable.values():
        expected[stage] += 1
    prepared, segmented = run.driver["project.prepare"], run.driver["project.segment"]
    assert prepared["rejects"] == expected["prepare"] == 10
    assert prepared["utterances"] == {"eval": len(bad_audio_dataset.usable) + 1}
    assert segmented["rejected"] == expected["segment"] == 1
    assert segmented["utterances"] == len(bad_audio_dataset.usable) + 1
    assert run.embed["rejected"] == expected["embed"] == 0
    assert run.embed["segments"] == segmented["segments"]
    # Nothing is copied: the manifest lists the usable files where they lie, and the project holds
    # no audio at all (not even the 60-minute file).
    listed = pq.read_table(run.layout.manifest).column("path").to_pylist()
    assert all(Path(p).is_absolute() and run.layout.resolve(p).is_file() for p in listed)
    audio_in_project = [p for p in run.layout.root.rglob("*") if p.suffix.lower() in {".wav", ".flac"}]
    assert audio_in_project == []


def test_reject_counts_reach_metrics_json_and_mlflow(run: Run, bad_audio_dataset) -> None:
    from mlflow.tracking import MlflowClient

    n_prepare = sum(stage == "prepare" for stage, _ in bad_audio_dataset.unusable.values())
    expected = {
        "rejects_total": len(bad_audio_dataset.unusable),
        "rejects_prepare": n_prepare,
        "rejects_segment": len(bad_audio_dataset.unusable) - n_prepare,
        "rejects_embed": 0,
    }
    ((name, on_disk),) = json.loads(run.layout.metrics.read_text()).items()  # one source, one eval set
    assert {k: on_disk[k] for k in expected} == expected
    logged = MlflowClient(tracking_uri=run.mlflow_uri).get_run(run.evaluate["mlflow_run_id"]).data.metrics
    assert {k: logged[f"{name}/{k}"] for k in expected} == {k: float(v) for k, v in expected.items()}
    # The same numbers as the DuckDB view.
    by_stage = run_query(run.layout, "SELECT stage, count(*) AS n FROM rejects GROUP BY stage").to_pylist()
    assert {f"rejects_{r['stage']}": r["n"] for r in by_stage} == {
        k: v for k, v in expected.items() if k != "rejects_total" and v
    }


def test_long_file_is_processed_in_bounded_memory(run: Run) -> None:
    d = run.driver
    assert d["project.prepare"]["utterances"]["eval"] > 1 and d["project.segment"]["audio_s"] > 3600
    growth = {
        "prepare": d["project.prepare.peak_mib"] - d["baseline.prepare.peak_mib"],
        "segment": d["project.segment.peak_mib"] - d["baseline.segment.peak_mib"],
    }
    for stage, mib in growth.items():
        assert mib < MEMORY_LIMIT_MIB, (
            f"{stage} on the 60-minute file raised peak RSS by {mib:.0f} MiB over a 15 s file "
            f"(decoded size {DECODED_MIB:.0f} MiB; limit {MEMORY_LIMIT_MIB:.0f})"
        )
    # Calibration: the same measurement does see a whole-file read.
    whole = d["whole_file.peak_mib"] - d["project.segment.peak_mib"]
    assert whole > MEMORY_LIMIT_MIB, f"a single 60-minute VAD window only added {whole:.0f} MiB"


# -- failures the dataset above cannot provoke ------------------------------------------------------


def _manifest(layout: Layout, files: list[Path]) -> None:
    from voiceprint.common import audio

    rows = []
    for f in files:
        info = audio.probe(f)
        rows.append(
            {
                "utterance_id": f.stem,
                "speaker_id": f.parent.name,
                "split": "eval",
                "path": str(f),
                "duration_s": info.duration_s,
                "sample_rate": info.sample_rate,
                "channels": info.channels,
                "sha256": "-",
            }
        )
    layout.data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.MANIFEST), layout.manifest)


def test_an_unexpected_vad_error_is_one_reject(
    tmp_path: Path, test_other_files: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import voiceprint.segment.stage as segment

    files = test_other_files[:3]
    victim = files[1]
    real_detect = segment.detect

    def flaky_detect(path: Path, duration_s: float, params: VadParams):
        if Path(path) == victim:
            raise RuntimeError("onnxruntime: input rejected")
        return real_detect(path, duration_s, params)

    monkeypatch.setattr(segment, "detect", flaky_detect)
    layout = Layout.at(tmp_path)
    _manifest(layout, files)
    with caplog.at_level(logging.WARNING, logger="voiceprint.segment.stage"):
        summary = segment_manifest(layout, VadParams(), progress=False)

    assert summary["rejected"] == 1
    (row,) = pq.read_table(layout.rejects("segment")).to_pylist()
    assert row["path"] == str(victim) and "VAD failed (RuntimeError: onnxruntime: input rejected)" in row["reason"]
    assert str(victim) in caplog.text  # the log names the file too
    kept = set(pq.read_table(layout.segments).column("utterance_id").to_pylist())
    assert kept == {files[0].stem, files[2].stem}


def test_vad_failing_on_every_file_is_an_error_not_an_empty_result(
    tmp_path: Path, test_other_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import voiceprint.segment.stage as segment

    def broken(*args: object) -> None:
        raise ImportError("onnxruntime is not installed")

    monkeypatch.setattr(segment, "detect", broken)
    layout = Layout.at(tmp_path)
    _manifest(layout, test_other_files[:2])
    with pytest.raises(SegmentError, match=r"every file \(2\).*onnxruntime is not installed"):
        segment_manifest(layout, VadParams(), progress=False)
    assert not layout.segments.exists()  # nothing that looks like a clean, empty result


def test_folder_scan_follows_symlinks_and_reports_broken_ones(tmp_path: Path, test_other_files: list[Path]) -> None:
    from voiceprint.config import DataParams
    from voiceprint.prepare.stage import prepare

    store = tmp_path / "store"
    (store / "extra").mkdir(parents=True)
    (store / "other").mkdir()
    for src, dest in zip(test_other_files[:3], ("a.flac", "extra/b.flac", "other/c.flac"), strict=True):
        shutil.copyfile(src, store / dest)
    voices = tmp_path / "voices"
    (voices / "spk").mkdir(parents=True)
    os.symlink(store / "a.flac", voices / "spk" / "a.flac")  # a file link
    os.symlink(store / "extra", voices / "spk" / "more")  # a folder link: followed
    os.symlink(tmp_path / "gone.wav", voices / "spk" / "dangling.wav")  # a broken link
    os.symlink(store / "other", voices / "linked")  # a speaker folder that is a link
    layout = Layout.at(tmp_path / "project")

    result = prepare(DataParams(dataset="folder", path=str(voices)), layout, progress=False)

    rows = pq.read_table(layout.manifest).to_pylist()
    assert {(r["speaker_id"], r["utterance_id"]) for r in rows} == {("spk", "a"), ("spk", "b"), ("linked", "c")}
    (reject,) = pq.read_table(layout.rejects("prepare")).to_pylist()
    assert reject["path"] == (voices / "spk" / "dangling.wav").as_posix()
    assert reject["reason"] == f"broken symlink (its target {tmp_path / 'gone.wav'} does not exist)"
    assert result.rejects == 1
    # Files are listed by the path the scan found them at (through the links), not copied.
    paths = {r["utterance_id"]: r["path"] for r in rows}
    assert paths == {
        "a": (voices / "spk" / "a.flac").as_posix(),
        "b": (voices / "spk" / "more" / "b.flac").as_posix(),
        "c": (voices / "linked" / "c.flac").as_posix(),
    }
    assert all(layout.resolve(p).resolve().is_relative_to(store.resolve()) for p in paths.values())
    assert not [p for p in layout.root.rglob("*") if p.suffix == ".flac"]


def test_reject_counts_without_and_with_rejects(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    assert reject_counts(layout) == {"rejects_total": 0, "rejects_prepare": 0, "rejects_segment": 0, "rejects_embed": 0}
    tables = {
        layout.rejects("prepare"): ["prepare"] * 2,
        layout.rejects("segment"): ["segment"],
        layout.embeddings / "rejects.parquet": ["embed"] * 3,
        layout.rejects("extra"): ["extra"],  # a stage added later is counted, not dropped
    }
    for path, stages in tables.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"path": f"f{i}.wav", "stage": s, "reason": "r"} for i, s in enumerate(stages)]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.REJECTS), path)
    counts = reject_counts(layout)
    assert counts == {
        "rejects_total": 7,
        "rejects_prepare": 2,
        "rejects_segment": 1,
        "rejects_embed": 3,
        "rejects_extra": 1,
    }
    assert all(type(v) is int for v in counts.values())  # JSON ints in metrics.json

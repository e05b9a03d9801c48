"""The scale benchmark's corpus builder (on real excerpts) and its report maths (on hand-made numbers).

Fast: six FLAC files are built from two real LibriSpeech excerpts; no stage runs, no timing is asserted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks import bench_scale as bs
from benchmarks.scale_corpus import build, perturbation, plan, source_files, tiny_files


@pytest.fixture(scope="module")
def sources(excerpts_dir: Path) -> list[tuple[str, str, Path]]:
    """One test-other file and one train-clean-100 file."""
    files = source_files(excerpts_dir)
    return [next(f for f in files if f[0] == "test"), next(f for f in files if f[0] == "train")]


@pytest.fixture(scope="module")
def corpus(sources: list[tuple[str, str, Path]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus") / "x3"
    return out, build(plan(sources, 3), out, jobs=1, progress=False, name="x3")


def test_variants_are_named_and_grouped_into_pseudo_speakers(corpus: tuple[Path, dict], sources: list) -> None:
    out, summary = corpus
    expected = {
        f"{split}/{speaker}-s{pct}/{path.stem}-v{v:03d}.flac"
        for split, speaker, path in sources
        for v, pct in enumerate(("100", "090", "110"))
    }
    found = {p.relative_to(out).as_posix() for p in out.rglob("*.flac")}
    assert found == expected
    assert summary["files"] == 6 and summary["written"] == 6
    assert summary["speakers"] == {"train": 3, "test": 3}  # (speaker, speed) pairs
    rows = list(csv.DictReader((out / "files.csv").read_text().splitlines()))
    assert {r["path"] for r in rows} == expected
    assert json.loads((out / "corpus.json").read_text())["audio_s"] == summary["audio_s"]


def test_speed_changes_duration_and_variant_zero_is_the_source(corpus: tuple[Path, dict], sources: list) -> None:
    out, _ = corpus
    for split, speaker, path in sources:
        src, rate = sf.read(str(path), dtype="int16")
        for v, speed in enumerate((1.0, 0.9, 1.1)):
            got, got_rate = sf.read(
                str(out / split / f"{speaker}-s{round(speed * 100):03d}" / f"{path.stem}-v{v:03d}.flac"), dtype="int16"
            )
            assert got_rate == rate
            assert abs(len(got) / rate - len(src) / rate / speed) < 1e-3
            if v == 0:
                assert np.array_equal(got, src)  # identity: 1x is the excerpts themselves
            else:  # real speech, same level (gain 0 dB for v < 5): RMS within a few percent
                rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))  # noqa: E731
                assert rms(got) == pytest.approx(rms(src), rel=0.05)


def test_build_is_deterministic_and_resumable(corpus: tuple[Path, dict], sources: list, tmp_path: Path) -> None:
    out, _ = corpus
    again = build(plan(sources, 3), out, jobs=1, progress=False)
    assert again["written"] == 0 and again["skipped"] == 6
    fresh = tmp_path / "x3"
    build(plan(sources, 3), fresh, jobs=2, progress=False)
    for path in out.rglob("*.flac"):
        a, _ = sf.read(str(path), dtype="int16")
        b, _ = sf.read(str(fresh / path.relative_to(out)), dtype="int16")
        assert np.array_equal(a, b)
    assert not list(fresh.rglob(".*.tmp"))


def test_perturbation_schedule(excerpts_dir: Path) -> None:
    assert perturbation(0) == (1.0, 0.0, 0.0)
    assert perturbation(5) == (1.0, -6.0, 0.0) and perturbation(12) == (1.1, 6.0, 0.0)
    speed, gain, shift = perturbation(15)
    assert (speed, gain) == (1.0, 0.0) and shift == pytest.approx(0.618034, abs=1e-6)
    assert len({perturbation(v) for v in range(100)}) == 100  # 100x: every variant differs
    tiny = tiny_files(excerpts_dir)
    assert len(tiny) == 8 and {f[0] for f in tiny} == {"train", "test"}


# ------------------------------------------------------------------------------------------------
# Report maths
# ------------------------------------------------------------------------------------------------


def test_fixed_cost_is_the_intercept() -> None:
    # wall = 5 s + audio / 100
    assert bs.fixed_cost(6.0, 100.0, 41.0, 3600.0) == pytest.approx(5.0)
    assert bs.fixed_cost(11.2, 80.0, 8.5, 3900.0) == 11.2  # noise tilts the line down: clipped to the tiny wall
    assert bs.fixed_cost(2.0, 100.0, 2.0, 100.0) == 2.0


def test_linearity_after_start_up() -> None:
    ok = bs.linearity(41.0, 3600.0, 3605.0, 360_000.0, fixed=5.0)
    assert ok["time_ratio"] == 100.0 and ok["excess"] == 1.0 and ok["ok"]
    edge = bs.linearity(41.0, 3600.0, 5.0 + 36 * 110, 360_000.0, fixed=5.0)
    assert edge["excess"] == pytest.approx(1.1) and edge["ok"]
    slow = bs.linearity(41.0, 3600.0, 4000.0, 360_000.0, fixed=5.0)
    assert slow["excess"] == pytest.approx(1.11, abs=1e-3) and not slow["ok"]
    # Without start-up subtraction the same numbers would look sub-linear: 4000 / 41 < 100.
    assert bs.linearity(4.0, 3600.0, 400.0, 360_000.0, fixed=5.0)["ok"] is None


def test_rss_and_disk_ratios() -> None:
    assert bs.rss_ratio(1300.0, 1000.0) == {"ratio": 1.3, "ok": True}
    assert not bs.rss_ratio(1301.0, 1000.0)["ok"]
    assert bs.disk_share(10, 100) == {"share": 0.1, "ok": True}
    assert not bs.disk_share(11, 100)["ok"]


def test_projection_arithmetic() -> None:
    stages = {
        "prepare": {"fixed_s": 2.0, "cpu_per_audio": 0.001, "cpu_per_utt": 0.0},
        "segment": {"fixed_s": 5.0, "cpu_per_audio": 0.002, "cpu_per_utt": 0.0},
        "embed": {"fixed_s": 10.0, "cpu_per_audio": 0.03, "cpu_per_utt": 0.0},
        "index": {"fixed_s": 1.0, "cpu_per_audio": 0.0, "cpu_per_utt": 0.001},
        "evaluate": {"fixed_s": 10.0, "cpu_per_audio": 0.0, "cpu_per_utt": 0.0001},
    }
    common = dict(audio_s=3.6e6, utterances=1_000_000, decode_cpu_per_audio=0.0002, m4a_factor=2.0, efficiency=1.0)
    cpu = bs.project(stages, cores=16, machines=1, gpu=False, **common)
    # prepare: 3.6e6 * (0.001 + 0.0002) CPU s over the 16 cores of one machine.
    assert cpu["stages_s"] == {"prepare": 272.0, "segment": 500.0, "embed": 6805.0, "index": 1001.0, "evaluate": 110.0}
    assert cpu["bound_by"] == "embed" and cpu["total_s"] == pytest.approx(8688.0)
    gpu = bs.project(stages, cores=16, machines=8, gpu=True, gpu_xrt=3000.0, **common)
    # embed: max(3.6e6 / (3000 * 8), 3.6e6 * 0.0002 * 2 / 128) = 150 s; prepare stays on one machine.
    assert gpu["stages_s"]["embed"] == 160.0 and gpu["stages_s"]["segment"] == pytest.approx(66.9, abs=0.05)
    assert gpu["stages_s"]["prepare"] == 272.0 and gpu["bound_by"] == "index"


def test_max_sampled_trials_matches_the_trial_sampler() -> None:
    from voiceprint.evaluate.trials import TrialListError, sample_trials

    counts = [10] * 10 + [3]
    speakers = np.repeat(np.arange(len(counts)), counts)
    limit = bs.max_sampled_trials(counts)
    assert len(sample_trials(speakers, limit, seed=0).same) == limit
    with pytest.raises(TrialListError):
        sample_trials(speakers, limit + 1, seed=0)


def test_report_renders_targets_from_records() -> None:
    def stage(scale: str, name: str, wall: float, audio: float, rss: float) -> dict:
        return {
            "bench": "scale", "kind": "stage", "scale": scale, "engine": "local", "stage": name, "rc": 0,
            "wall_s": wall, "cpu_s": wall * 1.5, "audio_s": audio, "files": int(audio / 10), "xrt": audio / wall,
            "xrt_per_core": audio / wall / 1.5, "ru_maxrss_mb": rss, "peak_rss_sum_mb": rss, "n_processes": 1,
            "data_bytes_added": 1000, "load_before": 1.0, "load_after": 1.0,
        }  # fmt: skip

    records = []
    for name in bs.STAGES:
        records += [stage("tiny", name, 6.0, 100.0, 500.0), stage("x1", name, 41.0, 3600.0, 1000.0)]
    records += [
        stage("x100", n, 3605.0 if n != "embed" else 5000.0, 360_000.0, 1000.0 if n != "index" else 2000.0)
        for n in bs.STAGES
    ]
    records.append({"bench": "scale", "kind": "decode", "audio_s": 600.0, "cpu_s": 0.3})
    records.append(
        {"bench": "scale", "kind": "run", "scale": "x100", "engine": "local", "corpus_bytes": 1000, "rc": 0,
         "disk": {"data_bytes": 900, "embeddings_bytes": 850, "index_bytes": 10, "data_excl_embeddings_bytes": 50}}
    )  # fmt: skip
    text = bs.render_report(records)
    assert "| x100 | local |" in text and "| - | 5.0% | PASS |" in text  # no DVC record yet
    records.append({"bench": "scale", "kind": "dvc", "scale": "x100", "engine": "local", "dvc_cache_bytes": 60})
    text = bs.render_report(records)
    assert "| 50 B | 60 B | 11.0% | FAIL |" in text  # the cached outputs count
    section = text.split("## Targets")[1].split("Disk:")[0]
    rows = {
        c[0]: c[2:]
        for c in (line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "local" in line)
    }
    assert rows["| segment"] == ["100.0", "100.0", "1.0", "PASS", "1.0", "PASS |"]
    assert rows["| embed"][3] == "FAIL" and rows["| embed"][0] == "138.75"
    assert rows["| index"][3:] == ["PASS", "2.0", "FAIL |"]
    assert "| 8 x (16 cores + H100) |" in text


def test_repeats_of_the_latest_invocation_report_their_median() -> None:
    def stage(run_id: str, wall: float) -> dict:
        return {"bench": "scale", "kind": "stage", "scale": "x1", "engine": "local", "stage": "embed", "rc": 0,
                "run_id": run_id, "wall_s": wall, "cpu_s": 2 * wall, "audio_s": 3600.0}  # fmt: skip

    older = [stage("A", 100.0), stage("A", 101.0), stage("A", 102.0)]
    latest = bs._latest([*older, stage("B", 14.0), stage("B", 30.0), stage("B", 16.0)], "stage")
    rec = latest[("x1", "local", "embed")]
    assert (rec["wall_s"], rec["cpu_s"], rec["repeats"]) == (16.0, 32.0, 3)  # medians of run B only
    assert rec["xrt"] == pytest.approx(225.0) and rec["xrt_per_core"] == pytest.approx(112.5)
    single = bs._latest([*older, stage("C", 20.0)], "stage")[("x1", "local", "embed")]
    assert (single["wall_s"], single["repeats"]) == (20.0, 1)  # a new invocation replaces the old repeats


def test_dvc_cache_holds_the_outputs_once_and_starts_fresh(tmp_path: Path) -> None:
    project = tmp_path / "x1-local"
    (project / "data" / "index").mkdir(parents=True)
    (project / "data" / "embeddings").mkdir()
    (project / "data" / "manifest.parquet").write_bytes(b"m" * 1000)
    (project / "data" / "index" / "speakers.faiss").write_bytes(b"i" * 3000)
    (project / "data" / "embeddings" / "part-0.parquet").write_bytes(b"e" * 50_000)
    first = bs.dvc_cache(project)
    assert first["outs"] == ["data/manifest.parquet", "data/index"]  # present outputs only, never embeddings
    # the two files' bytes plus the index folder's small .dir listing
    assert 4000 <= first["dvc_cache_bytes"] < 4000 + 1000, first
    assert bs.dvc_cache(project)["dvc_cache_bytes"] == first["dvc_cache_bytes"]


def test_memory_per_file_is_the_line_through_two_scales() -> None:
    grows = bs.memory_per_file(1000.0, 3_510, 1450.0, 35_100, 1_128_246)
    assert grows["mb_per_1000_files"] == pytest.approx(1000 * 450 / 31_590, abs=0.01)
    assert grows["projected_mb"] == round(1450 + 450 / 31_590 * (1_128_246 - 35_100))
    flat = bs.memory_per_file(900.0, 3_510, 880.0, 35_100, 1_128_246)  # noise below the smaller peak
    assert flat == {"mb_per_1000_files": 0.0, "projected_mb": 880}


def test_index_peak_is_split_into_the_indexes_and_the_rest() -> None:
    """At 100x the index stage holds 100 MB more of FAISS index than at 1x: what is left of its peak
    is judged against the flat-memory target."""
    recs = {
        ("x1", "local", "index"): {"ru_maxrss_mb": 200.0, "files": 351},
        ("x100", "local", "index"): {"ru_maxrss_mb": 360.0, "files": 35_100},
    }
    runs = {
        ("x1", "local"): {"disk": {"index_bytes": 1 * bs.MB}},
        ("x100", "local"): {"disk": {"index_bytes": 101 * bs.MB}},
    }
    held = bs.index_held(recs, runs, "local", "x1", "x100")
    assert held is not None
    assert held["rest_big"] == pytest.approx(260.0) and held["rest_ratio"] == pytest.approx(1.3)
    assert held["index_per_1000"] == pytest.approx(100 / 34.749, abs=0.01)
    assert bs.index_held(recs, {}, "local", "x1", "x100") is None  # no disk records: nothing to split
    recs["x100", "local", "index"]["summary"] = {"type": "flat", "indexes_in_memory": False}
    assert bs.index_held(recs, runs, "local", "x1", "x100") is None  # written from the batches: nothing held

"""SIGKILL at random moments during ``embed``, ``prepare`` (archive extraction and verification) and
``index``; the rerun must produce exactly what an uninterrupted run produces, and nothing partial
may ever be visible where readers look.

Each stage runs in a child process (a driver script below) that is killed with SIGKILL while it
works: for ``embed`` after a random number of staged parts has appeared (so every kill lands in
the middle of real work), for ``prepare`` and ``index`` after a random delay within the measured
duration of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from voiceprint.common import audio, schema
from voiceprint.common.layout import Layout
from voiceprint.encoders.ecapa import EcapaConfig, save_speechbrain_checkpoint

REPO = Path(__file__).resolve().parents[2]
KILL_TRIALS = 5

EMBED_DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from voiceprint.config import EmbedParams
from voiceprint.embed.engine import load_pipeline_encoder
from voiceprint.embed.stage import embed_segments
from voiceprint.common.layout import Layout
layout = Layout.at(sys.argv[1])
encoder = load_pipeline_encoder(layout, torch.device("cpu"))
summary = embed_segments(layout, EmbedParams(max_batch_s=6.0, device="cpu"), encoder=encoder,
                         progress=False, rows_per_group=3, part_every_s=0.0)
print(json.dumps(summary))
"""

PREPARE_DRIVER = """
import json, sys
from voiceprint.config import load_params
from voiceprint.prepare import librispeech
from voiceprint.prepare.stage import prepare
from voiceprint.common.layout import Layout
librispeech.SUBSET_MD5[sys.argv[2]] = sys.argv[3]
layout = Layout.at(sys.argv[1])
result = prepare(load_params(layout.params).data, layout, progress=False)
print(json.dumps(result.utterances))
"""

INDEX_DRIVER = """
import json, sys
from voiceprint.config import IndexParams
from voiceprint.index.stage import build_indexes
from voiceprint.common.layout import Layout
print(json.dumps(build_indexes(Layout.at(sys.argv[1]), IndexParams(type="hnsw", hnsw_m=16, ef_construction=80)), default=str))
"""


def _start(driver: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", driver, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _kill(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _file_cache(layout: Layout) -> dict[str, tuple[object, ...]]:
    """prepare's file cache by project-relative path: digest and decode result (mtimes differ)."""
    rows = pq.read_table(layout.file_cache).to_pylist()
    keys = ("size", "sha256", "validator", "duration_s", "sample_rate", "channels", "reason")
    return {Path(r["path"]).relative_to(layout.root).as_posix(): tuple(r[k] for k in keys) for r in rows}


def _index_digest(index_dir: Path) -> dict[str, object]:
    """Every index file byte for byte; ``index.json`` minus its build timestamp."""
    digest: dict[str, object] = _tree_digest(index_dir)
    info = json.loads((index_dir / "index.json").read_text())
    info.pop("built_at", None)  # older index.json files carried one
    digest["index.json"] = info
    return digest


# --------------------------------------------------------------------------------------- embed
def _embed_project(root: Path, files: list[Path], bad: Path) -> Layout:
    """Segments of real speech (three spans per file, plus one unreadable file) and a random ECAPA."""
    layout = Layout.at(root)
    rows = []
    for f in files:
        dur = audio.probe(f).duration_s
        for k, (a, b) in enumerate([(0.0, min(1.5, dur)), (dur / 3, min(dur, dur / 3 + 2.5)), (dur / 2, dur)]):
            rows.append(
                {
                    "segment_id": f"{f.stem}#{k:03d}",
                    "utterance_id": f.stem,
                    "speaker_id": f.parent.name,
                    "split": "eval",
                    "path": str(f),
                    "start_s": a,
                    "end_s": b,
                }
            )
    rows.append(
        {
            "segment_id": "bad#000",
            "utterance_id": "bad",
            "speaker_id": "x",
            "split": "eval",
            "path": str(bad),
            "start_s": 0.0,
            "end_s": 1.0,
        }
    )
    layout.data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SEGMENTS), layout.segments)
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(64)
    save_speechbrain_checkpoint(layout.model_dir, cfg.build().eval(), cfg)
    return layout


def _staged_parts(layout: Layout) -> list[Path]:
    return sorted((layout.data / "work").glob("*/part-*.parquet"))


def _kill_after_parts(layout: Layout, at_least: int, timeout: float = 120) -> tuple[bool, int]:
    """Start the embed driver and SIGKILL it once ``at_least`` parts are staged.

    Returns (killed mid-run, parts seen at the kill)."""
    proc = _start(EMBED_DRIVER, str(layout.root))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _finish(proc)
            return False, len(_staged_parts(layout))
        n = len(_staged_parts(layout))
        if n >= at_least:
            time.sleep(random.uniform(0.0, 0.05))  # land anywhere within the next batch
            _kill(proc)
            return True, n
        time.sleep(0.002)
    _kill(proc)
    raise AssertionError("embed driver made no progress")


def test_embed_survives_repeated_sigkill(tmp_path: Path, test_other_files: list[Path]) -> None:
    files = test_other_files[::2][:40]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00")
    reference = _embed_project(tmp_path / "reference", files, bad)
    crashed = _embed_project(tmp_path / "crashed", files, bad)

    _finish(_start(EMBED_DRIVER, str(reference.root)))
    assert not (reference.data / "work").exists(), "staging is removed after a complete run"
    ref_segments = pq.read_table(reference.segment_embeddings)

    rng = random.Random(1234)
    random.seed(1234)
    staged = 0
    kills = 0
    for _ in range(KILL_TRIALS):
        killed, staged = _kill_after_parts(crashed, staged + rng.randint(1, 6))
        assert killed, "the run finished before the kill: make the workload larger"
        kills += 1
        # Readers never see a partial result: no final tables yet, every staged part complete.
        assert not crashed.segment_embeddings.exists()
        for part in _staged_parts(crashed):
            pq.read_table(part)
    assert kills == KILL_TRIALS

    out = _finish(_start(EMBED_DRIVER, str(crashed.root)))
    assert '"resumed_batches": 0' not in out
    got = pq.read_table(crashed.segment_embeddings)
    assert got.column("segment_id").to_pylist() == ref_segments.column("segment_id").to_pylist()
    assert len(set(got.column("segment_id").to_pylist())) == got.num_rows == 3 * len(files)
    np.testing.assert_array_equal(schema.embeddings_matrix(got), schema.embeddings_matrix(ref_segments))
    assert got.equals(ref_segments)
    for name in ("utterances.parquet", "rejects.parquet"):
        assert pq.read_table(crashed.embeddings / name).equals(pq.read_table(reference.embeddings / name)), name
    assert pq.read_table(crashed.embeddings / "rejects.parquet").column("path").to_pylist() == [str(bad)]
    assert not (crashed.data / "work").exists()


def test_embed_ignores_staging_from_another_model(tmp_path: Path, test_other_files: list[Path]) -> None:
    """Parts staged with other weights must not leak into a run with a new model."""
    files = test_other_files[:6]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"")
    layout = _embed_project(tmp_path / "p", files, bad)
    killed, _ = _kill_after_parts(layout, 2)
    assert killed
    stale = {p.parent for p in _staged_parts(layout)}
    torch.manual_seed(1)
    cfg = EcapaConfig.from_channels(64)
    save_speechbrain_checkpoint(layout.model_dir, cfg.build().eval(), cfg)
    out = _finish(_start(EMBED_DRIVER, str(layout.root)))
    assert '"resumed_batches": 0' in out
    assert not any(d.exists() for d in stale)


# ------------------------------------------------------------------------------------- prepare
def _librispeech_mirror(mirror: Path, excerpts_dir: Path, subset: str) -> str:
    """A LibriSpeech-layout tarball of real excerpts in ``mirror``; returns its MD5."""
    (mirror / "LibriSpeech").mkdir(parents=True)
    archive = mirror / "LibriSpeech" / f"{subset}.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for flac in sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[:120]:
            speaker, chapter, _ = flac.stem.split("-")
            tar.add(flac, f"LibriSpeech/{subset}/{speaker}/{chapter}/{flac.name}")
    return hashlib.md5(archive.read_bytes()).hexdigest()


def _prepare_project(root: Path, mirror: Path, subset: str) -> Layout:
    """Default parameters (not the checkout's params.yaml: that is the user's) on a local mirror."""
    import yaml

    from voiceprint.config import Params

    raw = Params().model_dump(mode="json")
    raw["data"].update(
        {
            "dataset": "librispeech",
            "mirror": str(mirror),
            "train_subset": None,
            "eval_subset": subset,
            "url_base": "http://127.0.0.1:9/unreachable",
        }
    )
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return Layout.at(root)


def test_prepare_survives_sigkill_during_extraction_and_verification(tmp_path: Path, excerpts_dir: Path) -> None:
    subset = "train-crash"
    mirror = tmp_path / "mirror"
    md5 = _librispeech_mirror(mirror, excerpts_dir, subset)
    reference = _prepare_project(tmp_path / "reference", mirror, subset)
    crashed = _prepare_project(tmp_path / "crashed", mirror, subset)

    started = time.monotonic()
    _finish(_start(PREPARE_DRIVER, str(reference.root), subset, md5))
    duration = time.monotonic() - started
    ref_manifest = pq.read_table(reference.manifest)
    assert ref_manifest.num_rows == 120

    rng = random.Random(99)
    outcomes = []
    for _ in range(KILL_TRIALS):
        proc = _start(PREPARE_DRIVER, str(crashed.root), subset, md5)
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        finished = proc.poll() is not None
        if not finished:
            _kill(proc)
        else:
            _finish(proc)
        outcomes.append(finished)
        # The extraction is either absent or complete (marker present); the manifest never partial.
        extracted = crashed.downloads / subset
        if extracted.exists():
            assert (extracted / ".voiceprint-extracted.json").exists()
        if crashed.manifest.exists():
            assert pq.read_table(crashed.manifest).num_rows == 120
    assert outcomes.count(False) >= 3, f"kills mostly missed the run ({outcomes}); duration {duration:.2f}s"

    _finish(_start(PREPARE_DRIVER, str(crashed.root), subset, md5))
    assert pq.read_table(crashed.manifest).equals(ref_manifest)
    # The one extraction (read in place, never copied) is whole, and the file cache written around
    # the kills holds what an uninterrupted run found, file for file.
    assert _tree_digest(crashed.downloads / subset) == _tree_digest(reference.downloads / subset)
    assert _file_cache(crashed) == _file_cache(reference) and len(_file_cache(reference)) == 120
    assert all(str(p).startswith(f"data/downloads/{subset}/") for p in ref_manifest.column("path").to_pylist())
    leftovers = [p for p in crashed.data.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


# --------------------------------------------------------------------------------------- index
def _index_project(root: Path) -> Layout:
    """Embeddings of 3,000 synthetic speakers: enough work that HNSW takes a noticeable time."""
    layout = Layout.at(root)
    rng = np.random.default_rng(0)
    speakers, per = 3000, 10
    centroids = schema.l2_normalise(rng.standard_normal((speakers, 192)))
    vectors = schema.l2_normalise(np.repeat(centroids, per, axis=0) + 0.06 * rng.standard_normal((speakers * per, 192)))
    ids = [f"s{i // per:05d}-u{i % per}" for i in range(len(vectors))]
    cols = {
        "utterance_id": pa.array(ids),
        "speaker_id": pa.array([f"s{i // per:05d}" for i in range(len(vectors))]),
        "split": pa.array(["train"] * len(vectors)),
        "start_s": pa.array(np.zeros(len(vectors))),
        "end_s": pa.array(np.ones(len(vectors))),
        "num_segments": pa.array(np.ones(len(vectors), dtype=np.int32)),
        "model_id": pa.array(["synthetic"] * len(vectors)),
        "embedding": schema.embedding_column(vectors),
    }
    sch = schema.embedding_schema(192, utterance_level=True)
    layout.embeddings.mkdir(parents=True)
    pq.write_table(pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch), layout.utterance_embeddings)
    seg_cols = {**cols, "segment_id": pa.array([f"{u}#000" for u in ids])}
    seg_sch = schema.embedding_schema(192)
    pq.write_table(pa.Table.from_arrays([seg_cols[f.name] for f in seg_sch], schema=seg_sch), layout.segment_embeddings)
    return layout


def test_index_survives_sigkill(tmp_path: Path) -> None:
    reference = _index_project(tmp_path / "reference")
    crashed = _index_project(tmp_path / "crashed")
    started = time.monotonic()
    _finish(_start(INDEX_DRIVER, str(reference.root)))
    duration = time.monotonic() - started
    expected = _index_digest(reference.index_dir)

    rng = random.Random(7)
    killed = 0
    for trial in range(KILL_TRIALS):
        if trial == 2:  # a complete index from a previous run must survive a killed rebuild intact
            _finish(_start(INDEX_DRIVER, str(crashed.root)))
        proc = _start(INDEX_DRIVER, str(crashed.root))
        time.sleep(rng.uniform(0.2, 0.9) * duration)
        if proc.poll() is None:
            _kill(proc)
            killed += 1
        else:
            _finish(proc)
        if crashed.index_dir.exists():
            assert _index_digest(crashed.index_dir) == expected
    assert killed >= 3, f"only {killed} kills landed; duration {duration:.2f}s"

    _finish(_start(INDEX_DRIVER, str(crashed.root)))
    assert _index_digest(crashed.index_dir) == expected
    stray = [p.name for p in crashed.data.iterdir() if p.name.startswith(".index")]
    assert not stray, stray

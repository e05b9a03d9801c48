"""The embedding engine on real excerpts with a randomly initialised ECAPA-TDNN."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from voiceprint.common import audio, schema
from voiceprint.common.layout import Layout
from voiceprint.config import EmbedParams
from voiceprint.embed.engine import length_buckets
from voiceprint.embed.stage import embed_segments
from voiceprint.embed.utterances import embed_utterance_file, utterance_chunks
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(64)
    model_dir = tmp_path_factory.mktemp("model") / "ecapa"
    save_speechbrain_checkpoint(model_dir, cfg.build().eval(), cfg)
    return load_ecapa(model_dir)


def _segments(layout: Layout, files: list[Path], bad: Path | None = None) -> pa.Table:
    rows = []
    for f in files:
        dur = audio.probe(f).duration_s
        # Two segments per file, of different lengths, so batches mix utterances.
        for k, (a, b) in enumerate([(0.0, min(2.0, dur)), (min(2.5, dur / 2), dur)]):
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
    if bad is not None:
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
    table = pa.Table.from_pylist(rows, schema=schema.SEGMENTS)
    layout.data.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, layout.segments)
    return table


def test_length_buckets_cap_padded_seconds():
    durations = np.array([1.0, 9.0, 2.0, 2.5, 30.0, 0.5])
    batches = length_buckets(durations, max_batch_s=6.0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    for b in batches:
        assert len(b) == 1 or durations[b].max() * len(b) <= 6.0
    assert [len(b) for b in batches][-1] == 1  # the 30 s segment rides alone


def test_batched_engine_matches_one_at_a_time(tmp_path: Path, encoder, test_other_files: list[Path]):
    layout = Layout.at(tmp_path)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 10)
    files = test_other_files[::10][:6]
    table = _segments(layout, files, bad)

    summary = embed_segments(
        layout, EmbedParams(max_batch_s=20.0, utterance="segments"), encoder=encoder, progress=False
    )

    seg = pq.read_table(layout.segment_embeddings)
    assert seg.schema.field("embedding").type == pa.list_(pa.float32(), encoder.dim)
    assert summary["segments"] == seg.num_rows == table.num_rows - 1
    assert summary["rejected"] == 1
    rejects = pq.read_table(layout.embeddings / "rejects.parquet").to_pylist()
    assert rejects[0]["path"] == str(bad) and rejects[0]["stage"] == "embed"

    vectors = schema.embeddings_matrix(seg)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    by_id = dict(zip(seg.column("segment_id").to_pylist(), vectors))
    with torch.inference_mode():
        for row in table.to_pylist()[:-1]:
            wav = torch.from_numpy(audio.load(row["path"], row["start_s"], row["end_s"])).unsqueeze(0)
            ref = schema.l2_normalise(encoder.embed(wav, torch.ones(1)).numpy())[0]
            assert float(ref @ by_id[row["segment_id"]]) > 0.999, row["segment_id"]

    utt = pq.read_table(layout.utterance_embeddings)
    assert sorted(utt.column("utterance_id").to_pylist()) == sorted(f.stem for f in files)
    assert set(utt.column("num_segments").to_pylist()) == {2}
    uvec = dict(zip(utt.column("utterance_id").to_pylist(), schema.embeddings_matrix(utt)))
    for f in files:
        mean = by_id[f"{f.stem}#000"] + by_id[f"{f.stem}#001"]
        np.testing.assert_allclose(uvec[f.stem], mean / np.linalg.norm(mean), atol=1e-5)


def test_utterance_chunks_are_equal_and_cover_the_file():
    assert utterance_chunks(14.0, 60.0) == [(0.0, 14.0)]
    assert utterance_chunks(60.0, 60.0) == [(0.0, 60.0)]
    chunks = utterance_chunks(130.0, 60.0)  # three chunks of 43.3 s, not 60 + 60 + 10
    assert len(chunks) == 3 and chunks[0][0] == 0.0 and chunks[-1][1] == 130.0
    assert all(b == pytest.approx(a + 130.0 / 3) for a, b in chunks)
    assert all(chunks[k][1] == chunks[k + 1][0] for k in range(2))


def _one_call(encoder, path: Path, start_s: float = 0.0, end_s: float | None = None) -> np.ndarray:
    with torch.inference_mode():
        wav = torch.from_numpy(audio.load(path, start_s, end_s)).unsqueeze(0)
        return schema.l2_normalise(encoder.embed(wav, torch.ones(1)).numpy())[0]


def test_file_utterances_are_one_pass_over_the_whole_file(tmp_path: Path, encoder, test_other_files: list[Path]):
    """embed.utterance: file (default): the utterance vector is the whole file's, not its segments' mean."""
    layout = Layout.at(tmp_path)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 10)
    files = test_other_files[3::10][:5]
    _segments(layout, files, bad)

    summary = embed_segments(layout, EmbedParams(max_batch_s=20.0, amp=False), encoder=encoder, progress=False)
    assert summary["utterance"] == "file"
    assert summary["rejected"] == 1  # the undecodable file is rejected once and gets no utterance
    utt = pq.read_table(layout.utterance_embeddings)
    assert sorted(utt.column("utterance_id").to_pylist()) == sorted(f.stem for f in files)
    assert set(utt.column("num_segments").to_pylist()) == {
        2
    }  # columns other than the vector still describe the segments
    uvec = dict(zip(utt.column("utterance_id").to_pylist(), schema.embeddings_matrix(utt)))
    seg = pq.read_table(layout.segment_embeddings)
    by_id = dict(zip(seg.column("segment_id").to_pylist(), schema.embeddings_matrix(seg)))
    for f in files:
        assert float(uvec[f.stem] @ _one_call(encoder, f)) > 0.999, f.stem
        mean = schema.l2_normalise((by_id[f"{f.stem}#000"] + by_id[f"{f.stem}#001"])[None])[0]
        assert float(uvec[f.stem] @ mean) < 0.9999, "the utterance vector must not be the segments' mean"
    # embed_utterance_file (verify / identify / enroll) forms it the same way.
    np.testing.assert_allclose(embed_utterance_file(encoder, files[0]), uvec[files[0].stem], atol=2e-3)


def test_long_files_are_embedded_in_equal_chunks_and_averaged(tmp_path: Path, encoder, test_other_files: list[Path]):
    layout = Layout.at(tmp_path)
    f = max(test_other_files[:20], key=lambda p: audio.probe(p).duration_s)
    duration = audio.probe(f).duration_s
    _segments(layout, [f])
    params = EmbedParams(amp=False, utterance_chunk_s=duration / 2.5)  # three chunks
    embed_segments(layout, params, encoder=encoder, progress=False)
    got = schema.embeddings_matrix(pq.read_table(layout.utterance_embeddings))[0]
    chunks = utterance_chunks(duration, params.utterance_chunk_s)
    assert len(chunks) == 3
    expected = schema.l2_normalise(np.stack([_one_call(encoder, f, a, b) for a, b in chunks]).mean(0, keepdims=True))[0]
    assert float(got @ expected) > 0.999
    assert float(got @ _one_call(encoder, f)) < 0.9999  # not one pass over the whole file
    np.testing.assert_allclose(embed_utterance_file(encoder, f, embed_params=params), got, atol=2e-3)


def test_utterance_file_embedding_is_normalised_and_speaker_consistent(encoder, test_other_files: list[Path]):
    a = embed_utterance_file(encoder, test_other_files[0])
    assert a.shape == (encoder.dim,) and abs(np.linalg.norm(a) - 1) < 1e-5
    assert float(a @ embed_utterance_file(encoder, test_other_files[0])) > 0.9999


def test_cpu_engine_precision_and_batching_agree_with_float32(tmp_path: Path, encoder, test_other_files: list[Path]):
    """bf16 on CPUs with native bf16, padded batches: embeddings match float32 one segment per call."""
    from voiceprint.common.precision import autocast_dtype

    layout = Layout.at(tmp_path)
    files = test_other_files[1::10][:5]
    _segments(layout, files)
    fast = embed_segments(layout, EmbedParams(max_batch_s=20.0), encoder=encoder, progress=False)
    fast_table = pq.read_table(layout.segment_embeddings)
    exact = embed_segments(
        layout, EmbedParams(max_batch_s=20.0, amp=False, cpu_batching=False), encoder=encoder, progress=False
    )
    exact_table = pq.read_table(layout.segment_embeddings)

    native = autocast_dtype(torch.device("cpu"), amp=True)
    assert fast["precision"] == ("bfloat16" if native == torch.bfloat16 else "float32")
    assert exact["precision"] == "float32"
    assert fast["model_id"] == exact["model_id"] == encoder.model_id
    assert fast_table.column("segment_id").to_pylist() == exact_table.column("segment_id").to_pylist()
    cos = np.sum(schema.embeddings_matrix(fast_table) * schema.embeddings_matrix(exact_table), axis=1)
    assert cos.min() > 0.999, cos.min()


def test_reuse_copies_the_embed_stage_tables_only_when_they_match(
    tmp_path: Path, encoder, test_other_files: list[Path]
):
    """The comparison stage's shortcut: same segments, weights and plan -> the same files; else None."""
    from voiceprint.embed.stage import EMBED_SUMMARY, reuse_embeddings

    layout = Layout.at(tmp_path)
    _segments(layout, test_other_files[2::10][:4])
    params = EmbedParams(max_batch_s=20.0)
    summary = embed_segments(layout, params, encoder=encoder, progress=False)
    written = (layout.embeddings / EMBED_SUMMARY).read_bytes()
    out = tmp_path / "compare" / "ecapa"

    reused = reuse_embeddings(layout, params, encoder, out)
    assert reused is not None and reused["reused_from"] == "data/embeddings"
    assert reused["segments"] == summary["segments"]
    assert reused["realtime_factor"] is None  # no timing file from the embed stage: no throughput
    layout.embed_stats.write_text(json.dumps(summary))  # what the embed stage writes
    assert reuse_embeddings(layout, params, encoder, out)["realtime_factor"] == summary["realtime_factor"]
    for name in ("segments.parquet", "utterances.parquet", "rejects.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(layout.embeddings / name)), name
    assert (out / EMBED_SUMMARY).exists()

    # Another batch plan (and so other padding and rounding) is not the same output.
    assert reuse_embeddings(layout, EmbedParams(max_batch_s=20.0, cpu_batching=False), encoder, out / "x") is None
    # Other weights are not either.
    torch.manual_seed(1)
    cfg = EcapaConfig.from_channels(64)
    save_speechbrain_checkpoint(tmp_path / "other", cfg.build().eval(), cfg)
    other = load_ecapa(tmp_path / "other")
    assert other.model_id != encoder.model_id
    assert reuse_embeddings(layout, params, other, out / "w") is None
    # A rerun writing the same vectors leaves the directory byte-identical (no timings in it), so
    # DVC sees an unchanged output and reruns nothing downstream.
    embed_segments(layout, params, encoder=encoder, progress=False)
    assert (layout.embeddings / EMBED_SUMMARY).read_bytes() == written
    assert reuse_embeddings(layout, params, encoder, out / "v") is not None
    # New segments make the stage's tables stale.
    _segments(layout, test_other_files[3::10][:4])
    assert reuse_embeddings(layout, params, encoder, out / "y") is None
    # A run killed while merging leaves no summary, so nothing is reused.
    embed_segments(layout, params, encoder=encoder, progress=False)
    (layout.embeddings / EMBED_SUMMARY).unlink()
    assert reuse_embeddings(layout, params, encoder, out / "z") is None


def test_batch_plan_on_cpu_depends_on_model_size(encoder, monkeypatch: pytest.MonkeyPatch):
    from voiceprint.embed import engine

    durations = np.array([3.0, 1.0, 2.0, 8.0])
    buckets = [b.tolist() for b in length_buckets(durations, 6.0)]
    per_segment = [[1], [2], [0], [3]]

    def plan(**kw):
        return [b.tolist() for b in engine.batch_plan(durations, EmbedParams(max_batch_s=6.0, **kw), encoder)]

    assert plan() == buckets  # a small model batches
    assert plan(cpu_batching=False) == per_segment
    monkeypatch.setattr(engine, "CPU_PER_SEGMENT_MIN_PARAMS", encoder.num_parameters())
    assert plan() == per_segment  # a large one does not
    assert plan(cpu_batching=True) == buckets
    assert len(buckets) < len(per_segment)


def test_only_autocast_safe_encoders_run_in_reduced_precision(encoder):
    from voiceprint.embed.engine import engine_dtype
    from voiceprint.encoders.base import SpeakerEncoder

    assert encoder.autocast_safe and SpeakerEncoder.autocast_safe is False
    assert engine_dtype(encoder, EmbedParams(amp=False)) is None


def test_file_pass_resolves_project_relative_paths_from_any_directory(
    tmp_path: Path, encoder, test_other_files: list[Path], monkeypatch
):
    """segments.parquet stores paths relative to the project; the whole-file pass must find them from any cwd."""
    import shutil

    layout = Layout.at(tmp_path / "project")
    raw = layout.root / "data" / "raw"
    raw.mkdir(parents=True)
    f = test_other_files[7]
    shutil.copy(f, raw / f.name)
    _segments(layout, [raw / f.name])
    table = pq.read_table(layout.segments)
    relative = pa.array([str(Path(p).relative_to(layout.root)) for p in table.column("path").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", relative), layout.segments)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    embed_segments(layout, EmbedParams(amp=False), encoder=encoder, progress=False)
    got = schema.embeddings_matrix(pq.read_table(layout.utterance_embeddings))[0]
    segment_mean = schema.l2_normalise(
        schema.embeddings_matrix(pq.read_table(layout.segment_embeddings)).sum(0, keepdims=True)
    )[0]
    assert not np.allclose(got, segment_mean, atol=1e-6), "fell back to the segments' mean: the file was not found"
    assert float(got @ _one_call(encoder, raw / f.name)) > 0.999


def _plain_merge(segment_parts: list[pa.Table], file_parts: list[pa.Table]) -> dict[str, dict]:
    """The merge as a per-utterance dict of running float64 sums (what merge_parts must equal bit for bit)."""
    sums: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    for table in segment_parts:
        for row, v in zip(table.to_pylist(), schema.embeddings_matrix(table)):
            u = row["utterance_id"]
            sums[u] = sums.get(u, np.zeros(v.shape, np.float64)) + v
            m = meta.setdefault(u, {"speaker_id": row["speaker_id"], "start_s": row["start_s"], "end_s": row["end_s"]})
            m["start_s"], m["end_s"] = min(m["start_s"], row["start_s"]), max(m["end_s"], row["end_s"])
            m["num_segments"] = m.get("num_segments", 0) + 1
    whole: dict[str, np.ndarray] = {}
    for table in file_parts:
        for u, v in zip(table.column("utterance_id").to_pylist(), schema.embeddings_matrix(table)):
            whole[u] = whole.get(u, np.zeros(v.shape, np.float64)) + v
    for u in meta:
        meta[u]["embedding"] = schema.l2_normalise(whole.get(u, sums[u])[None])[0]
    return meta


def test_merge_sums_each_utterance_in_part_order(tmp_path: Path):
    """The columnar merge (utterance codes, one sums matrix) gives exactly the per-utterance running sums,
    with rejected rows, parts written across a resume, and whole-file vectors missing for some files."""
    from types import SimpleNamespace

    from voiceprint.common.parts import PartStore
    from voiceprint.embed.engine import Spans
    from voiceprint.embed.stage import _Pass
    from voiceprint.embed.tables import Stager, merge_parts, reject_rows, segment_batch

    rng = np.random.default_rng(0)
    layout, dim = Layout.at(tmp_path), 8
    utts = ["b", "a10", "a2", "ä", "c"] * 3  # 15 utterances: ids not in sorted order, one non-ASCII
    utts = [f"{u}{k}" for k, u in enumerate(utts)]
    seg_rows, file_rows = [], []
    for k, u in enumerate(utts):
        for j in range(1 + k % 4):
            seg_rows.append((f"{u}#{j:03d}", u, f"s{k % 3}", "eval", f"/x/{u}.flac", j * 2.0, j * 2.0 + 1 + k % 3))
        for j in range(k % 3):  # 0, 1 or 2 whole-file chunks: a third of the files fall back to their segments
            file_rows.append((f"{u}@file{j:03d}", u, f"s{k % 3}", "eval", f"/x/{u}.flac", j * 5.0, j * 5.0 + 5))
    names = schema.SEGMENTS.names
    seg = pa.Table.from_pylist([dict(zip(names, r)) for r in seg_rows], schema=schema.SEGMENTS)
    files = pa.Table.from_pylist([dict(zip(names, r)) for r in file_rows], schema=schema.SEGMENTS)
    encoder = SimpleNamespace(dim=dim, model_id="m")
    sch = schema.embedding_schema(dim)

    def staged(name: str, rows: pa.Table) -> tuple[_Pass, PartStore]:
        durations = (rows.column("end_s").to_numpy() - rows.column("start_s").to_numpy()).astype(np.float64)
        work = _Pass(rows, Spans(layout, rows), durations, length_buckets(durations, 6.0))
        store = PartStore.open(tmp_path / "work", name, "fp")
        for first, last in ((0, len(work.batches) // 2), (len(work.batches) // 2, len(work.batches))):  # a resume
            stager = Stager(store, sch, rows=5, every_s=1e9)
            for unit in range(first, last):
                idx = work.batches[unit].tolist()
                bad = [(i, "unreadable") for i in idx if i % 7 == 3]
                good = [i for i in idx if i % 7 != 3]
                vectors = schema.l2_normalise(rng.standard_normal((len(good), dim)).astype(np.float32))
                batch = segment_batch(rows, good, vectors, "m", sch) if good else None
                stager.add(unit, batch, reject_rows(rows, bad))
            stager.flush()
        return work, store

    segments, seg_store = staged("segments", seg)
    whole, file_store = staged("files", files)
    out = tmp_path / "out"
    counts = merge_parts(seg_store, out, layout, sch, encoder, 4, segments, file_store=file_store, files=whole)

    expected = _plain_merge([t for _, t in seg_store.iter_tables()], [t for _, t in file_store.iter_tables()])
    got = pq.read_table(out / "utterances.parquet")
    assert got.column("utterance_id").to_pylist() == sorted(expected) and counts["utterances"] == len(expected)
    for row, vector in zip(got.to_pylist(), schema.embeddings_matrix(got)):
        e = expected[row["utterance_id"]]
        assert (row["speaker_id"], row["start_s"], row["end_s"]) == (e["speaker_id"], e["start_s"], e["end_s"])
        assert row["num_segments"] == e["num_segments"]
        assert vector.tobytes() == e["embedding"].tobytes(), row["utterance_id"]
    segments_out = pq.read_table(out / "segments.parquet")
    assert segments_out.equals(pa.concat_tables(t for _, t in seg_store.iter_tables()))
    rejects = pq.read_table(out / "rejects.parquet").column("path").to_pylist()
    seg_rejects = [r["path"] for p in seg_store.parts() for r in p.rejects]
    assert rejects[: len(seg_rejects)] == seg_rejects and len(rejects) == counts["rejected"]
    assert not set(rejects[len(seg_rejects) :]) & set(seg_rejects)  # a file is reported by one pass only


def test_segment_table_bytes_do_not_depend_on_where_parts_were_cut(tmp_path: Path):
    """Parts are cut by a flush timer or a kill; the merged segments.parquet (a DVC output) must be the
    same bytes whatever the cuts. Parquet cuts pages at chunk boundaries, so the merge writes one
    chunk per row group (3,000 x 192 floats: several pages per column chunk)."""
    from types import SimpleNamespace

    from voiceprint.common.parts import PartStore
    from voiceprint.embed.engine import Spans
    from voiceprint.embed.stage import _Pass
    from voiceprint.embed.tables import Stager, merge_parts, segment_batch

    layout, dim, n = Layout.at(tmp_path), 192, 3000
    rows = [
        (f"u{k // 3:04d}#{k % 3:03d}", f"u{k // 3:04d}", f"s{k % 50}", "eval", "/x.flac", 0.0, 1.0) for k in range(n)
    ]
    seg = pa.Table.from_pylist([dict(zip(schema.SEGMENTS.names, r)) for r in rows], schema=schema.SEGMENTS)
    vectors = schema.l2_normalise(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
    sch = schema.embedding_schema(dim)
    written = []
    for name, flush_rows in (("a", 700), ("b", 1100)):
        durations = np.ones(n)
        work = _Pass(seg, Spans(layout, seg), durations, [np.arange(i, min(n, i + 100)) for i in range(0, n, 100)])
        store = PartStore.open(tmp_path / name / "work", "segments", "fp")
        stager = Stager(store, sch, rows=flush_rows, every_s=1e9)
        for unit, idx in enumerate(work.batches):
            stager.add(unit, segment_batch(seg, idx.tolist(), vectors[idx], "m", sch), [])
        stager.flush()
        assert len(list(store.parts())) == -(-n // flush_rows)  # different cuts: 5 parts against 3
        merge_parts(store, tmp_path / name / "out", layout, sch, SimpleNamespace(dim=dim, model_id="m"), 4096, work)
        written.append((tmp_path / name / "out" / "segments.parquet").read_bytes())
    assert written[0] == written[1]
    # Both tables come in row groups of the asked size, so a reader's batch never decodes more.
    merge_parts(store, tmp_path / "c", layout, sch, SimpleNamespace(dim=dim, model_id="m"), 400, work)
    for table, total in (("segments.parquet", n), ("utterances.parquet", n // 3)):
        meta = pq.ParquetFile(tmp_path / "c" / table).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [400] * (total // 400) + [
            total % 400
        ]

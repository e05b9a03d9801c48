"""FAISS index building, the speaker gallery and enrollments (synthetic clustered speakers)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voiceprint.common.layout import Layout
from voiceprint.common.schema import embedding_column, embedding_schema, embeddings_matrix, l2_normalise
from voiceprint.config import IndexParams
from voiceprint.index import stage as index_stage
from voiceprint.index.enrollment import EnrollmentError, enroll, load_enrollments, safe_name
from voiceprint.index.faiss_index import (
    SpeakerSums,
    build_index,
    build_index_from_batches,
    effective_nlist,
    speaker_centroids,
    write_flat_index,
)
from voiceprint.index.gallery import SpeakerGallery
from voiceprint.index.stage import build_indexes

DIM = 32
MODEL = "ecapa-test@abc123"


def _speakers(rng: np.random.Generator, n_spk: int, dim: int = DIM) -> np.ndarray:
    return l2_normalise(rng.normal(size=(n_spk, dim)))


def _around(rng: np.random.Generator, centre: np.ndarray, n: int, noise: float = 1.0) -> np.ndarray:
    """n unit vectors near ``centre``: noise of norm ~``noise`` (cosine to the centre ~0.7)."""
    dim = centre.shape[-1]
    return l2_normalise(centre + noise * rng.normal(size=(n, dim)) / np.sqrt(dim))


def write_embeddings(
    layout: Layout,
    rng: np.random.Generator,
    n_train: int = 6,
    n_eval: int = 4,
    utts: int = 5,
    segs: int = 3,
    model_id: str = MODEL,
) -> dict[str, np.ndarray]:
    """Synthetic utterance- and segment-level embedding files in the pipeline's schema."""
    centres = _speakers(rng, n_train + n_eval)
    utt_rows, seg_rows, utt_vecs, seg_vecs = [], [], [], []
    for s, centre in enumerate(centres):
        spk, split = f"spk{s:02d}", "train" if s < n_train else "eval"
        for u in range(utts):
            uid = f"{spk}-u{u:02d}"
            v = _around(rng, centre, segs)
            for k in range(segs):
                seg_rows.append(
                    dict(
                        segment_id=f"{uid}#{k:03d}",
                        utterance_id=uid,
                        speaker_id=spk,
                        split=split,
                        start_s=k * 2.0,
                        end_s=k * 2.0 + 1.5,
                        model_id=model_id,
                    )
                )
                seg_vecs.append(v[k])
            utt_rows.append(
                dict(
                    utterance_id=uid,
                    speaker_id=spk,
                    split=split,
                    start_s=0.0,
                    end_s=segs * 2.0,
                    num_segments=segs,
                    model_id=model_id,
                )
            )
            utt_vecs.append(l2_normalise(v.mean(axis=0, keepdims=True))[0])
    for rows, vecs, path, utterance_level in (
        (seg_rows, seg_vecs, layout.segment_embeddings, False),
        (utt_rows, utt_vecs, layout.utterance_embeddings, True),
    ):
        schema = embedding_schema(DIM, utterance_level=utterance_level)
        cols = {f.name: [r[f.name] for r in rows] for f in schema if f.name != "embedding"}
        cols["embedding"] = embedding_column(np.stack(vecs))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), path)
    return {"centres": centres}


@pytest.fixture()
def built(tmp_path: Path) -> tuple[Layout, dict]:
    layout = Layout.at(tmp_path)
    data = write_embeddings(layout, np.random.default_rng(0))
    stats = build_indexes(layout, IndexParams(type="flat", use_gpu="never"))
    return layout, {**data, "stats": stats}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------


def test_index_types_agree_on_clustered_speakers() -> None:
    rng = np.random.default_rng(1)
    centres = _speakers(rng, 40)
    labels = np.repeat(np.arange(40), 40)
    base = np.concatenate([_around(rng, c, 40, noise=0.6) for c in centres])
    queries = np.concatenate([_around(rng, c, 3, noise=0.6) for c in centres])
    q_labels = np.repeat(np.arange(40), 3)

    k = 10
    exact = build_index(base, IndexParams(type="flat", use_gpu="never"))
    _, truth = exact.search(queries, k)
    assert np.mean(labels[truth[:, 0]] == q_labels) == 1.0  # well-separated: exact top-1 is right

    for params in (
        IndexParams(type="ivf", nlist=64, nprobe=8, use_gpu="never"),
        IndexParams(type="hnsw", hnsw_m=16, ef_search=64, ef_construction=80, use_gpu="never"),
    ):
        index = build_index(base, params)
        assert index.ntotal == len(base)
        scores, found = index.search(queries, k)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
        assert recall >= 0.9, (params.type, recall)
        assert np.mean(labels[found[:, 0]] == q_labels) == 1.0
        assert np.all(scores <= 1.0 + 1e-5)  # inner products of unit vectors are cosines


def test_ivf_nlist_is_clamped_and_settings_apply() -> None:
    assert effective_nlist(100, 64) == 2
    assert effective_nlist(10, 64) == 1
    assert effective_nlist(100_000, 64) == 64
    rng = np.random.default_rng(2)
    index = build_index(rng.normal(size=(200, 8)), IndexParams(type="ivf", nlist=64, nprobe=16))
    ivf = faiss.extract_index_ivf(index)
    assert (ivf.nlist, ivf.nprobe) == (5, 5)
    hnsw = build_index(rng.normal(size=(50, 8)), IndexParams(type="hnsw", ef_search=77, hnsw_m=8))
    assert hnsw.hnsw.efSearch == 77
    assert build_index(np.zeros((0, 8)), IndexParams(type="ivf")).ntotal == 0


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_batched_build_equals_whole_matrix_build(kind: str) -> None:
    """The index stage feeds faiss a batch at a time: for flat, and for IVF trained on every row
    (n <= nlist x 256), the index must be the same bytes as one built from the whole matrix."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, DIM)).astype(np.float32)
    params = IndexParams(type=kind, nlist=8, use_gpu="never")
    whole = faiss.serialize_index(build_index(x, params)).tobytes()
    batched = build_index_from_batches(lambda: (x[i : i + 128] for i in range(0, 1000, 128)), 1000, DIM, params)
    assert batched.ntotal == 1000
    assert faiss.serialize_index(batched).tobytes() == whole
    with pytest.raises(ValueError, match="expected 1001 vectors"):
        build_index_from_batches(lambda: iter((x,)), 1001, DIM, params)


@pytest.mark.parametrize(("n", "dim"), [(0, DIM), (1, DIM), (1000, DIM), (777, 192)])
def test_flat_index_written_from_batches_is_faiss_own_file(tmp_path: Path, n: int, dim: int) -> None:
    """The index stage writes a flat index batch by batch instead of building it: the file must be
    the bytes faiss.write_index gives for the built index, and faiss must read it back."""
    x = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    path = tmp_path / "flat.faiss"
    write_flat_index(lambda: (x[i : i + 128] for i in range(0, max(n, 1), 128)), n, dim, path)
    built = build_index(x, IndexParams(type="flat", use_gpu="never"))
    assert path.read_bytes() == faiss.serialize_index(built).tobytes()
    back = faiss.read_index(str(path))
    assert back.ntotal == n and back.d == dim and back.metric_type == faiss.METRIC_INNER_PRODUCT
    if n:
        assert np.array_equal(back.reconstruct_n(0, n), l2_normalise(x))


def test_embeddings_matrix_of_a_sliced_batch_is_the_slice() -> None:
    """Readers take record batches that may be slices of a larger one: the rows must be the slice's."""
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    batch = pa.record_batch({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)})
    assert np.array_equal(embeddings_matrix(batch.slice(3, 4)), x[3:7])
    assert np.array_equal(embeddings_matrix(pa.Table.from_batches([batch]).slice(8)), x[8:])


def test_flat_index_writer_refuses_a_wrong_count(tmp_path: Path) -> None:
    x = np.ones((10, DIM), np.float32)
    with pytest.raises(ValueError, match="expected 11 vectors, the batches held 10"):
        write_flat_index(lambda: iter((x,)), 11, DIM, tmp_path / "flat.faiss")
    with pytest.raises(ValueError, match="expected 32-d vectors"):
        write_flat_index(lambda: iter((np.ones((2, 8), np.float32),)), 2, DIM, tmp_path / "flat.faiss")


def test_ivf_on_more_rows_than_faiss_trains_on_samples_evenly_and_reproducibly() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    params = IndexParams(type="ivf", nlist=2, nprobe=2, use_gpu="never")  # trains on 2 x 256 of 2,000 rows
    a, b = (
        build_index_from_batches(lambda: (x[i : i + 300] for i in range(0, 2000, 300)), 2000, 8, params) for _ in "ab"
    )
    assert faiss.serialize_index(a).tobytes() == faiss.serialize_index(b).tobytes()
    assert a.ntotal == 2000 and faiss.extract_index_ivf(a).nlist == 2


def test_speaker_sums_fed_in_batches_give_the_same_bits_as_whole() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, DIM)).astype(np.float32)
    speakers = [f"s{int(i)}" for i in rng.integers(0, 40, size=500)]
    names, centroids, counts = speaker_centroids(x, speakers)
    sums = SpeakerSums(speakers, DIM)
    for i in range(0, 500, 64):
        sums.add(x[i : i + 64], speakers[i : i + 64])
    b_names, b_centroids, b_counts = sums.centroids()
    assert b_names == names == sorted(set(speakers))
    assert np.array_equal(b_centroids, centroids) and np.array_equal(b_counts, counts) and counts.sum() == 500
    with pytest.raises(ValueError, match="'stranger' was not among the speakers"):
        sums.add(x[:1], ["stranger"])


def test_build_indexes_reads_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches smaller than the tables: the same vectors and centroids, and the id table in order."""
    whole, batched = Layout.at(tmp_path / "whole"), Layout.at(tmp_path / "batched")
    for layout in (whole, batched):
        write_embeddings(layout, np.random.default_rng(8))
    build_indexes(whole, IndexParams(type="flat", use_gpu="never"))
    monkeypatch.setattr(index_stage, "BATCH_ROWS", 16)  # 150 segment rows, 50 utterance rows
    monkeypatch.setattr(index_stage, "VECTOR_ROWS", 7)
    build_indexes(batched, IndexParams(type="flat", use_gpu="never"))
    for name in ("segments.faiss", "speakers.faiss", "speakers_ids.parquet", "index.json"):
        assert (whole.index_dir / name).read_bytes() == (batched.index_dir / name).read_bytes(), name
    ids = pq.ParquetFile(batched.index_dir / "segments_ids.parquet")
    assert ids.metadata.num_row_groups == 10  # ceil(150 / 16)
    assert ids.read().equals(pq.read_table(whole.index_dir / "segments_ids.parquet"))


def test_build_indexes_writes_aligned_files(built: tuple[Layout, dict]) -> None:
    layout, data = built
    d = layout.index_dir
    assert {p.name for p in d.iterdir()} == {
        "segments.faiss",
        "segments_ids.parquet",
        "speakers.faiss",
        "speakers_ids.parquet",
        "index.json",
    }
    info = json.loads((d / "index.json").read_text())
    assert info["type"] == "flat" and info["dim"] == DIM and info["model_id"] == MODEL
    assert info["counts"] == {"segments": 150, "utterances": 50, "speakers": 10}
    assert info["built_with"] == "cpu" and info["faiss_version"] == faiss.__version__
    assert "built_at" not in info and "seconds" not in info  # DVC output: no clock (the stats have the time)
    assert data["stats"]["counts"] == info["counts"] and data["stats"]["seconds"] >= 0

    seg_ids = pq.read_table(d / "segments_ids.parquet")
    assert seg_ids.column_names == ["segment_id", "utterance_id", "speaker_id", "split"]
    seg_index = faiss.read_index(str(d / "segments.faiss"))
    assert seg_index.ntotal == seg_ids.num_rows == 150
    # Row i of the id table is faiss id i: a stored vector finds itself.
    segs = pq.read_table(layout.segment_embeddings)
    v = np.asarray(segs.column("embedding")[17].as_py(), dtype=np.float32)[None]
    _, rows = seg_index.search(v, 1)
    assert seg_ids.column("segment_id")[int(rows[0, 0])].as_py() == segs.column("segment_id")[17].as_py()

    spk_ids = pq.read_table(d / "speakers_ids.parquet").to_pylist()
    assert [r["speaker_id"] for r in spk_ids] == [f"spk{i:02d}" for i in range(10)]
    assert {r["split"] for r in spk_ids} == {"train", "eval"}
    assert all(r["num_utterances"] == 5 for r in spk_ids)
    spk_index = faiss.read_index(str(d / "speakers.faiss"))
    centroids = spk_index.reconstruct_n(0, spk_index.ntotal)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # Centroid of spk03 = renormalised mean of its normalised utterance embeddings.
    utts = pq.read_table(layout.utterance_embeddings).to_pylist()
    mine = np.array([r["embedding"] for r in utts if r["speaker_id"] == "spk03"])
    expected = l2_normalise(l2_normalise(mine).mean(axis=0, keepdims=True))[0]
    assert np.allclose(centroids[3], expected, atol=1e-5)


def test_same_embeddings_give_byte_identical_index_anywhere(tmp_path: Path) -> None:
    """data/index is a DVC output: two projects (different paths, built at different times) holding
    the same embeddings must write the same bytes, or dvc.lock differs from checkout to checkout."""
    digests = []
    for root in (tmp_path / "a", tmp_path / "a-longer-project-path" / "nested"):
        layout = Layout.at(root)
        write_embeddings(layout, np.random.default_rng(7))
        build_indexes(layout, IndexParams(type="flat", use_gpu="never"))
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(layout.index_dir.iterdir())})
    assert digests[0] == digests[1]
    assert str(tmp_path) not in (Layout.at(tmp_path / "a").index_dir / "index.json").read_text()


def test_rebuild_replaces_directory_whole(built: tuple[Layout, dict]) -> None:
    layout, _ = built
    stats = build_indexes(layout, IndexParams(type="hnsw", hnsw_m=8))
    assert json.loads((layout.index_dir / "index.json").read_text())["type"] == "hnsw"
    assert stats["speakers_index"]["ef_search"] == 128
    assert not [p for p in layout.data.iterdir() if p.name.startswith(".index")]


def test_mixed_models_are_refused(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    write_embeddings(layout, np.random.default_rng(0))
    t = pq.read_table(layout.utterance_embeddings)
    t = t.set_column(t.schema.get_field_index("model_id"), "model_id", pa.array(["other"] * t.num_rows))
    pq.write_table(t, layout.utterance_embeddings)
    with pytest.raises(ValueError, match="different models"):
        build_indexes(layout, IndexParams())


def test_gallery_finds_the_right_speaker(built: tuple[Layout, dict]) -> None:
    layout, data = built
    gallery = SpeakerGallery.load(layout)
    assert len(gallery) == 10 and gallery.model_id == MODEL
    rng = np.random.default_rng(5)
    queries = np.concatenate([_around(rng, c, 2) for c in data["centres"]])
    results = gallery.search(queries, k=3)
    assert [r[0][0] for r in results] == [f"spk{i:02d}" for i in range(10) for _ in range(2)]
    assert all(len(r) == 3 and r[0][1] >= r[1][1] >= r[2][1] for r in results)
    single = gallery.search(queries[0], k=20)  # 1-D query, k larger than the gallery
    assert len(single) == 1 and len(single[0]) == 10


def test_enroll_is_searchable_without_touching_base_index(built: tuple[Layout, dict]) -> None:
    layout, _ = built
    before = _sha(layout.index_dir / "speakers.faiss")
    rng = np.random.default_rng(9)
    newcomer = _speakers(rng, 1)[0]
    record = enroll(layout, "Ada Lovelace", _around(rng, newcomer, 3), MODEL)
    assert record.count == 3 and record.path.parent == layout.enrollments
    assert record.path.name == f"{safe_name('Ada Lovelace')}.parquet"

    gallery = SpeakerGallery.load(layout)
    assert len(gallery) == 11
    best = gallery.search(_around(rng, newcomer, 4), k=5)
    assert all(r[0][0] == "Ada Lovelace" for r in best)
    assert all(r[1][0].startswith("spk") for r in best)  # merged with the base results
    assert _sha(layout.index_dir / "speakers.faiss") == before

    # Enrollments survive an index rebuild (they live outside data/index).
    build_indexes(layout, IndexParams(type="flat"))
    assert [e.name for e in SpeakerGallery.load(layout).enrolled] == ["Ada Lovelace"]


def test_re_enrolling_updates_the_weighted_mean(built: tuple[Layout, dict]) -> None:
    layout, _ = built
    rng = np.random.default_rng(11)
    vectors = _around(rng, _speakers(rng, 1)[0], 5)
    enroll(layout, "bob", vectors[:3], MODEL)
    record = enroll(layout, "bob", vectors[3:], MODEL)
    assert record.count == 5
    expected = l2_normalise(l2_normalise(vectors).mean(axis=0, keepdims=True))[0]
    (stored,) = load_enrollments(layout)
    assert stored.count == 5
    assert np.allclose(stored.centroid, expected, atol=1e-6)


def test_enrollment_with_another_model_is_refused(built: tuple[Layout, dict]) -> None:
    layout, _ = built
    with pytest.raises(EnrollmentError, match="re-enroll"):
        enroll(layout, "eve", np.ones((2, DIM)), "some-other-model")
    with pytest.raises(EnrollmentError, match="32-d"):
        enroll(layout, "eve", np.ones((2, 16)), MODEL)
    with pytest.raises(EnrollmentError, match="empty"):
        enroll(layout, "  ", np.ones((2, DIM)), MODEL)
    assert load_enrollments(layout) == []


def test_enrollments_from_an_old_model_are_ignored_after_a_model_change(tmp_path: Path) -> None:
    layout = Layout.at(tmp_path)
    rng = np.random.default_rng(0)
    write_embeddings(layout, rng, model_id="old-model")
    build_indexes(layout, IndexParams())
    enroll(layout, "carol", np.ones((1, DIM)), "old-model")

    write_embeddings(layout, rng, model_id="new-model")
    build_indexes(layout, IndexParams())
    gallery = SpeakerGallery.load(layout)
    assert [e.name for e in gallery.stale] == ["carol"] and gallery.enrolled == []
    record = enroll(layout, "carol", np.ones((2, DIM)), "new-model")
    assert record.count == 2  # replaced, not averaged with the old model's centroid
    assert [e.name for e in SpeakerGallery.load(layout).enrolled] == ["carol"]


def test_safe_names_are_distinct() -> None:
    names = ["alice", "Alice Smith", "Alice_Smith", "../etc/passwd", ".hidden", "名前"]
    slugs = [safe_name(n) for n in names]
    assert len(set(slugs)) == len(slugs)
    assert safe_name("alice") == "alice"
    assert all("/" not in s and not s.startswith(".") for s in slugs)


def test_gpu_path_builds_on_gpu_and_saves_cpu_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logic of the GPU branch with faiss' GPU entry points faked (CI machines have no GPU)."""
    import voiceprint.index.faiss_index as vi

    moved: list[str] = []

    class FakeParameterSpace:
        def set_index_parameter(self, index: faiss.Index, name: str, value: int) -> None:
            faiss.extract_index_ivf(index).nprobe = value

    def to_gpu(res: object, device: int, index: faiss.Index) -> faiss.Index:
        moved.append(type(index).__name__)
        return index

    monkeypatch.setattr(vi, "gpu_available", lambda: True)
    monkeypatch.setattr(vi, "_gpu_resources", None)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", FakeParameterSpace, raising=False)

    layout = Layout.at(tmp_path)
    write_embeddings(layout, np.random.default_rng(0))
    assert build_indexes(layout, IndexParams(type="ivf", nlist=2, nprobe=2))["built_with"] == "gpu"
    assert moved == ["IndexIVFFlat", "IndexIVFFlat"]  # segments and speakers
    assert build_indexes(layout, IndexParams(type="hnsw"))["built_with"] == "cpu"  # no GPU HNSW
    assert build_indexes(layout, IndexParams(type="flat", use_gpu="never"))["built_with"] == "cpu"
    # A flat index is written from the batches, never built, on the GPU or elsewhere.
    assert build_indexes(layout, IndexParams(type="flat"))["built_with"] == "cpu"
    assert len(moved) == 2

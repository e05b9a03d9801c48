"""DuckDB views over the pipeline tables (that user SQL cannot write or escape: tests/reliability/test_safe_loading.py)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voiceprint.common.layout import Layout
from voiceprint.common.schema import SEGMENTS, embedding_column, embedding_schema, l2_normalise
from voiceprint.query import connect, format_table, run_query

DIM = 16


@pytest.fixture()
def layout(tmp_path: Path) -> Layout:
    """Segment/utterance embeddings, segments and manifest for 4 speakers x 3 utterances."""
    layout = Layout.at(tmp_path / "project")
    rng = np.random.default_rng(0)
    centres = l2_normalise(rng.normal(size=(4, DIM)))
    utt_rows, utt_vecs, seg_rows, seg_vecs = [], [], [], []
    for s, centre in enumerate(centres):
        spk, split = f"spk{s}", "eval" if s >= 2 else "train"
        for u in range(3):
            uid = f"{spk}-{u}"
            v = l2_normalise(centre + 0.2 * rng.normal(size=(2, DIM)))
            for k in range(2):
                seg_rows.append(
                    dict(
                        segment_id=f"{uid}#{k:03d}",
                        utterance_id=uid,
                        speaker_id=spk,
                        split=split,
                        path=f"data/raw/{split}/{spk}/{uid}.flac",
                        start_s=float(k),
                        end_s=k + 0.9,
                        model_id="m1",
                    )
                )
                seg_vecs.append(v[k])
            utt_rows.append(
                dict(
                    utterance_id=uid,
                    speaker_id=spk,
                    split=split,
                    start_s=0.0,
                    end_s=1.9,
                    num_segments=2,
                    model_id="m1",
                    path=f"data/raw/{split}/{spk}/{uid}.flac",
                )
            )
            utt_vecs.append(l2_normalise(v.mean(axis=0, keepdims=True))[0])

    def write(path: Path, schema: pa.Schema, rows: list[dict], vecs: list[np.ndarray] | None) -> None:
        cols = {f.name: [r[f.name] for r in rows] for f in schema if f.name != "embedding"}
        if vecs is not None:
            cols["embedding"] = embedding_column(np.stack(vecs))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), path)

    write(layout.segment_embeddings, embedding_schema(DIM), seg_rows, seg_vecs)
    write(layout.utterance_embeddings, embedding_schema(DIM, utterance_level=True), utt_rows, utt_vecs)
    write(layout.segments, SEGMENTS, seg_rows, None)
    return layout


def test_views_and_types(layout: Layout) -> None:
    con = connect(layout)
    views = ("embeddings", "utterances", "segments")
    counts = {v: con.execute(f"SELECT count(*) FROM {v}").fetchone()[0] for v in views}
    assert counts == {"embeddings": 24, "utterances": 12, "segments": 24}
    assert con.execute("SELECT typeof(embedding) FROM utterances LIMIT 1").fetchone()[0] == f"FLOAT[{DIM}]"
    # manifest is optional: absent file, absent view.
    with pytest.raises(duckdb.CatalogException):
        con.sql("SELECT * FROM manifest")
    joined = con.execute(
        "SELECT count(*) FROM embeddings e JOIN segments s USING (segment_id) WHERE e.speaker_id = s.speaker_id"
    ).fetchone()[0]
    assert joined == 24


def test_manifest_view_when_present(layout: Layout) -> None:
    pq.write_table(pa.table({"utterance_id": ["a", "b"], "speaker_id": ["x", "y"]}), layout.manifest)
    assert run_query(layout, "SELECT count(*) AS n FROM manifest").to_pylist() == [{"n": 2}]


def test_nearest_neighbour_sql(layout: Layout) -> None:
    sql = """
        WITH q AS (SELECT embedding FROM utterances WHERE utterance_id = 'spk2-0')
        SELECT u.utterance_id, u.speaker_id,
               array_cosine_similarity(u.embedding, q.embedding) AS score,
               list_cosine_similarity(u.embedding, q.embedding) AS score_list
        FROM utterances u, q
        WHERE u.utterance_id <> 'spk2-0'
        ORDER BY score DESC
        LIMIT 5
    """
    result = run_query(layout, sql)
    assert isinstance(result, pa.Table) and result.num_rows == 5
    rows = result.to_pylist()
    assert [r["speaker_id"] for r in rows[:2]] == ["spk2", "spk2"]  # its own speaker first
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    assert all(abs(r["score"] - r["score_list"]) < 1e-5 for r in rows)
    # Same ranking as numpy.
    utts = pq.read_table(layout.utterance_embeddings).to_pylist()
    x = np.array([u["embedding"] for u in utts])
    ids = [u["utterance_id"] for u in utts]
    sims = x @ x[ids.index("spk2-0")]
    order = [ids[i] for i in np.argsort(-sims) if ids[i] != "spk2-0"][:5]
    assert [r["utterance_id"] for r in rows] == order


def test_missing_tables_explain_themselves(tmp_path: Path) -> None:
    empty = Layout.at(tmp_path / "nothing")
    with pytest.raises(duckdb.InvalidInputException, match="run the embed stage"):
        run_query(empty, "SELECT count(*) FROM embeddings")
    with pytest.raises(duckdb.InvalidInputException, match="run the vad stage"):
        run_query(empty, "SELECT * FROM segments")


def test_format_table() -> None:
    table = pa.table(
        {
            "speaker_id": ["a", "bb", None],
            "score": [0.123456789, 1.0, None],
            "n": [1, 22, 333],
            "embedding": pa.array([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], None], pa.list_(pa.float32(), 4)),
        }
    )
    text = format_table(table, max_rows=2)
    lines = text.splitlines()
    assert lines[0].split() == ["speaker_id", "score", "n", "embedding"]
    assert set(lines[1]) <= {"-", " "}
    assert "0.123457" in lines[2] and "(4)" in lines[2]
    assert lines[-1] == "(2 of 3 rows shown)"
    assert len(lines) == 5
    assert format_table(table).splitlines()[-1] == "(3 rows)"
    assert "NULL" in format_table(table)
    assert format_table(pa.table({})) == "(no result)"


def test_rejects_view_unions_every_stage(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from voiceprint.common import schema
    from voiceprint.common.layout import Layout
    from voiceprint.query import run_query

    layout = Layout.at(tmp_path)
    for stage, path in [
        ("prepare", layout.rejects("prepare")),
        ("segment", layout.rejects("segment")),
        ("embed", layout.embeddings / "rejects.parquet"),
    ]:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist([{"path": f"{stage}.wav", "stage": stage, "reason": "bad"}], schema=schema.REJECTS),
            path,
        )
    got = run_query(layout, "SELECT stage FROM rejects ORDER BY stage").column("stage").to_pylist()
    assert got == ["embed", "prepare", "segment"]

"""FileCache on its own: reuse only for an unchanged size and mtime, this run's entries first, what
save keeps, checkpoints, hash collisions in the path index, and caches written by earlier versions."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from voiceprint.prepare import filecache
from voiceprint.prepare.filecache import SCHEMA, Entry, FileCache, RowBatches

pytestmark = pytest.mark.timeout(60)


def _file(folder: Path, name: str, data: bytes = b"audio") -> tuple[str, os.stat_result]:
    path = folder / name
    path.write_bytes(data)
    return path.as_posix(), path.stat()


def _entry(st: os.stat_result, digest: str = "d" * 64, **facts: object) -> Entry:
    return Entry(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest, **facts)  # type: ignore[arg-type]


def _rows(cache_path: Path) -> dict[str, dict[str, object]]:
    table = pq.read_table(cache_path)
    assert table.schema.equals(SCHEMA)
    paths = table.column("path").to_pylist()
    assert paths == sorted(paths)
    return {row.pop("path"): row for row in table.to_pylist()}


def test_rerun_reuses_unchanged_files_only(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.parquet"
    a, st_a = _file(tmp_path, "a.wav")
    b, st_b = _file(tmp_path, "b.wav")
    first = FileCache(cache_path, "v1")
    assert first.lookup(a, st_a) is None
    first.store(a, _entry(st_a, "a" * 64, validator="v1", duration_s=1.5, sample_rate=16000, channels=1))
    first.store(b, _entry(st_b, "b" * 64, validator="v1", reason="not audio"))
    first.save()

    second = FileCache(cache_path, "v1")
    assert second.lookup(a, st_a) == _entry(
        st_a, "a" * 64, validator="v1", duration_s=1.5, sample_rate=16000, channels=1
    )
    assert second.lookup(b, st_b) == _entry(st_b, "b" * 64, validator="v1", reason="not audio")
    os.utime(b, ns=(st_b.st_atime_ns, st_b.st_mtime_ns + 1_000_000_000))
    assert second.lookup(b, os.stat(b)) is None  # touched: read again
    assert second.lookup((tmp_path / "new.wav").as_posix(), st_a) is None


def test_save_keeps_unchanged_entries_and_drops_deleted_or_changed_files(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.parquet"
    files = {name: _file(tmp_path, name) for name in ("kept.wav", "unseen.wav", "deleted.wav", "changed.wav")}
    first = FileCache(cache_path, "v1")
    for key, st in files.values():
        first.store(key, _entry(st))
    first.save()

    (tmp_path / "deleted.wav").unlink()
    changed, _ = _file(tmp_path, "changed.wav", b"other audio")
    added, st_added = _file(tmp_path, "added.wav")
    second = FileCache(cache_path, "v1")
    kept, st_kept = files["kept.wav"]
    second.store(kept, second.lookup(kept, st_kept) or _entry(st_kept))
    second.store(changed, _entry(os.stat(changed), "c" * 64))
    second.store(added, _entry(st_added, "e" * 64))
    second.save()

    rows = _rows(cache_path)
    assert sorted(rows) == sorted([kept, files["unseen.wav"][0], changed, added])
    assert rows[changed]["sha256"] == "c" * 64 and rows[changed]["size"] == len(b"other audio")
    assert rows[added]["sha256"] == "e" * 64


def test_an_entry_stored_this_run_is_the_one_looked_up(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.parquet"
    key, st = _file(tmp_path, "a.wav")
    first = FileCache(cache_path, "v1")
    first.store(key, _entry(st, "a" * 64))
    first.save()

    second = FileCache(cache_path, "v2")
    decoded = _entry(st, "a" * 64, validator="v2", duration_s=2.0, sample_rate=8000, channels=2)
    second.store(key, decoded)
    assert second.lookup(key, st) == decoded
    second.store(key, _entry(st, "a" * 64))  # stored again: the latest counts, once
    assert second.lookup(key, st) == _entry(st, "a" * 64)
    second.save()
    assert list(_rows(cache_path)) == [key]
    assert _rows(cache_path)[key]["validator"] is None


def test_many_entries_span_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filecache, "BATCH_ROWS", 4)
    cache_path = tmp_path / "cache.parquet"
    names = [f"{i:02d}.wav" for i in range(11)][::-1]  # stored out of path order
    files = [_file(tmp_path, name) for name in names]
    first = FileCache(cache_path, "v1")
    for i, (key, st) in enumerate(files):
        first.store(key, _entry(st, f"{i:064d}"))
    assert [first.lookup(key, st) for key, st in files] == [_entry(st, f"{i:064d}") for i, (_, st) in enumerate(files)]
    first.save()
    second = FileCache(cache_path, "v1")
    assert [second.lookup(key, st) for key, st in files] == [_entry(st, f"{i:064d}") for i, (_, st) in enumerate(files)]


def test_paths_that_share_a_hash_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_path = tmp_path / "cache.parquet"
    files = [_file(tmp_path, f"{i}.wav", bytes(i + 1)) for i in range(5)]
    first = FileCache(cache_path, "v1")
    for i, (key, st) in enumerate(files):
        first.store(key, _entry(st, f"{i:064d}"))
    first.save()
    monkeypatch.setattr(filecache, "hash", lambda _path: 42, raising=False)  # every path collides
    second = FileCache(cache_path, "v1")
    assert [second.lookup(key, st) for key, st in files] == [_entry(st, f"{i:064d}") for i, (_, st) in enumerate(files)]
    assert second.lookup((tmp_path / "other.wav").as_posix(), files[0][1]) is None


def test_checkpoints_write_what_is_known_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_path = tmp_path / "cache.parquet"
    a, st_a = _file(tmp_path, "a.wav")
    b, st_b = _file(tmp_path, "b.wav")
    first = FileCache(cache_path, "v1")
    first.store(a, _entry(st_a))
    first.save()

    monkeypatch.setattr(filecache, "CHECKPOINT_S", 0.0)
    second = FileCache(cache_path, "v1")
    second.store(b, _entry(st_b))  # killed after this: both entries are on disk
    assert sorted(_rows(cache_path)) == [a, b]


def test_reads_a_cache_written_in_one_row_group_with_dictionaries(tmp_path: Path) -> None:
    """The layout earlier versions wrote (``pq.write_table`` defaults)."""
    cache_path = tmp_path / "cache.parquet"
    key, st = _file(tmp_path, "a.wav")
    row = {"path": key, **vars(_entry(st, "a" * 64, validator="v1", duration_s=1.0, sample_rate=16000, channels=1))}
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), cache_path)
    assert FileCache(cache_path, "v1").lookup(key, st) == _entry(
        st, "a" * 64, validator="v1", duration_s=1.0, sample_rate=16000, channels=1
    )


def test_row_batches_keep_rows_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filecache, "BATCH_ROWS", 3)
    schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
    rows = RowBatches(schema)
    assert rows.table().num_rows == 0 and rows.table().schema.equals(schema)
    for n in range(8):
        rows.append({"n": n, "s": None if n % 2 else str(n)})
    assert len(rows) == 8
    assert [rows.row(i) for i in (0, 4, 7)] == [{"n": 0, "s": "0"}, {"n": 4, "s": "4"}, {"n": 7, "s": None}]
    assert rows.table().to_pylist() == [{"n": n, "s": None if n % 2 else str(n)} for n in range(8)]

"""What ``prepare`` learnt about each corpus file, so that a rerun reads only what changed.

One Parquet table (``Layout.file_cache``, outside the DVC outputs) keyed by the file's absolute
path holds its size, mtime, SHA-256 and the decode check's result (facts or reject reason). An
entry is reused while size and mtime are unchanged; the decode result also needs the same
validator fingerprint (decoder code and library versions), so a fixed check re-decodes without
re-hashing. Written atomically, and every :data:`CHECKPOINT_S` during a long run, so a killed
first pass over a large corpus keeps most of its work. In memory the entries stay Arrow columns
(:class:`RowBatches`, a path index of 64-bit hashes): a few hundred bytes a file, not kilobytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from voiceprint.common import audio
from voiceprint.common.atomic import write_table

log = logging.getLogger(__name__)

#: Seconds of work between two saves of the cache during one run.
CHECKPOINT_S = 60.0
#: Rows that :class:`RowBatches` collects as dicts before it turns them into one Arrow batch.
BATCH_ROWS = 1024
#: How the cache is written: row groups that are read one at a time, and a dictionary only for the
#: columns that repeat (path and digest differ in every row), so that neither reading nor writing
#: it needs much memory beyond the table itself.
WRITE_OPTIONS: dict[str, Any] = {"row_group_size": 8192, "use_dictionary": ["validator", "reason"]}

SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # absolute, as the stage found it (the corpus base resolved)
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", pa.string()),
        ("validator", pa.string()),  # fingerprint of the decode check below; null: not decoded
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("reason", pa.string()),  # why the decode check rejected the file; null: it passed
    ]
)


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    sha256: str
    validator: str | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    reason: str | None = None


_ENTRY_FIELDS = [f.name for f in fields(Entry)]
# What this run did with each entry read from disk (FileCache._old_state).
_UNSEEN, _KEPT, _REPLACED = 0, 1, 2


def validator_fingerprint() -> str:
    """Changes whenever the decode check may judge a file differently: its code, libsndfile, PyAV."""
    h = hashlib.sha256(Path(audio.__file__).read_bytes())
    h.update(str(getattr(audio.sf, "__libsndfile_version__", "")).encode())
    try:
        h.update(importlib.metadata.version("av").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no-av")
    return h.hexdigest()[:16]


class RowBatches:
    """Rows added one at a time as dicts, kept as Arrow record batches of :data:`BATCH_ROWS` rows:
    a row then costs the bytes of its values, not a dict and a Python object per value."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self._batches: list[pa.RecordBatch] = []
        self._pending: list[dict[str, Any]] = []
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        self._length += 1
        if len(self._pending) == BATCH_ROWS:
            self._batches.append(pa.RecordBatch.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def row(self, index: int) -> dict[str, Any]:
        """The ``index``-th row added (from 0)."""
        batch, offset = divmod(index, BATCH_ROWS)
        if batch < len(self._batches):
            return self._batches[batch].slice(offset, 1).to_pylist()[0]
        return self._pending[offset]

    def table(self) -> pa.Table:
        """Every row so far, in the order added."""
        pending = [pa.RecordBatch.from_pylist(self._pending, schema=self.schema)] if self._pending else []
        return pa.Table.from_batches([*self._batches, *pending], schema=self.schema)


class _PathIndex:
    """The row of each path of a column of distinct paths, by ``hash(path)`` (valid in this process
    only): 16 bytes a path instead of a dict entry and a ``str``. A hash hit is confirmed against
    the path itself, so paths that share a hash are still told apart."""

    def __init__(self, paths: pa.ChunkedArray):
        hashes = np.fromiter((hash(p) for p in _strings(paths)), dtype=np.int64, count=len(paths))
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]
        self._paths = paths

    def find(self, path: str) -> int | None:
        """The row holding ``path``; None when no row does."""
        h = hash(path)
        i = int(np.searchsorted(self._hashes, h))
        while i < len(self._hashes) and self._hashes[i] == h:
            row = int(self._order[i])
            if self._paths[row].as_py() == path:
                return row
            i += 1
        return None


def _strings(column: pa.ChunkedArray, step: int = 65536) -> Iterator[str]:
    """The values of a string column as Python strings, a slice at a time."""
    for chunk in column.chunks:
        for start in range(0, len(chunk), step):
            yield from chunk.slice(start, step).to_pylist()


class FileCache:
    """Entries by absolute path; :meth:`lookup` answers only for an unchanged size and mtime.

    Entries read from disk stay the Arrow table they were read as; this run's new or changed ones
    go to :class:`RowBatches`. :meth:`lookup` may run in several threads at once.
    """

    def __init__(self, path: Path, validator: str):
        self.path = path
        self.validator = validator
        self._old = self._load(path)
        self._old_columns = {name: self._old.column(name) for name in _ENTRY_FIELDS}
        self._old_rows = _PathIndex(self._old.column("path"))
        self._old_state = np.full(self._old.num_rows, _UNSEEN, dtype=np.uint8)
        self._new = RowBatches(SCHEMA)
        self._new_rows: dict[str, int] = {}  # path -> its latest row in _new
        self._lock = threading.Lock()
        self._saved_at = time.monotonic()

    @staticmethod
    def _load(path: Path) -> pa.Table:
        if not path.exists():
            return SCHEMA.empty_table()
        try:
            file = pq.ParquetFile(path)
            groups = [file.read_row_group(i, use_threads=False) for i in range(file.num_row_groups)]
            table = pa.concat_tables(groups) if groups else file.schema_arrow.empty_table()
            if not table.schema.equals(SCHEMA):
                raise ValueError("unexpected columns")
        except (OSError, ValueError, pa.ArrowException) as err:  # a cache: rebuild it, never fail on it
            log.warning("%s: unreadable file cache, every file is verified again (%s)", path, err)
            return SCHEMA.empty_table()
        return table

    def lookup(self, key: str, st: os.stat_result) -> Entry | None:
        entry = self._latest(key)
        if entry is None or entry.size != st.st_size or entry.mtime_ns != st.st_mtime_ns:
            return None
        return entry

    def store(self, key: str, entry: Entry) -> None:
        with self._lock:
            old = self._old_rows.find(key)
            if key not in self._new_rows and old is not None and self._old_entry(old) == entry:
                self._old_state[old] = _KEPT
            else:
                self._new_rows[key] = len(self._new)
                self._new.append({"path": key, **vars(entry)})
                if old is not None:
                    self._old_state[old] = _REPLACED
        if time.monotonic() - self._saved_at >= CHECKPOINT_S:
            self._write(self._old_state != _REPLACED)

    def save(self) -> None:
        """Write this run's entries, plus earlier ones whose file is still there unchanged (another
        dataset or looser caps may want them again); entries of deleted or changed files go."""
        keep = self._old_state == _KEPT
        paths, sizes, mtimes = (self._old.column(name) for name in ("path", "size", "mtime_ns"))
        for row in np.flatnonzero(self._old_state == _UNSEEN):
            try:
                st = os.stat(paths[row].as_py())
            except OSError:
                continue
            keep[row] = st.st_size == sizes[row].as_py() and st.st_mtime_ns == mtimes[row].as_py()
        self._write(keep)

    def _latest(self, key: str) -> Entry | None:
        """The entry of ``key`` stored this run, else the one read from disk; None when neither."""
        with self._lock:  # what was read from disk never changes; this run's entries do
            new = self._new_rows.get(key)
            if new is not None:
                row = self._new.row(new)
                return Entry(**{name: row[name] for name in _ENTRY_FIELDS})
        old = self._old_rows.find(key)
        return None if old is None else self._old_entry(old)

    def _old_entry(self, row: int) -> Entry:
        return Entry(**{name: column[row].as_py() for name, column in self._old_columns.items()})

    def _write(self, old_rows: np.ndarray) -> None:
        """The entries read from disk where ``old_rows`` is true, and the latest of this run's."""
        with self._lock:
            latest = np.zeros(len(self._new), dtype=bool)
            latest[np.fromiter(self._new_rows.values(), dtype=np.int64, count=len(self._new_rows))] = True
            table = pa.concat_tables([_filter(self._old, old_rows), _filter(self._new.table(), latest)])
        write_table(self.path, _sorted_by_path(table), **WRITE_OPTIONS)
        self._saved_at = time.monotonic()


def _filter(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """The rows of ``table`` where ``mask`` is true; ``table`` itself, not a copy, when it is true everywhere."""
    return table if mask.all() else table.filter(mask)


def _sorted_by_path(table: pa.Table) -> pa.Table:
    """``table`` sorted by path; itself, not a copy, when it already is (a rerun that changed nothing)."""
    paths = table.column("path")
    if len(paths) < 2 or pc.all(pc.greater(paths[1:], paths[:-1])).as_py():
        return table
    return table.sort_by("path")

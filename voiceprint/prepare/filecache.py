"""What ``prepare`` learnt about each corpus file, so that a rerun reads only what changed.

One Parquet table (``Layout.file_cache``, outside the DVC outputs) keyed by the file's absolute
path holds its size, mtime, SHA-256 and the decode check's result (facts or reject reason). An
entry is reused while size and mtime are unchanged; the decode result also needs the same
validator fingerprint (decoder code and library versions), so a fixed check re-decodes without
re-hashing. Written atomically, and every :data:`CHECKPOINT_S` during a long run, so a killed
first pass over a large corpus keeps most of its work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common import audio
from voiceprint.common.atomic import write_table

log = logging.getLogger(__name__)

#: Seconds of work between two saves of the cache during one run.
CHECKPOINT_S = 60.0

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


def validator_fingerprint() -> str:
    """Changes whenever the decode check may judge a file differently: its code, libsndfile, PyAV."""
    h = hashlib.sha256(Path(audio.__file__).read_bytes())
    h.update(str(getattr(audio.sf, "__libsndfile_version__", "")).encode())
    try:
        h.update(importlib.metadata.version("av").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no-av")
    return h.hexdigest()[:16]


class FileCache:
    """Entries by absolute path; :meth:`lookup` answers only for an unchanged size and mtime."""

    def __init__(self, path: Path, validator: str):
        self.path = path
        self.validator = validator
        self._old = self._load(path)
        self._new: dict[str, Entry] = {}
        self._saved_at = time.monotonic()

    @staticmethod
    def _load(path: Path) -> dict[str, Entry]:
        if not path.exists():
            return {}
        try:
            table = pq.read_table(path)
            if not table.schema.equals(SCHEMA):
                raise ValueError("unexpected columns")
        except (OSError, ValueError, pa.ArrowException) as err:  # a cache: rebuild it, never fail on it
            log.warning("%s: unreadable file cache, every file is verified again (%s)", path, err)
            return {}
        return {row.pop("path"): Entry(**row) for row in table.to_pylist()}

    def lookup(self, key: str, st: os.stat_result) -> Entry | None:
        entry = self._new.get(key) or self._old.get(key)
        if entry is None or entry.size != st.st_size or entry.mtime_ns != st.st_mtime_ns:
            return None
        return entry

    def store(self, key: str, entry: Entry) -> None:
        self._new[key] = entry
        if time.monotonic() - self._saved_at >= CHECKPOINT_S:
            self._write({**self._old, **self._new})

    def save(self) -> None:
        """Write this run's entries, plus earlier ones whose file is still there unchanged (another
        dataset or looser caps may want them again); entries of deleted or changed files go."""
        kept = dict(self._new)
        for key, entry in self._old.items():
            if key in kept:
                continue
            try:
                st = os.stat(key)
            except OSError:
                continue
            if st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns:
                kept[key] = entry
        self._write(kept)

    def _write(self, entries: dict[str, Entry]) -> None:
        rows = [{"path": key, **vars(entries[key])} for key in sorted(entries)]
        write_table(self.path, pa.Table.from_pylist(rows, schema=SCHEMA))
        self._saved_at = time.monotonic()

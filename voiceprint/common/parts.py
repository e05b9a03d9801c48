"""Crash-safe, resumable staging of a long stage's results as Parquet *parts*.

A stage that takes hours (``embed`` over a corpus) must not start again from zero after a SIGKILL,
and readers must never see a half-written result. So the work goes through a staging directory
*outside* the stage's DVC output (DVC deletes outputs before it reruns a stage):

* every part is written to a temporary name and renamed into place, so a part either exists whole
  or not at all; a part records, in its Parquet metadata, which units of work (batch numbers) it
  covers and the rejects found in them, so rows and rejects can never disagree;
* the staging directory is keyed by a *fingerprint* of everything that determines the result
  (inputs, model, batching); a rerun with the same fingerprint resumes, any other staging
  directory for the same output is stale and is removed;
* only when every unit is done are the parts merged into the final files (atomically) and the
  staging directory removed.

Units are whole batches rather than rows because batch composition changes padding and hence the
last bits of an embedding; replaying exactly the missing batches makes a resumed run produce the
same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from voiceprint.common import atomic

_META_KEY = b"voiceprint.part"
_PART_RE = re.compile(r"^part-(\d{8})\.parquet$")


def fingerprint(*components: Any) -> str:
    """Stable digest of JSON-serialisable settings and file contents (pass ``Path`` for a file)."""
    h = hashlib.sha256()
    for comp in components:
        if isinstance(comp, Path):
            h.update(b"file:")
            with open(comp, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(comp, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Part:
    path: Path
    units: tuple[int, ...]
    rejects: tuple[dict[str, str], ...]


class PartStore:
    """Parts of one output, under ``<staging root>/<key>-<fingerprint>/``."""

    def __init__(self, staging_root: Path, key: str, fp: str):
        self.directory = staging_root / f"{key}-{fp}"
        self._key = key
        self._staging_root = staging_root

    @classmethod
    def open(cls, staging_root: Path, key: str, fp: str) -> PartStore:
        """Open (or create) the store and drop stale stores of the same output."""
        store = cls(staging_root, key, fp)
        if staging_root.is_dir():
            for other in staging_root.glob(f"{key}-*"):
                if other != store.directory and other.name.rsplit("-", 1)[0] == key:
                    shutil.rmtree(other, ignore_errors=True)
        store.directory.mkdir(parents=True, exist_ok=True)
        return store

    def parts(self) -> list[Part]:
        """Complete parts in write order; temporary files of a killed write are ignored."""
        found = []
        for path in sorted(self.directory.iterdir()):
            if not _PART_RE.match(path.name):
                continue
            meta = json.loads(pq.read_schema(path).metadata[_META_KEY])
            found.append(Part(path, tuple(meta["units"]), tuple(meta["rejects"])))
        return found

    def done_units(self) -> set[int]:
        return {u for part in self.parts() for u in part.units}

    def write(self, table: pa.Table, units: Iterable[int], rejects: Iterable[dict[str, str]]) -> Path:
        units = sorted(units)
        meta = {"units": units, "rejects": list(rejects)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        existing = [int(m.group(1)) for p in self.directory.iterdir() if (m := _PART_RE.match(p.name))]
        target = self.directory / f"part-{(max(existing) + 1) if existing else 0:08d}.parquet"
        atomic.write_table(target, table)
        return target

    def iter_tables(self) -> Iterator[tuple[Part, pa.Table]]:
        """Parts ordered by their first unit, so merged rows follow unit order whatever the history."""
        for part in sorted(self.parts(), key=lambda p: min(p.units, default=-1)):
            table = pq.read_table(part.path)
            yield part, table.replace_schema_metadata(None)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self._staging_root.rmdir()  # only when empty
        except OSError:
            pass

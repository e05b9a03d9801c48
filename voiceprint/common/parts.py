"""Crash-safe, resumable staging of a long stage's results as Parquet *parts*.

:class:`PartStore` keeps atomically written parts, each covering whole batches and their rejects,
in a staging directory keyed by a :func:`fingerprint` of the inputs; a killed run resumes from
:meth:`PartStore.done_units`, and the stage merges the parts once every batch is done.
Design: docs/reliability.md#kills-and-resume.
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

    def write(
        self, table: pa.Table, units: Iterable[int], rejects: Iterable[dict[str, str]], *, number: int | None = None
    ) -> Path:
        """Write one part; ``number`` names it (writers running at once pass distinct ones, e.g. their
        first unit; rewriting a number replaces that part atomically), default: after the last part."""
        units = sorted(units)
        meta = {"units": units, "rejects": list(rejects)}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        if number is None:
            existing = [int(m.group(1)) for p in self.directory.iterdir() if (m := _PART_RE.match(p.name))]
            number = (max(existing) + 1) if existing else 0
        target = self.directory / f"part-{number:08d}.parquet"
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

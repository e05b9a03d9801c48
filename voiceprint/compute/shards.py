"""Deterministic shards: contiguous ranges of work units, each at most ``compute.shard_s`` audio seconds.

A unit is a manifest row (``segment``) or a batch of the embed plan (``embed``). The cut depends
only on the units' durations and the units already done, so a retried or resumed shard covers the
same units and writes the same part file. Design: docs/compute.md#shards.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Units ``start`` to ``stop - 1`` (contiguous) and their audio seconds."""

    start: int
    stop: int
    audio_s: float

    @property
    def units(self) -> range:
        return range(self.start, self.stop)


def cut_shards(durations: Sequence[float], shard_s: float, done: Collection[int] = ()) -> list[Shard]:
    """Shards over the units not in ``done``, in unit order.

    A shard grows unit by unit while its audio stays within ``shard_s``; it always holds at least
    one unit (a unit longer than ``shard_s`` is a shard of its own) and never spans a done unit, so
    each shard's first unit is one no part holds yet.
    """
    if shard_s <= 0:
        raise ValueError(f"shard_s must be > 0 (got {shard_s})")
    done = set(done)
    shards: list[Shard] = []
    start: int | None = None
    total = 0.0
    for unit, seconds in enumerate(durations):
        seconds = float(seconds)
        if unit in done:
            if start is not None:
                shards.append(Shard(start, unit, total))
            start, total = None, 0.0
            continue
        if start is not None and total + seconds > shard_s:
            shards.append(Shard(start, unit, total))
            start, total = None, 0.0
        if start is None:
            start = unit
        total += seconds
    if start is not None:
        shards.append(Shard(start, len(durations), total))
    return shards

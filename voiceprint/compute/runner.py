"""Submit shard tasks to a Dask client and collect them as they finish, with a progress bar.

The driver passes only the shards still to do (the rest are parts already written, see
:mod:`voiceprint.common.parts`); each task runs with ``retries`` and ``pure=False``, and the bar
counts audio seconds, starting at what earlier runs finished. Guide: docs/compute.md#runner.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from voiceprint.compute.cluster import ComputeError
from voiceprint.compute.shards import Shard

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


def host_threads(client: Client) -> dict[str, int]:
    """Host -> the Dask threads of all workers on it (how many tasks may share its cores)."""
    counts: dict[str, int] = {}
    for address, info in client.scheduler_info()["workers"].items():
        host = address.rsplit(":", 1)[0].split("://")[-1]
        counts[host] = counts.get(host, 0) + int(info.get("nthreads", 1))
    return counts


def run_shards(
    client: Client,
    task: Callable[..., Any],
    shards: Sequence[Shard],
    args_of: Callable[[Shard], tuple[Any, ...]],
    *,
    retries: int,
    total_s: float,
    done_s: float = 0.0,
    desc: str = "shards",
    progress: bool = True,
) -> list[Any]:
    """``task(*args_of(shard))`` for every shard on the cluster; results in shard order.

    ``total_s`` is the audio of the whole stage and ``done_s`` what earlier runs finished, so the
    bar shows the stage's progress, not this run's. The first failure (after its retries) cancels
    the rest and is raised; parts already written stay for the next run.
    """
    from distributed import as_completed

    if not shards:
        return []
    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            task,
            *args_of(shard),
            key=f"{desc}-{shard.start:08d}-{run_id}",
            retries=retries,
            pure=False,
        ): k
        for k, shard in enumerate(shards)
    }
    results: list[Any] = [None] * len(shards)
    bar = tqdm(
        total=total_s,
        initial=done_s,
        desc=desc,
        unit="audio-s",
        disable=not progress or None,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]",
    )
    try:
        for future in as_completed(futures):
            k = futures[future]
            if future.status != "finished":
                units = f"{desc}: shard of units {shards[k].start}-{shards[k].stop - 1}"
                if future.status != "error":  # cancelled: the scheduler dropped it (restarted, or closed)
                    raise ComputeError(f"{units} was {future.status} by the cluster")
                error = future.exception()
                raise ComputeError(
                    f"{units} failed after {retries} retries: {type(error).__name__}: {error}"
                ) from error
            results[k] = future.result()
            bar.update(shards[k].audio_s)
    finally:
        bar.close()
        client.cancel(list(futures))
    log.info("%s: %d shard(s) done on the cluster", desc, len(shards))
    return results

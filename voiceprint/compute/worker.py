"""Per-worker-process state: a model loaded once, torch threads set once, glibc's heap as at home.

A Dask worker process runs many shards; :func:`cached` keeps what a shard task builds (the
encoder) keyed by what identifies it, and :func:`use_threads` sizes torch's intra-op pool from
``compute.threads_per_worker`` or the host's cores shared by its worker threads.
:func:`prepare_worker` does both settings and undoes the nanny's forced mmap
(:func:`voiceprint.common.memory.undo_forced_mmap`). Guide: docs/compute.md#workers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from voiceprint.common.cores import usable_cores

T = TypeVar("T")

log = logging.getLogger(__name__)

_CACHE: dict[Hashable, Any] = {}
_LOCK = threading.Lock()


def cached(key: Hashable, factory: Callable[[], T]) -> T:
    """``factory()`` the first time ``key`` is asked for in this process, the same object afterwards.

    The cache holds one entry: a new key (another model, or the same files rewritten) drops the old
    object, so a long-lived worker never holds two models.
    """
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            log.info("worker %d: loading %s", os.getpid(), key)
            _CACHE[key] = factory()
        return _CACHE[key]


def files_key(directory: Path) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    """What identifies the files of ``directory``: its path and each file's name, size and mtime."""
    directory = Path(directory).resolve()
    entries = sorted(
        (p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    )
    return str(directory), tuple(entries)


def threads_for(requested: int | None, host_threads: Mapping[str, int]) -> int:
    """Torch threads for a task on the current worker: ``requested``, or this host's cores divided
    by the Dask threads of all workers on it (``host_threads``: host -> Dask threads, from the driver)."""
    if requested is not None:
        return requested
    from distributed import get_worker

    host = get_worker().address.rsplit(":", 1)[0].split("://")[-1]
    return max(1, usable_cores() // max(1, host_threads.get(host, 1)))


def use_threads(threads: int) -> None:
    """Set torch's intra-op threads to ``threads`` in this process, where they differ (a library may
    have changed them since the last shard)."""
    import torch

    with _LOCK:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def prepare_worker(threads: int | None = None) -> None:
    """Settings every shard task applies first: the heap thresholds (once), and torch's threads
    where ``threads`` is given."""
    from voiceprint.common.memory import undo_forced_mmap

    if undo_forced_mmap():
        log.info("worker %d: heap served up to 32 MiB again (the environment had forced mmap)", os.getpid())
    if threads is not None:
        use_threads(threads)

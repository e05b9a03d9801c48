"""Keep a long-running process's heap from growing with the amount of data it has seen.

glibc keeps freed blocks of ever-different tensor sizes in its heap, so the ``embed`` stage's RSS
grew with the number of batches; :func:`release_free_heap` (``malloc_trim``, every 2 s in the
engine) hands free pages back. Serving every large block from ``mmap`` instead keeps memory flat
but costs page faults: 2.5x slower ``embed``. Dask's nanny forces exactly that in its workers
(``MALLOC_TRIM_THRESHOLD_``); :func:`undo_forced_mmap` undoes it. Measurements: docs/compute.md
(How a stage runs) and docs/experiments/2026-12-07-scale-100x.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return free heap pages to the kernel (glibc); False where there is no ``malloc_trim``."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


#: ``mallopt`` parameters (glibc ``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's ceiling for its dynamic mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Environment variables with which glibc fixes its thresholds at start-up (Dask's nanny sets one).
FORCING_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@lru_cache(maxsize=1)
def undo_forced_mmap() -> bool:
    """Where the environment fixed glibc's thresholds, serve blocks up to 32 MiB from the heap again.

    Sets the mmap threshold to glibc's dynamic ceiling and the trim threshold to twice that, as its
    dynamic rule would after the first large block. Once per process; True if it changed anything.
    """
    libc = _libc()
    if libc is None or not any(name in os.environ for name in FORCING_VARIABLES):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
    )

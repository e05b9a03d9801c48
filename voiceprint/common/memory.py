"""Keep a long-running process's heap from growing with the amount of data it has seen.

CPU inference over variable-length batches allocates tensors of ever-different sizes. glibc keeps
freed blocks in its heap, where later, differently sized tensors often cannot reuse them, so the
resident size of the ``embed`` stage grew with the number of batches (measured: +600 MB over 25
batches at 1x data, more at 4x). ``malloc_trim`` hands the free pages back to the kernel; the
engine calls it every 2 s, which keeps the peak flat (``benchmarks/bench_pipeline.py``) at
a cost too small to measure. Serving large blocks from ``mmap`` instead (``M_MMAP_THRESHOLD``) also
kept memory flat but made ``embed`` 2.5x slower through page faults.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also switches off
glibc's dynamic mmap threshold: every tensor over 128 KiB then comes from a fresh ``mmap``. Measured
on the 1x scale corpus, the two workers of ``local:2`` spent 20 of their 45 CPU seconds in the
kernel against 5 of 30 for the local engine. :func:`undo_forced_mmap` puts the thresholds back
where glibc's dynamic rule would take them; ``malloc_trim`` above still keeps the heap flat.
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

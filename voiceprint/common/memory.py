"""Keep a long-running process's heap from growing with the amount of data it has seen.

CPU inference over variable-length batches allocates tensors of ever-different sizes. glibc keeps
freed blocks in its heap, where later, differently sized tensors often cannot reuse them, so the
resident size of the ``embed`` stage grew with the number of batches (measured: +600 MB over 25
batches at 1x data, more at 4x). ``malloc_trim`` hands the free pages back to the kernel; the
engine calls it every 2 s, which keeps the peak flat (``benchmarks/bench_pipeline.py``) at
a cost too small to measure. Serving large blocks from ``mmap`` instead (``M_MMAP_THRESHOLD``) also
kept memory flat but made ``embed`` 2.5x slower through page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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

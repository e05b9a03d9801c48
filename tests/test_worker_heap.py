"""Dask's nanny forces glibc to mmap every block over 128 KiB; a shard task undoes that.

Each case runs in a fresh interpreter, because glibc reads ``MALLOC_TRIM_THRESHOLD_`` at start-up.
The measure is the minor page faults of allocating and freeing a 1 MiB buffer 200 times (too small
for transparent huge pages): from mmap every round faults its pages in again, from the heap they
stay mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

_PROBE = """
import json, resource, sys
import numpy as np
from voiceprint.compute.worker import prepare_worker
if sys.argv[1] == "undo":
    prepare_worker()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        block = np.ones(1024 * 1024, dtype=np.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # the first round grows the heap either way
from voiceprint.common.memory import undo_forced_mmap
print(json.dumps({"faults": faults(), "changed": undo_forced_mmap()}))
"""


def _probe(mode: str, forced: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # 2 MiB pages would fault a block in a few times, not per 4 KiB page
    if forced:
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"  # what distributed.nanny.pre-spawn-environ sets
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_forced_mmap_faults_every_round_and_prepare_worker_stops_it() -> None:
    forced = _probe("keep", forced=True)
    undone = _probe("undo", forced=True)
    assert forced["faults"] > 200 * 64, forced  # every 1 MiB block faulted in again (>= 1 fault per 16 KiB)
    assert undone["changed"] is True
    assert undone["faults"] < forced["faults"] / 20, (undone, forced)


def test_prepare_worker_leaves_an_unforced_process_alone() -> None:
    plain = _probe("undo", forced=False)
    assert plain["changed"] is False
    assert plain["faults"] < 200 * 64 / 20, plain

"""``compute.engine: dask``: the segment and embed stages on Dask clusters write what ``engine: local`` writes.

The reference is ``small_project`` (built with ``engine: local``); each test copies its tree, drops
the segment and embed outputs and rebuilds them on a cluster: a ``LocalCluster`` (``local:2``), and
a real one (a ``dask scheduler`` and two ``dask worker`` processes, each in its own process group),
once undisturbed, once with a worker's process group SIGKILLed mid-stage. A resumed run must not
recompute the parts an interrupted one wrote. Measured: byte-identical files (docs/compute.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from voiceprint.common.layout import Layout
from voiceprint.common.parts import PartStore
from voiceprint.compute.cluster import ComputeError, open_client
from voiceprint.compute.shards import Shard, cut_shards
from voiceprint.config import ComputeParams
from voiceprint.stages import run_stage

#: The files each stage writes, compared byte for byte with the engine-local project's.
OUTPUTS = {
    "segment": ("data/segments.parquet", "data/rejects/segment.parquet"),
    "embed": (
        "data/embeddings/segments.parquet",
        "data/embeddings/utterances.parquet",
        "data/embeddings/rejects.parquet",
        "data/embeddings/embed.json",
    ),
}
#: Small shards, so the ~210 s of audio make many of them (a dozen or more per stage and pass).
SHARD_S = 15.0
#: Small batches: many batches, hence many embed shards.
SMALL_BATCHES = {"embed.max_batch_s": 10.0}


# -------------------------------------------------------------------------------- fast unit tests


def test_shards_are_contiguous_bounded_and_skip_done_units() -> None:
    durations = [4.0, 4.0, 4.0, 12.0, 1.0, 1.0, 3.0, 9.0]
    shards = cut_shards(durations, 8.0)
    assert shards == [Shard(0, 2, 8.0), Shard(2, 3, 4.0), Shard(3, 4, 12.0), Shard(4, 7, 5.0), Shard(7, 8, 9.0)]
    assert cut_shards(durations, 8.0) == shards  # deterministic
    resumed = cut_shards(durations, 8.0, done={0, 1, 5})
    assert resumed == [Shard(2, 3, 4.0), Shard(3, 4, 12.0), Shard(4, 5, 1.0), Shard(6, 7, 3.0), Shard(7, 8, 9.0)]
    assert [u for s in resumed for u in s.units] == [2, 3, 4, 6, 7]
    assert cut_shards([], 8.0) == []
    with pytest.raises(ValueError):
        cut_shards(durations, 0.0)


def test_explicit_part_numbers_do_not_collide(tmp_path: Path) -> None:
    import pyarrow as pa

    store = PartStore.open(tmp_path, "k", "fp")
    table = pa.table({"x": [1]})
    store.write(table, [7, 8], [], number=7)
    store.write(table, [2], [{"path": "a", "stage": "s", "reason": "r"}], number=2)
    store.write(table, [7, 8], [], number=7)  # a retried shard replaces its own part
    assert sorted(p.path.name for p in store.parts()) == ["part-00000002.parquet", "part-00000007.parquet"]
    assert [p.units for p, _ in store.iter_tables()] == [(2,), (7, 8)]
    assert store.write(table, [9], []).name == "part-00000008.parquet"  # default: after the last part


def test_local_cuda_without_dask_cuda_names_the_extra() -> None:
    pytest.importorskip("distributed")
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - a GPU machine with the extra installed
        pytest.skip("dask-cuda is installed")
    with (
        pytest.raises(ComputeError, match=r"pip install '\.\[gpu\]'"),
        open_client(ComputeParams(address="local-cuda")),
    ):
        pass


# -------------------------------------------------------------------------------- helpers


def _fresh_copy(reference: Layout, dest: Path, *, keep_segments: bool = False) -> Layout:
    """``reference``'s tree without the embed outputs, and without the segment outputs unless
    ``keep_segments`` (and no staging or lock files)."""
    shutil.copytree(reference.root, dest, ignore=shutil.ignore_patterns(".stage.lock", "work", "mlruns"))
    for rel in () if keep_segments else OUTPUTS["segment"]:
        (dest / rel).unlink()
    shutil.rmtree(dest / "data" / "embeddings")
    return Layout.at(dest)


def _run(layout: Layout, stages: tuple[str, ...] = ("segment", "embed"), **compute: Any) -> None:
    overrides = {
        **SMALL_BATCHES,
        "compute.engine": "dask",
        "compute.shard_s": SHARD_S,
        **{f"compute.{k}": v for k, v in compute.items()},
    }
    for stage in stages:
        run_stage(stage, layout.root, overrides=overrides)


def _assert_same_outputs(reference: Layout, layout: Layout, stages: tuple[str, ...] = ("segment", "embed")) -> None:
    """Byte-identical files, except float32 embeddings (see :func:`_assert_same_rows_close_vectors`)."""
    float32 = (
        "embed" in stages and json.loads((reference.embeddings / "embed.json").read_text())["precision"] == "float32"
    )
    for rel in (rel for stage in stages for rel in OUTPUTS[stage]):
        if float32 and rel.endswith(("/segments.parquet", "/utterances.parquet")) and "embeddings" in rel:
            _assert_same_rows_close_vectors(reference.root / rel, layout.root / rel)
        else:
            assert (layout.root / rel).read_bytes() == (reference.root / rel).read_bytes(), rel
    assert not list(layout.data.glob("work/*_dask-*")), "the staged parts outlived the stage"


#: float32 embeddings from another torch thread count (measured: max abs diff 9.7e-8, min cosine 0.99999994).
ATOL = 1e-6


def _assert_same_rows_close_vectors(expected: Path, actual: Path) -> tuple[float, float]:
    """Same rows, ids, order and columns; embeddings within :data:`ATOL`. Returns (max abs diff, min cosine)."""
    import numpy as np
    import pyarrow.parquet as pq

    a, b = pq.read_table(expected), pq.read_table(actual)
    assert a.schema == b.schema and a.drop(["embedding"]).equals(b.drop(["embedding"])), actual
    x = np.stack(a["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    y = np.stack(b["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    diff, cosine = float(np.abs(x - y).max(initial=0.0)), float((x * y).sum(axis=1).min(initial=1.0))
    assert diff <= ATOL and cosine >= 1 - ATOL, (actual, diff, cosine)
    return diff, cosine


@pytest.fixture(scope="module")
def reference(small_project: Layout, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """``small_project`` with its embeddings rebuilt in small batches, by ``engine: local``."""
    layout = _fresh_copy(small_project, tmp_path_factory.mktemp("reference") / "project", keep_segments=True)
    run_stage("embed", layout.root, overrides={**SMALL_BATCHES, "compute.engine": "local"})
    return layout


@pytest.fixture
def shard_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Shard]]]:
    """Every ``run_shards`` call of the two stages: (desc, the shards submitted)."""
    import voiceprint.embed.sharded as embed_sharded
    import voiceprint.segment.sharded as segment_sharded
    from voiceprint.compute import runner

    calls: list[tuple[str, list[Shard]]] = []

    def recording(client: Any, task: Callable[..., Any], shards: list[Shard], *args: Any, **kwargs: Any) -> Any:
        calls.append((kwargs.get("desc", ""), list(shards)))
        return runner.run_shards(client, task, shards, *args, **kwargs)

    monkeypatch.setattr(segment_sharded, "run_shards", recording)
    monkeypatch.setattr(embed_sharded, "run_shards", recording)
    return calls


# -------------------------------------------------------------------------------- a real cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A ``dask scheduler`` and ``dask worker`` processes, each the leader of its own process group."""

    def __init__(self, cwd: Path, workers: int = 2):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        dask = str(Path(sys.executable).with_name("dask"))
        common = {"cwd": cwd, "start_new_session": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.scheduler = subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"], **common
        )
        self.workers = [
            subprocess.Popen(
                [dask, "worker", self.address, "--nthreads", "1", "--no-dashboard", "--death-timeout", "60"], **common
            )
            for _ in range(workers)
        ]
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=90)

    def kill_worker(self, k: int = 0) -> None:
        """SIGKILL worker ``k``'s whole process group (its nanny and the worker process)."""
        os.killpg(self.workers[k].pid, signal.SIGKILL)
        self.workers[k].wait()

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    pytest.importorskip("distributed")
    started = Cluster(tmp_path)
    try:
        yield started
    finally:
        started.close()


# -------------------------------------------------------------------------------- equivalence


@pytest.mark.slow
def test_local_cluster_writes_what_the_local_engine_writes(small_project: Layout, tmp_path: Path) -> None:
    layout = _fresh_copy(small_project, tmp_path / "project")
    for stage in ("segment", "embed"):  # the batched plan, as small_project was embedded
        run_stage(stage, layout.root, overrides={"compute.engine": "dask", "compute.address": "local:2"})
    _assert_same_outputs(small_project, layout)


@pytest.mark.slow
def test_scheduler_and_workers_in_many_shards(
    reference: Layout, tmp_path: Path, cluster: Cluster, shard_log: list[tuple[str, list[Shard]]]
) -> None:
    layout = _fresh_copy(reference, tmp_path / "project")
    _run(layout, address=cluster.address)
    _assert_same_outputs(reference, layout)
    counts = {desc: len(shards) for desc, shards in shard_log}
    assert set(counts) == {"VAD", "embed (segments)", "embed (files)"}
    assert min(counts.values()) >= 5, counts


@pytest.mark.slow
def test_a_worker_killed_mid_stage_is_survived(
    reference: Layout, tmp_path: Path, cluster: Cluster, shard_log: list[tuple[str, list[Shard]]]
) -> None:
    layout = _fresh_copy(reference, tmp_path / "project", keep_segments=True)
    killed: dict[str, Any] = {}
    stop = threading.Event()

    def kill_after_first_part() -> None:
        while not stop.is_set():
            parts = list((layout.data / "work").glob("*_dask-*/part-*.parquet"))
            if parts:
                cluster.kill_worker(0)
                killed.update(parts=len(parts), at=time.monotonic())
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_first_part, daemon=True)
    watcher.start()
    try:
        _run(layout, stages=("embed",), address=cluster.address)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no part appeared: the worker was never killed"
    embed_shards = sum(len(shards) for desc, shards in shard_log if desc.startswith("embed"))
    assert killed["parts"] < embed_shards, "the worker was killed after the work was done"
    assert cluster.workers[0].returncode == -signal.SIGKILL
    _assert_same_outputs(reference, layout)


class DriverKilled(Exception):
    """Stands for the driver dying between two shards."""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["segment", "embed"])
def test_a_resumed_run_skips_the_parts_already_written(
    reference: Layout,
    tmp_path: Path,
    cluster: Cluster,
    shard_log: list[tuple[str, list[Shard]]],
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    """The first run stops (as a killed driver would) after half its shards; the second runs only the rest."""
    import voiceprint.embed.sharded as embed_sharded
    import voiceprint.segment.sharded as segment_sharded

    module = segment_sharded if stage == "segment" else embed_sharded
    layout = _fresh_copy(reference, tmp_path / "project", keep_segments=stage == "embed")
    recording = module.run_shards
    first: list[Shard] = []

    def half_then_crash(client: Any, task: Callable[..., Any], shards: list[Shard], *args: Any, **kw: Any) -> Any:
        first.extend(shards)
        recording(client, task, shards[: len(shards) // 2], *args, **kw)
        raise DriverKilled

    monkeypatch.setattr(module, "run_shards", half_then_crash)
    shard_log.clear()
    with pytest.raises(DriverKilled):
        _run(layout, stages=(stage,), address=cluster.address)
    assert len(list(layout.data.glob("work/*_dask-*/part-*.parquet"))) == len(first) // 2 > 0

    monkeypatch.setattr(module, "run_shards", recording)
    shard_log.clear()
    _run(layout, stages=(stage,), address=cluster.address)
    written = {u for s in first[: len(first) // 2] for u in s.units}
    rerun = {u for s in shard_log[0][1] for u in s.units}
    assert rerun and not rerun & written, "a resumed run recomputed staged units"
    assert rerun | written == {u for s in first for u in s.units}
    _assert_same_outputs(reference, layout, (stage,))


@pytest.mark.slow
def test_float32_embeddings_depend_on_torch_threads_only_in_rounding(
    reference: Layout, tmp_path: Path, cluster: Cluster
) -> None:
    """``embed.amp: false``: one torch thread per worker against the local engine's two changes the last
    bits of some vectors (bf16 autocast does not, the tests above); rows, ids and order stay identical."""
    import torch

    overrides = {**SMALL_BATCHES, "embed.amp": False, "compute.address": cluster.address, "compute.shard_s": SHARD_S}
    local = _fresh_copy(reference, tmp_path / "local", keep_segments=True)
    dask = _fresh_copy(reference, tmp_path / "dask", keep_segments=True)
    run_stage("embed", local.root, overrides={**overrides, "compute.engine": "local"})
    run_stage("embed", dask.root, overrides={**overrides, "compute.engine": "dask"})
    assert json.loads((dask.embeddings / "embed.json").read_text())["precision"] == "float32"
    for name in ("segments.parquet", "utterances.parquet"):
        diff, cosine = _assert_same_rows_close_vectors(local.embeddings / name, dask.embeddings / name)
        print(f"{name}: max abs diff {diff:.3g}, min cosine {cosine:.9f} (local: {torch.get_num_threads()} threads)")
    for name in ("rejects.parquet", "embed.json"):
        assert (dask.embeddings / name).read_bytes() == (local.embeddings / name).read_bytes(), name

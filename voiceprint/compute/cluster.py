"""Open a ``distributed.Client`` for ``params.compute``: a local cluster, a CUDA one, or a scheduler.

``local:N`` starts a ``LocalCluster`` of N single-threaded worker processes (no dashboard),
``local-cuda`` a ``dask_cuda.LocalCUDACluster`` (one worker per GPU), and ``tcp://host:port``
connects to a running scheduler. Clusters started here are closed when the block exits.
Guide: docs/compute.md#clusters.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from voiceprint.config import ComputeParams

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

#: Seconds to wait for a scheduler and its first worker.
CONNECT_TIMEOUT_S = 60.0


class ComputeError(RuntimeError):
    """The cluster cannot be opened or used; the message says what to install or start."""


@contextlib.contextmanager
def open_client(compute: ComputeParams) -> Iterator[Client]:
    """A connected client for ``compute.address``, with at least one worker; closed on exit.

    ``compute.retries`` becomes the scheduler's ``allowed_failures`` for the clusters started here
    (a shard whose worker died is rescheduled that many times); a scheduler started elsewhere uses
    its own ``distributed.scheduler.allowed-failures`` (Dask's default: 3).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:  # pragma: no cover - a core dependency
        raise ComputeError("compute.engine: dask needs the 'distributed' package (pip install distributed)") from err
    address = compute.address
    cluster = None
    if address.startswith("local:"):
        cluster = LocalCluster(
            n_workers=int(address.removeprefix("local:")),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,  # no dashboard; its HTTP endpoints on a free port, not 8787
            scheduler_kwargs={"allowed_failures": compute.retries, "dashboard_address": ":0"},
        )
    elif address == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:
            raise ComputeError(
                "compute.address: local-cuda needs dask-cuda, which is not installed: pip install '.[gpu]'"
            ) from err
        cluster = LocalCUDACluster(
            threads_per_worker=1,
            dashboard_address=None,
            scheduler_kwargs={"allowed_failures": compute.retries, "dashboard_address": ":0"},
        )
    try:
        client = Client(cluster if cluster is not None else address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        if cluster is not None:
            cluster.close()
        raise ComputeError(f"cannot reach the Dask scheduler at {address}: {err}") from err
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError as err:
            raise ComputeError(f"no Dask worker joined {address} within {CONNECT_TIMEOUT_S:.0f} s") from err
        log.info("compute: %s, %d worker(s)", address, len(client.scheduler_info()["workers"]))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

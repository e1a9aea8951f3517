"""A local multi-node Ray cluster for the engine tests: a head with no CPUs + two 2-CPU nodes (``ray.cluster_utils``).

Isolated per pytest process (xdist workers each get their own): Ray's temp dir (sessions, sockets, logs) lives in a
fresh directory removed at teardown, auth is off (``RAY_AUTH_MODE=disabled``: Ray 2.60 would otherwise write a token
under ``~/.ray``), object stores are small, and the driver is shut down and the cluster torn down even when a test
fails. The temp dir is a short path under ``/tmp``, not under pytest's ``tmp_path``: Ray's Unix sockets live below it
and an AF_UNIX path may not exceed 107 bytes, which pytest's nested temp paths plus Ray's session names do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

STORE = 80 * 2**20
NODE_CPUS = 2


def add_node(cluster: Any) -> Any:
    """Add one 2-CPU worker node and wait until it is alive."""
    node = cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=STORE)
    cluster.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """The cluster, with this process connected as a driver."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="urt", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # offline: no usage report to the Ray project
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE,
                                                                "include_dashboard": False})
        for _ in range(2):
            add_node(cluster)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)

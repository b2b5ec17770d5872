"""A multi-node Ray cluster on this machine, for the slow tests' module fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from ckptmgr.ray.runners import WORKER_ENV

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def local_cluster(workers: Mapping[str, Mapping[str, float]]) -> Iterator[tuple[Cluster, dict]]:
    """A head (1 CPU) and one 1-CPU node per name in ``workers``, with those custom
    resources; this process joins it. Yields the cluster and ``{name: node}``.

    The workers import test helpers by module name: same machine, so a path works.
    """
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {name: c.add_node(num_cpus=1, resources=dict(resources)) for name, resources in workers.items()}
    c.wait_for_nodes()
    env = dict(WORKER_ENV, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    ray.init(address=c.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()

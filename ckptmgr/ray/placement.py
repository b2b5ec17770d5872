"""Where the ranks run and what they ask of the cluster: :class:`Placement`,
and :func:`check_resources`, which fails in one line when the cluster lacks it.

Imports Ray only inside :func:`check_resources`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptmgr.errors import ConfigError

log = logging.getLogger("ckptmgr")

WORKER_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class Placement:
    """Where and with what the ranks run."""

    num_workers: int
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    resources: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None  # per rank, or all

    def needs(self) -> dict[str, float]:
        """What all ranks together ask of the cluster: {resource: amount}."""
        total: dict[str, float] = {"CPU": self.cpus_per_worker * self.num_workers}
        if self.use_gpu:
            total["GPU"] = float(self.num_workers)
        for rank in range(self.num_workers):
            for name, amount in self.actor_options(rank).get("resources", {}).items():
                total[name] = total.get(name, 0.0) + amount
        return total

    def actor_options(self, rank: int) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_worker,
            "num_gpus": 1 if self.use_gpu else 0,
            "runtime_env": {"env_vars": WORKER_ENV},
        }
        if isinstance(self.resources, Mapping):
            options["resources"] = dict(self.resources)
        elif self.resources:
            options["resources"] = dict(self.resources[rank])
        return options


RESOURCE_WAIT_S = 30.0  # how long missing resources may take to appear (an autoscaler adding nodes)


def check_resources(placement: Placement, wait_s: float | None = None) -> None:
    """Fail in one line when the cluster lacks what the ranks ask for (GPUs a
    CPU-only cluster does not have), after giving an autoscaler ``wait_s`` to
    add nodes, instead of waiting silently for ever."""
    import ray

    wait_s = RESOURCE_WAIT_S if wait_s is None else wait_s
    needed = placement.needs()
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        have = ray.cluster_resources()
        missing = {k: (v, have.get(k, 0.0)) for k, v in needed.items() if have.get(k, 0.0) < v}
        if not missing:
            return
        text = ", ".join(f"{need:g} {name} (the cluster has {got:g})" for name, (need, got) in sorted(missing.items()))
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"The job's {placement.num_workers} workers need {text}; add nodes that have them "
                "(or an autoscaler that does), or ask for less (ray.use_gpu, ray.cpus_per_worker, "
                "ray.num_workers).")
        if not said:
            log.warning("waiting up to %.0f s for %s", wait_s, text)
            said = True
        time.sleep(1.0)

"""Preemption notices inside Ray Train: ``ray.train.get_preemption_info()``.

Ray Train (V2, Ray >= 2.60) watches its workers' nodes and, when one is being
drained for preemption, answers ``get_preemption_info()`` with the deadline
and the ranks on that node. The call is a barrier across all workers: every
rank must make it equally often, so it is made every ``every_steps`` global
steps (the same steps on every rank of a synchronous data-parallel run), and
every rank learns of the notice at the same step: that step is the emergency
step, no agreement through the coordinator needed.

Ray Train's own advice is to save a just-in-time checkpoint and keep
training: when the node goes, Ray Train restarts the workers (within
``FailureConfig``) and the callback restores from the newest tier. A run that
returned instead would count as finished.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("ckptmgr")

POLL_EVERY_STEPS = 10


def in_ray_train() -> bool:
    """True inside a Ray Train V2 worker's training function."""
    if "ray" not in sys.modules:  # a Ray Train worker has imported Ray long before
        return False
    try:
        import ray.train

        ray.train.get_context()
        return hasattr(ray.train, "get_preemption_info")
    except Exception:  # noqa: BLE001 - not in Ray Train, or no Ray
        return False


class RayTrainNotices:
    """Asks Ray Train for a preemption notice every ``every_steps`` steps."""

    def __init__(self, every_steps: int = POLL_EVERY_STEPS):
        self.every_steps = every_steps
        self.available = in_ray_train()
        self._seen: set[str] = set()  # preempted nodes already acted on

    def poll(self, before: int, now: int) -> Any | None:
        """A new ``PreemptionInfo`` when a multiple of ``every_steps`` was
        crossed between ``before`` and ``now`` and Ray Train reports a node
        not acted on yet; else None."""
        if not self.available or before // self.every_steps == now // self.every_steps:
            return None
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        nodes = set(info.preempted_node_to_ranks)
        if nodes <= self._seen:
            return None
        self._seen |= nodes
        log.warning("Ray Train: node(s) %s being preempted (ranks %s)%s: emergency snapshot now",
                    ", ".join(n[:12] for n in sorted(nodes)),
                    sorted(r for ranks in info.preempted_node_to_ranks.values() for r in ranks),
                    "" if info.deadline_ms is None else f", deadline in {_seconds_left(info.deadline_ms):.1f} s")
        return info


def _seconds_left(deadline_ms: int) -> float:
    import time

    return deadline_ms / 1000.0 - time.time()

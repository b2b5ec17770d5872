"""A run's save figures as Ray metrics, so the dashboard and Prometheus see them.

Ray's exporter prefixes every application metric with ``ray_``: the names a
Prometheus query uses are ``ray_ckptmgr_*`` (see the README). Gauges hold the
last committed save; counters count every save's fate since the coordinator
started, so rates and failures show up in a dashboard.
"""

from __future__ import annotations

import time

GAUGES = {
    "checkpoint_bytes": "bytes of the last committed checkpoint",
    "blocked_seconds": "seconds training was blocked by the last save",
    "write_seconds": "seconds the coordinator spent writing the last save",
    "write_mb_per_s": "write throughput of the last save (MB/s)",
    "last_success_step": "step of the last committed checkpoint",
    "last_success_timestamp_seconds": "Unix time of the last committed checkpoint",
    "memory_tier_step": "step of the newest snapshot held in the memory tier",
}
COUNTERS = {
    "saves_committed": "checkpoints committed to storage",
    "saves_failed": "saves that failed (nothing was written for them)",
    "saves_replaced": "saves replaced by a newer one before being written (on_busy=newest)",
    "saves_skipped": "saves skipped because the writer was busy (on_busy=skip)",
    "memory_snapshots": "snapshots kept in the memory tier",
}


class RayMetrics:
    """Gauges and counters tagged with the run's directory."""

    def __init__(self, directory: str):
        self._tags = {"run": str(directory)}
        self.recorded = 0
        self.counts = {name: 0 for name in COUNTERS}
        try:
            from ray.util import metrics
        except ImportError:  # pragma: no cover - the coordinator runs on Ray
            self._gauges, self._counters = {}, {}
            return
        self._gauges = {name: metrics.Gauge(f"ckptmgr_{name}", description=text, tag_keys=("run",))
                        for name, text in GAUGES.items()}
        self._counters = {name: metrics.Counter(f"ckptmgr_{name}", description=text, tag_keys=("run",))
                          for name, text in COUNTERS.items()}

    def record(self, step: int, stats) -> None:
        """One committed save (its manifest's ``stats``)."""
        self._set(checkpoint_bytes=stats.bytes, blocked_seconds=stats.blocked_s,
                  write_seconds=stats.write_s, write_mb_per_s=stats.mb_per_s,
                  last_success_step=step, last_success_timestamp_seconds=time.time())
        self.count("saves_committed")
        self.recorded += 1

    def memory(self, step: int) -> None:
        self._set(memory_tier_step=step)
        self.count("memory_snapshots")

    def count(self, name: str) -> None:
        """One more of ``name`` (a key of COUNTERS; ``replaced``/``skipped`` accepted)."""
        name = name if name in COUNTERS else f"saves_{name}"
        self.counts[name] += 1
        if name in self._counters:
            self._counters[name].inc(1, tags=self._tags)

    def _set(self, **values: float) -> None:
        for name, value in values.items():
            if name in self._gauges:
                self._gauges[name].set(value, tags=self._tags)

"""The callback's preemption duties (a mixin of :class:`ckptmgr.keras.CheckpointCallback`).

A notice comes as SIGTERM (this process, or any rank through the
coordinator), as Ray draining a node of the run (the coordinator watches it),
or inside Ray Train as ``ray.train.get_preemption_info()``. Every rank then
saves at one agreed step: into the memory tier when the run has one, else
storage. Plain processes and actors stop after it; Ray Train workers keep
training, as Ray Train advises, and are restarted by it when the node goes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ckptmgr.errors import ConfigError
from ckptmgr.preemption import clear_preemption, preemption_requested

log = logging.getLogger("ckptmgr")


class PreemptionMixin:
    """Uses the callback's manager, model, position and ``_train_notices``."""

    def _emergency_due(self, before: int) -> bool:
        """A preemption notice: SIGTERM here or on any rank, or Ray draining a
        node of the run (both through the coordinator), or, inside Ray Train,
        ``get_preemption_info()``: save at a step every rank agrees on."""
        poll = getattr(self.manager, "emergency_step", None)
        if self._train_notices.available:
            info = self._train_notices.poll(before, self._global_step)
            if info is not None:  # every rank sees it at the same call: this step
                self._emergency_target = self._global_step
                if hasattr(self.manager, "note_deadline"):
                    self.manager.note_deadline(info.deadline_ms)
        elif poll is None:
            if preemption_requested():
                clear_preemption()
                self._emergency_target = self._global_step
        else:
            target = poll(self._global_step)
            if target is not None:
                self._emergency_target = target
        return self._emergency_target is not None and self._global_step >= self._emergency_target

    def _emergency_save(self, logs) -> None:
        loop = self._loop_state(next_epoch=self._epoch, next_batch=self._batch)
        if hasattr(self.manager, "emergency_save"):
            ok = self.manager.emergency_save(
                self._global_step, self.model, loop=loop, metrics=scalar_logs(logs)
            )
        else:
            self.manager.save(self._global_step, self.model, metrics=scalar_logs(logs),
                              loop=loop, extra={"emergency": True}, blocking=True)
            ok = True
        if ok:
            self._last_saved_step = self._global_step
        if self._train_notices.available:
            # Ray Train's advice: keep training; when the node goes it restarts the
            # workers and this callback restores the newest tier. Returning would finish the run.
            log.warning("emergency checkpoint at step %d %s; training continues until the node goes",
                        self._global_step, "committed" if ok else "abandoned")
            self._emergency_target = None
            return
        log.warning("emergency checkpoint at step %d %s; stopping training",
                    self._global_step, "committed" if ok else "abandoned")
        self.preempted = True
        self._emergency_target = None
        self.model.stop_training = True


def memory_tier_interval(memory_every: Any, manager: Any) -> int | None:
    """``memory_every`` checked; None where no memory tier can be (one process
    without a coordinator, or a coordinator started without it), said once."""
    if memory_every is None:
        return None
    if isinstance(memory_every, bool) or not isinstance(memory_every, int) or memory_every < 1:
        raise ConfigError(f"Invalid memory_every: Received: {memory_every!r}. Pass a number of "
                          "steps >= 1, or None for no memory tier.")
    if not getattr(getattr(manager, "options", None), "memory_replicas", 0):
        log.warning("memory_every=%d ignored: the memory tier needs a Ray run whose coordinator "
                    "keeps it (memory_replicas > 0); only storage checkpoints are taken", memory_every)
        return None
    return memory_every


def scalar_logs(logs) -> dict[str, float]:
    """Keep the scalar metrics of Keras logs, as Python floats."""
    metrics = {}
    for key, value in (logs or {}).items():
        try:
            array = np.asarray(value)
        except Exception:  # noqa: BLE001 - skip anything that is not numeric
            continue
        if array.size == 1 and np.issubdtype(array.dtype, np.number):
            metrics[key] = float(array.reshape(()))
    return metrics

"""Ray worker actor for the distributed benchmarks (imported inside Ray workers)."""

from __future__ import annotations

import bench  # noqa: F401  (environment before TensorFlow / gcsfs)

import gc
import os
import time
from typing import Any

from bench.common import ModelSpec, build_model, iterations, make_data, step_clock, timed


class BenchWorker:
    """One training rank holding a full (replicated) copy of the model."""

    def __init__(self, spec: dict[str, Any], rank: int, world_size: int):
        self.spec = ModelSpec(**spec)
        self.rank, self.world_size = rank, world_size
        self.model = None
        self.client = None

    def pid(self) -> int:
        return os.getpid()

    def setup(self, warm_steps: int) -> dict[str, float]:
        """Build the model; train ``warm_steps`` (or only build Adam's slots)."""
        started = time.perf_counter()
        self.model = build_model(self.spec)
        if warm_steps > 0:
            x, y = make_data(self.spec, warm_steps)
            self.model.fit(x, y, batch_size=self.spec.batch, epochs=1, shuffle=False, verbose=0)
        else:
            self.model.build((None, self.spec.width))
            self.model.optimizer.build(self.model.trainable_variables)
        return {"pid": os.getpid(), "setup_s": time.perf_counter() - started}

    def fit_with_checkpoints(self, directory: str, every: int, steps: int) -> dict[str, Any]:
        """``fit()`` with ckptmgr's callback, which finds the run's coordinator."""
        from ckptmgr.keras import CheckpointCallback

        x, y = make_data(self.spec, steps)
        callback = timed(CheckpointCallback)(
            directory, save_freq=every, rank=self.rank, world_size=self.world_size,
            restore=False, save_on_train_end=False,
        )
        clock = step_clock()
        offset = iterations(self.model)
        self.model.fit(x, y, batch_size=self.spec.batch, epochs=1, shuffle=False, verbose=0,
                       callbacks=[callback, clock])
        out = {
            "manager": type(callback.manager).__name__,
            "batch_seconds": callback.batch_seconds,
            "offset": offset,
            "every": every,
            "wall_s": clock.wall,
            "tail_s": (clock.train_end or clock.ends[-1]) - clock.ends[-1],
        }
        close = getattr(callback.manager, "close", None)
        if close is not None:
            close()
        del callback
        gc.collect()
        return out

    def probe_handover(self) -> dict[str, float]:
        """Time the hand-over steps on this worker: capture, digest, ray.put."""
        import ray

        from ckptmgr.coordinator import snapshot_digest
        from ckptmgr.state import StatePlan

        out: dict[str, float] = {}
        started = time.perf_counter()
        plan = StatePlan(self.model)
        out["plan_s"] = time.perf_counter() - started
        started = time.perf_counter()
        snapshot = plan.capture(reuse_buffers=True)
        out["first_capture_s"] = time.perf_counter() - started
        started = time.perf_counter()
        snapshot = plan.capture(reuse_buffers=True)
        out["capture_s"] = time.perf_counter() - started
        out["bytes"] = float(snapshot.nbytes)
        started = time.perf_counter()
        snapshot_digest(snapshot)
        out["digest_s"] = time.perf_counter() - started
        started = time.perf_counter()
        ref = ray.put(snapshot)
        out["put_s"] = time.perf_counter() - started
        started = time.perf_counter()
        ray.get(ref)
        out["get_s"] = time.perf_counter() - started
        del ref, snapshot, plan
        gc.collect()
        return out

    def save(self, directory: str, step: int) -> dict[str, float]:
        """One save through the coordinator protocol; waits for the commit."""
        from ckptmgr.ray.joining import client_for

        if self.client is None:
            self.client = client_for(directory, rank=self.rank, world_size=self.world_size,
                                     storage_options=None, retention={}, on_busy="wait")
            if self.client is None:
                raise RuntimeError(f"rank {self.rank}: no coordinator found for {directory}")
        started = time.perf_counter()
        self.client.save(step, self.model, blocking=False)
        blocked = time.perf_counter() - started
        self.client.wait_until_finished()
        return {"rank": self.rank, "blocked_s": blocked, "total_s": time.perf_counter() - started}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.model = None
        try:
            import keras

            keras.backend.clear_session()
        except Exception:  # noqa: BLE001
            pass
        gc.collect()

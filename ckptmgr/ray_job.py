"""The example job on a Ray cluster: N worker actors, one coordinator.

Each worker is a plain Ray actor training the example model with
``tf.distribute.MultiWorkerMirroredStrategy`` (data parallel; ckptmgr's
:mod:`keras_compat` fix makes Keras 3 ``fit()`` work there) and a
:class:`~ckptmgr.keras.CheckpointCallback`, which finds the run's coordinator
and switches to distributed mode by itself. If any worker dies (node removed,
preempted), the driver stops the others and reports it: ``ckptmgr resume``
then starts the job again from the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, replace
from typing import Any

from ckptmgr.config import JobConfig
from ckptmgr.coordinator import CoordinatorOptions, get_or_create
from ckptmgr.errors import CheckpointNotFoundError, JobStoppedError  # noqa: F401 - JobStoppedError re-exported

log = logging.getLogger("ckptmgr")

WORKER_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONUNBUFFERED": "1",
}




@dataclass(frozen=True)
class RayJobResult:
    final_step: int | None
    restored_step: int | None
    preempted: bool
    final_loss: float | None
    weights_sha256: str
    directory: str
    restored_tier: str | None = None  # "memory" or "storage"
    restarts: int = 0  # automatic restarts after a preemption or a lost node


class TrainWorker:
    """One rank of the job (Ray actor body)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def address(self) -> str:
        """host:port for this rank's TensorFlow collective server."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def train(self, cfg_json: str, cluster: list[str], return_weights: bool = False) -> dict[str, Any]:
        if self.world_size > 1:
            os.environ["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": self.rank}}
            )
        cfg = JobConfig.model_validate_json(cfg_json)
        # The callback passes a SIGTERM on to the handler it found once its emergency
        # checkpoint is committed: here, ours (Ray's would end the actor before it
        # reports); the driver then says the run was preempted and stops the actors.
        previous = signal.signal(signal.SIGTERM, _note_sigterm)
        try:
            model, callback, history = _fit_example(
                cfg, multiworker=self.world_size > 1, rank=self.rank, world_size=self.world_size,
                grace_period_s=cfg.ray.grace_period_s,
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
        losses = history.history.get("loss") or []
        return {
            "rank": self.rank,
            "restored_step": callback.restored_step,
            "restored_tier": callback.restored_tier,
            "preempted": callback.preempted,
            "final_loss": float(losses[-1]) if losses else None,
            "weights_sha256": weights_digest(model),
            # Only on request (tests): a whole model's weights to the driver.
            "weights": model.get_weights() if return_weights and self.rank == 0 else None,
        }


def _note_sigterm(signum, frame) -> None:
    log.info("SIGTERM passed on after the emergency checkpoint; reporting to the driver")


def ray_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``ray.train.tensorflow.TensorflowTrainer``.

    Ray Train sets ``TF_CONFIG``; the callback reads rank and world size from
    the Ray Train context and, since the driver created the run's coordinator
    (:func:`coordinator_options` + ``coordinator.get_or_create``), switches to
    distributed mode by itself. ``config["cfg"]`` is a ``JobConfig`` as JSON.
    Note: Ray Train runs this function off the main thread, so no SIGTERM
    handler can be installed here; use plain worker actors (``run_on_ray``)
    where preemption notices must trigger an emergency checkpoint.
    """
    import ray.train

    from ckptmgr.distributed import CoordinatorClient

    cfg = JobConfig.model_validate_json(config["cfg"])
    model, callback, history = _fit_example(cfg, multiworker=True)
    losses = history.history.get("loss") or []
    ray.train.report({
        "distributed": isinstance(callback.manager, CoordinatorClient),
        "rank": ray.train.get_context().get_world_rank(),
        "restored_step": callback.restored_step,
        "loss": float(losses[-1]) if losses else float("nan"),
        "weights_sha256": weights_digest(model),
    })


def _fit_example(cfg: JobConfig, *, multiworker: bool, **callback_args: Any):
    """Build the example model under the right strategy and fit it with checkpoints."""
    import tensorflow as tf

    from ckptmgr.job import build_model, make_dataset, seed_everything
    from ckptmgr.keras import CheckpointCallback
    from ckptmgr.keras_compat import apply_multiworker_fit_patch

    cfg.user_code.user_code().load()  # the user's modules, before any model is built
    seed_everything(cfg.training.seed)
    if multiworker:
        apply_multiworker_fit_patch()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(cfg.training)
    x, y = make_dataset(cfg.training)
    ckpt = cfg.checkpoint
    callback = CheckpointCallback(
        ckpt.directory, storage_options=ckpt.storage_options, save_freq=ckpt.save_freq,
        mtbf=ckpt.mtbf, on_busy=ckpt.on_busy, checksum=ckpt.checksum, **ckpt.retention_options(),
        memory_every=ckpt.memory_tier.every_steps, memory_replicas=ckpt.memory_tier.replicas,
        **callback_args,
    )
    history = model.fit(
        x, y, batch_size=cfg.training.batch_size, epochs=cfg.training.epochs,
        shuffle=cfg.training.shuffle, callbacks=[callback], verbose=0,
    )
    return model, callback, history


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(array.tobytes())
    return digest.hexdigest()


def coordinator_options(cfg: JobConfig) -> CoordinatorOptions:
    ckpt = cfg.checkpoint
    return CoordinatorOptions(
        directory=ckpt.directory,
        world_size=cfg.ray.num_workers,
        storage_options=dict(ckpt.storage_options),
        retention=ckpt.retention_options(),
        on_busy=ckpt.on_busy,
        save_timeout_s=cfg.ray.save_timeout_s,
        prune_interval_s=ckpt.prune_interval_s,
        checksum=ckpt.checksum,
        parallel_write=cfg.ray.parallel_write,
        memory_replicas=ckpt.memory_tier.replicas if ckpt.memory_tier.every_steps else 0,
    )


def run_on_ray(
    cfg: JobConfig,
    *,
    resume: bool,
    worker_resources: list[dict[str, float]] | None = None,
    return_weights: bool = False,
) -> tuple[RayJobResult, list[Any] | None]:
    """Run the example job on Ray; returns the result and, with
    ``return_weights``, rank 0's final weights (else ``None``).

    ``worker_resources`` (one dict per rank) places ranks on chosen nodes.
    After a preemption or a lost worker the workers are started again from
    the newest tier, up to ``ray.max_restarts`` times; then the run stops
    (``JobStoppedError``, or a result with ``preempted``).
    """
    restarts = 0
    while True:
        try:
            result, weights = _run_once(cfg, resume=resume or restarts > 0,
                                        worker_resources=worker_resources, return_weights=return_weights)
        except JobStoppedError as exc:
            if restarts >= cfg.ray.max_restarts:
                raise
            reason = str(exc)
        else:
            if not result.preempted:
                _release_memory_tier(cfg)
            if not result.preempted or restarts >= cfg.ray.max_restarts:
                return replace(result, restarts=restarts), weights
            reason = f"preempted at step {result.final_step}"
        restarts += 1
        log.warning("restarting the workers (%d of %d): %s", restarts, cfg.ray.max_restarts, reason[:300])


def _release_memory_tier(cfg: JobConfig) -> None:
    """A finished run's memory snapshots serve no restart: free their RAM."""
    from ckptmgr.ray.keepers import MemoryTier

    if cfg.checkpoint.memory_tier.every_steps:
        stopped = MemoryTier(cfg.checkpoint.directory).stop()
        log.info("run finished: stopped %d memory-tier keeper(s)", stopped)


def _run_once(cfg: JobConfig, *, resume: bool, worker_resources: list[dict[str, float]] | None,
              return_weights: bool) -> tuple[RayJobResult, list[Any] | None]:
    """One start of the workers: train until done, preempted, or a worker is lost."""
    import ray

    if not ray.is_initialized():
        # null means a new local cluster, as documented: plain ray.init() would join
        # whatever /tmp/ray/ray_current_cluster names (and wait minutes on a stale one).
        ray.init(address=cfg.ray.address or "local", runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=False, configure_logging=False)
    coordinator = _coordinator_for(coordinator_options(cfg))
    latest = ray.get(coordinator.latest_step.remote())
    if resume and latest is None and not ray.get(coordinator.memory_copies.remote()):
        raise CheckpointNotFoundError(
            f"Nothing to resume under {cfg.checkpoint.directory}: it holds no checkpoints; "
            "use `ckptmgr run` to start."
        )
    worker_cls = ray.remote(max_restarts=0)(TrainWorker)
    workers = []
    for rank in range(cfg.ray.num_workers):
        options: dict[str, Any] = {
            "num_cpus": cfg.ray.cpus_per_worker,
            "num_gpus": 1 if cfg.ray.use_gpu else 0,
            "runtime_env": {"env_vars": WORKER_ENV},
        }
        if worker_resources:
            options["resources"] = worker_resources[rank]
        workers.append(worker_cls.options(**options).remote(rank, cfg.ray.num_workers))
    try:
        cluster = ray.get([w.address.remote() for w in workers])
        refs = [w.train.remote(cfg.model_dump_json(), cluster, return_weights) for w in workers]
        results = _wait_all(refs, workers)
    finally:
        for w in workers:
            ray.kill(w)
    lead = results[0]
    if any(r["preempted"] for r in results) and not ray.get(
            coordinator.flush_writes.remote(cfg.ray.save_timeout_s)):
        log.error("the emergency checkpoint is still being persisted after %.0f s", cfg.ray.save_timeout_s)
    final_step = ray.get(coordinator.latest_step.remote())
    return (
        RayJobResult(
            final_step=final_step, restored_step=lead["restored_step"],
            restored_tier=lead["restored_tier"],
            preempted=any(r["preempted"] for r in results), final_loss=lead["final_loss"],
            weights_sha256=lead["weights_sha256"], directory=cfg.checkpoint.directory,
        ),
        lead["weights"],
    )


def _coordinator_for(options: CoordinatorOptions):
    """The run's coordinator, replaced if it was started with other options
    (another world size or retention): it is detached and outlives a job."""
    import ray

    from ckptmgr.coordinator import find

    existing = find(options.directory)
    if existing is not None and ray.get(existing.options_.remote()) != options:
        log.info("restarting the coordinator of %s with the new options", options.directory)
        ray.get(existing.shutdown.remote())  # finishes a write in flight
        ray.kill(existing)
    return get_or_create(options)


def _wait_all(refs: list, workers: list) -> list[dict[str, Any]]:
    """Results of every rank, or stop all and raise when one fails."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as exc:
            rank = refs.index(done[0])
            log.error("worker rank %d failed:\n%s", rank, exc)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise JobStoppedError(
                f"The job stopped: worker rank {rank} failed ({type(exc).__name__}: "
                f"{reason[:200]}). Run `ckptmgr resume CONFIG` to continue from the "
                "newest checkpoint."
            ) from None
    return ray.get(refs)

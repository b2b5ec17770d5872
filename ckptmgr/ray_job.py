"""The example job on a Ray cluster: N worker actors, one coordinator.

The example job (:mod:`ckptmgr.job`) as a :class:`~ckptmgr.ray.runners.FitJob`,
run by the same code as :func:`ckptmgr.ray.fit_on_ray` (:mod:`ckptmgr.ray.runners`):
each rank is a plain Ray actor training under
``tf.distribute.MultiWorkerMirroredStrategy`` with ckptmgr's multi-worker
``fit()`` fix and a :class:`~ckptmgr.keras.CheckpointCallback` talking to the
run's coordinator. If any worker dies (node removed, preempted), the driver
stops the others and reports it, or restarts them (``ray.max_restarts``):
``ckptmgr resume`` starts the job again from the newest checkpoint that
verifies. :func:`ray_train_loop` trains the example job under Ray Train.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from ckptmgr.config import JobConfig, load_config
from ckptmgr.coordinator import CoordinatorOptions
from ckptmgr.errors import CheckpointNotFoundError, ConfigError, JobStoppedError
from ckptmgr.ray.runners import (
    WORKER_ENV,
    FitJob,
    Placement,
    RayJobResult,
    TrainWorker,
    coordinator_for,
    ensure_ray,
    fit_rank,
    release_memory_tier,
    run_attempt,
    run_with_restarts,
    stop_coordinator,
    weights_digest,
)

__all__ = ["WORKER_ENV", "JobStoppedError", "RayJobResult", "TrainWorker", "coordinator_options",
           "example_job", "ray_train_loop", "run_on_ray", "weights_digest"]

log = logging.getLogger("ckptmgr")

RESUME_HINT = "Run `ckptmgr resume CONFIG` to continue from the newest checkpoint."
_coordinator_for = coordinator_for  # the older private name


def example_job(cfg: JobConfig, **callback_options: Any) -> FitJob:
    """The example job as a :class:`FitJob`: its model, data, callback and fit options."""
    from ckptmgr import job

    ckpt, training = cfg.checkpoint, cfg.training
    return FitJob(
        build_model=functools.partial(job.build_model, training),
        make_dataset=functools.partial(job.make_dataset, training),
        directory=ckpt.directory,
        callback_options=dict(
            storage_options=ckpt.storage_options, save_freq=ckpt.save_freq, mtbf=ckpt.mtbf,
            on_busy=ckpt.on_busy, checksum=ckpt.checksum, **ckpt.retention_options(),
            memory_every=ckpt.memory_tier.every_steps, memory_replicas=ckpt.memory_tier.replicas,
            **callback_options,
        ),
        fit_kwargs=dict(batch_size=training.batch_size, epochs=training.epochs, shuffle=training.shuffle),
        seed=training.seed,
        setup=cfg.user_code.user_code().load,  # the user's modules, before any model is built
    )


def _example_task(cfg_json: str, return_weights: bool, rank: int, world_size: int) -> dict[str, Any]:
    """One rank of the example job (runs in a :class:`TrainWorker`)."""
    cfg = JobConfig.model_validate_json(cfg_json)
    job = example_job(cfg, grace_period_s=cfg.ray.grace_period_s)
    return fit_rank(job, rank, world_size, return_weights=return_weights)


def ray_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``ray.train.tensorflow.TensorflowTrainer``
    that trains the *example job*: ``train_loop_config={"cfg": cfg}`` with a
    ``JobConfig`` (``load_config("configs/local.yaml")``), its JSON, or a YAML
    path. For your own model, write your own loop with ``CheckpointCallback``
    (README, "Your own model on a Ray cluster").

    Ray Train sets ``TF_CONFIG``; the callback finds (or creates) the run's
    coordinator and reports each committed checkpoint to Ray Train. Ray Train
    runs this function off the main thread, so no SIGTERM handler can be
    installed here; Ray's drain notices reach the ranks instead.
    """
    import ray.train

    cfg = _train_loop_config(config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    outcome = fit_rank(example_job(cfg), rank, world_size)
    loss = outcome["final_loss"]
    ray.train.report({
        "distributed": outcome["distributed"],
        "rank": rank,
        "restored_step": outcome["restored_step"],
        "loss": float("nan") if loss is None else loss,
        "weights_sha256": outcome["weights_sha256"],
    })


def _train_loop_config(config: dict[str, Any] | None) -> JobConfig:
    """``config["cfg"]``: a JobConfig, its JSON, or a YAML path; else one line saying how."""
    cfg = (config or {}).get("cfg")
    if isinstance(cfg, JobConfig):
        return cfg
    if isinstance(cfg, dict):
        return JobConfig.model_validate(cfg)
    if isinstance(cfg, str) and cfg.lstrip().startswith("{"):
        return JobConfig.model_validate_json(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        return load_config(cfg)
    raise ConfigError(
        f"ray_train_loop needs the example job's config: Received: train_loop_config="
        f"{config!r}. Pass train_loop_config={{'cfg': load_config('configs/local.yaml')}} "
        "(a JobConfig, its JSON or a YAML path); for your own model, write your own loop "
        "with CheckpointCallback."
    )


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
    watch: bool = False,
) -> tuple[RayJobResult, list[Any] | None]:
    """Run the example job on Ray; returns the result and, with
    ``return_weights``, rank 0's final weights (else ``None``).

    ``worker_resources`` (one dict per rank) places ranks on chosen nodes.
    ``watch`` shows progress and one line per save and restore on stderr.
    After a preemption or a lost worker the workers are started again from
    the newest tier, up to ``ray.max_restarts`` times; then the run stops
    (``JobStoppedError``, or a result with ``preempted``).
    """
    result = run_with_restarts(
        # A restart continues from whatever the failed attempt saved, if anything
        # (a run that failed before its first checkpoint starts again fresh).
        lambda restarted: _run_once(cfg, resume=resume and not restarted, worker_resources=worker_resources,
                                    return_weights=return_weights, watch=watch),
        cfg.ray.max_restarts,
    )
    if not result.preempted and not cfg.ray.keep_coordinator:
        stop_coordinator(cfg.checkpoint.directory)  # and its keepers: a finished run needs neither
    elif not result.preempted and cfg.checkpoint.memory_tier.every_steps:
        release_memory_tier(cfg.checkpoint.directory)
    return result, result.weights


def _run_once(cfg: JobConfig, *, resume: bool, worker_resources: list[dict[str, float]] | None,
              return_weights: bool, watch: bool = False) -> RayJobResult:
    """One start of the workers: train until done, preempted, or a worker is lost."""
    import ray

    # null means a new local cluster, as documented: plain ray.init() would join
    # whatever /tmp/ray/ray_current_cluster names (and wait minutes on a stale one).
    ensure_ray(cfg.ray.address or "local", log_to_driver=cfg.ray.worker_logs, configure_logging=False)
    options = coordinator_options(cfg)
    coordinator = coordinator_for(options)
    latest = ray.get(coordinator.latest_step.remote())
    if resume and latest is None and not ray.get(coordinator.memory_copies.remote()):
        raise CheckpointNotFoundError(
            f"Nothing to resume under {cfg.checkpoint.directory}: it holds no checkpoints; "
            "use `ckptmgr run` to start."
        )
    placement = Placement(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, worker_resources)
    task = functools.partial(_example_task, cfg.model_dump_json(), return_weights)
    return run_attempt(coordinator, options, task, placement, hint=RESUME_HINT, watch=watch)

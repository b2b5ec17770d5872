"""Training on N plain Ray actors, one per rank, with checkpoints through the
run's coordinator: :func:`fit_on_ray` for your own model, and the example job
behind ``ckptmgr run`` (:mod:`ckptmgr.ray_job`) on the same code.

Driver side: the run's coordinator is created on the driver's node
(:func:`start_coordinator`, also the one-call helper for Ray Train), one
:class:`TrainWorker` actor is started per rank, each gets ``TF_CONFIG`` naming
every rank's address, and the driver waits for all of them. If a worker dies
(node removed, preempted), the others are stopped: :class:`JobStoppedError`,
or, with ``max_restarts``, every rank is started again and the callback
restores the newest checkpoint that verifies (in memory or in storage).

Worker side (:func:`fit_rank`): the user's ``build_model()`` runs under
``tf.distribute.MultiWorkerMirroredStrategy`` with the multi-worker ``fit()``
fix applied (:mod:`ckptmgr.keras_compat`), ``make_dataset()`` gives the data,
and ``fit()`` runs with a :class:`~ckptmgr.keras.CheckpointCallback`.

Imports neither Ray, TensorFlow nor Keras until a function needs them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ckptmgr.errors import ConfigError, JobStoppedError, not_restartable
from ckptmgr.ray.placement import WORKER_ENV, Placement, check_resources
from ckptmgr.ray.watch import RunWatch, log_to_stderr

if TYPE_CHECKING:
    from ckptmgr.coordinator import CoordinatorOptions

log = logging.getLogger("ckptmgr")

FIT_ON_RAY_HINT = ("Call fit_on_ray again with the same checkpoint directory to continue from the "
                   "newest checkpoint, or pass max_restarts=N to restart by itself.")

Task = Callable[[int, int], dict[str, Any]]  # (rank, world size) -> the rank's outcome


@dataclass(frozen=True)
class RayJobResult:
    """What a run on Ray did (rank 0's view; the ranks agree)."""

    final_step: int | None
    restored_step: int | None
    preempted: bool
    final_loss: float | None
    weights_sha256: str
    directory: str
    restored_tier: str | None = None  # "memory" or "storage"
    restarts: int = 0  # automatic restarts after a preemption or a lost node
    history: dict[str, list[float]] = field(default_factory=dict, repr=False, compare=False)
    weights: list[Any] | None = field(default=None, repr=False, compare=False)  # rank 0's, on request


@dataclass(frozen=True)
class FitJob:
    """What every rank runs (pickled to the workers): the user's functions and
    the callback's and ``fit()``'s keyword arguments."""

    build_model: Callable[[], Any]
    make_dataset: Callable[[], Any]
    directory: str
    callback_options: Mapping[str, Any] = field(default_factory=dict)
    fit_kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    setup: Callable[[], None] | None = None  # before seeding and building (user code imports)


# -- worker side ----------------------------------------------------------------
class TrainWorker:
    """One rank (Ray actor body): runs a task under ``TF_CONFIG``."""

    def __init__(self, rank: int, world_size: int):
        from ckptmgr.tf_noise import import_keras_quietly

        self.rank, self.world_size = rank, world_size
        # Before a task's arguments (the user's functions) are unpickled: TensorFlow's
        # start-up lines would reach the driver with --verbose (ray.worker_logs).
        import_keras_quietly()
        log_to_stderr()

    def address(self) -> str:
        """host:port for this rank's TensorFlow collective server."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def run(self, task: Task, cluster: list[str]) -> dict[str, Any]:
        if self.world_size > 1:
            os.environ["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": self.rank}}
            )
        # The callback passes a SIGTERM on to the handler it found once its emergency
        # checkpoint is committed: here, ours (Ray's would end the actor before it
        # reports); the driver then says the run was preempted and stops the actors.
        previous = signal.signal(signal.SIGTERM, _note_sigterm)
        try:
            return task(self.rank, self.world_size)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _note_sigterm(signum, frame) -> None:
    log.info("SIGTERM passed on after the emergency checkpoint; reporting to the driver")


def fit_rank(job: FitJob, rank: int, world_size: int, *, return_weights: bool = False) -> dict[str, Any]:
    """Worker side: build the model under the strategy, ``fit()`` it with a
    checkpoint callback, and say what happened (plain data, for the driver)."""
    from ckptmgr.distributed import CoordinatorClient

    model, callback, history = _fit(job, rank, world_size)
    losses = history.history.get("loss") or []
    return {
        "rank": rank,
        "distributed": isinstance(callback.manager, CoordinatorClient),
        "restored_step": callback.restored_step,
        "restored_tier": callback.restored_tier,
        "preempted": callback.preempted,
        "final_loss": float(losses[-1]) if losses else None,
        "weights_sha256": weights_digest(model),
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        # Only on request: a whole model's weights to the driver.
        "weights": model.get_weights() if return_weights and rank == 0 else None,
    }


def _fit(job: FitJob, rank: int, world_size: int):
    import tensorflow as tf

    from ckptmgr.keras import CheckpointCallback
    from ckptmgr.keras_compat import apply_multiworker_fit_patch

    if job.setup is not None:
        job.setup()
    if job.seed is not None:
        from ckptmgr.job import seed_everything

        seed_everything(job.seed)
    if world_size > 1:
        apply_multiworker_fit_patch()  # Keras 3 fit() under multi-worker MWMS (keras_compat)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = job.build_model()
    data = job.make_dataset()
    callback = CheckpointCallback(job.directory, rank=rank, world_size=world_size, **job.callback_options)
    fit_kwargs = dict(job.fit_kwargs)
    callbacks = [callback, *fit_kwargs.pop("callbacks", [])]
    fit_kwargs.setdefault("verbose", 0)
    history = model.fit(*_fit_data(data), callbacks=callbacks, **fit_kwargs)
    return model, callback, history


def _fit_data(data: Any) -> tuple:
    """``make_dataset()``'s result as ``fit()``'s positional data: a pair is (x, y)."""
    return tuple(data) if isinstance(data, tuple) and len(data) == 2 else (data,)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(array.tobytes())
    return digest.hexdigest()


# -- driver side: the coordinator ---------------------------------------------------
def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """``ray.init(address)`` unless Ray is already initialized in this process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, **init_kwargs)


def coordinator_for(options: CoordinatorOptions) -> Any:
    """The run's coordinator, replaced if it was started with other options
    (another world size or retention): it is detached and outlives a job."""
    import ray

    from ckptmgr.coordinator import find, get_or_create, shut_down

    existing = find(options.directory)
    if existing is not None:
        try:
            current = ray.get(existing.options_.remote())
        except ray.exceptions.RayActorError:  # died with its node: a new one carries on
            log.warning("the coordinator of %s died (lost node); starting a new one", options.directory)
            current = None
        if current != options:
            if current is not None:
                log.info("restarting the coordinator of %s with the new options", options.directory)
            shut_down(existing)
    return get_or_create(options)


def start_coordinator(directory: str | os.PathLike, *, num_workers: int, save_timeout_s: float = 120.0,
                      **callback_options: Any) -> Any:
    """Create the run's coordinator on this (the driver's) node, for the ranks'
    ``CheckpointCallback(directory, **callback_options)``; returns the actor.

    Only the options the coordinator owns are used (``storage_options``, the
    ``keep_*``/``monitor`` retention, ``on_busy``, ``checksum``,
    ``memory_every``/``memory_replicas``); the callbacks then agree with it.
    A coordinator already there with other options is replaced. Starts Ray
    (``ray.init()``) if this process has not.
    """
    options = callback_coordinator_options(directory, num_workers, save_timeout_s, callback_options)
    ensure_ray()
    return coordinator_for(options)


def callback_coordinator_options(directory: str | os.PathLike, num_workers: int, save_timeout_s: float,
                                 callback_options: Mapping[str, Any]) -> CoordinatorOptions:
    """The coordinator options that ``CheckpointCallback(directory,
    **callback_options)`` on ``num_workers`` ranks agrees with."""
    from ckptmgr.ray import joining
    from ckptmgr.retention import RetentionPolicy, callback_best_options

    opts = dict(callback_options)
    rules = {k: opts.get(k) for k in ("keep_last", "keep_every_n_steps", "keep_within")}
    _, best = callback_best_options(
        keep_best=opts.get("keep_best"), keep_best_mode=opts.get("keep_best_mode", "min"),
        monitor=opts.get("monitor"), mode=opts.get("mode"),
        save_best_only=opts.get("save_best_only", False), rules=rules,
    )
    retention = {**rules, **best}
    RetentionPolicy.from_options(**retention)  # refused here in one line, not in the actor
    return joining.callback_coordinator_options(
        os.fspath(directory), _positive_int("num_workers", num_workers), opts.get("storage_options"),
        retention, on_busy=opts.get("on_busy", "newest"), checksum=opts.get("checksum", "crc32c"),
        save_timeout_s=save_timeout_s,
        memory_replicas=opts.get("memory_replicas", 2) if opts.get("memory_every") else 0,
    )


def stop_coordinator(directory: str | os.PathLike) -> bool:
    """Stop the run's coordinator (after its write in flight) and its
    memory-tier keepers, as ``ckptmgr coordinators stop`` does; False if
    neither was running."""
    from ckptmgr.coordinator import find, shut_down
    from ckptmgr.ray.keepers import MemoryTier

    directory = os.fspath(directory)
    existing = find(directory)
    if existing is not None:
        shut_down(existing)
    return MemoryTier(directory).stop() > 0 or existing is not None


def release_memory_tier(directory: str) -> None:
    """A finished run's memory snapshots serve no restart: free their RAM."""
    from ckptmgr.ray.keepers import MemoryTier

    stopped = MemoryTier(directory).stop()
    log.info("run finished: stopped %d memory-tier keeper(s)", stopped)


# -- driver side: the ranks -----------------------------------------------------------
def run_ranks(task: Task, placement: Placement, *, hint: str,
              on_tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Start one :class:`TrainWorker` per rank, run ``task`` on each, and return
    their outcomes by rank; every actor is stopped afterwards. A failed rank
    stops all: :class:`JobStoppedError` ending with ``hint``, or the rank's own
    error where no restart mends it (:data:`ckptmgr.errors.NOT_RESTARTABLE`). ``on_tick`` is
    called about twice a second while they train."""
    import ray

    check_resources(placement)
    worker_cls = ray.remote(max_restarts=0)(TrainWorker)
    n = placement.num_workers
    workers = [worker_cls.options(**placement.actor_options(rank)).remote(rank, n) for rank in range(n)]
    runs: list = []
    try:
        cluster = ray.get([w.address.remote() for w in workers])
        runs = [w.run.remote(task, cluster) for w in workers]
        outcomes = _wait_all(runs, hint, on_tick)
        runs = []  # every outcome read
        return outcomes
    finally:
        for w in workers:
            ray.kill(w)
        for run in runs:  # a failed run's outcomes read: Ray prints none as an "unhandled error"
            with contextlib.suppress(Exception):
                ray.get(run, timeout=10)


def _wait_all(refs: list, hint: str, on_tick: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Results of every rank, or raise when one fails (the caller stops the rest)."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=None if on_tick is None else 0.5)
        if not done:
            on_tick()
            continue
        try:
            ray.get(done[0])
        except ray.exceptions.RayError as exc:
            rank = refs.index(done[0])
            final = not_restartable(exc)
            if final is not None:  # one line from the CLI; no traceback, no restart
                raise final from None
            log.error("worker rank %d failed:\n%s", rank, exc)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise JobStoppedError(
                f"The job stopped: worker rank {rank} failed ({type(exc).__name__}: "
                f"{reason[:200]}). {hint}"
            ) from None
    return ray.get(refs)


def run_attempt(coordinator, options: CoordinatorOptions, task: Task, placement: Placement, *,
                hint: str, watch: bool = False) -> RayJobResult:
    """One start of the ranks: train until done, preempted, or a rank is lost.
    ``watch``: show progress and the coordinator's saves on stderr (:mod:`ckptmgr.ray.watch`)."""
    import ray

    with RunWatch(coordinator) if watch else contextlib.nullcontext() as shown:
        results = run_ranks(task, placement, hint=hint, on_tick=shown.tick if shown else None)
        preempted = any(r["preempted"] for r in results)
        if preempted and not ray.get(coordinator.flush_writes.remote(options.save_timeout_s)):
            log.error("the emergency checkpoint is still being persisted after %.0f s", options.save_timeout_s)
    lead = results[0]
    return RayJobResult(
        final_step=ray.get(coordinator.latest_step.remote()), restored_step=lead["restored_step"],
        preempted=preempted, final_loss=lead["final_loss"], weights_sha256=lead["weights_sha256"],
        directory=options.directory, restored_tier=lead["restored_tier"], history=lead["history"],
        weights=lead["weights"],
    )


def run_with_restarts(attempt: Callable[[bool], RayJobResult], max_restarts: int) -> RayJobResult:
    """``attempt(restarted)`` until it finishes; after a preemption or a lost
    rank it is started again, up to ``max_restarts`` times; then the last
    preempted result is returned, or the :class:`JobStoppedError` raised."""
    restarts = 0
    while True:
        try:
            result = attempt(restarts > 0)
        except JobStoppedError as exc:
            if restarts >= max_restarts:
                raise
            reason = str(exc)
        else:
            if not result.preempted or restarts >= max_restarts:
                return replace(result, restarts=restarts)
            reason = f"preempted at step {result.final_step}"
        restarts += 1
        log.warning("restarting the workers (%d of %d): %s", restarts, max_restarts, reason[:300])
        from ckptmgr.ray.drain import wait_until_drained

        still = wait_until_drained()  # never restart a rank on a node that is about to go
        if still:
            log.warning("node(s) %s still draining; restarting anyway", ", ".join(n[:12] for n in still))


# -- the public helper ----------------------------------------------------------------------
def fit_on_ray(
    build_model: Callable[[], Any],
    make_dataset: Callable[[], Any],
    *,
    checkpoint: str | os.PathLike,
    num_workers: int = 2,
    checkpoint_options: Mapping[str, Any] | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
    cpus_per_worker: float = 1.0,
    use_gpu: bool = False,
    resources_per_worker: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
    max_restarts: int = 0,
    save_timeout_s: float = 120.0,
    address: str | None = None,
    return_weights: bool = False,
    keep_coordinator: bool = False,
) -> RayJobResult:
    """Train your own Keras model on ``num_workers`` Ray actors, data parallel,
    with checkpoints in ``checkpoint`` (an absolute path every node sees, or a URL).

    On every rank: ``build_model()`` is called under
    ``MultiWorkerMirroredStrategy`` (it returns a compiled model), with the
    multi-worker ``fit()`` fix applied; ``make_dataset()`` returns ``(x, y)``
    or anything ``fit(x)`` takes alone (a ``tf.data.Dataset``); then
    ``model.fit(..., **fit_kwargs)`` runs with
    ``CheckpointCallback(checkpoint, **checkpoint_options)`` first among its
    callbacks. Both functions are pickled to the workers (define them at module
    level, or in your script). A directory that holds checkpoints is continued
    from the newest one that verifies, exactly (with ``seed``: Keras's and
    TensorFlow's seeds and op determinism on every rank).

    Returns rank 0's :class:`RayJobResult` (``weights`` with ``return_weights``).
    A lost rank stops all: :class:`JobStoppedError`, unless ``max_restarts``
    allows starting again (never after a :class:`WriterFencedError` or another
    error no restart mends: that is raised as itself). The run's coordinator is stopped when the run
    finishes, unless ``keep_coordinator``. Starts Ray (``ray.init(address)``)
    if this process has not.
    """
    if not callable(build_model) or not callable(make_dataset):
        raise ConfigError(f"fit_on_ray needs two functions: Received: build_model={build_model!r}, "
                          f"make_dataset={make_dataset!r}. Pass functions that build the model and the data.")
    _positive_int("num_workers", num_workers)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"Invalid max_restarts: Received: {max_restarts!r}. Pass an int >= 0.")
    directory = os.fspath(checkpoint)
    callback_options = dict(checkpoint_options or {})
    options = callback_coordinator_options(directory, num_workers, save_timeout_s, callback_options)
    ensure_ray(address)
    job = FitJob(build_model, make_dataset, directory, callback_options, dict(fit_kwargs or {}), seed)
    placement = Placement(num_workers, cpus_per_worker, use_gpu, resources_per_worker)
    task = functools.partial(fit_rank, job, return_weights=return_weights)
    result = run_with_restarts(
        lambda restarted: run_attempt(coordinator_for(options), options, task, placement, hint=FIT_ON_RAY_HINT),
        max_restarts,
    )
    if not result.preempted:  # a preempted run's newest snapshot may be in memory only
        if not keep_coordinator:
            stop_coordinator(directory)
        elif options.memory_replicas:
            release_memory_tier(directory)
    return result


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Invalid {name}: Received: {value!r}. Pass an int >= 1.")
    return value

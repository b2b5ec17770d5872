"""How a rank of a distributed run joins its run's coordinator.

A rank learns its place (Ray Train's context, or ``TF_CONFIG``), finds the
coordinator named after the checkpoint directory, or creates it with the
options a callback was given (never a writer per rank), and gets a
:class:`~ckptmgr.distributed.CoordinatorClient`. Retention belongs to the
coordinator: a rank's different options are refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from typing import Any

from ckptmgr.coordinator import CoordinatorOptions, find, get_or_create
from ckptmgr.distributed import CoordinatorClient
from ckptmgr.errors import ConfigError, DistributedSaveError

log = logging.getLogger("ckptmgr")


def ray_rank_and_world() -> tuple[int, int] | None:
    """(rank, world size) inside a Ray Train worker or a TF_CONFIG cluster."""
    try:
        import ray.train

        context = ray.train.get_context()
        return context.get_world_rank(), context.get_world_size()
    except Exception:  # noqa: BLE001 - not inside Ray Train
        pass
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker")
    if workers and "task" in tf_config:
        return int(tf_config["task"]["index"]), len(workers)
    return None



def client_for(directory: str, *, rank: int | None, world_size: int | None,
               storage_options: dict | None, retention: dict[str, Any], on_busy: str,
               save_timeout_s: float = 120.0, prune_interval_s: float = 60.0,
               grace_period_s: float = 25.0, sharded: Collection[str] = (),
               checksum: str = "crc32c", memory_replicas: int = 0) -> CoordinatorClient | None:
    """A client when this process is a rank of a distributed Ray run, else None.

    A rank of a run with several workers always writes through the run's
    coordinator: if none exists yet it is created here (named after the
    directory, as the driver would), never a per-rank writer, which would make
    the ranks fence each other. Retention belongs to the coordinator: options
    that differ from its own are refused in one line.
    """
    try:
        import ray
    except ImportError:  # pragma: no cover
        return None
    if not ray.is_initialized():
        return None
    if rank is None or world_size is None:
        detected = ray_rank_and_world()
        if detected is None:
            return None
        rank, world_size = detected
    actor = find(str(directory))
    if actor is None:
        if world_size <= 1:
            return None  # one worker: its own manager writes
        actor = _create_coordinator(
            directory, world_size, storage_options, retention, on_busy, save_timeout_s, prune_interval_s,
            checksum, memory_replicas,
        )
    options = ray.get(actor.options_.remote())
    if options.world_size != world_size:
        raise DistributedSaveError(
            f"World size mismatch: this worker says {world_size}, the coordinator of "
            f"{directory} expects {options.world_size}. Start the coordinator with "
            "the job's number of workers."
        )
    if _given(retention) and _given(retention) != _given(options.retention):
        raise ConfigError(
            f"Retention options of a distributed run belong to its coordinator: Received: "
            f"{_given(retention)} in a worker's callback, the coordinator of {directory} has "
            f"{_given(options.retention) or 'none'}. Pass them where the coordinator is "
            "created (CoordinatorOptions.retention, or checkpoint.keep_* in the job config)."
        )
    return CoordinatorClient(options, rank, grace_period_s=grace_period_s, sharded=sharded)


def _given(retention: dict[str, Any]) -> dict[str, Any]:
    """Retention options that were set (not None, not the default mode)."""
    return {k: v for k, v in (retention or {}).items()
            if v is not None and not (k == "keep_best_mode" and v == "min")}


def _create_coordinator(directory: str, world_size: int, storage_options: dict | None,
                        retention: dict[str, Any], on_busy: str, save_timeout_s: float,
                        prune_interval_s: float, checksum: str = "crc32c", memory_replicas: int = 0):
    options = callback_coordinator_options(
        directory, world_size, storage_options, retention, on_busy=on_busy,
        save_timeout_s=save_timeout_s, prune_interval_s=prune_interval_s, checksum=checksum,
        memory_replicas=memory_replicas,
    )
    log.info("no coordinator for %s: creating it (world size %d)", directory, world_size)
    return get_or_create(options)


def callback_coordinator_options(directory: str, world_size: int, storage_options: dict | None,
                                 retention: dict[str, Any], *, on_busy: str = "newest",
                                 save_timeout_s: float = 120.0, prune_interval_s: float = 60.0,
                                 checksum: str = "crc32c", memory_replicas: int = 0,
                                 parallel_write: bool | str = "auto") -> CoordinatorOptions:
    """The coordinator options a rank's callback creates its run's coordinator
    with (also what a driver helper uses, so both agree); a relative local
    directory is refused."""
    from ckptmgr.io.storage import Storage

    if Storage(directory, storage_options).is_local and not os.path.isabs(directory):
        raise ConfigError(
            f"Invalid checkpoint directory for a distributed run: Received: {directory!r}, "
            "a relative path, which means another place on every node. Pass an absolute "
            "path or a URL."
        )
    return CoordinatorOptions(
        directory, world_size=world_size, storage_options=dict(storage_options or {}),
        retention=_given(retention), on_busy=on_busy, save_timeout_s=save_timeout_s,
        prune_interval_s=prune_interval_s, checksum=checksum, memory_replicas=memory_replicas,
        parallel_write=parallel_write,
    )

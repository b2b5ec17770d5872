"""S10: recovery by tier (issue 11): how long a restore takes from the memory
tier, from local disk and from gs:// (fake-gcs-server), and how long an
emergency snapshot of the whole state takes to reach memory on another node,
against a 15 s and a 30 s preemption notice.

Runs on a ``ray.cluster_utils.Cluster`` with a head and two worker nodes on
this machine: the keepers sit on other nodes than the driver's (the
producer), as on a real cluster; a copy on another node is streamed from its
keeper (:mod:`ckptmgr.ray.stream`), but between processes of one machine, not
over a network.
"""

from __future__ import annotations

import bench  # noqa: F401

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import median
from bench.context import Context
from bench.gcs import GCSServer
from bench.parallel_write import _Gcs
from bench.report import Row

REPO = str(Path(__file__).resolve().parents[1])


def recovery_by_tier(ctx: Context) -> None:
    from ckptmgr import CheckpointManager

    model = ctx.model
    if model is None:
        raise RuntimeError("the model could not be set up (see the setup error)")
    reps = 2 if ctx.settings.quick else 4  # the first keep also starts the keepers: reported apart
    work = tempfile.mkdtemp(prefix="ckptmgr-s10-")
    try:
        keep_s, memory_s, local_s = _memory_tier(ctx, model, os.path.join(work, "run"), reps)
        # The cluster is gone (its object stores and keepers' copies with it) before
        # the storage restores: at full size both at once do not fit in 23.5 GiB.
        gc.collect()
        nbytes, disk_s = _restores(CheckpointManager(os.path.join(work, "local"), keep_last=1), model, reps)
        with GCSServer(filesystem_root=os.path.join(work, "gcs")) as gcs:  # the memory backend: ~3.5x the bytes
            _, gs_s = _restores(CheckpointManager(gcs.new_url("s10-"), storage_options=gcs.storage_options),
                                model, reps)
        cap = ctx.settings.cap_mb_s
        with _Gcs(cap * 1e6) as capped:  # each connection capped, as real object stores cap a stream
            url, options = capped.new_url()
            _, capped_s = _restores(CheckpointManager(url, storage_options=options), model, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first_keep, keep = keep_s[0], median(keep_s[1:])
    mem, disk, gs, gs_capped = median(memory_s), median(disk_s), median(gs_s), median(capped_s)
    add = ctx.report.add
    add(Row("S10", f"emergency snapshot into memory on 2 other nodes ({nbytes / 1e9:.2f} GB)", keep, "s",
            "15 s notice (GKE pods)", 15.0, "s", keep / 15.0, "<=", 1.0, "<= 1x a 15 s notice",
            note=f"first one, keepers starting: {first_keep:.2f} s"))
    add(Row("S10", "emergency snapshot into memory vs a 30 s notice", keep, "s",
            "30 s notice (GCP spot)", 30.0, "s", keep / 30.0, "<=", 1.0, "<= 1x a 30 s notice"))
    add(Row("S10", f"restore from memory, the copy on another node (a replacement rank: stream, load, "
            f"digest) vs from gs:// at {cap:g} MB/s a connection",
            mem, "s", "restore from gs:// (emulator behind a per-connection cap)", gs_capped, "s",
            gs_capped / mem, ">=", 5.0, "memory >= 5x faster than gs://"))
    here = median(local_s)
    add(Row("S10", f"restore from memory, a copy on the rank's own node (a surviving rank: no transfer) "
            f"vs from gs:// at {cap:g} MB/s a connection",
            here, "s", "restore from gs:// (emulator behind a per-connection cap)", gs_capped, "s",
            gs_capped / here, ">=", 5.0, "memory >= 5x faster than gs://"))
    add(Row("S10", "restore from memory vs from gs:// (emulator on 127.0.0.1, no cap: the unfavourable case)",
            mem, "s", "restore from gs:// (uncapped emulator)", gs, "s", gs / mem, None, None, "information"))
    add(Row("S10", "restore from memory vs from local disk", mem, "s", "restore from local disk", disk, "s",
            disk / mem, None, None, "information"))
    if ctx.step_s:
        step = ctx.step_s  # measured in S0: restore, then one step, before training goes on
        add(Row("S10", f"recovery to the first training step, from memory vs from gs:// at {cap:g} MB/s "
                f"(restore + one {step:.2f} s step; process start and model build, the same for every tier, "
                "not counted)", mem + step, "s", "the same from gs:// (capped)", gs_capped + step, "s",
                (gs_capped + step) / (mem + step), ">=", 5.0, "memory >= 5x faster than gs://"))
    _lost_steps_on_paper(ctx, keep)
    ctx.log(f"S10: keep {keep:.2f}s, restore memory {mem:.2f}s (own node {here:.2f}s), disk {disk:.2f}s, gs {gs:.2f}s, "
            f"gs capped {gs_capped:.2f}s")


def _memory_tier(ctx: Context, model, directory: str, reps: int) -> tuple[list[float], ...]:
    """Seconds of ``reps`` emergency snapshots into memory on two other nodes,
    each followed by a restore from memory, on a head and two worker nodes;
    then of restores from a copy on this node."""
    import ray
    from ray.cluster_utils import Cluster

    from ckptmgr.ray_job import WORKER_ENV

    # Object stores sized as a real node's would be (Ray gives 30 % of RAM): room for a
    # keeper's two copies plus the one it is pulling. Smaller (2.5x) spilled to disk and
    # measured the spilling; Cluster's test default, 150 MiB, spills every snapshot.
    store = int(max(512 << 20, 3.5 * (ctx.ckpt_bytes or ctx.spec.params * 12)))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    env = dict(WORKER_ENV, PYTHONPATH=REPO)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        keep_s, memory_s = _memory_rounds(ctx, model, directory, replicas=2, reps=reps, first_step=100)
        # A rank whose own node holds a copy (a surviving rank, or a restart placed beside
        # a keeper): a third replica lands on this node, read without a transfer.
        _, local_s = _memory_rounds(ctx, model, directory + "-local", replicas=3, reps=reps, first_step=200,
                                    node=ray.get_runtime_context().get_node_id())
    finally:
        ray.shutdown()
        cluster.shutdown()
    return keep_s, memory_s, local_s


def _memory_rounds(ctx: Context, model, directory: str, *, replicas: int, reps: int, first_step: int,
                   node: str | None = None) -> tuple[list[float], list[float]]:
    """Seconds of ``reps`` snapshots into memory on ``replicas`` nodes and of
    the restore from memory after each (read on ``node`` when given)."""
    from ckptmgr.coordinator import CoordinatorOptions, get_or_create
    from ckptmgr.distributed import CoordinatorClient
    from ckptmgr.io.manifest import LoopState
    from ckptmgr.ray.keepers import MemoryTier

    options = CoordinatorOptions(directory, world_size=1, memory_replicas=replicas)
    get_or_create(options)
    client = CoordinatorClient(options, rank=0)
    client.prepare(model)
    keep_s, restore_s = [], []
    for rep in range(reps):
        started = time.perf_counter()
        outcome = client.save(first_step + rep, model, loop=LoopState(), tier="memory").result()
        keep_s.append(time.perf_counter() - started)
        if not outcome.get("memory"):
            raise RuntimeError(f"memory snapshot failed: {outcome}")
        ctx.log(f"S10: memory snapshot on {replicas} nodes {keep_s[-1]:.2f}s end to end, "
                f"keepers {outcome['keep_s']:.2f}s (each {outcome['keeper_s']})")
        started = time.perf_counter()
        client.restore(model)
        restore_s.append(time.perf_counter() - started)
        if client.restored_tier != "memory" or node not in (None, client.restored_node):
            raise RuntimeError(f"read {client.restored_tier} on {client.restored_node}, not memory "
                               f"{'on ' + node if node else ''}")
    client.close()
    MemoryTier(directory).stop()
    return keep_s, restore_s


def _restores(manager, model, reps: int) -> tuple[int, list[float]]:
    """The archive's size and the seconds of ``reps`` restores of it (saved
    once, then verified and applied each time)."""
    nbytes = manager.save(1, model, blocking=True).stats.bytes
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        manager.restore(model, 1)
        seconds.append(time.perf_counter() - started)
    return nbytes, seconds


def _lost_steps_on_paper(ctx: Context, keep_s: float) -> None:
    """Expected steps lost per preemption (uniform in time): half the interval
    of the newest tier that survives, or none when a notice comes early enough
    for an emergency snapshot (``keep_s`` plus the ~1 s lead the ranks agree on)."""
    memory_every, storage_every = 20, 200  # configs/gcs.yaml: memory_tier.every_steps, save_freq
    step_s = ctx.step_s or 0.1
    for name, lost in (
        (f"persistent only, every {storage_every} steps", storage_every / 2),
        (f"memory tier every {memory_every} steps (+ storage every {storage_every})", memory_every / 2),
        ("with a drain notice >= the emergency snapshot time ahead", 0.0),
    ):
        ctx.report.add(Row("S10", f"lost steps per preemption, {name} (paper)", lost, "steps",
                           "training time", lost * step_s, "s", None, None, None, "information",
                           note=f"emergency snapshot {keep_s:.2f} s + ~1 s lead"
                           if lost == 0.0 else ""))

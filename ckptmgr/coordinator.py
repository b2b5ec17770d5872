"""The coordinator: one Ray actor per run that commits every worker's checkpoints.

Workers copy their state to host memory and hand it over through the Ray object
store; the coordinator does the slow part (streaming the ``.keras`` archive,
checksums, the commit, retention) with only numpy and h5py, no TensorFlow.

A save of step N is two-phase:

1. *Parts*: every rank submits a part: rank 0 its snapshot (a Ray object
   reference), every rank a digest of its replicated state. A step whose
   parts do not all arrive within ``save_timeout_s`` fails, naming the missing
   ranks and how long each was waited for. A digest that differs from rank 0's
   fails the step, naming the ranks that disagree. Nothing is written then.
2. *Commit*: once all parts agree, the archive is streamed and the manifest
   written last (see :mod:`storage`); then retention runs.

While a step is writing, what a newly complete step does is decided here,
in one place, so every rank agrees (``on_busy``, see :mod:`ckptmgr.pipeline`):
under ``"newest"`` it becomes pending and a newer complete step replaces it;
the replaced step's outcome is ``{"replaced": True, "by": newer}`` for every
rank waiting on it, not an error. An emergency step is never replaced.

The actor is named after the checkpoint directory, so every process of a run
finds the same one, and a restarted driver or worker finds it again.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ckptmgr.agreement import RestoreVotes
from ckptmgr.replicas import gather_shards, shard_rows, snapshot_digest, with_shards  # noqa: F401 - re-exported
from ckptmgr.errors import DistributedSaveError
from ckptmgr.integrity import one_line
from ckptmgr.manager import CheckpointManager
from ckptmgr.io.manifest import LoopState
from ckptmgr.io.parts import parallel_kind_of
from ckptmgr.pipeline import SavePipeline
from ckptmgr.ranged_write import RangeAssignment, RangeResult, RangeRounds
from ckptmgr.ray.drain import DrainNotice, DrainWatch
from ckptmgr.ray.keepers import MemoryTier
from ckptmgr.ray.memory_coordinator import MemoryTierMixin
from ckptmgr.ray.metrics import RayMetrics
from ckptmgr.ray.watch import RunEvents, log_to_stderr

log = logging.getLogger("ckptmgr")

NAMESPACE = "ckptmgr"


_KEPT_OUTCOMES = 64
Slot = tuple[int, str]  # (step, tier): a step's outcome in one tier


def tier_of(extra: dict | None) -> str:
    """The tier a save is for: "memory" when its ``extra`` says so, else "storage"."""
    return "memory" if (extra or {}).get("tier") == "memory" else "storage"


def coordinator_name(directory: str) -> str:
    """The actor name of the run that checkpoints into ``directory``."""
    return "ckptmgr:" + str(directory).rstrip("/")


@dataclass
class CoordinatorOptions:
    """Everything needed to (re)create a run's coordinator; picklable."""

    directory: str
    world_size: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    retention: dict[str, Any] = field(default_factory=dict)  # CheckpointManager kwargs
    on_busy: str = "newest"
    save_timeout_s: float = 120.0
    prune_interval_s: float = 60.0
    checksum: str = "crc32c"
    parallel_write: bool | str = "auto"  # see ranged_writes()
    memory_replicas: int = 0  # memory tier: nodes holding each snapshot (0: off)
    memory_retain: int = 2  # memory tier: newest snapshots each keeper holds

    def ranged_writes(self) -> bool:
        """Whether the ranks write byte ranges of each archive themselves
        (:mod:`ckptmgr.ranged_write`) instead of the coordinator writing it all.

        ``"auto"``: on GCS and S3 with 2+ ranks. Local paths only with
        ``parallel_write=True``: every rank must see the same file system
        (one node, or NFS/Lustre). Never with ``checksum="sha256"`` (a
        whole-archive digest cannot be combined from ranges).
        """
        if self.world_size < 2 or self.checksum != "crc32c" or self.parallel_write is False:
            return False
        kind = parallel_kind_of(self.directory)
        return kind is not None and (self.parallel_write is True or kind != "pwrite")


@dataclass
class Part:
    """One rank's contribution to a step."""

    rank: int
    digest: str
    snapshot_ref: list  # [ObjectRef] from rank 0, [] from the others
    blocked_s: float
    arrived: float
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    loop: dict[str, Any] | None = None
    shard_ref: list = field(default_factory=list)  # [ObjectRef of {path: (start, stop, rows)}]
    ranged: bool = False  # rank 0 sent a spec; every rank writes its own range


class Coordinator(MemoryTierMixin):
    """Ray actor body (threaded: waits and submissions run concurrently)."""

    def __init__(self, options: CoordinatorOptions):
        log_to_stderr()  # its save lines, for --verbose
        self.options = options
        self.manager = CheckpointManager(
            options.directory,
            storage_options=options.storage_options,
            on_busy=options.on_busy,  # type: ignore[arg-type]
            checksum=options.checksum,  # type: ignore[arg-type]
            **options.retention,
        )
        self._ranges = RangeRounds()
        self._votes = RestoreVotes(options.world_size)
        self._bad: set[tuple[int, str | None]] = set()  # (step, attempt) a rank found corrupt
        self._bad_memory: set[tuple[int, str]] = set()  # (step, keeper) a rank found damaged
        # Claim the directory now: a coordinator of an earlier run (a zombie
        # after a preemption) is fenced from this moment, not at our first save.
        self.manager.claim()
        self._lock = threading.Condition()
        # By (step, tier): one step can be both a memory snapshot and a persistent
        # save (the end of an epoch or of training); neither answers for the other.
        self._parts: dict[Slot, dict[int, Part]] = {}
        self._results: dict[Slot, Future] = {}
        self._metrics = RayMetrics(options.directory)
        self._events = RunEvents()  # what the driver shows (ckptmgr.ray.watch)
        self._writer = SavePipeline(options.on_busy, name="ckptmgr-coordinator",  # type: ignore[arg-type]
                                    on_drop=self._dropped)
        self._prune_lock = threading.Lock()
        self._emergency: int | None = None
        self._stop = threading.Event()
        self._tier = (MemoryTier(options.directory, replicas=options.memory_replicas,
                                 retain=options.memory_retain, timeout_s=options.save_timeout_s)
                      if options.memory_replicas > 0 else None)
        # Memory snapshots are kept beside (not behind) persistent writes; newest wins.
        self._keeping = SavePipeline("newest", name="ckptmgr-memory-tier")
        self._rank_nodes: dict[int, str] = {}
        self._notice: DrainNotice | None = None
        self._drain = DrainWatch(lambda: set(self._rank_nodes.values()), self._on_drain_notice)
        for target in (self._timeout_loop, self._prune_loop):
            threading.Thread(target=target, daemon=True).start()

    # -- phase 1: parts ---------------------------------------------------------
    def submit_part(self, step: int, rank: int, digest: str, snapshot_ref: list,
                    blocked_s: float, metrics: dict | None = None,
                    extra: dict | None = None, loop: dict | None = None,
                    shard_ref: list | None = None, ranged: bool = False) -> None:
        """Record one rank's part of ``step``; commit when the last one arrives.

        ``digest`` covers the replicated state; ``shard_ref`` carries the rows
        of sharded datasets this rank owns; ``ranged``: rank 0's ref is a spec
        (:meth:`ModelSnapshot.spec`) and every rank writes its range.
        """
        part = Part(rank, digest, snapshot_ref, blocked_s, time.monotonic(),
                    metrics or {}, extra or {}, loop, list(shard_ref or []), ranged)
        slot = (step, tier_of(extra))
        with self._lock:
            self._forget_old_outcomes()
            result = self._result_of(slot)
            if result.done():
                return  # the step already failed (timeout) or finished
            parts = self._parts.setdefault(slot, {})
            parts[rank] = part
            if len(parts) < self.options.world_size:
                return
            del self._parts[slot]
        self._complete(step, parts, result)

    def _forget_old_outcomes(self) -> None:
        """Keep the outcomes of the newest ``_KEPT_OUTCOMES`` finished steps
        (ranks ask for them right after saving), not one per step forever."""
        done = sorted(s for s, f in self._results.items() if f.done())
        for old in done[:-_KEPT_OUTCOMES]:
            del self._results[old]

    def _complete(self, step: int, parts: dict[int, Part], result: Future) -> None:
        reference = parts[0].digest
        disagree = sorted(r for r, p in parts.items() if p.digest != reference)
        if disagree:
            refused = DistributedSaveError(
                f"step {step} refused: replicated state of ranks {disagree} differs "
                f"from rank 0 (digest {parts[disagree[0]].digest[:12]} vs {reference[:12]}); "
                "nothing was written. Replicas diverged: check the strategy and seeds."
            )
            result.set_exception(refused)
            self._failed(step, refused)
            return
        memory = tier_of(parts[0].extra) == "memory"
        pipeline, job = (self._keeping, self._keep) if memory else (self._writer, self._write)
        future = pipeline.submit(
            step, lambda: job(step, parts), may_drop=True, report=False,
            sticky=bool(parts[0].extra.get("emergency")),
            replaced=lambda by: {"replaced": True, "step": step, "by": by},
            skipped=lambda: {"skipped": True, "step": step},
        )
        future.add_done_callback(lambda f: _copy_outcome(f, result))
        future.add_done_callback(lambda f: f.exception() is None or self._failed(step, f.exception()))

    def _failed(self, step: int, exc: BaseException) -> None:
        self._metrics.count("saves_failed")
        self._events.add("failed", step=step, error=one_line(exc, step))

    def _dropped(self, kind: str, line: str) -> None:
        """A save replaced or skipped because the writer was busy (with the
        ``save_freq`` that would keep up): counted, and shown on the driver."""
        self._metrics.count(kind)
        self._events.add("dropped", text=line)

    def _committed(self, step: int, stats, **fields: Any) -> None:
        """A checkpoint is in storage: the metrics and the driver's watch hear of it."""
        self._metrics.record(step, stats)
        self._events.add("saved", step=step, bytes=stats.bytes, write_s=stats.write_s, **fields)

    # -- phase 2: commit --------------------------------------------------------
    def _write(self, step: int, parts: dict[int, Part]) -> dict:
        """The writer thread's job; the manifest also counts the steps
        replaced or skipped since the previous write."""
        import ray

        counts = self._writer.take_counts()
        try:
            lead = parts[0]
            snapshot = ray.get(lead.snapshot_ref[0])  # a spec of a few KB when ranged
            meta = dict(
                metrics=lead.metrics, extra=lead.extra,
                loop=LoopState(**lead.loop) if lead.loop else None,
                blocked_s=max(p.blocked_s for p in parts.values()),
                world={"world_size": self.options.world_size, "ranks": sorted(parts),
                       "digest": lead.digest, "ranged": lead.ranged},
                counts=counts,
            )
            with self._prune_lock:
                if lead.ranged:
                    dispatch = lambda assignments: self._ranges.dispatch(  # noqa: E731
                        step, assignments, self.options.save_timeout_s)
                    manifest = self.manager.write_ranges(step, snapshot, self.options.world_size, dispatch, **meta)
                else:
                    shards = gather_shards(step, {r: ray.get(p.shard_ref[0]) for r, p in parts.items() if p.shard_ref})
                    if shards:
                        snapshot = with_shards(snapshot, shards)
                    manifest = self.manager.write_snapshot(step, snapshot, **meta)
        except BaseException:
            self._writer.give_back_counts(counts)
            raise
        self._committed(step, manifest.stats)
        return {"step": step, "manifest": manifest.model_dump(mode="json")}

    # -- ranged writes (see ckptmgr.ranged_write) --------------------------------
    def range_for(self, step: int, rank: int, timeout_s: float) -> RangeAssignment | None:
        """This rank's byte range of ``step`` once its write starts; None when
        the step settled otherwise (replaced, skipped, failed) or has no range
        for this rank."""
        def settled() -> bool:
            with self._lock:
                result = self._results.get((step, "storage"))
                return result is not None and result.done()

        return self._ranges.assignment_for(step, rank, timeout_s, settled)

    def range_done(self, step: int, rank: int, result: RangeResult) -> None:
        self._ranges.done(step, rank, result)

    def range_failed(self, step: int, rank: int, message: str) -> None:
        self._ranges.failed(step, rank, message)

    def wait_step(self, step: int, timeout_s: float | None = None, tier: str = "storage") -> dict:
        """Block until ``step`` is committed to ``tier`` (or failed); re-raise its error."""
        with self._lock:
            result = self._result_of((step, tier))
        return result.result(timeout=timeout_s)

    def _result_of(self, slot: Slot) -> Future:
        """The outcome of ``slot`` (created on first use; call with the lock held).
        Settling it wakes ranks waiting for a range of it."""
        result = self._results.get(slot)
        if result is None:
            result = self._results[slot] = Future()
            result.add_done_callback(lambda _: self._ranges.wake())
        return result

    def _timeout_loop(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            expired = []
            with self._lock:
                for slot, parts in list(self._parts.items()):
                    first = min(p.arrived for p in parts.values())
                    if now - first > self.options.save_timeout_s:
                        expired.append((slot, self._parts.pop(slot)))
            for (step, tier), parts in expired:
                missing = sorted(set(range(self.options.world_size)) - set(parts))
                first = min(p.arrived for p in parts.values())
                waited = ", ".join(f"rank {r} for {now - first:.1f} s" for r in missing)
                where = " (memory tier)" if tier == "memory" else ""
                self._results[(step, tier)].set_exception(DistributedSaveError(
                    f"step {step}{where} timed out: no part from ranks {missing} (waited {waited}; "
                    f"ranks {sorted(parts)} arrived). Nothing was written for this step."
                ))
                log.error("%s", self._results[(step, tier)].exception())

    # -- retention on a timer ----------------------------------------------------
    def _prune_loop(self) -> None:
        while not self._stop.wait(self.options.prune_interval_s):
            self.prune_now()

    def prune_now(self) -> list[int]:
        if self.manager.retention.is_empty():
            return []
        with self._prune_lock:
            try:
                return list(self.manager.prune().deleted)
            except Exception as exc:  # noqa: BLE001 - keep the timer alive, say why
                log.error("scheduled prune failed: %s", exc)
                return []

    # -- queries -------------------------------------------------------------------
    def steps(self) -> list[int]:
        return self.manager.steps()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_step(self) -> int | None:
        """The newest step worth trying: its manifest reads, its archive has
        the recorded size, and no rank found it corrupt. The archive is not
        read here: the ranks verify it, a share each (:meth:`restore_vote`)."""
        for step in reversed(self.manager.steps()):
            manifest = self._manifest_or_none(step)
            if (step, manifest.attempt if manifest else None) in self._bad:
                continue
            problem = self.manager.quick_check(step, manifest)
            if problem is None:
                return step
            log.warning("%s; falling back to an older checkpoint", problem)
        return None

    def _manifest_or_none(self, step: int):
        try:
            return self.manager.manifest(step)
        except Exception:  # noqa: BLE001 - unreadable or gone: quick_check says why
            return None

    def _attempt(self, step: int) -> tuple[int, str | None]:
        """``step`` and the write attempt its manifest names: a verdict on a
        step never outlives the step (written afresh after a fallback, it is
        another attempt)."""
        manifest = self._manifest_or_none(step)
        return step, manifest.attempt if manifest else None

    def restore_vote(self, step: int, rank: int, problem: str | None, timeout_s: float) -> str | None:
        """Barrier of a distributed restore: every rank's verdict on its share
        of ``step``. None if all agree it is good; else the first problem, and
        the step is never offered again."""
        verdict = self._votes.vote(step, rank, problem, timeout_s)
        if verdict is not None:
            attempt = self._attempt(step)
            if attempt not in self._bad:
                self._bad.add(attempt)
                log.warning("step %d: %s; falling back to an older checkpoint", step, verdict)
        return verdict

    def supersede_after(self, step: int | None, reason: str) -> list[int]:
        """Move steps newer than ``step`` aside (see :mod:`ckptmgr.history`)."""
        self.forget_after(step)
        with self._prune_lock:  # never while a scheduled prune reads the listing
            return self.manager.supersede_after(step, reason)

    def forget_after(self, step: int | None) -> None:
        """Drop outcomes of steps newer than ``step`` (all, for None): a run
        continuing from ``step`` saves them again, and an old outcome (a
        timeout before a node loss, an abandoned commit) must not answer for
        the new save. Rank 0 calls it at train begin."""
        with self._lock:
            for table in (self._results, self._parts):
                for old in [slot for slot in table if step is None or slot[0] > step]:
                    del table[old]
            # A notice and emergency step of an earlier session were acted on then.
            self._emergency, self._notice = None, None

    def options_(self) -> CoordinatorOptions:
        return self.options

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def imports_tensorflow(self) -> bool:
        """True if this process has imported TensorFlow (it should not need to)."""
        import sys

        return "tensorflow" in sys.modules

    def metrics_recorded(self) -> int:
        """How many saves were exported as Ray metrics."""
        return self._metrics.recorded

    def dropped_saves(self) -> dict[str, int]:
        """Steps replaced and skipped so far (also the Ray counters)."""
        return {kind: self._metrics.counts[f"saves_{kind}"] for kind in ("replaced", "skipped")}

    # -- the driver's watch (ckptmgr.ray.watch) ---------------------------------------
    def watch(self, cursor: int) -> dict[str, Any]:
        """Events since ``cursor`` and rank 0's latest progress."""
        return self._events.since(cursor)

    def note(self, kind: str, fields: dict[str, Any]) -> None:
        """An event a rank saw (the restore it applied, an epoch's end)."""
        self._events.add(kind, **fields)

    def note_progress(self, fields: dict[str, Any]) -> None:
        self._events.progress(fields)

    def metric_counts(self) -> dict[str, int]:
        """Every counter exported as a Ray metric (``ray_ckptmgr_*``), so far."""
        return dict(self._metrics.counts)

    def shutdown(self) -> None:
        self._stop.set()
        self._drain.stop()
        self._keeping.flush()
        self._writer.flush()


def _copy_outcome(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def get_or_create(options: CoordinatorOptions, node_id: str | None = None):
    """The run's coordinator actor, created on first use (also after a crash);
    on ``node_id`` when given (e.g. a node that is not preemptible), else on
    the caller's node."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Each rank may block a thread in wait_step and another in range_for.
    concurrency = max(32, 4 * options.world_size + 8)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=concurrency, max_restarts=0)(Coordinator)
    # On the creator's node (the driver, on the head: not a spot worker whose
    # loss would take the coordinator and the emergency checkpoint with it).
    # Hard affinity: Ray 2.60 placed 3 of 4 actors with a *soft* affinity to an
    # alive node with room on other nodes; the creator's own node is alive.
    here = node_id or ray.get_runtime_context().get_node_id()
    return actor_cls.options(
        name=coordinator_name(options.directory),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        runtime_env={"env_vars": {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}},
    ).remote(options)


def shut_down(coordinator, timeout_s: float | None = None) -> None:
    """Stop a coordinator once its write in flight is done, then kill it; one
    lost with its node (or stuck past ``timeout_s``) is only killed."""
    import ray

    try:
        ray.get(coordinator.shutdown.remote(), timeout=timeout_s)
    except ray.exceptions.RayError:
        pass
    ray.kill(coordinator)


def find(directory: str):
    """The run's coordinator if one is alive, else ``None``."""
    import ray

    try:
        return ray.get_actor(coordinator_name(directory), namespace=NAMESPACE)
    except ValueError:
        return None

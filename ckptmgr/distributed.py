"""Worker side of distributed checkpointing: hand state to the run's coordinator.

:class:`CoordinatorClient` has the manager's save/restore surface, so
:class:`ckptmgr.keras.CheckpointCallback` uses it unchanged. A save blocks
training only while the state is copied into reusable host buffers; a
background thread then digests it, puts it in the Ray object store (rank 0
only) and submits this rank's part; the buffers are then free again. The
coordinator decides, for every rank alike, what happens to a complete step
while another one is writing (``on_busy``: newest wins by default, see
:mod:`ckptmgr.coordinator`); the worker never drops a part. Two sets of host
buffers let one be handed over while the next save copies into the other, so
a save waits only for this rank's own previous handover, never for a commit.
``on_busy="wait"`` (one set) waits for the previous commit before the next copy.

Preemption: :func:`install_sigterm_handler` turns SIGTERM into a flag that the
callback checks after every batch; the run then takes an emergency checkpoint
at a step every rank agrees on (through the coordinator) within the grace
period, and stops.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import time
from concurrent.futures import Future
from typing import Any

from collections.abc import Collection

from ckptmgr.coordinator import CoordinatorOptions, find, get_or_create, tier_of
from ckptmgr.replicas import shard_rows, snapshot_digest
from ckptmgr.errors import CorruptCheckpointError, DistributedSaveError
from ckptmgr.ranged_write import write_assigned_range
from ckptmgr.manager import CheckpointManager
from ckptmgr.io.manifest import LoopState, Manifest
from ckptmgr.pipeline import SavePipeline
from ckptmgr.keras_preemption import scalar_logs
from ckptmgr.preemption import clear_preemption, preemption_requested

log = logging.getLogger("ckptmgr")

POLL_INTERVAL_S = 0.2  # how often workers ask the coordinator for an emergency step
EMERGENCY_LEAD_S = 1.0  # how far ahead (in training time) the emergency step is set
PROGRESS_INTERVAL_S = 0.5  # how often rank 0 tells the coordinator its step and loss


class CoordinatorClient:
    """The manager-like face of a run's coordinator, used by one worker."""

    def __init__(self, options: CoordinatorOptions, rank: int, *, grace_period_s: float = 25.0,
                 sharded: Collection[str] = ()):
        self.options = options
        self.rank = rank
        self.sharded = frozenset(sharded)  # dataset paths, e.g. "optimizer/vars/3"
        self.grace_period_s = grace_period_s
        self._reader = CheckpointManager(options.directory, storage_options=options.storage_options)
        self._plan = None
        self._waits_for_commit = options.on_busy == "wait"
        # Replica-parallel persistence: this rank writes its own byte range of
        # every archive (sharded state is gathered and written by the coordinator).
        self._ranged = options.ranged_writes() and not self.sharded
        # Handovers run one at a time, in order, none dropped ("wait" policy);
        # with two buffer sets the next copy overlaps the previous handover.
        self._handovers = SavePipeline("wait", buffer_sets=1 if self._waits_for_commit else 2,
                                       name="ckptmgr-client")
        self._outcomes: list[Future] = []  # of saves not yet waited for, oldest first
        self._emergency_ref = None
        self._resumed_from: int | None = None
        self.restored_tier: str | None = None  # "memory" or "storage" after a restore
        self.restored_node: str | None = None  # the node of the memory copy read
        self._node: str | None = None  # this rank's Ray node (set at prepare)
        self._deadline_ms: int | None = None  # of a drain notice (Unix ms)
        self._handle = None
        self._next_poll = 0.0
        self._next_progress = 0.0
        self._step_clock: tuple[int, float] | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=32)

    @property
    def directory(self) -> str:
        return self.options.directory

    def _actor(self):
        """The coordinator's handle, looked up once (a lookup is an RPC)."""
        if self._handle is None:
            self._handle = find(self.options.directory) or get_or_create(self.options)
        return self._handle

    def _call(self, method: str, *args, timeout: float | None = None):
        import ray

        try:
            return ray.get(getattr(self._actor(), method).remote(*args), timeout=timeout)
        except ray.exceptions.RayActorError:
            # The coordinator died (ray.kill, node loss): a new one carries on.
            log.warning("coordinator died; starting a new one")
            self._handle = get_or_create(self.options)
            return ray.get(getattr(self._handle, method).remote(*args), timeout=timeout)

    # -- what the driver's watch shows (ckptmgr.ray.watch): rank 0, fire and forget --
    def note_progress(self, step: int, logs, *, epoch: int, epochs: int | None,
                      total_steps: int | None, epoch_end: bool = False) -> None:
        """Rank 0's step and loss, at most every ``PROGRESS_INTERVAL_S`` and at each
        epoch's end (``epoch`` counts from 1, as Keras shows it)."""
        now = time.monotonic()
        if self.rank != 0 or (now < self._next_progress and not epoch_end):
            return
        self._next_progress = now + PROGRESS_INTERVAL_S
        loss = scalar_logs({"loss": (logs or {}).get("loss")}).get("loss")
        fields = {"step": step, "epoch": epoch, "epochs": epochs, "total_steps": total_steps, "loss": loss}
        self._tell("note_progress", fields)
        if epoch_end:
            self._tell("note", "epoch", fields)

    def _tell(self, method: str, *args) -> None:
        """Call the coordinator without waiting; showing progress never stops training."""
        try:
            getattr(self._actor(), method).remote(*args)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not tell the coordinator %s: %s", method, exc)

    # -- queries and restore ---------------------------------------------------
    def steps(self) -> list[int]:
        return self._call("steps")

    def latest_step(self) -> int | None:
        return self._call("latest_step")

    def restore_plan(self) -> dict | None:
        """Where a restore would continue: ``{"tier": "memory"|"storage",
        "step", ...}`` of the newest snapshot of either tier, or None. The
        memory tier may hold snapshots newer than storage, or the only ones
        (a run lost before its first persistent save). Pass it to
        :meth:`restore` to restore exactly that without asking again."""
        return self._call("restore_plan")

    def restore(self, model, step: int | None = None, *, plan: dict | None = None) -> Manifest:
        """Every rank restores the same step: the newest one that all ranks,
        each verifying a share of its chunks, agree is good (ranged reads in
        parallel; no process reads the whole archive to verify it). Without
        ``step``, a newer (or equal) snapshot in the memory tier is tried
        first (see :mod:`ckptmgr.ray.memory_restore`), starting from ``plan``
        (a :meth:`restore_plan` the caller just asked for) when given."""
        if step is None:
            manifest, plan = self._restore_from_memory(model, plan or self.restore_plan())
            if manifest is not None:
                return manifest
        rejected: list[int] = []
        while True:
            if step is not None:
                chosen = step
            elif plan is not None:  # the storage step the plan named: no second lookup
                chosen, plan = plan["step"], None
            else:
                chosen = self._call("restore_step")
            if chosen is None:
                raise CorruptCheckpointError(
                    f"No checkpoint under {self.directory} verifies (see the warnings above "
                    "for each step's problem); nothing was restored.")
            problem = self._reader.verify_share(chosen, self.rank, self.options.world_size)
            verdict = self._call("restore_vote", chosen, self.rank, problem, self.options.save_timeout_s)
            if verdict is None:
                break
            if step is not None:
                raise CorruptCheckpointError(f"step {chosen}: {verdict}")
            rejected.append(chosen)
        if rejected and self.rank == 0:
            log.warning("fell back from step %d to step %d, the newest checkpoint every rank "
                        "verified", rejected[0], chosen)
        manifest = self._reader.restore(model, chosen, verified=True)
        self._resumed_from = chosen
        self.restored_tier, self.restored_node = "storage", None
        if self.rank == 0:
            log.info("restored step %d from storage", chosen)
            self._tell("note", "restored", {"step": chosen, "tier": "storage"})
        return manifest

    def _restore_from_memory(self, model, plan: dict | None) -> tuple[Manifest | None, dict | None]:
        """(the newest memory copy every rank verified, applied; None when the
        newest good snapshot is in storage or none is, with the plan that
        said so), starting from ``plan``."""
        from ckptmgr.ray.memory_restore import named_copy, nearest_copy, restore_copy

        if plan is None or plan["tier"] != "memory":
            return None, plan
        while True:  # a copy that fails may be partly loaded: the next candidate overwrites it
            copy = nearest_copy(plan)
            manifest, problem = restore_copy(model, plan, copy, self.options.save_timeout_s)
            verdict = self._call("memory_vote", plan["step"], named_copy(plan)["keeper"], self.rank,
                                 problem, self.options.save_timeout_s, copy["keeper"])
            if verdict is None:
                break
            plan = self.restore_plan()
            if plan is None or plan["tier"] != "memory":
                return None, plan
        self._resumed_from, self.restored_tier = plan["step"], "memory"
        self.restored_node = copy["node"]
        if self.rank == 0:
            log.info("restored step %d from memory on node %s", plan["step"], copy["node"][:12])
            self._tell("note", "restored", {"step": plan["step"], "tier": "memory"})
        return manifest, None

    def supersede_after(self, step: int | None, reason: str) -> list[int]:
        """Rank 0 asks the coordinator (the lease holder) to move steps newer
        than ``step`` aside; the others' first save waits for rank 0's anyway."""
        return self._call("supersede_after", step, reason) if self.rank == 0 else []

    def prepare(self, model) -> None:
        """Plan and allocate host buffers now, so the first save is not slower."""
        from ckptmgr.state import plan_for

        import ray

        self.wait_until_finished()
        if self.rank == 0:  # outcomes of steps this run saves again must not answer for it
            self._call("forget_after", self._resumed_from)
            if self.options.memory_replicas:
                self._call("forget_memory_after", self._resumed_from)
        self._node = ray.get_runtime_context().get_node_id()
        self._call("register_node", self.rank, self._node)
        self._plan = plan_for(model, self._plan)
        self._plan.warm(self._handovers.buffer_sets)

    # -- saving -------------------------------------------------------------------
    def save(self, step: int, model, *, metrics=None, extra=None, loop: LoopState | None = None,
             pin: bool = False, blocking: bool = False, tier: str = "storage"):
        """Copy state to host (blocking), then hand it over in the background.

        Returns a future of the coordinator's outcome for the step: the
        committed manifest, or ``{"replaced": True, "by": newer}`` /
        ``{"skipped": True}`` as the coordinator decided (the same for every
        rank). Raises an earlier save's failure once. ``tier="memory"``: the
        snapshot goes to the run's memory tier, not to storage (outcome
        ``{"memory": True, "nodes": [...]}``).
        """
        if tier == "memory":
            extra = dict(extra or {}, tier="memory", node=self._node)
        if self._waits_for_commit:
            if self._outcomes and not self._outcomes[-1].done():
                log.info("rank %d: waiting for the previous save (on_busy='wait')", self.rank)
            self.wait_until_finished()
        else:
            self._raise_failed()
        outcome = self._copy_and_hand_over(step, model, metrics=metrics, extra=extra, loop=loop)
        return self.wait_until_finished() if blocking else outcome

    def _copy_and_hand_over(self, step: int, model, *, metrics, extra, loop) -> Future:
        """Copy into a free buffer set (waiting for this rank's previous
        handover if both are busy); queue the handover; the outcome's future."""
        from ckptmgr.state import plan_for

        started = time.perf_counter()
        ticket = self._handovers.admit(step, may_drop=False)
        try:
            self._plan = plan_for(model, self._plan)
            snapshot = self._plan.capture(reuse_buffers=True, buffer_set=ticket.buffer_set)
        except BaseException:
            self._handovers.cancel(ticket)
            raise
        blocked_s = time.perf_counter() - started
        meta = dict(metrics=metrics or {}, extra=extra or {},
                    loop=loop.model_dump() if loop is not None else None)
        outcome: Future = Future()
        handed = self._handovers.submit(
            step, lambda: self._hand_over(step, snapshot, blocked_s, meta, outcome),
            ticket=ticket, report=False,
        )
        handed.add_done_callback(lambda f: f.exception() is None or outcome.set_exception(f.exception()))
        self._outcomes.append(outcome)
        return outcome

    def _hand_over(self, step: int, snapshot, blocked_s: float, meta: dict, outcome: Future) -> None:
        """Digest, put (rank 0: the snapshot, or only its spec when ranks write
        ranges) and submit this rank's part; when ranged, write this rank's
        range once the coordinator hands it out. The snapshot's buffers are
        free once this returns. ``outcome`` settles at the commit."""
        import ray

        digest = snapshot_digest(snapshot, exclude=self.sharded)
        tier = tier_of(meta["extra"])
        ranged = self._ranged and tier == "storage"  # keepers need it all
        refs = [ray.put(snapshot.spec() if ranged else snapshot)] if self.rank == 0 else []
        shard_ref = [ray.put(self._owned_rows(snapshot))] if self.sharded else []
        self._call("submit_part", step, self.rank, digest, refs, blocked_s,
                   meta["metrics"], meta["extra"], meta["loop"], shard_ref, ranged)
        timeout = self.options.save_timeout_s + 600.0
        ref = self._actor().wait_step.remote(step, timeout, tier)
        ref.future().add_done_callback(lambda done: self._settle(step, blocked_s, done, outcome))
        if ranged:
            self._write_my_range(step, snapshot)

    def _write_my_range(self, step: int, snapshot) -> None:
        """Write this rank's byte range of ``step``'s archive, straight to storage."""
        wait_s = 2 * self.options.save_timeout_s + 60.0  # the steps queued before ours write first
        assignment = self._call("range_for", step, self.rank, wait_s)
        if assignment is None:
            return  # replaced, skipped or failed (the outcome says), or nothing for this rank
        try:
            result = write_assigned_range(self._reader.storage, snapshot, assignment)
        except Exception as exc:  # noqa: BLE001 - the coordinator fails the step; its outcome says why
            log.error("rank %d: writing range %d of step %d failed: %s", self.rank, assignment.index, step, exc)
            self._call("range_failed", step, self.rank, f"{type(exc).__name__}: {exc}"[:500])
            return
        self._call("range_done", step, self.rank, result)

    def _settle(self, step: int, blocked_s: float, done: Future, outcome: Future) -> None:
        """The coordinator's outcome for ``step`` into ``outcome``, logged."""
        import ray

        try:
            result = done.result()
        except ray.exceptions.RayActorError as exc:
            self._handle = None  # the next save goes to a new coordinator
            outcome.set_exception(DistributedSaveError(
                f"step {step}: the coordinator died before committing it ({type(exc).__name__}); "
                "nothing partial is listed, and the next save goes to a new coordinator."))
            return
        except BaseException as exc:  # noqa: BLE001 - the save's own error
            outcome.set_exception(exc)
            return
        if self.rank == 0 and result.get("memory") is False:
            log.warning("step %d not kept in memory: %s", step, result.get("error"))
        if self.rank == 0 and "manifest" in result:
            stats = result["manifest"]["stats"]
            log.info("saved step %d: %d bytes, blocked %.3fs, write %.3fs, %.1f MB/s",
                     step, stats["bytes"], blocked_s, stats["write_s"], stats["mb_per_s"])
        outcome.set_result(result)

    def _owned_rows(self, snapshot) -> dict[str, tuple[int, int, Any]]:
        """This rank's rows of every sharded dataset: {path: (start, stop, rows)}."""
        owned = {}
        for group in snapshot.groups:
            for key, array in group.arrays:
                path = f"{group.path}/{key}"
                if path in self.sharded:
                    start, stop = shard_rows(array.shape[0], self.rank, self.options.world_size)
                    owned[path] = (start, stop, array[start:stop])
        missing = self.sharded - set(owned)
        if missing:
            raise DistributedSaveError(
                f"Sharded dataset(s) {sorted(missing)} are not in this model's state; "
                "name them as in model.weights.h5, e.g. 'layers/dense/vars/0'."
            )
        return owned

    def _raise_failed(self) -> None:
        """Raise the first failure among finished saves, once."""
        done = [f for f in self._outcomes if f.done()]
        self._outcomes = [f for f in self._outcomes if not f.done()]
        for future in done:
            if future.exception() is not None:
                raise future.exception()

    def wait_until_finished(self, timeout_s: float | None = None) -> dict | None:
        """Wait for the outcome of every save so far (``TimeoutError`` after
        ``timeout_s``); the newest one's, or the first failure, once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = list(self._outcomes)
        for future in waiting:  # the coordinator settles steps in order
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            future.exception(timeout=left)
        self._outcomes = [f for f in self._outcomes if f not in waiting]
        for future in waiting:
            if future.exception() is not None:
                raise future.exception()
        return waiting[-1].result() if waiting else None

    # -- preemption -------------------------------------------------------------------
    def emergency_step(self, current_step: int) -> int | None:
        """The agreed emergency step, if any rank was preempted.

        Called after every batch, it asks the coordinator at most every
        ``POLL_INTERVAL_S`` (a time check otherwise), so fast steps pay ~1 µs.
        The preempted rank picks a step far enough ahead that every rank hears
        of it first: two polls' worth of steps, plus two.
        """
        import ray

        now = time.monotonic()
        self._track_step_time(current_step, now)
        if preemption_requested():
            clear_preemption()
            return self._call("request_emergency", current_step, self._emergency_margin())
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_INTERVAL_S
        if self._emergency_ref is None:
            self._emergency_ref = self._actor().notice.remote()
            return None
        ready, _ = ray.wait([self._emergency_ref], timeout=0)
        if not ready:
            return None
        self._emergency_ref = None
        try:
            notice = ray.get(ready[0])
        except ray.exceptions.RayActorError:
            self._handle = None  # a new coordinator carries on; ask it next time
            return None
        if notice["step"] is None and notice["drain"] is not None:
            # Ray is draining a node of the run: agree on a step, as after SIGTERM.
            self._deadline_ms = notice["drain"]["deadline_ms"] or None
            return self._call("request_emergency", current_step, self._emergency_margin())
        return notice["step"]

    def _track_step_time(self, step: int, now: float) -> None:
        if self._step_clock is not None and step > self._step_clock[0]:
            self._step_times.append((now - self._step_clock[1]) / (step - self._step_clock[0]))
        self._step_clock = (step, now)

    def _emergency_margin(self) -> int:
        """Steps until the emergency save: EMERGENCY_LEAD_S of training, so that
        every rank has polled (every POLL_INTERVAL_S) before reaching it. The
        median step time ignores pauses such as saves; all ranks must save at
        the same step (collective ops under MultiWorkerMirroredStrategy)."""
        step_s = statistics.median(self._step_times) if self._step_times else 1e-3
        return 2 + int(math.ceil(EMERGENCY_LEAD_S / max(step_s, 1e-4)))

    def emergency_save(self, step: int, model, *, loop: LoopState, metrics=None) -> bool:
        """Save ``step`` and wait for its commit, at most the grace period.

        The coordinator never replaces an emergency step (``extra.emergency``):
        it is written right after the step writing now, if any. Only under
        ``on_busy="wait"`` is the previous commit waited for first.
        """
        started = time.monotonic()
        deadline = started + self._seconds_to_deadline()
        memory = bool(self.options.memory_replicas)
        extra = {"emergency": True, **({"tier": "memory", "node": self._node} if memory else {})}
        try:
            if self._waits_for_commit and not memory:
                self.wait_until_finished(timeout_s=max(0.0, deadline - time.monotonic()))
            outcome = self._copy_and_hand_over(step, model, metrics=metrics, loop=loop, extra=extra)
            result = outcome.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - abandoned: nothing partial is listed; say why
            log.error("emergency checkpoint of step %d abandoned after %.1f s: %s", step,
                      time.monotonic() - started, exc)
            return False
        reached = "memory" if result.get("memory") else "storage" if "manifest" in result else None
        if self.rank == 0 and reached:
            log.warning("emergency checkpoint of step %d reached %s in %.1f s%s", step, reached,
                        time.monotonic() - started,
                        "; the coordinator persists it to storage in the background" if reached == "memory" else "")
        return reached is not None

    def note_deadline(self, deadline_ms: int | None) -> None:
        """A notice's deadline (Unix ms) for the next emergency save (Ray Train's)."""
        self._deadline_ms = deadline_ms or None

    def _seconds_to_deadline(self) -> float:
        """The grace period, or less when Ray's drain notice names an earlier
        deadline (minus a second to stop cleanly)."""
        if self._deadline_ms:
            return max(0.5, min(self.grace_period_s, self._deadline_ms / 1000.0 - time.time() - 1.0))
        return self.grace_period_s

    def close(self) -> None:
        """Wait for every save's outcome (the handover thread ends by itself)."""
        self.wait_until_finished()

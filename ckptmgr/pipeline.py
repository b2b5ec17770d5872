"""The save pipeline: one write at a time, and what a save does while one runs.

Used by the manager (jobs write archives), the distributed client (jobs hand a
snapshot over to the coordinator) and the coordinator (jobs write the archive
of a complete step). A job runs on a background thread; jobs run one at a
time, in the order they were queued. What a save does while the writer is
busy is the ``on_busy`` policy:

- ``"newest"`` (default): never wait on the writer. A save copies into a free
  set of host buffers and queues as *pending*; a newer save replaces a pending
  one that has not started (its future resolves as replaced). With two buffer
  sets (one being written, one pending) ``fit()`` blocks only for the copy,
  at the cost of twice the host state in the worst case.
- ``"wait"``: wait until a buffer set is free (with one set: until the
  previous job has finished), then queue. Every save is written.
- ``"skip"``: drop the save while the writer is busy.

An older step is never written after a newer one: under ``"newest"`` a save
whose step is older than one queued or running is replaced at once. *Sticky*
jobs (blocking and emergency saves) are never replaced.

Every replaced or skipped save is logged once, with the last measured write
time and the smallest ``save_freq`` that would keep up, and counted until the
next write takes the counts into its manifest (:meth:`take_counts`).
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptmgr.errors import ConfigError

log = logging.getLogger("ckptmgr")

BusyPolicy = Literal["newest", "wait", "skip"]
BUSY_POLICIES: tuple[str, ...] = ("newest", "wait", "skip")


def check_policy(on_busy: Any) -> BusyPolicy:
    if on_busy not in BUSY_POLICIES:
        raise ConfigError(
            f"Invalid on_busy: Received: on_busy={on_busy!r}. Use 'newest' (default: never "
            "wait on the writer, the newest pending save wins), 'wait' or 'skip'."
        )
    return on_busy


@dataclass(frozen=True)
class Ticket:
    """A save admitted by :meth:`SavePipeline.admit`: which buffer set to copy into."""

    step: int
    buffer_set: int


@dataclass
class _Job:
    step: int
    run: Callable[[], Any]
    future: Future
    buffer_set: int | None
    sticky: bool
    report: bool  # keep its error for the next admit / wait_until_finished
    replaced: Callable[[int], Any]
    started: float = 0.0


@dataclass
class _Pace:
    """Seconds per training step, from the steps and times saves arrive at."""

    last: tuple[int, float] | None = None
    per_step: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16))

    def note(self, step: int, now: float) -> None:
        if self.last is not None and step > self.last[0]:
            self.per_step.append((now - self.last[1]) / (step - self.last[0]))
        self.last = (step, now)

    def step_s(self) -> float | None:
        return statistics.median(self.per_step) if self.per_step else None


class SavePipeline:
    """Queue of save jobs for one writer thread, under an ``on_busy`` policy.

    Args:
        on_busy: ``"newest"``, ``"wait"`` or ``"skip"`` (see the module).
        buffer_sets: how many sets of host buffers callers of :meth:`admit`
            copy into; a set is never handed out while a queued or running
            job holds it.
        name: the writer thread's name.
        on_drop: called with ``"replaced"`` or ``"skipped"`` and the logged line
            for every dropped save (the coordinator counts them as Ray metrics
            and shows them on the driver).
    """

    def __init__(self, on_busy: BusyPolicy, *, buffer_sets: int = 1, name: str = "ckptmgr-writer",
                 on_drop: Callable[[str, str], None] | None = None):
        self.on_busy = check_policy(on_busy)
        self.buffer_sets = buffer_sets
        self._name = name
        self._on_drop = on_drop or (lambda kind, line: None)
        self._cond = threading.Condition()
        self._running: _Job | None = None
        self._pending: list[_Job] = []
        self._reserved: set[int] = set()
        self._thread: threading.Thread | None = None
        self._last: Future | None = None  # the newest job, for wait_until_finished
        self._error: BaseException | None = None
        self._counts = {"replaced": 0, "skipped": 0}
        self._pace = _Pace()
        self.last_write_s: float | None = None

    # -- admitting and queueing -------------------------------------------------
    def admit(self, step: int, *, may_drop: bool = True) -> Ticket | None:
        """Reserve a free buffer set for a save of ``step`` (blocks per policy).

        Returns ``None`` when the save is skipped (``"skip"`` and busy, and
        ``may_drop``). Under ``"newest"`` with no free set, the pending save
        is replaced now and its set handed out. Raises an earlier save's error
        that nobody was told of yet.
        """
        with self._cond:
            self._raise_error()
            self._pace.note(step, time.monotonic())
            waited = False
            while True:
                free = self._free_set()
                if free is not None:
                    self._reserved.add(free)
                    return Ticket(step, free)
                if self.on_busy == "skip" and may_drop:
                    self._drop_locked(step, "skipped", None)
                    return None
                victim = self._replaceable() if self.on_busy == "newest" else None
                if victim is not None:
                    self._pending.remove(victim)
                    self._drop_locked(victim.step, "replaced", step, victim)
                    self._reserved.add(victim.buffer_set)
                    return Ticket(step, victim.buffer_set)
                if not waited:
                    log.info("step %d: previous save still writing; waiting (on_busy=%r)",
                             step, self.on_busy)
                    waited = True
                self._cond.wait()

    def cancel(self, ticket: Ticket) -> None:
        """Give back an admitted buffer set (the copy failed)."""
        with self._cond:
            self._reserved.discard(ticket.buffer_set)
            self._cond.notify_all()

    def submit(self, step: int, run: Callable[[], Any], *, ticket: Ticket | None = None,
               sticky: bool = False, may_drop: bool = False, report: bool = True,
               replaced: Callable[[int], Any] = lambda by: None,
               skipped: Callable[[], Any] = lambda: None) -> Future:
        """Queue ``run`` (the write of ``step``); a future of its result.

        A dropped save's future resolves with ``replaced(newer_step)`` or
        ``skipped()``, never with an error. ``ticket``: from :meth:`admit`
        (then its buffer set is held until the job ends). Without one
        (the coordinator), ``"skip"`` drops the job while busy if ``may_drop``.
        """
        job = _Job(step, run, Future(), ticket.buffer_set if ticket else None, sticky, report, replaced)
        with self._cond:
            if ticket is None:
                self._pace.note(step, time.monotonic())
            else:
                self._reserved.discard(ticket.buffer_set)
            if self.on_busy == "skip" and may_drop and not sticky and self._busy():
                self._drop_locked(step, "skipped", None)
                job.future.set_result(skipped())
                return job.future
            if self.on_busy == "newest":
                newer = self._newest_queued()
                if not sticky and newer is not None and newer > step:  # never older after newer
                    self._drop_locked(step, "replaced", newer)
                    job.future.set_result(replaced(newer))
                    return job.future
                for victim in [j for j in self._pending if not j.sticky]:
                    self._pending.remove(victim)
                    self._drop_locked(victim.step, "replaced", step, victim)
            self._pending.append(job)
            self._last = job.future
            if self._thread is None:  # idle: the job starts now, nothing can replace it
                first = self._next_locked()
                self._thread = threading.Thread(target=self._drain, args=(first,), name=self._name)
                self._thread.start()
        return job.future

    # -- waiting ------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued job has run (``TimeoutError`` after ``timeout_s``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._busy():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"saves still writing after {timeout_s:.1f} s")
                self._cond.wait(left)

    def wait_until_finished(self, timeout_s: float | None = None) -> Any:
        """Run every queued save (pending ones included); the newest's result.

        Raises an earlier save's error once; ``None`` when nothing was saved
        since the last call.
        """
        self.flush(timeout_s)
        with self._cond:
            last, self._last = self._last, None
            self._raise_error()
        return last.result() if last is not None and not last.exception() else None

    def take_counts(self) -> dict[str, int]:
        """Saves replaced or skipped since the last call (for the next manifest)."""
        with self._cond:
            counts, self._counts = self._counts, {"replaced": 0, "skipped": 0}
            return counts

    def give_back_counts(self, counts: dict[str, int]) -> None:
        """A write that took the counts failed: the next one records them."""
        with self._cond:
            for kind, n in counts.items():
                self._counts[kind] += n

    # -- internals ------------------------------------------------------------------
    def _busy(self) -> bool:
        return self._running is not None or bool(self._pending)

    def _held_sets(self) -> set[int]:
        jobs = ([self._running] if self._running else []) + self._pending
        return {j.buffer_set for j in jobs if j.buffer_set is not None} | self._reserved

    def _free_set(self) -> int | None:
        held = self._held_sets()
        return next((s for s in range(self.buffer_sets) if s not in held), None)

    def _replaceable(self) -> _Job | None:
        """The newest pending job whose buffer set a newer save may take."""
        found = [j for j in self._pending if not j.sticky and j.buffer_set is not None]
        return found[-1] if found else None

    def _newest_queued(self) -> int | None:
        jobs = ([self._running] if self._running else []) + self._pending
        return max((j.step for j in jobs), default=None)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _drop_locked(self, step: int, kind: str, by: int | None, job: _Job | None = None) -> None:
        """Count and log one dropped save; resolve its future if it was queued."""
        self._counts[kind] += 1
        writing = self._running.step if self._running else None
        if kind == "replaced":
            what = f"step {step} replaced by step {by} before it was written (on_busy='newest')"
        else:
            what = f"skipping the save of step {step} (on_busy='skip')"
        line = f"{what}: {self._keep_up_hint(writing)}"
        log.warning("%s", line)
        if job is not None:
            job.future.set_result(job.replaced(by))
        self._on_drop(kind, line)

    def _keep_up_hint(self, writing: int | None) -> str:
        """The measured write time and the smallest save_freq that keeps up."""
        busy = f"step {writing} still writing" if writing is not None else "the writer is busy"
        write_s, at_least = self.last_write_s, ""
        if write_s is None and self._running is not None:  # no write finished yet
            write_s, at_least = time.monotonic() - self._running.started, "at least "
        step_s = self._pace.step_s()
        if write_s is None or step_s is None or step_s <= 0:
            return f"{busy}; no write time measured yet"
        keep_up = max(1, math.ceil(write_s / step_s))
        return (f"{busy}; a write takes {at_least}{write_s:.2f} s, a step {step_s * 1e3:.1f} ms: "
                f"save_freq >= {keep_up} would keep up")

    def _next_locked(self) -> _Job | None:
        """Take the oldest queued job as the running one."""
        job = self._pending.pop(0) if self._pending else None
        if job is not None:
            job.started = time.monotonic()
        self._running = job
        return job

    def _drain(self, job: _Job | None) -> None:
        """The writer thread: run ``job``, then queued jobs in order, until none is left."""
        while job is not None:
            error = None
            try:
                value = job.run()
            except BaseException as exc:  # noqa: BLE001 - handed to the job's future
                error = exc
            with self._cond:
                self.last_write_s = time.monotonic() - job.started
                if error is not None and job.report and self._error is None:
                    self._error = error
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)
            with self._cond:
                job = self._next_locked()
                if job is None:
                    self._thread = None
                self._cond.notify_all()

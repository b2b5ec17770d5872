"""Replica-parallel persistence: N data-parallel ranks write one ``.keras`` archive.

Every rank holds the same replicated state, so each can write any byte of
the archive. The coordinator plans the archive from a spec (shapes and
dtypes, no array data: :meth:`ModelSnapshot.spec`), cuts ``[0, prefix_end)``
into one contiguous range per rank, aligned to checksum chunks
(:func:`ckptmgr.io.archive_plan.split_ranges`), and hands out a
:class:`RangeAssignment` each. Each rank plans the same archive from its own
arrays (the plans' fingerprints must match), writes its range straight to
storage (:meth:`Storage.open_range_writer`) and reports a
:class:`RangeResult`: the CRC32 of the weights bytes in its range, and the
CRC32Cs of its chunks. The coordinator (:func:`assemble`) combines the CRC32s
into the weights member's, writes the tail (a few KB), continues the last
chunk's CRC32C over it and assembles the archive server-side. It never holds
more than the tail. The result is byte-identical to a single writer's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ckptmgr.errors import DistributedSaveError
from ckptmgr.io.archive_plan import ArchivePlan, planned_archive, write_range
from ckptmgr.io.checksums import ChunkedCrc32c, crc32_combine
from ckptmgr.io.snapshot import ModelSnapshot


@dataclass(frozen=True)
class RangeAssignment:
    """What one rank writes: bytes ``[start, end)`` of archive ``name``."""

    step: int
    name: str
    index: int
    start: int
    end: int
    fingerprint: str  # of the coordinator's plan; the rank's must be equal
    chunk_bytes: int
    # Rank 0's small members: another rank's own would differ at least in the
    # save time in metadata.json (ranks capture a moment apart).
    config_json: str = ""
    metadata_json: str = ""
    assets: dict[str, bytes] = field(default_factory=dict)

    def applied_to(self, snapshot: ModelSnapshot) -> ModelSnapshot:
        """This rank's arrays with rank 0's small members: the archive planned."""
        return ModelSnapshot(self.config_json, self.metadata_json, snapshot.groups, dict(self.assets))


@dataclass(frozen=True)
class RangeResult:
    """What one rank wrote: checksums the coordinator combines."""

    index: int
    bytes: int
    weights_crc: int  # CRC32 of the weights member's bytes within the range
    weights_bytes: int
    chunk_crcs: tuple[int, ...]  # CRC32C of each complete chunk
    partial_crc: int  # CRC32C of a trailing partial chunk (the last range only)
    partial_bytes: int


def write_assigned_range(storage, snapshot: ModelSnapshot, assignment: RangeAssignment,
                         scratch_dir: str | None = None) -> RangeResult:
    """Rank side: plan from our own arrays, check it is the coordinator's plan,
    write our range to storage. Runs in the rank's background thread."""
    snapshot = assignment.applied_to(snapshot)
    with planned_archive(snapshot, scratch_dir) as plan:
        if plan.fingerprint() != assignment.fingerprint:
            raise DistributedSaveError(
                f"step {assignment.step}: range {assignment.index} refused: this rank plans "
                "another archive than the coordinator (a different Keras/h5py version, or "
                "state that is not replicated); nothing was written."
            )
        start, end = assignment.start, assignment.end
        with storage.open_range_writer(assignment.name, assignment.index, start) as writer:
            weights_crc = write_range(writer, plan, snapshot, start, end)
        if writer.chunk_bytes != assignment.chunk_bytes:
            raise DistributedSaveError(
                f"step {assignment.step}: chunk size {writer.chunk_bytes} differs from the "
                f"coordinator's {assignment.chunk_bytes}; upgrade every node to one ckptmgr.")
        complete, partial, filled = writer.chunk_state()
        weights_bytes = max(end, plan.weights_start) - max(start, plan.weights_start)
        return RangeResult(assignment.index, writer.bytes_written, weights_crc, weights_bytes,
                           tuple(complete), partial, filled)


def assemble(storage, name: str, plan: ArchivePlan, results: list[RangeResult],
             chunk_bytes: int, assignments: list[RangeAssignment]) -> tuple[int, list[str]]:
    """Coordinator side: the tail, the archive, and its chunk CRC32Cs.

    Returns (archive size, chunk CRC32Cs as hex). Raises if a range is missing
    or does not have the length planned.
    """
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(results))):
        raise DistributedSaveError(f"{name}: ranges {[r.index for r in results]} arrived; some are missing")
    short = [r.index for r, a in zip(results, assignments) if r.bytes != a.end - a.start]
    if short or sum(r.bytes for r in results) != plan.prefix_end or any(r.partial_bytes for r in results[:-1]):
        raise DistributedSaveError(f"{name}: the ranges written do not cover the archive as planned"
                                   + (f" (ranges {short} have another length)" if short else ""))
    weights_crc = 0
    for result in results:
        weights_crc = crc32_combine(weights_crc, result.weights_crc, result.weights_bytes)
    tail = plan.tail(weights_crc)
    complete = [c for r in results for c in r.chunk_crcs]
    chunks = ChunkedCrc32c.resumed(complete, results[-1].partial_crc, results[-1].partial_bytes, chunk_bytes)
    chunks.update(tail)
    storage.finish_parallel(name, len(results), plan.prefix_end, tail)
    return plan.prefix_end + len(tail), chunks.finish()


@dataclass
class _Round:
    assignments: dict[int, RangeAssignment]
    results: dict[int, RangeResult] = field(default_factory=dict)
    failure: tuple[int, str] | None = None


class RangeRounds:
    """Coordinator side: hands each rank its range of a step and collects
    what they wrote. Range ``i`` goes to rank ``i``; ranks beyond the number
    of ranges (small archives, S3's 5 MiB minimum part) have nothing to write."""

    def __init__(self):
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}

    def dispatch(self, step: int, assignments: list[RangeAssignment], timeout_s: float) -> list[RangeResult]:
        """Publish ``assignments`` and wait for every result (the writer thread)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            round_ = self._rounds[step] = _Round({a.index: a for a in assignments})
            self._cond.notify_all()
            try:
                while len(round_.results) < len(assignments) and round_.failure is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                del self._rounds[step]
        if round_.failure is not None:
            rank, message = round_.failure
            raise DistributedSaveError(f"step {step}: rank {rank} could not write its range "
                                       f"({message}); nothing was committed.")
        missing = sorted(set(round_.assignments) - set(round_.results))
        if missing:
            raise DistributedSaveError(
                f"step {step}: ranks {missing} did not write their ranges within "
                f"{timeout_s:.0f} s (save_timeout_s); nothing was committed.")
        return [round_.results[i] for i in sorted(round_.results)]

    def assignment_for(self, step: int, rank: int, timeout_s: float,
                       settled: Callable[[], bool]) -> RangeAssignment | None:
        """Rank ``rank``'s range of ``step`` once the coordinator starts writing
        it; None if the step settled otherwise (replaced, skipped, failed), if
        this rank has no range, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                round_ = self._rounds.get(step)
                if round_ is not None:
                    return round_.assignments.get(rank)
                left = deadline - time.monotonic()
                if settled() or left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))

    def done(self, step: int, rank: int, result: RangeResult) -> None:
        with self._cond:
            if step in self._rounds:
                self._rounds[step].results[rank] = result
                self._cond.notify_all()

    def failed(self, step: int, rank: int, message: str) -> None:
        with self._cond:
            if step in self._rounds and self._rounds[step].failure is None:
                self._rounds[step].failure = (rank, message)
                self._cond.notify_all()

    def wake(self) -> None:
        """A step settled: ranks waiting for its range look again."""
        with self._cond:
            self._cond.notify_all()

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

from dataclasses import dataclass

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
             chunk_bytes: int) -> tuple[int, list[str]]:
    """Coordinator side: the tail, the archive, and its chunk CRC32Cs.

    Returns (archive size, chunk CRC32Cs as hex). Raises if a range is missing
    or does not have the length planned.
    """
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(results))):
        raise DistributedSaveError(f"{name}: ranges {[r.index for r in results]} arrived; some are missing")
    if sum(r.bytes for r in results) != plan.prefix_end or any(r.partial_bytes for r in results[:-1]):
        raise DistributedSaveError(f"{name}: the ranges written do not cover the archive as planned")
    weights_crc = 0
    for result in results:
        weights_crc = crc32_combine(weights_crc, result.weights_crc, result.weights_bytes)
    tail = plan.tail(weights_crc)
    complete = [c for r in results for c in r.chunk_crcs]
    chunks = ChunkedCrc32c.resumed(complete, results[-1].partial_crc, results[-1].partial_bytes, chunk_bytes)
    chunks.update(tail)
    storage.finish_parallel(name, len(results), plan.prefix_end, tail)
    return plan.prefix_end + len(tail), chunks.finish()

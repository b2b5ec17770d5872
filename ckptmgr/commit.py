"""One checkpoint written under the commit protocol (see ``ckptmgr.io.storage``).

Runs wherever the snapshot is (a worker's writer thread or the coordinator);
needs no TensorFlow. The archive goes under a fresh attempt name, the sealed
manifest is created only if absent, under the writer's lease. When the create
finds a manifest there, reading it back tells a lost response (ours) from
another writer's commit (theirs is kept, ours removed, a warning says so).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ckptmgr import faults
from ckptmgr.errors import CheckpointExistsError, CheckpointNotFoundError, CkptmgrError, CorruptCheckpointError
from ckptmgr.io import checksums
from ckptmgr.io.archive_plan import planned_archive, split_ranges, write_keras_archive
from ckptmgr.io.checksums import Algorithm, check_algorithm
from ckptmgr.io.parts import MIN_PART_BYTES
from ckptmgr.io.snapshot import ModelSnapshot
from ckptmgr.ranged_write import RangeAssignment, RangeResult, assemble
from ckptmgr.io.layout import archive_name, new_attempt_id
from ckptmgr.io.lease import WriterLease
from ckptmgr.io.manifest import FileEntry, LoopState, Manifest, SaveStats, WriterInfo, now_utc
from ckptmgr.io.storage import Storage

log = logging.getLogger("ckptmgr")


class Committer:
    """Writes checkpoints of one directory as the holder of its lease."""

    def __init__(self, storage: Storage, lease: WriterLease, manifest: Callable[[int], Manifest],
                 algorithm: Algorithm = "crc32c"):
        self._storage = storage
        self._lease = lease
        self._manifest = manifest
        self._algorithm = check_algorithm(algorithm)

    def write(self, step: int, snapshot: ModelSnapshot, **meta: Any) -> tuple[Manifest, bool]:
        """Commit ``snapshot`` as ``step``, streamed by this process: (the
        step's manifest, whether it is ours). ``meta``: see :meth:`_write`.

        Raises ``WriterFencedError`` once another process claimed the directory.
        """
        def stream(name: str) -> tuple[FileEntry, dict]:
            with self._storage.open_archive_writer(name, self._algorithm) as writer:
                write_keras_archive(writer, snapshot, scratch_dir=self._storage.scratch_dir())
            crcs, sha256 = writer.result()
            return FileEntry(bytes=writer.bytes_written, crc32c=crcs, chunk_bytes=writer.chunk_bytes,
                             sha256=sha256), {}

        return self._write(step, stream, _keras_version(snapshot), **meta)

    def write_ranges(self, step: int, spec: ModelSnapshot, writers: int,
                     dispatch: Callable[[list[RangeAssignment]], list[RangeResult]],
                     **meta: Any) -> tuple[Manifest, bool]:
        """Commit ``step`` written by up to ``writers`` ranks, a byte range each
        (see :mod:`ckptmgr.ranged_write`). ``spec``: the snapshot's layout
        (:meth:`ModelSnapshot.spec`); ``dispatch`` hands the assignments to the
        ranks and returns their results (or raises). Chunk CRC32Cs only: a
        sha256 of the whole cannot be combined from ranges.
        """
        kind = self._storage.parallel_kind()
        if kind is None or self._algorithm != "crc32c":
            raise ValueError(f"{self._storage.url}: no ranged writes here (backend or checksum={self._algorithm!r})")

        def stream(name: str) -> tuple[FileEntry, dict]:
            chunk = checksums.CHUNK_BYTES
            with planned_archive(spec) as plan:
                ranges = split_ranges(plan, writers, align=chunk, min_bytes=MIN_PART_BYTES[kind])
                fingerprint = plan.fingerprint()
                assignments = [RangeAssignment(step, name, i, a, b, fingerprint, chunk, spec.config_json,
                                               spec.metadata_json, dict(spec.assets))
                               for i, (a, b) in enumerate(ranges)]
                self._storage.begin_parallel(name, plan.total)
                try:
                    size, crcs = assemble(self._storage, name, plan, dispatch(assignments), chunk, assignments)
                except BaseException:
                    self._storage.abandon_parallel(name, len(ranges))
                    raise
            return FileEntry(bytes=size, crc32c=crcs, chunk_bytes=chunk), {"ranges": len(ranges)}

        return self._write(step, stream, _keras_version(spec), **meta)

    def _write(
        self,
        step: int,
        stream: Callable[[str], tuple[FileEntry, dict]],
        keras_version: str,
        *,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        loop: LoopState | None = None,
        blocked_s: float = 0.0,
        world: dict[str, Any] | None = None,
        counts: dict[str, int] | None = None,
    ) -> tuple[Manifest, bool]:
        """Claim, stream the archive under a fresh attempt name, commit the manifest.

        ``stream(name)`` writes the archive: (its file entry, facts for ``world``).

        ``counts``: saves replaced or skipped since the previous write (stats).
        """
        lease = self._lease.ensure(f"saving step {step}")
        existing = self._committed_before(step, lease.token, (world or {}).get("digest"))
        if existing is not None:
            return existing, False
        started = time.perf_counter()
        attempt = new_attempt_id()
        name = archive_name(step, attempt)
        entry, written_by = stream(name)
        write_s = time.perf_counter() - started
        size = entry.bytes
        manifest = Manifest(
            step=step,
            created=now_utc(),
            keras_version=keras_version,
            archive=name,
            attempt=attempt,
            writer=WriterInfo(token=lease.token, owner=lease.owner),
            files={name: entry},
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            extra=dict(extra or {}),
            loop=loop,
            stats=SaveStats(
                bytes=size,
                blocked_s=round(blocked_s, 6),
                write_s=round(write_s, 6),
                mb_per_s=round(size / 1e6 / write_s, 3) if write_s > 0 else 0.0,
                **(counts or {}),
            ),
            world={**(world or {}), **written_by},
        ).sealed()
        faults.crash_point("before_manifest")
        self._lease.check(f"committing step {step}")
        committed = self._commit(manifest)
        return committed, committed is manifest

    def _commit(self, manifest: Manifest) -> Manifest:
        """Create the manifest; a lost response is resolved by reading it back.

        Returns ``manifest`` when ours is committed, or the other writer's
        manifest when another attempt committed the step first (ours is then
        removed again).
        """
        step = manifest.step
        try:
            self._storage.write_manifest(step, manifest.to_bytes())
            return manifest
        except CheckpointExistsError:
            pass
        try:
            there = self._manifest(step)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            raise CheckpointExistsError(
                f"Checkpoint step {step} exists under {self._storage.url} but cannot be read "
                f"({exc}); delete it (ckptmgr prune or by hand) to save this step again."
            ) from None
        if there.attempt == manifest.attempt:
            log.info("step %d: the commit's response was lost; read back, it is ours", step)
            return manifest
        self._discard_attempt(manifest.archive)
        return self._other_writers_step(there)

    def _committed_before(self, step: int, token: int, digest: str | None) -> Manifest | None:
        """The manifest of ``step`` if an earlier writer committed it, or if we
        did with the same state (``world["digest"]``: an emergency step the
        coordinator persisted from memory, then saved again by the ranks),
        else None. Our own lease saving another state of a step raises."""
        try:  # the common case, nothing there, costs one failed read
            there = self._manifest(step)
        except CheckpointNotFoundError:
            return None
        except CorruptCheckpointError:
            there = None
        if there is not None and (there.writer is None or there.writer.token != token):
            return self._other_writers_step(there)
        if there is not None and digest is not None and (there.world or {}).get("digest") == digest:
            log.info("step %d: this state is already committed; not written again", step)
            return there
        raise CheckpointExistsError(
            f"Checkpoint step {step} already exists under {self._storage.url}; "
            "steps are never overwritten. Delete it first or use a new step."
        )

    def _other_writers_step(self, there: Manifest) -> Manifest:
        who = f"lease {there.writer.token} ({there.writer.owner})" if there.writer else "an earlier run"
        log.warning(
            "step %d was already committed by %s under %s; keeping that "
            "checkpoint, this save of the step is dropped", there.step, who, self._storage.url,
        )
        return there

    def _discard_attempt(self, name: str) -> None:
        try:
            self._storage.delete_archive(name)
        except CkptmgrError as exc:  # left as an orphan; swept later
            log.debug("could not remove %s: %s", name, exc)


def _keras_version(snapshot: ModelSnapshot) -> str:
    try:
        return json.loads(snapshot.metadata_json).get("keras_version", "")
    except ValueError:
        return ""

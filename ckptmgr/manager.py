"""``CheckpointManager``: save, restore, list, verify, prune and export on one process.

The manager glues the layers together: :mod:`state` captures a model to host
arrays (the only step that blocks training), :mod:`archive` streams them as a
``.keras`` zip, :mod:`storage` commits it atomically, :mod:`retention` decides
what to prune. :meth:`CheckpointManager.write_snapshot` needs no TensorFlow, so
the Ray coordinator reuses it unchanged.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Literal

from ckptmgr.commit import Committer
from ckptmgr.errors import (
    CheckpointNotFoundError,
    CkptmgrError,
    ConfigError,
    CorruptCheckpointError,
)
from ckptmgr.exporting import Exporting
from ckptmgr.history import History
from ckptmgr.integrity import Progress, Verifier, VerifyResult, one_line
from ckptmgr.io.checksums import Algorithm
from ckptmgr.io.archive import ModelSnapshot
from ckptmgr.io.layout import manifest_name
from ckptmgr.io.lease import WriterLease
from ckptmgr.io.manifest import LoopState, Manifest
from ckptmgr.io.storage import Storage
from ckptmgr.ranged_write import RangeAssignment, RangeResult
from ckptmgr.pipeline import BusyPolicy, SavePipeline, check_policy
from ckptmgr.pruning import PruneReport, Pruning, short_list  # noqa: F401 - PruneReport re-exported
from ckptmgr.retention import RetentionPolicy, check_grace

log = logging.getLogger("ckptmgr")

class CheckpointManager(Pruning, Exporting):
    """Rolling checkpoints of one training run in one directory (any fsspec URL).

    Args:
        directory: local path or URL (``gs://``, ``s3://``, ``memory://``...).
        storage_options: passed to fsspec (credentials, endpoints).
        keep_last, keep_every_n_steps, keep_best, keep_best_mode, keep_best_n,
            keep_within: retention rules, combined as a union; none means keep
            everything. The newest checkpoint is never pruned.
            ``keep_best_mode`` is ``"min"`` (default), ``"max"`` or ``"auto"``
            (inferred from the metric's name, as Keras's ``mode="auto"``);
            ``keep_best_n`` keeps that many best.
        retention: a ready :class:`RetentionPolicy` instead of the options.
        on_busy: what a non-blocking save does while the previous one is still
            writing (see :mod:`ckptmgr.pipeline`): ``"newest"`` (default) copies
            into a second set of host buffers and is written next, replacing
            a pending save that has not started (newest wins), so saving never
            waits on the writer, at the cost of up to twice the state in host
            memory; ``"wait"`` waits for the previous write; ``"skip"`` drops
            the save. Replaced and skipped saves are logged and counted in the
            next manifest's ``stats``.
        sweep_grace_s: leftovers of interrupted writes older than this (and
            older than the newest manifest) are removed when pruning.
        checksum: ``"crc32c"`` (default: a CRC32C per 16 MiB chunk, cheap) or
            ``"sha256"`` (also a cryptographic digest of each archive); see
            :mod:`ckptmgr.io.checksums`. Reading verifies whatever was recorded.

    The first save claims the directory's writer lease (see
    :mod:`ckptmgr.io.lease`); a writer that claimed it before is fenced.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: str | None = None,
        keep_best_mode: Literal["min", "max", "auto"] = "min",
        keep_best_n: int = 1,
        keep_within: timedelta | str | None = None,
        retention: RetentionPolicy | None = None,
        on_busy: BusyPolicy = "newest",
        sweep_grace_s: float = 3600.0,
        checksum: Algorithm = "crc32c",
    ):
        self.storage = Storage(os.fspath(directory), storage_options)
        if retention is None:
            retention = RetentionPolicy.from_options(
                keep_last=keep_last,
                keep_every_n_steps=keep_every_n_steps,
                keep_best=keep_best,
                keep_best_mode=keep_best_mode,
                keep_best_n=keep_best_n,
                keep_within=keep_within,
            )
        self.retention = retention
        self.on_busy = check_policy(on_busy)
        self.sweep_grace_s = check_grace(sweep_grace_s)
        self.lease = WriterLease(self.storage)
        self._verifier = Verifier(self.storage, self._read_manifest)
        self.checksum = checksum
        self._committer = Committer(self.storage, self.lease, self._read_manifest, checksum)
        self._history = History(self.storage, self.lease)
        self._plan = None
        self._pipeline = SavePipeline(on_busy, buffer_sets=2 if on_busy == "newest" else 1)
        self._restore_buffers = None  # a BufferPool while restores repeat (see restore())

    @property
    def directory(self) -> str:
        return self.storage.url

    def __repr__(self) -> str:
        return f"CheckpointManager({self.storage.url!r})"

    # -- listing ---------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending. Only manifested checkpoints exist."""
        return self.storage.committed_steps()

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def manifest(self, step: int | None = None) -> Manifest:
        step = self._resolve_step(step)
        return self._read_manifest(step)

    def _read_manifest(self, step: int) -> Manifest:
        where = f"step {step}: {manifest_name(step)}"
        try:
            data = self.storage.read_manifest_bytes(step)
        except CorruptCheckpointError as exc:  # not a regular file, a symlink...
            raise CorruptCheckpointError(f"{where}: {exc}") from None
        manifest = Manifest.from_bytes(data, where=where)
        if manifest.step != step:
            raise CorruptCheckpointError(f"{where}: manifest describes step {manifest.step}.")
        return manifest

    def archive_url(self, step: int | None = None) -> str:
        """URL of the archive of ``step`` (default: newest), as its manifest names it."""
        return self.storage.url_of(self.manifest(step).archive)

    def local_archive_path(self, step: int | None = None) -> str | None:
        """A path stock Keras can open directly, when storage is local disk."""
        return self.storage.local_path_of(self.manifest(step).archive)

    def manifests(self) -> list[Manifest]:
        """Manifests of every committed step that parses (bad ones are logged,
        ones deleted meanwhile by a concurrent prune are skipped)."""
        return self._read_manifests(self.steps())

    def _read_manifests(self, steps: list[int]) -> list[Manifest]:
        found = []
        for step in steps:
            try:
                found.append(self._read_manifest(step))
            except CheckpointNotFoundError:
                continue
            except CorruptCheckpointError as exc:
                log.warning("%s", exc)
        return found

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_step()
            if latest is None:
                raise CheckpointNotFoundError(
                    f"No checkpoints under {self.directory}. Train with "
                    "CheckpointCallback or CheckpointManager.save() first."
                )
            return latest
        if not self.storage.is_committed(step):
            raise CheckpointNotFoundError(
                f"No checkpoint for step {step} under {self.directory}. "
                f"Available: {short_list(self.steps())}."
            )
        return step

    # -- saving ----------------------------------------------------------------
    def claim(self) -> None:
        """Claim the directory's writer lease now (saves claim it otherwise).

        Any writer that claimed it before is fenced from this moment: its next
        commit or delete raises ``WriterFencedError``. See :mod:`ckptmgr.io.lease`.
        """
        self.lease.acquire()

    def save(
        self,
        step: int,
        model,
        *,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        loop: LoopState | None = None,
        pin: bool = False,
        blocking: bool = True,
    ) -> Manifest | Future | None:
        """Checkpoint ``model`` as ``step``.

        Blocking saves return the committed :class:`Manifest`. Non-blocking
        saves return once state is on the host (a :class:`Future` of the
        manifest; ``None`` in it when a newer save replaced this one before it
        was written), or ``None`` when skipped (``on_busy="skip"``). A blocking
        save (the emergency one) is never replaced; it replaces a pending one.
        """
        step = _check_step(step)
        metrics, extra = _check_metadata(metrics, extra)
        started = time.perf_counter()
        ticket = self._pipeline.admit(step, may_drop=not blocking)
        if ticket is None:
            return None
        try:
            snapshot = self._capture(model, ticket.buffer_set)
        except BaseException:
            self._pipeline.cancel(ticket)
            raise
        blocked_s = time.perf_counter() - started
        args = dict(metrics=metrics, extra=extra, loop=loop, pin=pin, blocked_s=blocked_s)
        future = self._pipeline.submit(
            step, lambda: self._write_counted(step, snapshot, args),
            ticket=ticket, sticky=blocking, report=not blocking,
        )
        return future.result() if blocking else future

    def _capture(self, model, buffer_set: int | None = None) -> ModelSnapshot | None:
        """Copy state into ``buffer_set``; without one (``prepare``), allocate
        every set the ``on_busy`` policy uses, so no save pays page faults."""
        from ckptmgr.state import plan_for

        self._plan = plan_for(model, self._plan)
        if buffer_set is None:
            self._plan.warm(self._pipeline.buffer_sets)
            return None
        return self._plan.capture(reuse_buffers=True, buffer_set=buffer_set)

    def _write_counted(self, step: int, snapshot: ModelSnapshot, args: dict[str, Any]) -> Manifest:
        """The writer thread's job: the manifest also counts the saves replaced
        or skipped since the previous write."""
        counts = self._pipeline.take_counts()
        try:
            return self.write_snapshot(step, snapshot, counts=counts, **args)
        except BaseException:
            self._pipeline.give_back_counts(counts)
            raise

    def wait_until_finished(self) -> Manifest | None:
        """Write every queued save (a pending one too: a final state is never
        dropped) and wait for the commits; the newest one's manifest, or None
        if nothing was saved since the last call. Re-raises an earlier
        failure once."""
        return self._pipeline.wait_until_finished()

    def close(self) -> None:
        """Finish every queued save (the writer thread then ends by itself)
        and let go of the buffers kept from restores."""
        self._drop_restore_buffers()
        self.wait_until_finished()

    def write_snapshot(
        self,
        step: int,
        snapshot: ModelSnapshot,
        *,
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        loop: LoopState | None = None,
        pin: bool = False,
        blocked_s: float = 0.0,
        world: dict[str, Any] | None = None,
        prune: bool = True,
        counts: dict[str, int] | None = None,
    ) -> Manifest:
        """Stream ``snapshot`` to storage, commit its manifest, then prune.

        Runs wherever the snapshot is (worker thread or coordinator); needs no
        TensorFlow. Raises ``WriterFencedError`` once another process claimed
        the directory. Pruning after the commit never makes the save fail.
        ``counts``: saves replaced or skipped since the previous write, for
        the manifest's ``stats``.
        """
        manifest, ours = self._committer.write(
            step, snapshot, metrics=metrics, extra=extra, loop=loop, blocked_s=blocked_s, world=world,
            counts=counts,
        )
        return self._after_commit(manifest, ours, pin=pin, prune=prune)

    def write_ranges(self, step: int, spec: ModelSnapshot, writers: int,
                     dispatch: Callable[[list[RangeAssignment]], list[RangeResult]], *,
                     pin: bool = False, prune: bool = True, **meta: Any) -> Manifest:
        """Like :meth:`write_snapshot`, but the archive is written by up to
        ``writers`` ranks, a byte range each (:mod:`ckptmgr.ranged_write`):
        ``spec`` lays it out, ``dispatch`` hands the ranges out and returns
        what each rank wrote. Object stores and local disk only (see
        :meth:`ranged_writes`); ``meta`` as for :meth:`write_snapshot`."""
        manifest, ours = self._committer.write_ranges(step, spec, writers, dispatch, **meta)
        return self._after_commit(manifest, ours, pin=pin, prune=prune)

    def ranged_writes(self) -> bool:
        """Whether archives here can be written in ranges by several ranks."""
        return self.storage.parallel_kind() is not None and self.checksum == "crc32c"

    def _after_commit(self, manifest: Manifest, ours: bool, *, pin: bool, prune: bool) -> Manifest:
        """Pin, log and prune after a commit of ours (another writer's is kept as is)."""
        if not ours:  # another writer's checkpoint of this step is kept (logged)
            return manifest
        step = manifest.step
        if pin:  # after the commit: a crashed or lost attempt must not pin another's step
            self.storage.write_pin(step, True)
        stats = manifest.stats
        log.info(
            "saved step %d: %d bytes, blocked %.3fs, write %.3fs, %.1f MB/s%s",
            step, stats.bytes, stats.blocked_s, stats.write_s, stats.mb_per_s, _dropped(stats),
        )
        if prune and not self.retention.is_empty():
            self._prune_after_save(step)
        return manifest

    def _prune_after_save(self, step: int) -> None:
        """Apply retention, never to the step just saved (older runs' larger
        steps in the directory would otherwise make it the first to go)."""
        try:
            report = self.prune(protect={step})
        except CkptmgrError as exc:  # fenced meanwhile, storage hiccup: the next save tells
            log.warning("step %d is saved; pruning after it failed: %s", step, exc)
            return
        if report.newest is not None and report.newest > step:
            log.warning(
                "saved step %d, but %s already holds step %d (another run's?): retention "
                "ranks by step, so step %d is kept now and pruned by later saves; "
                "use a new directory for a new run", step, self.directory, report.newest, step,
            )

    # -- integrity ---------------------------------------------------------------
    def verify(self, step: int | None = None, *, progress: Progress | None = None) -> list[VerifyResult]:
        """Recompute checksums of one step, or of every committed step.

        Checking every step also reports orphans: archives whose step has no
        manifest (an interrupted write, or a manifest deleted by hand). They
        are not restorable and are swept once older than the grace time.
        """
        if step is not None:
            return [self._verifier.verify_step(self._resolve_step(step), progress)]
        steps = self.steps()
        results = [self._verifier.verify_step(s, progress) for s in steps]
        orphans = self._verifier.orphans(set(steps), self._history.kept_archives)
        return sorted(results + orphans, key=lambda r: r.step)

    def verified_archive(self, step: int | None = None, *, progress: Progress | None = None):
        """A local path to a verified archive of ``step`` (downloaded if remote)."""
        return self._verifier.verified_archive(self.manifest(step), progress=progress)

    def _first_good(self, step: int | None, use: Callable[[Manifest, str], Any], *,
                    overlap: bool = False, verify: bool = True,
                    inline: Callable[[Manifest, str], Any] | None = None) -> tuple[Manifest, Any]:
        """``use(manifest, local_path)`` on a checkpoint that verifies (see
        :meth:`ckptmgr.integrity.Verifier.first_good`)."""
        candidates = [self._resolve_step(step)] if step is not None else list(reversed(self.steps()))
        if not candidates:
            self._resolve_step(None)  # raises a clear not-found error
        return self._verifier.first_good(candidates, use, explicit=step is not None, overlap=overlap,
                                         verify=verify or step is None, inline=inline)

    def quick_check(self, step: int, manifest: Manifest | None = None) -> str | None:
        """The manifest reads (pass it if already read) and the archive has
        the size it records (the archive itself is not read); the problem in
        one line, or None."""
        try:
            self._verifier.check_size(manifest or self._read_manifest(step))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            return one_line(exc, step)
        return None

    def verify_share(self, step: int, rank: int, world_size: int) -> str | None:
        """Verify this rank's share (every ``world_size``-th chunk from ``rank``)
        of ``step``'s archive; the problem in one line, or None. The ranks of a
        distributed restore verify an archive together this way."""
        try:
            self._verifier.verify_share(self._read_manifest(step), rank, world_size)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            return one_line(exc, step)
        return None

    # -- restoring ----------------------------------------------------------------
    def prepare(self, model) -> None:
        """Plan the capture and allocate host buffers now (e.g. at train begin),
        so the first save blocks no longer than the later ones. Training
        starts: the buffers kept from restores are let go."""
        self._drop_restore_buffers()
        self.wait_until_finished()
        self._capture(model)

    def restore(self, model, step: int | None = None, *, verified: bool = False) -> Manifest:
        """Load weights and optimizer state into an existing, built ``model``.

        With ``step=None`` the newest checkpoint that verifies is used; corrupt
        newer ones are skipped with a warning. An unbuilt model is first built
        from the checkpoint's ``build_config`` (as ``load_model`` does). A
        checkpoint that verifies but does not fit the model raises
        ``IncompatibleCheckpointError`` (no fallback). ``verified``: the caller
        already verified ``step`` (see :meth:`verify_share`). Returns the
        restored manifest (its ``loop`` says where training continues).

        Local archives written by ckptmgr are read once, straight into host
        buffers the variables take over, checking chunk CRC32Cs on the way
        (:mod:`ckptmgr.restore_direct`); the manager keeps those buffers for
        a next restore (at most the last two restores' worth, for 60 s, or
        until :meth:`prepare` or :meth:`close`).
        """
        from ckptmgr.restore_direct import restore_archive

        pool = self.restore_buffers()

        def apply(manifest: Manifest, path: str) -> None:  # the archive is verified
            restore_archive(model, path, where=_where(manifest), pool=pool)

        def apply_checking(manifest: Manifest, path: str) -> None:  # chunks checked as read
            restore_archive(model, path, where=_where(manifest), entry=manifest.archive_entry, pool=pool)

        try:
            manifest, _ = self._first_good(step, apply, verify=not verified, inline=apply_checking)
        finally:
            pool.release_later()
        return manifest

    def restore_buffers(self):
        """The :class:`~ckptmgr.io.direct_read.BufferPool` restores read large
        arrays into, kept for the next restore; bracket its use with
        ``begin()`` and ``release_later()``."""
        from ckptmgr.io.direct_read import BufferPool

        if self._restore_buffers is None:
            self._restore_buffers = BufferPool()
        return self._restore_buffers

    def _drop_restore_buffers(self) -> None:
        if self._restore_buffers is not None:
            self._restore_buffers.clear()
            self._restore_buffers = None

    def load(
        self,
        step: int | None = None,
        custom_objects: dict[str, Any] | None = None,
        *,
        compile: bool = True,
        safe_mode: bool = True,
    ):
        """A new model, as ``keras.saving.load_model`` would give (``safe_mode`` on)."""
        import keras

        def build(manifest: Manifest, path: str):
            return keras.saving.load_model(
                path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
            )

        _, model = self._first_good(step, build, overlap=True)
        return model


def _where(manifest: Manifest) -> str:
    return f"step {manifest.step}: {manifest.archive}"


def _check_step(step: Any) -> int:
    """An int >= 0 (numpy integers too); bools and floats are refused."""
    try:
        value = operator.index(step) if not isinstance(step, bool) else -1
    except TypeError:
        value = -1
    if value < 0:
        raise ConfigError(f"Invalid step: Received: step={step!r}. Use an integer >= 0.")
    return value


def _check_metadata(metrics, extra) -> tuple[dict[str, float], dict[str, Any]]:
    """Fail before writing anything if metrics or extra cannot go in a manifest."""
    import json

    try:
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid metrics: Received: metrics={metrics!r} ({exc}). "
                          "Use a dict of names to numbers.") from None
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid extra: Received: extra={extra!r} ({exc}). "
                          "Use JSON-serializable values (convert arrays with .tolist()).") from None
    return metrics, dict(extra or {})


def _dropped(stats) -> str:
    """", 2 replaced, 1 skipped since the previous save" (empty when none)."""
    parts = [f"{n} {kind}" for kind, n in (("replaced", stats.replaced), ("skipped", stats.skipped)) if n]
    return f", {', '.join(parts)} since the previous save" if parts else ""

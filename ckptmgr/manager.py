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
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ckptmgr.commit import Committer
from ckptmgr.errors import (
    CheckpointNotFoundError,
    CkptmgrError,
    ConfigError,
    CorruptCheckpointError,
)
from ckptmgr.history import History, SupersededCheckpoint
from ckptmgr.integrity import Progress, Verifier, VerifyResult
from ckptmgr.io.checksums import Algorithm
from ckptmgr.io.archive import ModelSnapshot, open_weights, read_json_member, write_weights_only
from ckptmgr.io.destination import copy_to_destination
from ckptmgr.io.layout import manifest_name
from ckptmgr.io.lease import WriterLease
from ckptmgr.io.manifest import LoopState, Manifest, now_utc
from ckptmgr.io.storage import Storage
from ckptmgr.pipeline import BusyPolicy, SavePipeline, check_policy
from ckptmgr.retention import CheckpointInfo, RetentionDecision, RetentionPolicy, check_grace

log = logging.getLogger("ckptmgr")

@dataclass(frozen=True)
class PruneReport:
    decision: RetentionDecision
    deleted: tuple[int, ...]
    dry_run: bool
    newest: int | None = None  # the newest committed step when pruning began


class CheckpointManager:
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
        self._committer = Committer(self.storage, self.lease, self._read_manifest, checksum)
        self._history = History(self.storage, self.lease)
        self._plan = None
        self._pipeline = SavePipeline(on_busy, buffer_sets=2 if on_busy == "newest" else 1)

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
                f"Available: {_short_list(self.steps())}."
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
        """Finish every queued save (the writer thread then ends by itself)."""
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
        if not ours:  # another writer's checkpoint of this step is kept (logged)
            return manifest
        if pin:  # after the commit: a crashed or lost attempt must not pin another's step
            self.storage.write_pin(step, True)
        stats = manifest.stats
        log.info(
            "saved step %d: %d bytes, blocked %.3fs, write %.3fs, %.1f MB/s%s",
            step, stats.bytes, blocked_s, stats.write_s, stats.mb_per_s, _dropped(stats),
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
                    overlap: bool = False) -> tuple[Manifest, Any]:
        """``use(manifest, local_path)`` on a checkpoint that verifies (see
        :meth:`ckptmgr.integrity.Verifier.first_good`)."""
        candidates = [self._resolve_step(step)] if step is not None else list(reversed(self.steps()))
        if not candidates:
            self._resolve_step(None)  # raises a clear not-found error
        return self._verifier.first_good(candidates, use, explicit=step is not None, overlap=overlap)

    # -- restoring ----------------------------------------------------------------
    def prepare(self, model) -> None:
        """Plan the capture and allocate host buffers now (e.g. at train begin),
        so the first save blocks no longer than the later ones."""
        self.wait_until_finished()
        self._capture(model)

    def restore(self, model, step: int | None = None) -> Manifest:
        """Load weights and optimizer state into an existing, built ``model``.

        With ``step=None`` the newest checkpoint that verifies is used; corrupt
        newer ones are skipped with a warning. An unbuilt model is first built
        from the checkpoint's ``build_config`` (as ``load_model`` does). A
        checkpoint that verifies but does not fit the model raises
        ``IncompatibleCheckpointError`` (no fallback). Returns the restored manifest (its ``loop`` says where
        training continues).
        """
        from ckptmgr.state import apply_weights, build_if_needed

        def apply(manifest: Manifest, path: str) -> None:
            with open(path, "rb") as f:
                build_if_needed(model, read_json_member(f, "config.json"))
                with open_weights(f) as h5:
                    apply_weights(model, h5)

        manifest, _ = self._first_good(step, apply)
        return manifest

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

    # -- pruning --------------------------------------------------------------------
    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned."""
        self.storage.write_pin(self._resolve_step(step), pinned)

    def plan_prune(self, retention: RetentionPolicy | None = None, now: datetime | None = None) -> RetentionDecision:
        policy = retention or self.retention
        return policy.decide(self._infos(self.manifests()), now or now_utc())

    def _infos(self, manifests: list[Manifest]) -> list[CheckpointInfo]:
        pinned = self.storage.pinned_steps()
        return [CheckpointInfo(m.step, m.created, m.metrics, m.step in pinned) for m in manifests]

    def prune(self, dry_run: bool = False, retention: RetentionPolicy | None = None,
              protect: Collection[int] = ()) -> PruneReport:
        """Delete what the retention policy does not keep; never the newest,
        never a step in ``protect``.

        Deletion removes the manifest first, so a crash mid-prune leaves only an
        unlisted orphan (swept later), never a listed checkpoint without data.
        A writer checks its lease before deleting: a fenced one deletes nothing.
        """
        steps = self.steps()  # one listing: manifests, newest and sweep all use it
        manifests = self._read_manifests(steps)
        decision = (retention or self.retention).decide(self._infos(manifests), now_utc())
        for warning in decision.warnings:
            log.warning("%s", warning)
        newest = steps[-1] if steps else None
        if dry_run:
            return PruneReport(decision, (), True, newest)
        doomed = [s for s in decision.delete if s < newest and s not in protect]  # never the newest
        archives = self.storage.archives() if doomed else []
        for step in doomed:
            self.lease.check(f"pruning step {step}")
            self.storage.delete(step, archives)
        if doomed:
            log.info("pruned steps %s", _short_list(doomed))
        self._sweep(self.sweep_grace_s, manifests)
        return PruneReport(decision, tuple(doomed), False, newest)

    # -- one run's history (see ckptmgr.history) ---------------------------------
    def supersede_after(self, step: int | None, reason: str) -> list[int]:
        """Move committed steps newer than ``step`` (all, for None) to
        ``superseded/`` before training writes those steps again; takes the
        writer lease if not held. Returns the steps moved."""
        if self.lease.held is None:
            self.claim()
        return self._history.supersede_after(step, reason)

    def superseded(self) -> list[SupersededCheckpoint]:
        """Steps moved aside (never restored; kept until :meth:`delete_superseded`)."""
        return self._history.list()

    def delete_superseded(self) -> list[SupersededCheckpoint]:
        """Delete every superseded step and its archive; return them."""
        live = {m.step: m.archive for m in self.manifests()}
        return self._history.delete(live)

    def sweep(self, older_than_s: float | None = None) -> list[str]:
        """Remove leftovers of interrupted writes; return their URLs.

        Only files no manifest claims, older than ``older_than_s`` (default:
        ``sweep_grace_s``) and older than the newest manifest, so an attempt
        another writer has in flight survives.
        """
        grace = self.sweep_grace_s if older_than_s is None else check_grace(older_than_s, "older_than_s")
        return self._sweep(grace, self.manifests())

    def _sweep(self, grace: float, manifests: list[Manifest]) -> list[str]:
        """``manifests`` must have been read before the sweep lists the root."""
        self.lease.check("sweeping leftovers")
        claimed = {m.step: m.archive for m in manifests}
        return self.storage.sweep(grace, claimed, self._history.kept_archives)

    def leftovers(self, older_than_s: float | None = None) -> list[str]:
        """What :meth:`sweep` would remove now (names relative to the directory)."""
        grace = self.sweep_grace_s if older_than_s is None else check_grace(older_than_s, "older_than_s")
        claimed = {m.step: m.archive for m in self.manifests()}
        return self.storage.orphans(grace, claimed, self._history.kept_archives)

    # -- exporting ----------------------------------------------------------------------
    def export_weights(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None, overwrite: bool = False, include_optimizer: bool = True) -> str:
        """Write the ``.weights.h5`` that ``model.save_weights`` writes (optimizer
        state included unless ``include_optimizer=False``); ``load_weights`` reads it."""
        if not str(path).endswith(".weights.h5"):
            raise ConfigError(
                f"Invalid export path: Received: path={path!r}. Keras requires "
                "weights files to end with '.weights.h5'."
            )
        self._check_destination(path)
        with self.verified_archive(step, progress=progress) as (_, archive), _local_staging() as tmp:
            out = os.path.join(tmp, "model.weights.h5")
            with open(archive, "rb") as f:
                write_weights_only(f, out, include_optimizer=include_optimizer)
            return copy_to_destination(out, str(path), storage_options, overwrite=overwrite)

    def export_keras(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None, overwrite: bool = False) -> str:
        """Copy a verified ``.keras`` archive out of the checkpoint directory."""
        self._check_destination(path)
        with self.verified_archive(step, progress=progress) as (_, archive):
            return copy_to_destination(archive, str(path), storage_options, overwrite=overwrite)

    def export_saved_model(self, path: str, step: int | None = None, *, custom_objects=None, storage_options: dict[str, Any] | None = None, safe_mode: bool = True, progress: Progress | None = None, overwrite: bool = False) -> str:
        """Export a TensorFlow SavedModel for serving (Keras ``model.export``)."""
        self._check_destination(path)
        model = self.load(step, custom_objects, compile=False, safe_mode=safe_mode)
        with _local_staging() as tmp:
            out = os.path.join(tmp, "saved_model")
            model.export(out, format="tf_saved_model", verbose=False)
            return copy_to_destination(out, str(path), storage_options, overwrite=overwrite)

    def _check_destination(self, path: str) -> None:
        if self.storage.contains(str(path)):
            raise ConfigError(
                f"Invalid export destination: Received: {path!r}, inside the checkpoint "
                f"directory {self.directory}. Export outside it; checkpoints are never overwritten."
            )


@contextmanager
def _local_staging() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="ckptmgr-export-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _short_list(steps: list[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[-10:])
    return shown if len(steps) <= 10 else f"... {shown}"

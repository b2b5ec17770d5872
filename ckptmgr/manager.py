"""``CheckpointManager``: save, restore, list, verify, prune and export on one process.

The manager glues the layers together: :mod:`state` captures a model to host
arrays (the only step that blocks training), :mod:`archive` streams them as a
``.keras`` zip, :mod:`storage` commits it atomically, :mod:`retention` decides
what to prune. :meth:`CheckpointManager.write_snapshot` needs no TensorFlow, so
the Ray coordinator reuses it unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from ckptmgr import faults
from ckptmgr.archive import ModelSnapshot, open_weights, write_keras_archive, write_weights_only
from ckptmgr.errors import (
    CheckpointNotFoundError,
    CkptmgrError,
    ConfigError,
    CorruptCheckpointError,
    SaveInProgressError,
    UnknownCustomObjectError,
    UnsafeCheckpointError,
)
from ckptmgr.manifest import FileEntry, LoopState, Manifest, SaveStats, now_utc
from ckptmgr.retention import CheckpointInfo, RetentionDecision, RetentionPolicy
from ckptmgr.storage import CHUNK_BYTES, Storage, archive_name, copy_to_destination

log = logging.getLogger("ckptmgr")

BusyPolicy = Literal["wait", "skip"]
Progress = Callable[[int, int], None]  # (bytes just read, total bytes)


@dataclass(frozen=True)
class VerifyResult:
    step: int
    ok: bool
    problem: str = ""  # one line naming the step and the file


@dataclass(frozen=True)
class PruneReport:
    decision: RetentionDecision
    deleted: tuple[int, ...]
    dry_run: bool


class CheckpointManager:
    """Rolling checkpoints of one training run in one directory (any fsspec URL).

    Args:
        directory: local path or URL (``gs://``, ``s3://``, ``memory://``...).
        storage_options: passed to fsspec (credentials, endpoints).
        keep_last, keep_every_n_steps, keep_best, keep_best_mode, keep_within:
            retention rules, combined as a union; none means keep everything.
            The newest checkpoint is never pruned.
        retention: a ready :class:`RetentionPolicy` instead of the options.
        on_busy: what a non-blocking save does while the previous one is still
            writing: ``"wait"`` (default) or ``"skip"``.
        sweep_grace_s: leftovers of interrupted writes older than this are
            removed when pruning.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: str | None = None,
        keep_best_mode: str = "min",
        keep_within: timedelta | str | None = None,
        retention: RetentionPolicy | None = None,
        on_busy: BusyPolicy = "wait",
        sweep_grace_s: float = 3600.0,
    ):
        self.storage = Storage(os.fspath(directory), storage_options)
        if retention is None:
            retention = RetentionPolicy.from_options(
                keep_last=keep_last,
                keep_every_n_steps=keep_every_n_steps,
                keep_best=keep_best,
                keep_best_mode=keep_best_mode,
                keep_within=keep_within,
            )
        self.retention = retention
        if on_busy not in ("wait", "skip"):
            raise ConfigError(
                f"Invalid on_busy: Received: on_busy={on_busy!r}. Use 'wait' or 'skip'."
            )
        self.on_busy = on_busy
        self.sweep_grace_s = sweep_grace_s
        self._plan = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        self._lock = threading.Lock()

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
        data = self.storage.read_manifest_bytes(step)
        where = f"step {step}: {archive_name(step)[:-6]}.json"
        manifest = Manifest.from_bytes(data, where=where)
        if manifest.step != step or manifest.archive != archive_name(step):
            raise CorruptCheckpointError(
                f"{where}: manifest describes step {manifest.step} ({manifest.archive})."
            )
        return manifest

    def manifests(self) -> list[Manifest]:
        """Manifests of every committed step that parses (bad ones are logged)."""
        found = []
        for step in self.steps():
            try:
                found.append(self.manifest(step))
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
        manifest), or ``None`` when skipped because the previous save is still
        writing and ``on_busy="skip"``.
        """
        step = _check_step(step)
        metrics, extra = _check_metadata(metrics, extra)
        if not self._wait_for_previous(may_skip=not blocking):
            return None
        started = time.perf_counter()
        snapshot = self._capture(model)
        blocked_s = time.perf_counter() - started
        args = dict(metrics=metrics, extra=extra, loop=loop, pin=pin, blocked_s=blocked_s)
        if blocking:
            return self.write_snapshot(step, snapshot, **args)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckptmgr-writer")
            self._in_flight = self._executor.submit(self.write_snapshot, step, snapshot, **args)
            return self._in_flight

    def _capture(self, model) -> ModelSnapshot:
        from ckptmgr.state import plan_for

        self._plan = plan_for(model, self._plan)
        return self._plan.capture(reuse_buffers=True)

    def _wait_for_previous(self, may_skip: bool = True) -> bool:
        """Only one save in flight: wait for it (or skip), per ``on_busy``."""
        pending = self._in_flight
        if pending is None or pending.done():
            self._raise_if_failed(pending)
            return True
        if self.on_busy == "skip" and may_skip:
            log.warning("ckptmgr: previous save still writing; skipping this save (on_busy='skip')")
            return False
        log.info("ckptmgr: previous save still writing; waiting (on_busy='wait')")
        self.wait_until_finished()
        return True

    def _raise_if_failed(self, future: Future | None) -> None:
        if future is not None and future.done() and future.exception() is not None:
            self._in_flight = None
            raise future.exception()

    def wait_until_finished(self) -> Manifest | None:
        """Block until the in-flight save (if any) has committed; re-raise its error."""
        pending = self._in_flight
        if pending is None:
            return None
        try:
            return pending.result()
        finally:
            self._in_flight = None

    def close(self) -> None:
        """Finish the in-flight save and stop the writer thread."""
        try:
            self.wait_until_finished()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

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
    ) -> Manifest:
        """Stream ``snapshot`` to storage, commit its manifest, then prune.

        Runs wherever the snapshot is (worker thread or coordinator); needs no
        TensorFlow.
        """
        started = time.perf_counter()
        with self.storage.open_archive_writer(step) as writer:
            write_keras_archive(writer, snapshot, scratch_dir=self.storage.scratch_dir())
        write_s = time.perf_counter() - started
        size = writer.bytes_written
        manifest = Manifest(
            step=step,
            created=now_utc(),
            keras_version=_keras_version(snapshot),
            archive=archive_name(step),
            files={archive_name(step): FileEntry(bytes=size, sha256=writer.hexdigest())},
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            extra=dict(extra or {}),
            loop=loop,
            stats=SaveStats(
                bytes=size,
                blocked_s=round(blocked_s, 6),
                write_s=round(write_s, 6),
                mb_per_s=round(size / 1e6 / write_s, 3) if write_s > 0 else 0.0,
            ),
            world=dict(world or {}),
        )
        if pin:
            self.storage.write_pin(step, True)
        faults.crash_point("before_manifest")
        self.storage.write_manifest(step, manifest.to_bytes())
        log.info(
            "ckptmgr: saved step %d: %d bytes, blocked %.3fs, write %.3fs, %.1f MB/s",
            step, size, blocked_s, write_s, manifest.stats.mb_per_s,
        )
        if prune and not self.retention.is_empty():
            self.prune()
        return manifest

    # -- integrity ---------------------------------------------------------------
    def verify(self, step: int | None = None, *, progress: Progress | None = None) -> list[VerifyResult]:
        """Recompute checksums of one step, or of every committed step."""
        steps = [self._resolve_step(step)] if step is not None else self.steps()
        return [self._verify_one(s, progress) for s in steps]

    def _verify_one(self, step: int, progress: Progress | None = None) -> VerifyResult:
        try:
            manifest = self.manifest(step)
            self._check_archive(manifest, sink=None, progress=progress)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            return VerifyResult(step, False, _one_line(exc, step))
        return VerifyResult(step, True)

    def _check_archive(self, manifest: Manifest, sink, progress: Progress | None = None) -> None:
        """Stream the archive once, hashing it (and copying it into ``sink``)."""
        step, name, entry = manifest.step, manifest.archive, manifest.archive_entry
        try:
            size = self.storage.archive_size(step)
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(f"step {step}: {name} is missing") from None
        if size != entry.bytes:
            raise CorruptCheckpointError(
                f"step {step}: {name} is truncated or altered "
                f"({size} bytes, manifest says {entry.bytes})"
            )
        digest = hashlib.sha256()
        for chunk in self.storage.iter_archive_chunks(step):
            digest.update(chunk)
            if sink is not None:
                sink.write(chunk)
            if progress is not None:
                progress(len(chunk), entry.bytes)
        if digest.hexdigest() != entry.sha256:
            raise CorruptCheckpointError(
                f"step {step}: {name} is corrupt (sha256 {digest.hexdigest()[:12]}..., "
                f"manifest says {entry.sha256[:12]}...)"
            )

    @contextmanager
    def verified_archive(self, step: int | None = None, *, progress: Progress | None = None) -> Iterator[tuple[Manifest, str]]:
        """A local path to a verified archive of ``step`` (downloaded if remote)."""
        manifest = self.manifest(step)
        local = self.storage.local_archive_path(manifest.step)
        if local is not None:
            self._check_archive(manifest, sink=None, progress=progress)
            yield manifest, local
            return
        fd, tmp = tempfile.mkstemp(prefix=f"ckptmgr-{manifest.step}-", suffix=".keras")
        try:
            with os.fdopen(fd, "wb") as sink:
                self._check_archive(manifest, sink=sink, progress=progress)
            yield manifest, tmp
        finally:
            os.remove(tmp)

    def _first_good(self, step: int | None, use: Callable[[Manifest, str], Any], *,
                    overlap: bool = False) -> tuple[Manifest, Any]:
        """``use(manifest, local_path)`` on a checkpoint that verifies.

        Explicit step: that one or an error. Otherwise the newest that verifies;
        corrupt newer ones are skipped with a warning. By default the checksum
        is checked before ``use`` runs, so a corrupt checkpoint never touches
        anything. With ``overlap`` (only for a ``use`` without side effects,
        like building a new model) the checksum runs in a thread while ``use``
        reads the same local file, about one pass instead of two; the result is
        returned only once the checksum has matched.
        """
        candidates = [self._resolve_step(step)] if step is not None else list(reversed(self.steps()))
        if not candidates:
            self._resolve_step(None)  # raises a clear not-found error
        problems = []
        for candidate in candidates:
            try:
                return self._use_verified(candidate, use, problems, overlap)
            except CorruptCheckpointError as exc:
                if step is not None:
                    raise
                problems.append(_one_line(exc, candidate))
                log.warning("ckptmgr: %s; falling back to an older checkpoint", problems[-1])
        raise CorruptCheckpointError(
            f"No checkpoint under {self.directory} verifies: " + "; ".join(problems)
        )

    def _use_verified(self, step: int, use, problems: list[str], overlap: bool) -> tuple[Manifest, Any]:
        manifest = self.manifest(step)
        local = self.storage.local_archive_path(step)
        if local is None or not overlap:  # remote: download while hashing, then use
            with self.verified_archive(step) as (_, path):
                result = use(manifest, path)
        else:
            result = self._use_while_hashing(manifest, local, use)
        if problems:
            log.warning("ckptmgr: restoring step %d, the newest checkpoint that verifies", step)
        return manifest, result

    def _use_while_hashing(self, manifest: Manifest, path: str, use):
        outcome: dict[str, BaseException] = {}

        def check():
            try:
                self._check_archive(manifest, sink=None)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                outcome["error"] = exc

        checker = threading.Thread(target=check, name="ckptmgr-verify")
        checker.start()
        try:
            result = use(manifest, path)
        except Exception:
            checker.join()
            if "error" in outcome:  # the data was bad: report that, not its symptom
                raise outcome["error"] from None
            raise
        checker.join()
        if "error" in outcome:
            raise outcome["error"]
        return result

    # -- restoring ----------------------------------------------------------------
    def prepare(self, model) -> None:
        """Plan the capture and allocate host buffers now (e.g. at train begin),
        so the first save blocks no longer than the later ones."""
        self.wait_until_finished()
        self._capture(model)

    def restore(self, model, step: int | None = None) -> Manifest:
        """Load weights and optimizer state into an existing, built ``model``.

        With ``step=None`` the newest checkpoint that verifies is used; corrupt
        newer ones are skipped with a warning. Returns the restored manifest
        (its ``loop`` says where training continues).
        """
        from ckptmgr.state import apply_weights

        def apply(manifest: Manifest, path: str) -> None:
            with open(path, "rb") as f, open_weights(f) as h5:
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
            try:
                return keras.saving.load_model(
                    path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
                )
            except (TypeError, ValueError) as exc:
                raise _loading_error(exc, manifest.step) from None

        _, model = self._first_good(step, build, overlap=True)
        return model

    # -- pruning --------------------------------------------------------------------
    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned."""
        self.storage.write_pin(self._resolve_step(step), pinned)

    def plan_prune(self, retention: RetentionPolicy | None = None, now: datetime | None = None) -> RetentionDecision:
        policy = retention or self.retention
        pinned = self.storage.pinned_steps()
        infos = [
            CheckpointInfo(m.step, m.created, m.metrics, m.step in pinned)
            for m in self.manifests()
        ]
        return policy.decide(infos, now or now_utc())

    def prune(self, dry_run: bool = False, retention: RetentionPolicy | None = None) -> PruneReport:
        """Delete what the retention policy does not keep; never the newest.

        Deletion removes the manifest first, so a crash mid-prune leaves only an
        unlisted orphan (swept later), never a listed checkpoint without data.
        """
        decision = self.plan_prune(retention)
        if dry_run:
            return PruneReport(decision, (), True)
        newest = self.latest_step()
        deleted = []
        for step in decision.delete:
            if step == newest:  # belt and braces: the policy already keeps it
                continue
            self.storage.delete(step)
            deleted.append(step)
        if deleted:
            log.info("ckptmgr: pruned steps %s", _short_list(deleted))
        self.storage.sweep(self.sweep_grace_s)
        return PruneReport(decision, tuple(deleted), False)

    # -- exporting ----------------------------------------------------------------------
    def export_weights(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None) -> str:
        """Write a weights-only ``.weights.h5`` that ``model.load_weights`` accepts."""
        if not str(path).endswith(".weights.h5"):
            raise ConfigError(
                f"Invalid export path: Received: path={path!r}. Keras requires "
                "weights files to end with '.weights.h5'."
            )
        with self.verified_archive(step, progress=progress) as (_, archive), _local_staging() as tmp:
            out = os.path.join(tmp, "model.weights.h5")
            with open(archive, "rb") as f:
                write_weights_only(f, out)
            return copy_to_destination(out, str(path), storage_options)

    def export_keras(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None) -> str:
        """Copy a verified ``.keras`` archive out of the checkpoint directory."""
        with self.verified_archive(step, progress=progress) as (_, archive):
            return copy_to_destination(archive, str(path), storage_options)

    def export_saved_model(self, path: str, step: int | None = None, *, custom_objects=None, storage_options: dict[str, Any] | None = None, safe_mode: bool = True, progress: Progress | None = None) -> str:
        """Export a TensorFlow SavedModel for serving (Keras ``model.export``)."""
        model = self.load(step, custom_objects, compile=False, safe_mode=safe_mode)
        with _local_staging() as tmp:
            out = os.path.join(tmp, "saved_model")
            model.export(out, format="tf_saved_model", verbose=False)
            return copy_to_destination(out, str(path), storage_options)


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


def _keras_version(snapshot: ModelSnapshot) -> str:
    import json

    try:
        return json.loads(snapshot.metadata_json).get("keras_version", "")
    except ValueError:
        return ""


def _one_line(exc: Exception, step: int) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if text.startswith("step ") else f"step {step}: {text}"


def _short_list(steps: list[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[-10:])
    return shown if len(steps) <= 10 else f"... {shown}"


def _loading_error(exc: Exception, step: int) -> CkptmgrError:
    text = str(exc)
    if "Could not locate" in text or "custom_objects" in text and "not found" in text:
        found = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
        name = found.group(1) if found else "?"
        return UnknownCustomObjectError(
            f"step {step}: unknown custom object {name!r}. Pass custom_objects="
            f"{{{name!r}: ...}}, or decorate it with "
            "@keras.saving.register_keras_serializable() and import it first."
        )
    if "lambda" in text and "safe_mode" in text:
        return UnsafeCheckpointError(
            f"step {step}: the model contains a Python lambda, refused by safe_mode. "
            "Load with safe_mode=False (CLI: --unsafe) only if you trust its source."
        )
    return CorruptCheckpointError(f"step {step}: cannot rebuild the model: {text.splitlines()[0]}")

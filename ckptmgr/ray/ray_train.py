"""Ray Train sees ckptmgr's checkpoints: each committed one is reported with
``ray.train.report(metrics, checkpoint=...)``, so ``result.checkpoint`` and
``ray.train.get_checkpoint()`` name the newest committed checkpoint.

What is reported is a *reference*, never a copy of the ``.keras``: Ray Train
2.60 registers only checkpoints inside its own run directory
(``RunConfig(storage_path=...)/name``; a ``Checkpoint(path, filesystem)``
elsewhere is refused by every upload mode), so rank 0 reports a directory
holding only Ray's ``.metadata.json`` with ``{"ckptmgr": {"directory",
"step", "archive"}}`` (a few hundred bytes, copied into the run directory by
Ray). :func:`checkpoint_ref` reads it back. Ray Train's own retention
(``CheckpointConfig(num_to_keep=...)``) therefore deletes only references;
ckptmgr's retention owns the archives.

When: ``ray.train.report`` is a barrier that every rank must reach equally
often, from the training thread (where Keras runs callbacks). Ranks save at
the same steps, but learn of a commit at different times, so each save's
outcome is reported at the *next* save (or at train end), on every rank
alike, waiting for the commit if it is still being written (rarely: the
interval between saves normally outlasts the write). Rank 0 carries the
checkpoint; every other rank reports metrics only.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from ckptmgr.errors import ConfigError

log = logging.getLogger("ckptmgr")

METADATA_KEY = "ckptmgr"


@dataclass(frozen=True)
class CheckpointRef:
    """A committed ckptmgr checkpoint, as a Ray Train checkpoint names it."""

    directory: str  # the checkpoint directory (URL or path) the callback was given
    step: int
    archive: str  # the step's .keras: a local path (stock keras.saving.load_model opens it) or a URL

    def load(self, *, storage_options: dict[str, Any] | None = None, **load_kwargs: Any):
        """The model at this step (``CheckpointManager.load``: verified, any storage)."""
        from ckptmgr.manager import CheckpointManager

        return CheckpointManager(self.directory, storage_options=storage_options).load(self.step, **load_kwargs)


def checkpoint_ref(checkpoint: Any) -> CheckpointRef:
    """The ckptmgr checkpoint a Ray Train checkpoint refers to
    (``result.checkpoint``, ``ray.train.get_checkpoint()``)."""
    meta = (checkpoint.get_metadata() or {}).get(METADATA_KEY) if checkpoint is not None else None
    if not isinstance(meta, dict) or not {"directory", "step", "archive"} <= set(meta):
        where = getattr(checkpoint, "path", checkpoint)
        raise ConfigError(
            f"Not a ckptmgr checkpoint reference: Received: {where!r}, whose metadata has no "
            f"{METADATA_KEY!r} entry. Pass a checkpoint that CheckpointCallback reported "
            "(result.checkpoint, ray.train.get_checkpoint())."
        )
    return CheckpointRef(directory=meta["directory"], step=int(meta["step"]), archive=meta["archive"])


class RayTrainReporter:
    """Reports every save's outcome to Ray Train at the next save (see the
    module docstring); called by the callback on the training thread."""

    def __init__(self, manager: Any, rank: int):
        self.manager = manager
        self.rank = rank
        self._pending: tuple[int, Any] | None = None  # (step, the save's result)
        self._storage = None

    def saved(self, step: int, result: Any) -> None:
        """A save of ``step`` was started: report the previous one, keep this one."""
        previous, self._pending = self._pending, (step, result)
        if previous is not None:
            self._report(*previous)

    def finish(self) -> None:
        """Train end (after every save was waited for): report the last one."""
        previous, self._pending = self._pending, None
        if previous is not None:
            self._report(*previous)

    def _report(self, step: int, result: Any) -> None:
        import ray.train

        manifest = _committed(result)
        metrics = {"step": step, **(manifest.metrics if manifest is not None else {})}
        if self.rank != 0 or manifest is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="ckptmgr-ref-") as tmp:
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            checkpoint.set_metadata({METADATA_KEY: self._reference(manifest)})
            name = manifest.archive.rsplit(".keras", 1)[0]  # ckpt-<step>-<attempt>: unique per write
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def _reference(self, manifest) -> dict[str, Any]:
        storage = self._storage_of()
        archive = storage.local_path_of(manifest.archive) or storage.url_of(manifest.archive)
        return {"directory": self.manager.directory, "step": manifest.step, "archive": archive}

    def _storage_of(self):
        if self._storage is None:
            self._storage = getattr(self.manager, "storage", None)
            if self._storage is None:  # the distributed client
                from ckptmgr.io.storage import Storage

                self._storage = Storage(self.manager.directory, self.manager.options.storage_options)
        return self._storage


def _committed(result: Any):
    """The committed manifest of a save's result (waiting for it), else None
    (skipped, replaced by a newer step, or failed: the manager raises that)."""
    from ckptmgr.cadence import committed_manifest

    if result is not None and hasattr(result, "result"):
        try:
            result = result.result()
        except Exception:  # noqa: BLE001 - the manager raises it at its next call
            return None
    return committed_manifest(result)


def ray_train_reporter(manager: Any) -> RayTrainReporter | None:
    """A reporter when this thread runs a Ray Train training function, else None."""
    ray = sys.modules.get("ray")  # a Ray Train worker imported and started Ray long before
    if ray is None or not ray.is_initialized():
        return None
    try:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return None
    return RayTrainReporter(manager, rank)

"""``CheckpointCallback``: rolling checkpoints inside ``model.fit()``, exact resume.

At train begin the callback restores the newest checkpoint that verifies:
weights, optimizer state, seed-generator and metric state, the Python and
NumPy global RNGs, and the position in the loop. Keras's ``fit()`` only knows
how to start at an epoch, so to resume *inside* an epoch the callback swaps
``model.train_function`` for one that consumes the already-trained batches of
that epoch without training on them, then puts the real one back. With a
deterministic setup (``keras.utils.set_random_seed``, TensorFlow op
determinism, ``shuffle=False``) an interrupted and resumed run therefore ends
with weights bit-identical to an uninterrupted one, on the TensorFlow and the
JAX backend alike.

Saves block ``fit()`` only while state is copied to host memory; the archive
is written by a background thread (``async_save=True``). By default
(``on_busy="newest"``) a save due while the previous one still writes copies
into a second set of host buffers and is written next, a newer one replacing
it until then: ``fit()`` never waits on the writer, for up to twice the state
in host memory.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta
from typing import Any, Literal

import keras
import numpy as np

from ckptmgr.cadence import AutoSaveFreq, committed_manifest, job_mtbf_s, parse_mtbf
from ckptmgr.ray.joining import client_for
from ckptmgr.ray.train_notices import RayTrainNotices
from ckptmgr.keras_preemption import PreemptionMixin, memory_tier_interval, scalar_logs
from ckptmgr.preemption import SigtermGuard
from ckptmgr.errors import ConfigError
from ckptmgr.keras_compat import apply_multiworker_fit_patch, batch_skipper
from ckptmgr.manager import CheckpointManager
from ckptmgr.io.manifest import LoopState, Manifest
from ckptmgr.ray.ray_train import ray_train_reporter
from ckptmgr.retention import RetentionPolicy, callback_best_options, received_options
from ckptmgr.state import TrainingState, apply_training_state, capture_training_state, ensure_built_optimizer

log = logging.getLogger("ckptmgr")


class CheckpointCallback(PreemptionMixin, keras.callbacks.Callback):
    """Save rolling ``.keras`` checkpoints during ``fit()`` and resume exactly.

    Args:
        directory_or_manager: a directory/URL, or a ready ``CheckpointManager``
            (or any object with the same save/restore methods, such as the
            distributed client).
        save_freq: ``"epoch"``, a number of batches (global, across epochs), or
            ``"auto"``: the interval that wastes least for the measured cost of
            a save and ``mtbf`` (Young/Daly), never shorter than 1.5x the
            background write, re-estimated after every save (see
            :mod:`ckptmgr.cadence`). The first save comes after 10 steps, to
            measure; each manifest keeps the chosen interval in ``loop.cadence``,
            and a resumed run starts from the restored one's measurements.
        mtbf: ``save_freq="auto"`` only: one node's mean time between failures,
            ``"24h"``-style or seconds (default ``"24h"``, the longest a
            preemptible GCP VM runs); divided by the world size when distributed.
        storage_options, keep_last, keep_every_n_steps, keep_within:
            passed to the manager when a directory is given.
        checksum: ``"crc32c"`` (chunk checksums, default) or ``"sha256"`` (also a
            whole-archive digest); see :mod:`ckptmgr.io.checksums`.
        on_busy: a save due while the previous one is still writing:
            ``"newest"`` (default) copies into a second set of host buffers
            (2x the state in host memory) and is written next, unless a newer
            save replaces it first; ``"wait"`` waits for the write; ``"skip"``
            drops the save. Replaced and skipped saves are logged with the
            ``save_freq`` that would keep up, and counted in manifest stats.
        monitor, mode, save_best_only: as in Keras's ``ModelCheckpoint``.
            ``monitor`` names the metric in ``fit()``'s logs that defines the
            best checkpoint (``"val_loss"``); ``mode`` is ``"auto"`` (default:
            inferred from the name, as Keras does), ``"min"`` or ``"max"``.
            Monitoring alone deletes nothing: with a batch ``save_freq`` it
            adds a save at every epoch end, where validation metrics exist,
            and warns once if the metric is not logged.
            ``save_best_only=True`` keeps only the best checkpoint by
            ``monitor`` (default ``"val_loss"``), plus the newest: every
            scheduled save is still written, because resuming needs the newest
            state (what Keras's ``BackupAndRestore`` is for), and retention
            deletes the previous one unless it is the best. It refuses other
            ``keep_*`` options.
        keep_best: ``N`` with ``monitor``: also keep the N best checkpoints
            (a union with the other ``keep_*`` rules). The older spelling
            ``keep_best="val_loss"`` with ``keep_best_mode`` (``"min"`` by
            default, ``"max"`` or ``"auto"``) keeps the best one and is a
            monitor too; it cannot be mixed with ``monitor``/``mode``.
        restore: restore the newest good checkpoint at train begin.
        new_run: start a new run in a directory that holds checkpoints without
            restoring them: they are moved to ``superseded/`` (see
            :mod:`ckptmgr.history`). Without it, ``restore=False`` over
            existing checkpoints is refused: one directory, one run's history.
        async_save: write in a background thread; ``fit()`` blocks only for
            the copy to host memory.
        save_on_train_end: save the final state unless it was just saved.
        rank, world_size: this worker's place in a distributed run (read from
            Ray Train or ``TF_CONFIG`` when not given).
        grace_period_s: how long an emergency checkpoint may take after SIGTERM
            (less when Ray's drain notice names an earlier deadline).
        memory_every: on a Ray run, also keep a snapshot every this many steps
            in the run's memory tier: host RAM on ``memory_replicas`` nodes
            (other than the producer's), restored first when newer than
            storage (see :mod:`ckptmgr.ray.keepers`). Emergency checkpoints
            then go to memory first and are persisted in the background.
        sharded_variables: distributed mode only: datasets (paths as in
            ``model.weights.h5``, e.g. ``"optimizer/vars/3"``) whose rows each
            rank owns a contiguous even share of; every rank sends its rows and
            the coordinator gathers them. All other state is replicated.
    """

    def __init__(
        self,
        directory_or_manager: str | os.PathLike | CheckpointManager | Any,
        *,
        save_freq: Literal["epoch", "auto"] | int = "epoch",
        mtbf: str | float | None = None,
        storage_options: dict[str, Any] | None = None,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: str | int | None = None,
        keep_best_mode: Literal["min", "max", "auto"] = "min",
        keep_within: timedelta | str | None = None,
        monitor: str | None = None,
        mode: Literal["auto", "min", "max"] | None = None,
        save_best_only: bool = False,
        on_busy: Literal["newest", "wait", "skip"] = "newest",
        checksum: Literal["crc32c", "sha256"] = "crc32c",
        restore: bool = True,
        new_run: bool = False,
        async_save: bool = True,
        save_on_train_end: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        grace_period_s: float = 25.0,
        sharded_variables: tuple[str, ...] = (),
        memory_every: int | None = None,
        memory_replicas: int = 2,
    ):
        super().__init__()
        _check_save_freq(save_freq, mtbf)
        rules = dict(keep_last=keep_last, keep_every_n_steps=keep_every_n_steps, keep_within=keep_within)
        self.monitor, best = callback_best_options(
            keep_best=keep_best, keep_best_mode=keep_best_mode, monitor=monitor, mode=mode,
            save_best_only=save_best_only, rules=rules,
        )
        retention = {**rules, **best}
        if isinstance(directory_or_manager, (str, os.PathLike)):
            RetentionPolicy.from_options(**retention)  # one line here, not in a coordinator
            directory_or_manager = client_for(
                os.fspath(directory_or_manager), rank=rank, world_size=world_size,
                storage_options=storage_options, retention=retention, on_busy=on_busy,
                grace_period_s=grace_period_s, sharded=sharded_variables, checksum=checksum,
                memory_replicas=memory_replicas if memory_every else 0,
            ) or CheckpointManager(
                directory_or_manager, storage_options=storage_options, on_busy=on_busy,
                checksum=checksum, **retention
            )
        elif given := received_options(**rules, keep_best=keep_best, keep_best_mode=keep_best_mode,
                                save_best_only=save_best_only or None):
            raise ConfigError(
                f"Invalid retention options: Received: {given} with a ready "
                f"{type(directory_or_manager).__name__}, whose own retention applies. Pass "
                "them to CheckpointManager(...), or pass a directory."
            )
        self.manager = directory_or_manager
        if _world_size(self.manager) > 1:
            apply_multiworker_fit_patch()  # before fit() builds anything (Keras 3 under multi-worker MWMS)
        self._ray_train = ray_train_reporter(self.manager)  # inside Ray Train: report each commit
        self.save_freq = save_freq
        self.memory_every = memory_tier_interval(memory_every, self.manager)
        self.auto: AutoSaveFreq | None = None  # the save_freq="auto" schedule
        if save_freq == "auto":
            self.auto = AutoSaveFreq(job_mtbf_s(mtbf, _world_size(self.manager)),
                                     async_save=async_save)
        self._pending: Any = None  # auto: the last save's result, until its costs are learnt
        # Batch saves carry training logs only: epoch ends add the val_ metrics.
        self._epoch_saves = self.monitor is not None and save_freq != "epoch"
        self._monitor_warned = False
        if self._epoch_saves:
            log.info("save_freq=%s with monitor %r: also saving at every epoch end, "
                     "where fit() logs validation metrics", save_freq, self.monitor)
        self.restore_on_begin = restore
        self.new_run = new_run
        self._started = False  # a later fit() with this callback continues its own run
        self.async_save = async_save
        self.save_on_train_end = save_on_train_end
        self.grace_period_s = grace_period_s
        self.preempted = False
        self._sigterm = SigtermGuard()
        self._train_notices = RayTrainNotices()  # inside Ray Train: get_preemption_info()
        self.restored_step: int | None = None
        self.restored_manifest: Manifest | None = None
        self.restored_tier: str | None = None  # "memory" or "storage"
        self._reset_position()

    def _reset_position(self) -> None:
        self._global_step = 0
        self._epoch = 0
        self._batch = 0  # batches done in the current epoch
        self._batch_begin = 0
        self._epoch_done = False
        self._last_saved_step: int | None = None
        self._skip: tuple[int, int] | None = None  # (epoch, batches to skip)
        self._emergency_target: int | None = None
        self._deferred_save = False  # a batch save on an epoch's last batch, for on_epoch_end
        self._tell_progress = None  # set at train begin (rank 0 on Ray)

    # -- begin: restore -------------------------------------------------------
    def on_train_begin(self, logs=None):
        previous = self._global_step  # this callback's own count, from an earlier fit()
        self._reset_position()
        self.restored_step, self.restored_manifest, self.restored_tier = None, None, None
        self._sigterm.install()  # released (and a SIGTERM passed on) at train end
        # The optimizer's count restarts at 0 after a recompile; ours does not.
        self._global_step = max(_optimizer_iterations(self.model), previous)
        newest = self.manager.latest_step()
        if newest is not None and not (self.restore_on_begin or self.new_run or self._started):
            raise self._fresh_run_refused(newest)  # before claiming: a refused launch fences no one
        if isinstance(self.manager, CheckpointManager) and self.manager.lease.held is None:
            # Fence an earlier writer still running here *before* reading where to
            # continue, so nothing it commits afterwards is taken for this run's history.
            self.manager.claim()
            newest = self.manager.latest_step()
        if self.restore_on_begin:
            self._restore_newest(newest)
        self._settle_history(newest)
        self._started = True
        self._tell_progress = self._progress_sink()
        if hasattr(self.manager, "prepare"):
            # What fit() builds at its first step (Adam's slots), then the plan and
            # host buffers: the first save then blocks no longer than later ones.
            ensure_built_optimizer(self.model)
            self.manager.prepare(self.model)
        if self.auto is not None:
            self._pending = None
            self.auto.start(self._global_step, self.restored_manifest)

    def _restore_newest(self, newest: int | None) -> None:
        """Continue from the newest checkpoint, if any. On Ray the memory tier
        counts too: the coordinator is asked once where to continue, and the
        restore starts from that answer."""
        if hasattr(self.manager, "restore_plan"):
            plan = self.manager.restore_plan()
            if plan is not None:
                self._continue_from(self.manager.restore(self.model, plan=plan))
        elif newest is not None:
            self._continue_from(self.manager.restore(self.model))

    def _continue_from(self, manifest) -> None:
        self.restored_manifest, self.restored_step = manifest, manifest.step
        self.restored_tier = getattr(self.manager, "restored_tier", None) or "storage"
        # A step restored from memory is not in storage yet: the train-end save writes it.
        self._global_step = manifest.step
        self._last_saved_step = manifest.step if self.restored_tier == "storage" else None
        loop = manifest.loop or LoopState()
        apply_training_state(self.model, TrainingState.from_json(loop.training))
        next_epoch, next_batch = self._resume_position(loop)
        self.model._initial_epoch = next_epoch
        self._epoch = next_epoch
        if next_batch > 0:
            self._skip = (next_epoch, next_batch)
            self._install_skipper(next_batch)
        log.info("resumed from step %d (from %s; epoch %d, batch %d)", manifest.step,
                 self.restored_tier, next_epoch + 1, next_batch)

    def _settle_history(self, newest: int | None) -> None:
        """One directory, one run's history (see :mod:`ckptmgr.history`): steps
        newer than the one training continues from are moved aside before
        training writes those step numbers again (a fresh run over another run's
        checkpoints was refused before, unless ``new_run``)."""
        if newest is None:
            return
        if self.restored_step is not None:
            if newest > self.restored_step:
                self.manager.supersede_after(
                    self.restored_step, f"training resumed from step {self.restored_step}")
        elif self.new_run:
            self.manager.supersede_after(None, "a new run started here (new_run=True)")

    def _fresh_run_refused(self, newest: int) -> ConfigError:
        return ConfigError(
            f"{self.manager.directory} already holds checkpoints (newest: step {newest}) "
            "and restore=False. Pass restore=True to continue that run, new_run=True "
            "to start a new one (the old steps are moved to superseded/), or use a new directory."
        )

    def _resume_position(self, loop: LoopState) -> tuple[int, int]:
        """Where to continue. A batch save on an epoch's last batch leaves nothing
        of that epoch to train: continue with the next one (an epoch of skipped
        batches only would end with unbuilt metrics, and Keras would refuse)."""
        steps = (self.params or {}).get("steps")
        if steps and loop.next_batch >= steps:
            return loop.next_epoch + 1, 0
        return loop.next_epoch, loop.next_batch

    def _install_skipper(self, batches: int) -> None:
        """Consume ``batches`` of the resumed epoch without training on them."""
        model = self.model
        model.train_function = batch_skipper(model, batches)

    # -- progress -----------------------------------------------------------
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._batch, self._epoch_done = epoch, 0, False

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_begin = batch

    def on_train_batch_end(self, batch, logs=None):
        if self._skip is not None:
            skip_epoch, skip_batches = self._skip
            if self._epoch == skip_epoch and batch < skip_batches:
                self._batch = batch + 1
                return
            self._skip = None
        done = batch - self._batch_begin + 1
        before = self._global_step
        self._global_step += done
        self._batch = batch + 1
        self._note_progress(logs)
        if self._emergency_due(before):
            self._emergency_save(logs)
            return
        if self._batch_save_due(before, done):
            if self._epoch_saves and self._ends_epoch():
                self._deferred_save = True  # on_epoch_end saves it, with the val_ metrics
            else:
                self._save(logs, next_epoch=self._epoch, next_batch=self._batch)
        elif self.memory_every and before // self.memory_every != self._global_step // self.memory_every:
            loop = self._loop_state(next_epoch=self._epoch, next_batch=self._batch)
            self.manager.save(self._global_step, self.model, metrics=scalar_logs(logs), loop=loop,
                              tier="memory")

    def _batch_save_due(self, before: int, steps: int) -> bool:
        """A multiple of ``save_freq`` was crossed, or the auto interval reached."""
        if self.auto is not None:
            self.auto.timer.tick(busy=_writing(self._pending), steps=steps)
            return self.auto.due(self._global_step)
        return self.save_freq != "epoch" and before // self.save_freq != self._global_step // self.save_freq

    def _ends_epoch(self) -> bool:
        """True after the epoch's last batch (unknown when fit() has no steps count)."""
        steps = (self.params or {}).get("steps")
        return bool(steps) and self._batch >= steps

    def _progress_sink(self):
        """Where rank 0 on Ray sends its step and loss (the driver's watch,
        ``ckptmgr run``), looked up once per fit(); None elsewhere."""
        if getattr(self.manager, "rank", None) != 0 or not hasattr(self.manager, "note_progress"):
            return None
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        return functools.partial(self.manager.note_progress, epochs=epochs,
                                 total_steps=steps * epochs if steps and epochs else None)

    def _note_progress(self, logs, epoch_end: bool = False) -> None:
        if self._tell_progress is not None:
            self._tell_progress(self._global_step, logs, epoch=self._epoch + 1, epoch_end=epoch_end)

    def on_epoch_end(self, epoch, logs=None):
        self._note_progress(logs, epoch_end=True)
        self._skip = None
        logged = self._monitor_logged(epoch, logs)
        deferred, self._deferred_save = self._deferred_save, False
        self._epoch_done = not self._stopped_mid_epoch()
        if self.save_freq == "epoch" or deferred or (self._epoch_saves and logged):
            self._save_where_training_stands(logs)

    def _stopped_mid_epoch(self) -> bool:
        """fit() ends an epoch it stopped early (``model.stop_training``) with on_epoch_end
        too. Known only when Keras knows the epoch's length."""
        steps = (self.params or {}).get("steps")
        return bool(getattr(self.model, "stop_training", False) and steps and self._batch < steps)

    def _monitor_logged(self, epoch: int, logs) -> bool:
        """Whether the monitored metric is in this epoch's logs; warns once if not."""
        if self.monitor is None:
            return False
        if self.monitor in (logs or {}):
            return True
        if not self._monitor_warned:
            self._monitor_warned = True
            log.warning(
                "monitor %r is not in the logs of epoch %d (logged: %s): checkpoints carry "
                "it only when fit() logs it. Pass validation_data to fit() for val_ "
                "metrics, or monitor a logged metric.",
                self.monitor, epoch + 1, ", ".join(sorted(logs or {})) or "nothing",
            )
        return False

    def on_train_end(self, logs=None):
        try:
            if self.save_on_train_end and self._global_step != self._last_saved_step:
                self._save_where_training_stands(logs)
            self.manager.wait_until_finished()
            if self._ray_train is not None:
                self._ray_train.finish()
        finally:
            self.model._initial_epoch = None
            self._sigterm.release()  # after the emergency checkpoint: pass SIGTERM on

    # -- saving ---------------------------------------------------------------
    def _save_where_training_stands(self, logs) -> None:
        """Save after a finished epoch, or inside one (the rest is still to train)."""
        if self._epoch_done:
            self._save(logs, next_epoch=self._epoch + 1, next_batch=0)
        else:
            self._save(logs, next_epoch=self._epoch, next_batch=self._batch)

    def _save(self, logs, *, next_epoch: int, next_batch: int) -> None:
        step = self._global_step
        if step == self._last_saved_step:
            return
        loop = self._loop_state(next_epoch=next_epoch, next_batch=next_batch)
        if self.auto is not None:
            # The previous save's costs. Every rank waits for the same one (it has
            # normally finished: the interval outlasts the write), so all agree.
            self.auto.learn(self._take_pending())
            loop.cadence = self.auto.record()
        result = self.manager.save(
            step,
            self.model,
            metrics=scalar_logs(logs),
            loop=loop,
            blocking=not self.async_save,
        )
        if self._ray_train is not None:  # every rank, every save: Ray Train's report is a barrier
            self._ray_train.saved(step, result)
        if result is not None:  # None: skipped, the previous save still writing
            self._last_saved_step = step
        if self.auto is not None:
            self._schedule_auto(step, result)

    def _schedule_auto(self, step: int, result: Any) -> None:
        """The next auto save: one interval on. The first save is waited for,
        once, so that the rule starts from a measured cost."""
        self._pending = result
        if not self.auto.estimator.measured:
            self.auto.learn(self._take_pending())
        self.auto.schedule(step)
        self.auto.timer.restart()  # the save's own time is not a training step

    def _take_pending(self) -> Manifest | None:
        """The committed manifest of the last save, waiting for it; None when it
        was skipped or failed (the manager raises that at its next call)."""
        pending, self._pending = self._pending, None
        if pending is not None and hasattr(pending, "result"):
            try:
                pending = pending.result()
            except Exception:  # noqa: BLE001 - reported by the manager's next call
                return None
        return committed_manifest(pending)


    def _loop_state(self, *, next_epoch: int, next_batch: int) -> LoopState:
        return LoopState(
            epoch=self._epoch,
            batch=self._batch,
            next_epoch=next_epoch,
            next_batch=next_batch,
            training=capture_training_state(self.model).to_json(),
        )


def _check_save_freq(save_freq: Any, mtbf: Any) -> None:
    if isinstance(save_freq, str):
        ok = save_freq in ("epoch", "auto")
    else:
        ok = isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq >= 1
    if not ok:
        raise ConfigError(
            f"Invalid save_freq: Received: save_freq={save_freq!r}. "
            "Use 'epoch', 'auto' or a number of batches >= 1."
        )
    if mtbf is not None and save_freq != "auto":
        raise ConfigError(
            f"Invalid mtbf: Received: mtbf={mtbf!r} with save_freq={save_freq!r}. "
            "mtbf sets the interval of save_freq='auto' only: pass save_freq='auto', or drop mtbf."
        )
    if mtbf is not None:
        parse_mtbf(mtbf)


def _world_size(manager: Any) -> int:
    """Nodes whose failures stop the job: the distributed client's world size, else 1."""
    return int(getattr(getattr(manager, "options", None), "world_size", 1) or 1)


def _writing(result: Any) -> bool:
    """Whether a save's background write is still running."""
    return result is not None and hasattr(result, "done") and not result.done()


def _optimizer_iterations(model) -> int:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return 0
    return int(np.asarray(optimizer.iterations.numpy()))

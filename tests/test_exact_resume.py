"""Interrupted-and-resumed fit() ends bit-identical to an uninterrupted one.

Deterministic setup: keras.utils.set_random_seed, TF op determinism,
shuffle=False. The model has Dropout, so seed-generator state must be
restored too, and Adam, so optimizer slots and iterations must be.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import tensorflow as tf  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402

SAMPLES, BATCH, EPOCHS = 96, 16, 3  # 6 batches per epoch, 18 in all


class Interrupt(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    """Raise after ``global_batch`` batches, like a crash mid-epoch."""

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch, self.seen = global_batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.global_batch:
            self.act()

    def act(self) -> None:
        raise Interrupt()


class StopAt(InterruptAt):
    """Set ``model.stop_training`` after ``global_batch`` batches: fit() ends
    the epoch (on_epoch_end still runs) and returns, as after an abandoned
    emergency checkpoint or the user's own stopping callback."""

    def act(self) -> None:
        self.model.stop_training = True


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


def _fit(directory, save_freq, interrupt_at=None, *, shuffle=False, steps_per_execution=1, stop_at=None):
    model = _model()
    if steps_per_execution > 1:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"],
                      steps_per_execution=steps_per_execution)
    callback = CheckpointCallback(directory, save_freq=save_freq)
    callbacks = [callback] + ([InterruptAt(interrupt_at)] if interrupt_at else [])
    callbacks += [StopAt(stop_at)] if stop_at else []
    x, y = _data()
    try:
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=shuffle, verbose=0, callbacks=callbacks
        )
    except Interrupt:
        callback.manager.wait_until_finished()  # what a crash leaves: committed saves
        return model, callback, None
    return model, callback, history


def _state(model):
    return [v.numpy() for v in model.weights + model.optimizer.variables]


@pytest.fixture(autouse=True)
def _determinism():
    tf.config.experimental.enable_op_determinism()


@pytest.mark.parametrize(
    "save_freq, interrupt_at, resumed_at",
    [
        ("epoch", 10, (1, 0)),  # last save at end of epoch 0 (step 6)
        (4, 11, (1, 2)),  # last save at step 8: epoch 1, 2 batches in
        # A batch save on an epoch's last batch (step 6 of 6): resuming used to
        # skip a whole epoch of batches and crash on unbuilt metrics (issue 9).
        (6, 8, (0, 6)),
    ],
    ids=["epoch", "mid-epoch", "batch-save-at-epoch-end"],
)
def test_resume_is_bit_identical(tmp_path, save_freq, interrupt_at, resumed_at):
    reference, _, ref_history = _fit(tmp_path / "reference", save_freq)

    _, _, none = _fit(tmp_path / "run", save_freq, interrupt_at=interrupt_at)
    assert none is None
    resumed, callback, history = _fit(tmp_path / "run", save_freq)

    manifest = callback.restored_manifest
    assert manifest is not None
    assert (manifest.loop.next_epoch, manifest.loop.next_batch) == resumed_at
    for ref, got in zip(_state(reference), _state(resumed), strict=True):
        np.testing.assert_array_equal(ref, got)
    assert int(resumed.optimizer.iterations) == EPOCHS * SAMPLES // BATCH
    # Epoch-end logs of the resumed epoch match too: metric state was restored.
    assert history.history["loss"][-1] == ref_history.history["loss"][-1]
    assert CheckpointManager(tmp_path / "run").latest_step() == EPOCHS * SAMPLES // BATCH


@pytest.mark.parametrize("save_freq", ["epoch", 4])
def test_a_stop_mid_epoch_is_saved_where_it_stopped_and_resumes_exactly(tmp_path, save_freq):
    """fit() stopped mid-epoch still calls on_epoch_end: the epoch's save (or
    the train-end save after it) recorded the epoch as finished, and a resume
    skipped the rest of it."""
    reference, _, _ = _fit(tmp_path / "reference", save_freq)
    _fit(tmp_path / "run", save_freq, stop_at=9)  # epoch 1, 3 of 6 batches in
    manifest = CheckpointManager(tmp_path / "run").manifest()
    assert manifest.step == 9
    assert (manifest.loop.next_epoch, manifest.loop.next_batch) == (1, 3)
    resumed, callback, _ = _fit(tmp_path / "run", save_freq)
    assert callback.restored_step == 9
    for ref, got in zip(_state(reference), _state(resumed), strict=True):
        np.testing.assert_array_equal(ref, got)
    assert int(resumed.optimizer.iterations) == EPOCHS * SAMPLES // BATCH


def test_completed_run_resumes_to_a_no_op(tmp_path):
    first, _, _ = _fit(tmp_path / "run", "epoch")
    again, callback, _ = _fit(tmp_path / "run", "epoch")
    assert callback.restored_step == EPOCHS * SAMPLES // BATCH
    for a, b in zip(_state(first), _state(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_shuffle_true_restores_position_not_data_order(tmp_path):
    """What the README promises for shuffle=True: exact state and position,
    the same number of steps in all; not bit-identical weights."""
    reference, _, _ = _fit(tmp_path / "reference", 4, shuffle=True)
    _fit(tmp_path / "run", 4, interrupt_at=11, shuffle=True)
    saved = CheckpointManager(tmp_path / "run").manifest(8)
    resumed, callback, _ = _fit(tmp_path / "run", 4, shuffle=True)
    assert callback.restored_step == 8
    assert (saved.loop.next_epoch, saved.loop.next_batch) == (1, 2)
    total = EPOCHS * SAMPLES // BATCH
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations) == total
    assert CheckpointManager(tmp_path / "run").latest_step() == total


def test_callback_reused_across_a_recompile_keeps_counting(tmp_path):
    """Issue 9: the step came from the optimizer's iterations, which a new
    optimizer restarts at 0, so the second fit() re-saved step 4 and stopped."""
    model = _model()
    x, y = _data()
    callback = CheckpointCallback(tmp_path / "run", save_freq=4, restore=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    first = CheckpointManager(tmp_path / "run").steps()
    assert first == [4, 6]
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    assert CheckpointManager(tmp_path / "run").steps() == [4, 6, 8, 12]
    assert CheckpointManager(tmp_path / "run").verify(12)[0].ok


@pytest.mark.parametrize("steps_per_execution, save_freq, interrupt_at", [(2, 4, 11), (3, 3, 10)])
def test_resume_with_steps_per_execution(tmp_path, steps_per_execution, save_freq, interrupt_at):
    """Issue 9: resume is exact when fit() runs several batches per call."""
    spe = steps_per_execution
    reference, _, _ = _fit(tmp_path / "reference", save_freq, steps_per_execution=spe)
    _fit(tmp_path / "run", save_freq, interrupt_at // spe, steps_per_execution=spe)  # InterruptAt counts calls
    saved = CheckpointManager(tmp_path / "run").latest_step()
    assert 0 < saved < EPOCHS * SAMPLES // BATCH
    resumed, callback, _ = _fit(tmp_path / "run", save_freq, steps_per_execution=spe)
    assert callback.restored_step == saved
    for ref, got in zip(_state(reference), _state(resumed), strict=True):
        np.testing.assert_array_equal(ref, got)
    assert int(resumed.optimizer.iterations) == EPOCHS * SAMPLES // BATCH

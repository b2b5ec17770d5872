"""Subprocess body for tests/test_jax_backend.py: one Keras backend per process.

Keras fixes its backend at import (``KERAS_BACKEND``), so each step of the
cross-backend tests runs here, in a fresh process, and leaves what it saw in
``.npz`` files (weights, then optimizer variables, in order) for the test to
compare. Usage: ``python backend_worker.py COMMAND WORKDIR``:

- ``train`` (JAX): an uninterrupted reference run into ``WORKDIR/reference``,
  then a run into ``WORKDIR/run`` that crashes after ``CRASH_AT`` batches
  (a batch save every ``SAVE_FREQ``: the newest checkpoint is mid-epoch).
- ``resume`` (JAX): a fresh process continues ``WORKDIR/run`` to the end;
  stock ``keras.saving.load_model`` opens the reference run's newest archive;
  ``CheckpointManager.restore`` loads the TensorFlow-written checkpoint.
- ``tensorflow`` (TensorFlow): stock ``load_model`` opens the JAX-written
  archive and ``CheckpointManager.restore`` loads it into a model; a short
  run writes ``WORKDIR/tf`` with ``CheckpointCallback``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402

SAMPLES, BATCH, EPOCHS = 96, 16, 3  # 6 batches per epoch, 18 in all
SAVE_FREQ, CRASH_AT = 4, 11  # newest save before the crash: step 8 (epoch 2, batch 2)


class Crash(Exception):
    pass


class CrashAt(keras.callbacks.Callback):
    """Raise after ``batches`` batches, as a crash mid-epoch would."""

    def __init__(self, batches: int):
        super().__init__()
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batches:
            raise Crash()


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    return x, y


def model():
    """Dropout (seed-generator state) and Adam (slots, iterations): both must
    come back for a bit-identical resume."""
    keras.utils.set_random_seed(42)
    m = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(1),
    ])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return m


def fit(directory: str, crash_at: int | None = None):
    m = model()
    callback = CheckpointCallback(directory, save_freq=SAVE_FREQ)
    x, y = data()
    try:
        history = m.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                        callbacks=[callback] + ([CrashAt(crash_at)] if crash_at else []))
    except Crash:
        callback.manager.wait_until_finished()  # what a crash leaves: committed saves
        return m, callback, None
    return m, callback, history


def dump(path: str, m, **extra) -> None:
    """Weights then optimizer variables, as arrays named by position."""
    variables = list(m.weights) + (list(m.optimizer.variables) if m.optimizer is not None else [])
    arrays = {f"v{i:03d}": np.asarray(keras.ops.convert_to_numpy(v)) for i, v in enumerate(variables)}
    np.savez(path, **arrays, **extra)


def newest_archive(directory: str) -> str:
    manager = CheckpointManager(directory)
    return os.path.join(directory, manager.manifest(manager.latest_step()).archive)


def train(work: str) -> None:
    reference, _, history = fit(os.path.join(work, "reference"))
    dump(os.path.join(work, "reference.npz"), reference, loss=history.history["loss"][-1])
    _, _, crashed = fit(os.path.join(work, "run"), crash_at=CRASH_AT)
    assert crashed is None


def resume(work: str) -> None:
    resumed, callback, history = fit(os.path.join(work, "run"))
    loop = callback.restored_manifest.loop
    dump(os.path.join(work, "resumed.npz"), resumed, loss=history.history["loss"][-1],
         restored=[callback.restored_step, loop.next_epoch, loop.next_batch])
    dump(os.path.join(work, "jax_loaded.npz"),
         keras.saving.load_model(newest_archive(os.path.join(work, "reference"))))
    restored = model()
    manifest = CheckpointManager(os.path.join(work, "tf")).restore(restored)
    dump(os.path.join(work, "tf_restored.npz"), restored, step=manifest.step)


def tensorflow(work: str) -> None:
    dump(os.path.join(work, "tf_loaded.npz"),
         keras.saving.load_model(newest_archive(os.path.join(work, "reference"))))
    restored = model()
    manifest = CheckpointManager(os.path.join(work, "reference")).restore(restored)
    dump(os.path.join(work, "jax_restored_on_tf.npz"), restored, step=manifest.step)
    m = model()
    x, y = data()
    m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
          callbacks=[CheckpointCallback(os.path.join(work, "tf"), save_freq="epoch")])
    dump(os.path.join(work, "tf_written.npz"), m)


if __name__ == "__main__":
    command, work = sys.argv[1:3]
    backend = keras.backend.backend()
    expected = "tensorflow" if command == "tensorflow" else "jax"
    if backend != expected:
        sys.exit(f"{command} needs KERAS_BACKEND={expected}; Keras runs on {backend}")
    {"train": train, "resume": resume, "tensorflow": tensorflow}[command](work)
    print(json.dumps({"backend": backend, "command": command}))

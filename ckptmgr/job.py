"""The example training job behind ``ckptmgr run`` / ``ckptmgr resume``.

A small Dense regression model on deterministic synthetic data, trained with
:class:`~ckptmgr.keras.CheckpointCallback`. The same seed, op determinism and
``shuffle=False`` make an interrupted-and-resumed run end with the same
weights as an uninterrupted one.

Runs in the process that calls it (the CLI, or one Ray worker); TensorFlow and
Keras are imported here, not by the CLI, so the other commands start fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckptmgr.config import JobConfig, TrainingConfig
from ckptmgr.errors import CheckpointNotFoundError


@dataclass(frozen=True)
class JobResult:
    """What a run of the example job did."""

    final_step: int | None  # newest committed checkpoint after training
    restored_step: int | None  # checkpoint training continued from, if any
    epochs: int  # epochs the job trains in total (cfg.training.epochs)
    final_loss: float | None  # training loss of the last epoch run; None if none ran
    directory: str
    preempted: bool = False  # stopped by SIGTERM after an emergency checkpoint


def make_dataset(training: TrainingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic regression data ``(x, y)``, the same for the same seed.

    ``y`` is a fixed nonlinear function of ``x`` plus a little noise, so the
    loss goes down visibly within a few epochs.
    """
    rng = np.random.default_rng(training.seed)
    x = rng.standard_normal((training.samples, training.features), dtype=np.float32)
    w = rng.standard_normal((training.features, 1), dtype=np.float32) / np.sqrt(training.features)
    noise = 0.05 * rng.standard_normal((training.samples, 1), dtype=np.float32)
    y = (np.tanh(x @ w) + 0.5 * (x[:, :1] ** 2) + noise).astype(np.float32)
    return x, y


def build_model(training: TrainingConfig):
    """A compiled Dense regression model (Adam, MSE loss, MAE metric)."""
    import keras

    inputs = keras.Input(shape=(training.features,), name="features")
    h = inputs
    for i, units in enumerate(training.hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    outputs = keras.layers.Dense(1, name="output")(h)
    model = keras.Model(inputs, outputs, name="example_regressor")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=training.learning_rate),
        loss="mse",
        metrics=["mae"],
    )
    return model


def seed_everything(seed: int) -> None:
    """Python, NumPy and backend RNGs from ``seed``; deterministic TF ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def run_local(cfg: JobConfig, *, resume: bool) -> JobResult:
    """Train the example job in this process, checkpointing to ``cfg.checkpoint``.

    Both ``run`` and ``resume`` continue from the newest checkpoint that
    verifies, if there is one (the callback restores it). ``resume=True``
    additionally requires one: with none, it raises
    :class:`~ckptmgr.errors.CheckpointNotFoundError` before building anything.
    """
    from ckptmgr.manager import CheckpointManager

    ckpt = cfg.checkpoint
    if resume:  # checked before importing TensorFlow: fails fast
        probe = CheckpointManager(ckpt.directory, storage_options=ckpt.storage_options)
        if probe.latest_step() is None:
            raise CheckpointNotFoundError(
                f"Nothing to resume under {ckpt.directory}: it holds no checkpoints; "
                "use `ckptmgr run` to start."
            )

    from ckptmgr.keras import CheckpointCallback

    cfg.user_code.user_code().load()  # the user's modules, before any model is built
    seed_everything(cfg.training.seed)
    model = build_model(cfg.training)
    x, y = make_dataset(cfg.training)
    callback = CheckpointCallback(
        ckpt.directory,
        storage_options=ckpt.storage_options,
        save_freq=ckpt.save_freq,
        mtbf=ckpt.mtbf,
        on_busy=ckpt.on_busy,
        checksum=ckpt.checksum,
        **ckpt.retention_options(),
    )
    try:
        history = model.fit(
            x,
            y,
            batch_size=cfg.training.batch_size,
            epochs=cfg.training.epochs,
            shuffle=cfg.training.shuffle,
            callbacks=[callback],
            verbose=0,
        )
    finally:
        callback.manager.close()
    losses = history.history.get("loss") or []
    return JobResult(
        final_step=callback.manager.latest_step(),
        restored_step=callback.restored_step,
        epochs=cfg.training.epochs,
        final_loss=float(losses[-1]) if losses else None,
        directory=callback.manager.directory,
        preempted=callback.preempted,
    )

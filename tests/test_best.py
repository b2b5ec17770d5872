"""Best checkpoints as Keras users know them (issue 9, item 4).

``monitor``/``mode``/``save_best_only`` on ``CheckpointCallback``; ``keep_best``
keeps working; with a batch ``save_freq`` every epoch end is saved too, so the
checkpoints carry the validation metrics that keep-best ranks. Real ``fit()``
with a tiny model: 6 batches an epoch, 3 epochs, validation data on which the
model gets worse as it trains, so the best checkpoint is never the newest.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import tensorflow as tf  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.config import load_config  # noqa: E402
from ckptmgr.errors import ConfigError  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402
from ckptmgr.retention import KeepBest, infer_mode  # noqa: E402
from test_exact_resume import BATCH, EPOCHS, SAMPLES, Interrupt, InterruptAt, _data, _model, _state  # noqa: E402

STEPS_PER_EPOCH = SAMPLES // BATCH  # 6
TOTAL = EPOCHS * STEPS_PER_EPOCH  # 18
EPOCH_ENDS = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]  # 6, 12, 18


@pytest.fixture(autouse=True)
def _determinism():
    tf.config.experimental.enable_op_determinism()


@pytest.fixture
def saves(monkeypatch):
    """Every step the callback asked the manager to write, in order."""
    written: list[int] = []
    real_save = CheckpointManager.save

    def spy(self, step, model, **kwargs):
        written.append(step)
        return real_save(self, step, model, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", spy)
    return written


def _validation():
    """The training targets negated: val_loss rises while training improves."""
    x, y = _data()
    return x[:32], -y[:32]


def _fit(directory, interrupt_at=None, validation=True, **options):
    model = _model()
    callback = CheckpointCallback(directory, **options)
    callbacks = [callback] + ([InterruptAt(interrupt_at)] if interrupt_at else [])
    x, y = _data()
    try:
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
            validation_data=_validation() if validation else None, callbacks=callbacks,
        )
    except Interrupt:
        callback.manager.wait_until_finished()
        return model, callback, None
    return model, callback, history


def _best_epoch_end(history) -> int:
    val_loss = history.history["val_loss"]
    best = EPOCH_ENDS[int(np.argmin(val_loss))]
    assert best != TOTAL, "the data must make the best checkpoint an older one"
    return best


# -- mode="auto" -----------------------------------------------------------------------


def _keras_metrics_with_a_direction():
    """Every metric Keras ships that knows its direction, as fit() names it."""
    from keras.src.metrics import ALL_OBJECTS

    needs = {"num_classes": 2, "target_class_ids": [0], "recall": 0.5, "precision": 0.5,
             "specificity": 0.5, "sensitivity": 0.5}
    found = []
    for cls in ALL_OBJECTS:
        params = inspect.signature(cls.__init__).parameters
        required = [p for p in params.values()
                    if p.default is p.empty and p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
        if any(p.name not in needs for p in required):
            continue  # Metric, MeanMetricWrapper: no direction of their own
        metric = cls(**{k: v for k, v in needs.items() if k in params and params[k].default is params[k].empty})
        if hasattr(metric, "_direction"):
            found.append((metric.name, "max" if metric._direction == "up" else "min"))
    return found


def test_auto_mode_agrees_with_the_direction_of_every_keras_metric():
    metrics = _keras_metrics_with_a_direction()
    assert len(metrics) > 30  # the table would rot silently otherwise
    for name, mode in metrics:
        for logged in (name, f"val_{name}", f"val_out_a_{name}", f"{name}_1"):
            assert infer_mode(logged) == mode, logged


@pytest.mark.parametrize("name, mode", [
    ("loss", "min"), ("val_loss", "min"), ("val_out_a_loss", "min"),
    ("val_acc", "max"), ("val_out_b_accuracy", "max"), ("auc_2", "max"), ("val_mae", "min"),
])
def test_auto_mode_from_names_fit_logs(name, mode):
    assert infer_mode(name) == mode


def test_auto_mode_refuses_a_name_it_cannot_infer():
    with pytest.raises(ConfigError) as info:
        infer_mode("val_score")
    message = str(info.value)
    assert message.startswith("Invalid mode: Received: mode='auto' for metric 'val_score'")
    assert "Use mode='min'" in message and "\n" not in message


def test_manager_and_config_take_auto(tmp_path):
    manager = CheckpointManager(tmp_path / "a", keep_best="val_accuracy", keep_best_mode="auto")
    assert manager.retention.rules == (KeepBest("val_accuracy", "max"),)
    path = tmp_path / "job.yaml"
    path.write_text(f"checkpoint: {{directory: {tmp_path / 'b'}, keep_best: val_auc, keep_best_mode: auto}}\n")
    assert load_config(path).checkpoint.retention_policy().rules == (KeepBest("val_auc", "max"),)
    path.write_text(f"checkpoint: {{directory: {tmp_path / 'b'}, keep_best: score, keep_best_mode: auto}}\n")
    with pytest.raises(ConfigError, match=r"keep_best_mode='auto' for metric 'score'"):
        load_config(path)


def test_callback_infers_the_mode_from_monitor(tmp_path):
    def rule(**options):
        return CheckpointCallback(tmp_path / "run", **options).manager.retention.rules

    assert rule(monitor="val_accuracy", keep_best=1) == (KeepBest("val_accuracy", "max"),)
    assert rule(monitor="val_mae", keep_best=2) == (KeepBest("val_mae", "min", 2),)
    assert rule(monitor="val_mae", mode="max", keep_best=1) == (KeepBest("val_mae", "max"),)
    assert rule(save_best_only=True) == (KeepBest("val_loss", "min"),)  # Keras's default monitor
    assert rule(keep_best="val_accuracy") == (KeepBest("val_accuracy", "min"),)  # the old default
    assert rule(keep_best="val_accuracy", keep_best_mode="auto") == (KeepBest("val_accuracy", "max"),)
    assert rule(monitor="val_score") == ()  # monitoring alone keeps nothing extra: no mode needed


# -- contradictory options ----------------------------------------------------------------


@pytest.mark.parametrize("options, start", [
    (dict(keep_best="val_loss", monitor="val_loss"), "Invalid keep_best: Received: keep_best='val_loss', monitor='val_loss'"),
    (dict(keep_best="val_loss", mode="max"), "Invalid keep_best: Received: keep_best='val_loss', mode='max'"),
    (dict(keep_best="val_loss", save_best_only=True), "Invalid keep_best: Received: keep_best='val_loss', save_best_only=True"),
    (dict(monitor="val_acc", keep_best_mode="max"), "Invalid keep_best_mode: Received: keep_best_mode='max'"),
    (dict(keep_best=3), "Invalid monitor: Received: monitor=None, keep_best=3"),
    (dict(mode="max"), "Invalid monitor: Received: monitor=None, mode='max'"),
    (dict(monitor="val_loss", keep_best=0), "Invalid keep_best: Received: keep_best=0"),
    (dict(monitor="val_loss", keep_best=True), "Invalid keep_best: Received: keep_best=True"),
    (dict(save_best_only=True, keep_last=3), "Invalid save_best_only: Received: save_best_only=True, keep_last=3"),
    (dict(save_best_only=True, monitor="val_loss", keep_best=2), "Invalid save_best_only: Received: save_best_only=True, keep_best=2"),
    (dict(save_best_only="yes"), "Invalid save_best_only: Received: save_best_only='yes'"),
    (dict(monitor="val_loss", mode="best", keep_best=1), "Invalid mode: Received: mode='best'"),
    (dict(monitor="val_score", keep_best=1), "Invalid mode: Received: mode='auto' for metric 'val_score'"),
    (dict(monitor="", keep_best=1), "Invalid monitor: Received: monitor=''"),
])
def test_contradictory_options_are_refused_in_one_line(tmp_path, options, start):
    with pytest.raises(ConfigError) as info:
        CheckpointCallback(tmp_path / "run", **options)
    message = str(info.value)
    assert message.startswith(start), message
    assert "Use " in message and "\n" not in message


@pytest.mark.parametrize("options", [dict(keep_last=3), dict(save_best_only=True),
                                     dict(monitor="val_loss", keep_best=2)])
def test_retention_options_with_a_ready_manager_are_refused(tmp_path, options):
    """The manager's own retention applies: the options would be silently ignored."""
    with pytest.raises(ConfigError, match=r"^Invalid retention options: Received: .* ready CheckpointManager"):
        CheckpointCallback(CheckpointManager(tmp_path / "run"), **options)
    CheckpointCallback(CheckpointManager(tmp_path / "run"), monitor="val_loss")  # no retention: fine


# -- epoch-end saves with a batch save_freq ----------------------------------------------------


def test_batch_save_freq_with_keep_best_saves_every_epoch_end_and_keeps_the_best(tmp_path, saves):
    """Issue 9: with save_freq=4 and keep_best='val_loss' only the final save had
    val_loss. Now epoch ends (6, 12, 18) are saved too; the batch save at 12 is
    the epoch's last batch, so it waits for the epoch end (saved once, with val_loss)."""
    _, callback, history = _fit(tmp_path / "run", save_freq=4, keep_best="val_loss")
    assert saves == [4, 6, 8, 12, 16, 18]
    best = _best_epoch_end(history)
    manager = CheckpointManager(tmp_path / "run")
    assert manager.steps() == [best, TOTAL]
    for step in (best, TOTAL):
        assert manager.manifest(step).metrics["val_loss"] == pytest.approx(
            history.history["val_loss"][EPOCH_ENDS.index(step)])


def test_monitor_alone_adds_epoch_end_saves_and_deletes_nothing(tmp_path, saves, caplog):
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        _fit(tmp_path / "run", save_freq=4, monitor="val_loss")
    assert any("also saving at every epoch end" in r.getMessage() for r in caplog.records)
    manager = CheckpointManager(tmp_path / "run")
    assert manager.steps() == saves == [4, 6, 8, 12, 16, 18]
    for step in EPOCH_ENDS:
        manifest = manager.manifest(step)
        assert "val_loss" in manifest.metrics
        assert (manifest.loop.next_epoch, manifest.loop.next_batch) == (EPOCH_ENDS.index(step) + 1, 0)
    for step in (4, 8, 16):
        assert "val_loss" not in manager.manifest(step).metrics


def test_batch_saves_on_epoch_ends_are_not_doubled(tmp_path, saves):
    _fit(tmp_path / "run", save_freq=STEPS_PER_EPOCH, monitor="val_loss")
    assert saves == EPOCH_ENDS
    manager = CheckpointManager(tmp_path / "run")
    assert all("val_loss" in manager.manifest(s).metrics for s in EPOCH_ENDS)


def test_monitor_with_save_freq_epoch_changes_nothing_and_says_nothing(tmp_path, saves, caplog):
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        _fit(tmp_path / "run", save_freq="epoch", monitor="val_loss")
    assert saves == EPOCH_ENDS
    assert not any("epoch end" in r.getMessage() for r in caplog.records)


def test_monitored_metric_never_logged_warns_once(tmp_path, saves, caplog):
    """No validation data: say so once, as Keras does, and add no epoch-end saves."""
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        _fit(tmp_path / "run", validation=False, save_freq=4, monitor="val_loss")
    warnings = [r.getMessage() for r in caplog.records if "is not in the logs" in r.getMessage()]
    assert warnings == [
        "monitor 'val_loss' is not in the logs of epoch 1 (logged: loss, mae): checkpoints "
        "carry it only when fit() logs it. Pass validation_data to fit() for val_ metrics, "
        "or monitor a logged metric."
    ]
    assert saves == [4, 8, 12, 16, 18]  # 12: the deferred batch save is still taken


# -- save_best_only ---------------------------------------------------------------------------


@pytest.mark.parametrize("save_freq, written", [("epoch", EPOCH_ENDS), (4, [4, 6, 8, 12, 16, 18])])
def test_save_best_only_writes_every_save_and_keeps_the_best_and_the_newest(
        tmp_path, saves, save_freq, written):
    """Resume needs the newest state, so every save is written; retention then
    keeps only the best by monitor (val_loss by default) and the newest."""
    _, _, history = _fit(tmp_path / "run", save_freq=save_freq, save_best_only=True)
    assert saves == written
    assert CheckpointManager(tmp_path / "run").steps() == [_best_epoch_end(history), TOTAL]


def test_keep_best_n_with_monitor_is_a_union_with_keep_last(tmp_path):
    _, _, history = _fit(tmp_path / "run", save_freq=4, monitor="val_loss", keep_best=2, keep_last=1)
    order = np.argsort(history.history["val_loss"])
    best_two = sorted(EPOCH_ENDS[i] for i in order[:2])
    assert CheckpointManager(tmp_path / "run").steps() == sorted({*best_two, TOTAL})


# -- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, interrupt_at, resumed_at", [
    # Saves 4, 6, 8 committed; save_best_only kept 6 (best) and 8 (newest).
    (dict(save_freq=4, save_best_only=True), 11, (1, 2)),
    # The batch save at 12 was deferred to the epoch end: resume at the next epoch.
    (dict(save_freq=4, keep_best="val_loss", keep_last=1), 13, (2, 0)),
    (dict(save_freq="epoch", monitor="val_loss", keep_best=1), 14, (2, 0)),
], ids=["save-best-only", "deferred-epoch-end", "epoch"])
def test_resume_with_best_options_is_exact(tmp_path, options, interrupt_at, resumed_at):
    reference, _, ref_history = _fit(tmp_path / "reference", **options)
    _fit(tmp_path / "run", interrupt_at=interrupt_at, **options)
    resumed, callback, history = _fit(tmp_path / "run", **options)

    loop = callback.restored_manifest.loop
    assert (loop.next_epoch, loop.next_batch) == resumed_at
    for ref, got in zip(_state(reference), _state(resumed), strict=True):
        np.testing.assert_array_equal(ref, got)
    assert int(resumed.optimizer.iterations) == TOTAL
    assert history.history["val_loss"][-1] == ref_history.history["val_loss"][-1]
    assert CheckpointManager(tmp_path / "run").steps() == CheckpointManager(tmp_path / "reference").steps()


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_prune_mode_auto(tmp_path):
    from test_cli import assert_clean_failure, cli, tiny_model

    manager = CheckpointManager(tmp_path / "run")
    model = tiny_model()
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)]:
        manager.save(step, model, metrics={"val_accuracy": accuracy, "score": accuracy})
    line = assert_clean_failure(cli("prune", tmp_path / "run", "--keep-best", "score", "--mode", "auto"))
    assert "keep_best_mode='auto' for metric 'score'" in line
    result = cli("prune", tmp_path / "run", "--keep-best", "val_accuracy", "--mode", "auto")
    assert result.returncode == 0, result.stderr
    assert "keep   step 2: keep_best=val_accuracy/max" in result.stdout
    assert manager.steps() == [2, 4]

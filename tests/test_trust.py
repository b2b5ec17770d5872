"""Issue 8: checkpoints that tell the truth.

- non-finite metrics (a diverging loss) are stored losslessly and never make
  a checkpoint unreadable or stop retention;
- the manifest checksums itself: every edit, bit flip or deletion is reported
  by ``verify`` and skipped by restore with a warning naming both steps;
- model-code and architecture errors are not corruption: they propagate with
  the model's own message and never fall back to an older step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import (  # noqa: E402
    IncompatibleCheckpointError,
)
from ckptmgr.io.layout import manifest_name  # noqa: E402
from ckptmgr.io.manifest import Manifest  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402


def small_model(units: int = 3):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, name="dense")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, units)), verbose=0)
    return model


def kernel_of(model) -> np.ndarray:
    return np.asarray(model.get_layer("dense").kernel)


# -- non-finite metrics -----------------------------------------------------------


def test_nan_and_inf_metrics_round_trip_and_keep_last_holds(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2)
    model = small_model()
    values = [math.nan, math.inf, -math.inf, 0.5, math.nan, 1.0, math.inf, 2.0]
    for step, value in enumerate(values, start=1):
        mgr.save(step, model, metrics={"loss": value, "acc": 1.0})
    assert mgr.steps() == [7, 8]  # retention kept working through the NaNs
    assert all(r.ok for r in mgr.verify())
    stored = json.loads((tmp_path / "run" / manifest_name(7)).read_text())
    assert stored["metrics"]["loss"] == "Infinity"  # lossless, and still strict JSON
    assert math.isinf(mgr.manifest(7).metrics["loss"])
    reader = CheckpointManager(tmp_path / "run")
    assert [m.step for m in reader.manifests()] == [7, 8]
    np.testing.assert_array_equal(kernel_of(reader.load()), kernel_of(model))


def test_fit_with_a_diverging_loss_keeps_checkpointing(tmp_path):
    """The loss goes to inf then NaN inside fit(): checkpoints list, verify,
    load, and keep_last holds."""
    x = np.full((64, 4), 1e30, "float32")
    y = np.full((64, 1), -1e30, "float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e10), loss="mse")
    callback = CheckpointCallback(tmp_path / "run", save_freq=2, keep_last=2, on_busy="wait")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert not all(math.isfinite(v) for v in history.history["loss"])  # it did diverge
    mgr = CheckpointManager(tmp_path / "run")
    assert mgr.steps() == [14, 16]
    assert all(r.ok for r in mgr.verify())
    assert any(not math.isfinite(v) for m in mgr.manifests() for v in m.metrics.values())
    assert mgr.load() is not None


def test_schema_1_manifest_with_null_metric_and_naive_time_still_reads(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, small_model())
    path = tmp_path / "run" / manifest_name(1)
    data = json.loads(path.read_text())
    data.update(schema_version=1, created="2026-01-01T10:00:00", metrics={"loss": None})
    for key in ("checksum", "attempt", "writer"):
        data.pop(key)
    data["archive"] = "ckpt-000000001.keras"
    data["files"] = {"ckpt-000000001.keras": data["files"].popitem()[1]}
    os.rename(next((tmp_path / "run").glob("ckpt-000000001-*.keras")), tmp_path / "run" / "ckpt-000000001.keras")
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        manifest = mgr.manifest(1)
    assert any("no time zone; read as UTC" in r.getMessage() for r in caplog.records)
    assert math.isnan(manifest.metrics["loss"])
    assert manifest.created.utcoffset() is not None
    assert mgr.verify(1)[0].ok
    assert mgr.plan_prune().keep == {1: ("newest", "no retention rules")}


# -- the manifest protects itself -----------------------------------------------------


@pytest.fixture
def three_steps(tmp_path):
    mgr = CheckpointManager(tmp_path / "run")
    model = small_model()
    for step in (1, 2, 3):
        model.get_layer("dense").kernel.assign(np.full((4, 3), step, "float32"))
        mgr.save(step, model, metrics={"loss": float(step)}, extra={"epoch": step})
    return mgr, tmp_path / "run"


def test_every_single_bit_flip_in_a_manifest_is_reported(three_steps):
    mgr, root = three_steps
    path = root / manifest_name(3)
    original = path.read_bytes()
    rng = random.Random(8)
    for _ in range(300):
        damaged = bytearray(original)
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        result = mgr.verify(3)[0]
        assert not result.ok, (position, bytes(damaged[max(0, position - 20):position + 20]))
        assert "\n" not in result.problem and "step 3" in result.problem
    path.write_bytes(original)
    assert mgr.verify(3)[0].ok


@pytest.mark.parametrize("edit", [
    ("keras_version", "9.9.9"), ("extra", {"epoch": 30}), ("metrics", {"loss": 0.001}), ("step", 3),
])
def test_edited_manifest_is_skipped_by_restore_with_both_steps_named(three_steps, edit, caplog):
    mgr, root = three_steps
    path = root / manifest_name(3)
    data = json.loads(path.read_text())
    data[edit[0]] = edit[1]
    if edit[0] == "step":  # a digit edit in a number the reader also checks
        path.write_text(path.read_text().replace('"epoch": 3', '"epoch": 4'))
    else:
        path.write_text(json.dumps(data, indent=2))
    assert not mgr.verify(3)[0].ok
    assert "checksum" in mgr.verify(3)[0].problem
    target = small_model()
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.restore(target).step == 2
    assert float(kernel_of(target).flat[0]) == 2.0
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "fell back from step 3 to step 2" in text


def test_deleted_manifest_is_reported_as_an_orphan(three_steps):
    mgr, root = three_steps
    (root / manifest_name(3)).unlink()
    results = {r.step: r for r in mgr.verify()}
    assert results[1].ok and results[2].ok
    assert not results[3].ok and "orphan archive" in results[3].problem
    # Sweeping after the grace time is the only way it goes: not within it.
    assert mgr.sweep() == []
    assert list(root.glob("ckpt-000000003-*.keras"))


# -- model errors are not corruption -------------------------------------------------------


@keras.saving.register_keras_serializable(package="trust_test")
class FragileDense(keras.layers.Dense):
    """A layer whose own loading code fails, as user code sometimes does."""

    fail = False

    def load_own_variables(self, store):
        if FragileDense.fail:
            raise RuntimeError("FragileDense cannot read its kernel: unsupported layout v7")
        super().load_own_variables(store)


def test_model_code_error_propagates_without_fallback(tmp_path, caplog):
    model = keras.Sequential([keras.Input((4,)), FragileDense(3, name="dense")])
    model.compile(optimizer="adam", loss="mse")
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, model)
    mgr.save(2, model)
    FragileDense.fail = True
    try:
        with caplog.at_level(logging.WARNING, logger="ckptmgr"):
            with pytest.raises(IncompatibleCheckpointError) as info:
                mgr.load()
    finally:
        FragileDense.fail = False
    message = str(info.value)
    assert "step 2" in message and "unsupported layout v7" in message and "\n" not in message
    assert not any("fell back" in r.getMessage() for r in caplog.records)


def test_changed_architecture_is_reported_once_without_fallback(three_steps, caplog):
    mgr, _ = three_steps
    other = small_model(units=5)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        with pytest.raises(IncompatibleCheckpointError) as info:
            mgr.restore(other)
    message = str(info.value)
    assert "step 3" in message and "does not fit this model" in message
    assert "\n" not in message and len(message) < 500  # no dump of variable values
    assert not [r for r in caplog.records if "step 2" in r.getMessage()]  # no fallback tried


class Sub(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, name="dense")

    def call(self, x):
        return self.dense(x)


@pytest.mark.parametrize("make", [
    lambda: keras.Sequential([keras.layers.Dense(3, name="dense")]),
    lambda: Sub(),
], ids=["sequential", "subclassed"])
def test_restore_into_an_unbuilt_model_builds_it_from_the_checkpoint(tmp_path, make):
    """As load_model does (issue 9); it used to restore nothing and say success."""
    saved = make()
    saved.compile(optimizer="adam", loss="mse")
    saved.fit(np.ones((4, 4)), np.full((4, 3), 2.0), verbose=0)
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, saved)
    fresh = make()
    fresh.compile(optimizer="adam", loss="mse")
    assert not fresh.variables
    mgr.restore(fresh)
    for a, b in zip(saved.weights + saved.optimizer.variables,
                    fresh.weights + fresh.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_into_a_model_that_cannot_be_built_is_refused(three_steps):
    """A model whose build does not create variables: one line, no success."""
    mgr, _ = three_steps

    class Hollow(keras.Model):
        def build(self, input_shape):
            pass  # creates nothing

        def call(self, x):
            return x

    with pytest.raises(IncompatibleCheckpointError, match="not built"):
        mgr.restore(Hollow())


def test_load_without_the_custom_class_is_not_corruption(tmp_path):
    @keras.saving.register_keras_serializable(package="trust_test_gone")
    class Gone(keras.layers.Dense):
        pass

    model = keras.Sequential([keras.Input((4,)), Gone(3)])
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, model)
    mgr.save(2, model)
    del keras.saving.get_custom_objects()["trust_test_gone>Gone"]
    from ckptmgr.errors import UnknownCustomObjectError

    with pytest.raises(UnknownCustomObjectError, match="step 2"):
        mgr.load()
    assert isinstance(Manifest, type)


def test_a_pinned_save_that_dies_before_its_commit_pins_nothing(tmp_path, monkeypatch):
    """Otherwise the stray pin would protect whatever later commits that step."""
    import ckptmgr.faults as faults_mod

    class Died(RuntimeError):
        pass

    def crash(name):
        if name == "before_manifest":
            raise Died(name)

    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    model = small_model()
    mgr.save(1, model)
    monkeypatch.setattr(faults_mod, "crash_point", crash)
    with pytest.raises(Died):
        mgr.save(2, model, pin=True)
    monkeypatch.undo()
    assert mgr.storage.pinned_steps() == set()
    mgr.save(2, model)
    mgr.save(3, model)
    assert mgr.steps() == [3]  # step 2 was never pinned, so keep_last=1 pruned it

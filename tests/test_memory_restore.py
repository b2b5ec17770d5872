"""A memory-tier snapshot applied straight from host arrays leaves the model
exactly as a restore of the same state's archive does (no Ray needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ckptmgr.io.archive import open_weights  # noqa: E402
from ckptmgr.io.archive_plan import write_keras_archive  # noqa: E402
from ckptmgr.ray.memory_restore import apply_snapshot  # noqa: E402
from ckptmgr.replicas import snapshot_digest  # noqa: E402
from ckptmgr.state import apply_weights, plan_for  # noqa: E402


def _mlp(dtype=None):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", dtype=dtype),
                              keras.layers.Dense(2, dtype=dtype)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def _functional():
    inputs = keras.Input((6,))
    a = keras.layers.Dense(5)(inputs)
    b = keras.layers.BatchNormalization()(keras.layers.Dense(5)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


def _state(model) -> list[np.ndarray]:
    return [np.array(v) for v in model.variables] + [np.array(v) for v in model.optimizer.variables]


@pytest.mark.parametrize("build", [_mlp, _functional, lambda: _mlp("bfloat16")], ids=["mlp", "functional", "bfloat16"])
def test_arrays_applied_from_memory_equal_the_archive_restore(build):
    keras.utils.set_random_seed(1)
    trained = build()
    x, y = np.random.default_rng(0).normal(size=(32, 6)), np.ones((32, trained.output_shape[-1]))
    trained.fit(x, y, epochs=2, batch_size=8, verbose=0)
    snapshot = plan_for(trained).capture(reuse_buffers=False)
    plan = {"step": 8, "meta": {"digest": snapshot_digest(snapshot), "time": 0.0,
                                              "loop": {"epoch": 1, "next_epoch": 2}, "metrics": {"loss": 1.0}}}

    from_memory = build()
    manifest = apply_snapshot(from_memory, snapshot, plan, "n")
    from_archive = build()
    buffer = io.BytesIO()
    write_keras_archive(buffer, snapshot)
    with open_weights(buffer) as h5:
        apply_weights(from_archive, h5)

    want, got, reference = _state(trained), _state(from_memory), _state(from_archive)
    assert len(got) == len(want) and any(np.any(w != 0) for w in want[-3:])  # Adam/momentum slots moved
    for g, r, w in zip(got, reference, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(r, w)
    assert manifest.step == 8 and manifest.extra["tier"] == "memory" and manifest.loop.next_epoch == 2
    assert manifest.extra["memory_bytes"] == snapshot.nbytes and manifest.extra["node"] == "n"


def test_a_model_that_does_not_fit_is_refused_in_one_line():
    from ckptmgr.errors import IncompatibleCheckpointError

    snapshot = plan_for(_mlp()).capture(reuse_buffers=False)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    other.compile(optimizer="adam", loss="mse")
    plan = {"step": 1, "meta": {"digest": "x", "time": 0.0}}
    with pytest.raises(IncompatibleCheckpointError, match="does not fit this model"):
        apply_snapshot(other, snapshot, plan, "n")


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    """``array`` in a fresh 64-byte aligned buffer (as a stream reads into)."""
    raw = np.empty(array.nbytes + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    out = raw[skip:skip + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def test_streamed_arrays_become_the_variables_and_object_store_views_are_copied():
    """A copy streamed into the reader's own buffers is lent to TensorFlow (no
    second copy of the state); a read-only array (a view of Ray's object
    store, which its keeper still holds) is never lent: training would write
    into the keeper's copy."""
    trained = _mlp()
    snapshot = plan_for(trained).capture(reuse_buffers=False)
    kernel_path = "layers/dense/vars"
    for group in snapshot.groups:
        group.arrays = [(k, _aligned_copy(a)) for k, a in group.arrays]
    ours = dict(next(g for g in snapshot.groups if g.path == kernel_path).arrays)["0"]
    plan = {"step": 1, "meta": {"digest": snapshot_digest(snapshot), "time": 0.0}}

    lent_into = _mlp()
    apply_snapshot(lent_into, snapshot, plan, "n")
    assert _address(lent_into.layers[0].kernel) == ours.ctypes.data

    for group in snapshot.groups:
        for _, array in group.arrays:
            array.flags.writeable = False
    copied_into = _mlp()
    apply_snapshot(copied_into, snapshot, plan, "n")
    assert _address(copied_into.layers[0].kernel) != ours.ctypes.data
    np.testing.assert_array_equal(np.asarray(copied_into.layers[0].kernel), ours)


def _address(variable) -> int:
    return variable.value.read_value()._numpy().ctypes.data


def test_object_store_views_are_copied_into_the_restore_buffers_to_be_lent():
    from ckptmgr.io.direct_read import BufferPool
    from ckptmgr.ray.memory_restore import _into_buffers

    wide = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256)])  # a 256 KB kernel
    wide.compile(optimizer="adam", loss="mse")
    snapshot = plan_for(wide).capture(reuse_buffers=False)
    digest = snapshot_digest(snapshot)
    for group in snapshot.groups:
        for _, array in group.arrays:
            array.flags.writeable = False  # as Ray's zero-copy views are
    pool = BufferPool()
    pool.begin()
    big = [a for g in _into_buffers(snapshot, pool.take).groups for _, a in g.arrays if a.nbytes >= 64 * 1024]
    assert snapshot_digest(snapshot) == digest
    assert big and all(a.flags.writeable and a.ctypes.data % 64 == 0 for a in big)
    assert len(big) == 1  # the kernel (the optimizer is not built yet)

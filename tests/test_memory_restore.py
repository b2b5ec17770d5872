"""A memory-tier snapshot applied straight from host arrays leaves the model
exactly as a restore of the same state's archive does (no Ray needed)."""

from __future__ import annotations

import io
import socket
import threading
import time

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


def _wide():
    """An MLP whose kernels and Adam slots (256 KB each) are streamed, not inlined."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def _trained_wide():
    trained = _wide()
    x = np.random.default_rng(0).normal(size=(16, 256))
    trained.fit(x, np.ones((16, 2)), epochs=1, batch_size=8, verbose=0)
    snapshot = plan_for(trained).capture(reuse_buffers=False)
    return trained, snapshot, {"step": 4, "meta": {"digest": snapshot_digest(snapshot), "time": 0.0}}


def test_a_streamed_copy_is_loaded_array_by_array_through_a_few_reused_buffers():
    """A copy from another node needs memory for its largest arrays, not a
    second copy of the state: each array is copied into its variable as it
    arrives and its buffer is read into again."""
    from ckptmgr.io.direct_read import BufferPool
    from ckptmgr.io.snapshot import INLINE_BYTES
    from ckptmgr.ray import stream
    from ckptmgr.ray.memory_restore import _CopyReader, _load

    trained, snapshot, plan = _trained_wide()
    streamed = [a for g in snapshot.groups for _, a in g.arrays if a.nbytes >= INLINE_BYTES]
    assert len(streamed) >= 6  # two kernels, their Adam slots

    pool = BufferPool()
    restored = _wide()
    offer = stream.offer_stream(snapshot, timeout_s=30)
    with _CopyReader(offer["spec"], stream.StreamReader(offer, 30, pool.take)) as reader:
        manifest = _load(restored, reader, plan, "n")
    assert manifest is not None and manifest.extra["memory_bytes"] == snapshot.nbytes
    for got, want in zip(_state(restored), _state(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    assert pool.nbytes <= 2 * (256 * 256 * 4 + 64) < sum(a.nbytes for a in streamed) / 2


def test_a_copy_damaged_in_transit_is_reported_and_its_model_left_to_be_overwritten():
    from ckptmgr.ray import stream
    from ckptmgr.ray.memory_restore import _CopyReader, _load

    _, snapshot, plan = _trained_wide()
    kernel = dict(next(g for g in snapshot.groups if g.path == "layers/dense/vars").arrays)["0"]
    kernel.reshape(-1).view(np.uint8)[12345] ^= 0x10  # one bit, after the digest was taken
    offer = stream.offer_stream(snapshot, timeout_s=30)
    with _CopyReader(offer["spec"], stream.StreamReader(offer, 30)) as reader:
        assert _load(_wide(), reader, plan, "n") is None
        assert reader.digest() != plan["meta"]["digest"]


def test_object_store_views_are_copied_into_the_variables_never_aliased():
    """A read-only array (a view of Ray's object store, which its keeper still
    holds) is copied: training after the restore must not write into the
    keeper's copy."""
    trained, snapshot, plan = _trained_wide()
    for group in snapshot.groups:
        for _, array in group.arrays:
            array.flags.writeable = False  # as Ray's zero-copy views are
    before = snapshot_digest(snapshot)
    restored = _wide()
    apply_snapshot(restored, snapshot, plan, "n")
    for got, want in zip(_state(restored), _state(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    restored.fit(np.ones((8, 256)), np.zeros((8, 2)), epochs=1, batch_size=8, verbose=0)
    assert snapshot_digest(snapshot) == before
    kernel = dict(next(g for g in snapshot.groups if g.path == "layers/dense/vars").arrays)["0"]
    assert not np.array_equal(np.asarray(restored.layers[0].kernel), kernel)


def test_a_streamed_copy_with_assets_is_checked_whole_before_it_is_loaded():
    """Keras reads assets (a vocabulary) from files: such a copy is laid out
    as an archive, so it is read whole and its digest checked first; a
    damaged one loads nothing."""
    from ckptmgr.ray import stream
    from ckptmgr.ray.memory_restore import _CopyReader, _load

    def build(vocabulary):
        inputs = keras.Input((1,), dtype="string")
        lookup = keras.layers.StringLookup()
        lookup.adapt(vocabulary)  # an adapted vocabulary is saved as an asset file
        ids = lookup(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Embedding(8, 300)(ids)))
        model.compile(optimizer="adam", loss="mse")
        return model

    saved = build(["a", "b", "c"])
    snapshot = plan_for(saved).capture(reuse_buffers=False)
    assert snapshot.assets
    plan = {"step": 2, "meta": {"digest": snapshot_digest(snapshot), "time": 0.0}}
    restored = build(["x"])
    offer = stream.offer_stream(snapshot, timeout_s=30)
    with _CopyReader(offer["spec"], stream.StreamReader(offer, 30)) as reader:
        assert _load(restored, reader, plan, "n") is not None
    assert restored.layers[1].get_vocabulary() == saved.layers[1].get_vocabulary()
    np.testing.assert_array_equal(np.asarray(restored.layers[2].embeddings), np.asarray(saved.layers[2].embeddings))

    embeddings = dict(next(g for g in snapshot.groups if g.path.endswith("embedding/vars")).arrays)["0"]
    assert embeddings.nbytes >= 8 * 300 * 4  # streamed, not inlined
    embeddings.reshape(-1).view(np.uint8)[7] ^= 1
    untouched = build(["x"])
    before = np.asarray(untouched.layers[2].embeddings).copy()
    offer = stream.offer_stream(snapshot, timeout_s=30)
    with _CopyReader(offer["spec"], stream.StreamReader(offer, 30)) as reader:
        assert _load(untouched, reader, plan, "n") is None
    np.testing.assert_array_equal(np.asarray(untouched.layers[2].embeddings), before)
    assert untouched.layers[1].get_vocabulary() == ["[UNK]", "x"]


def test_staging_buffers_serve_arrays_of_every_size_not_one_buffer_per_size():
    """A model of varied widths: the stream's buffers stay near its largest
    array, not the sum of its distinct sizes."""
    from ckptmgr.io.direct_read import BufferPool
    from ckptmgr.ray import stream
    from ckptmgr.ray.memory_restore import _CopyReader, _load

    def build():
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((200,))] + [keras.layers.Dense(w) for w in (300, 250, 200, 150, 2)])
        model.compile(optimizer="adam", loss="mse")
        return model

    trained = build()
    trained.fit(np.ones((8, 200)), np.ones((8, 2)), epochs=1, verbose=0)
    snapshot = plan_for(trained).capture(reuse_buffers=False)
    plan = {"step": 1, "meta": {"digest": snapshot_digest(snapshot), "time": 0.0}}
    sizes = {a.nbytes for g in snapshot.groups for _, a in g.arrays if a.nbytes >= 64 * 1024}
    largest = max(sizes)
    assert sum(sizes) > 2 * largest  # one buffer per size would fail the bound below

    staging = BufferPool()
    restored = build()
    offer = stream.offer_stream(snapshot, timeout_s=30)
    with _CopyReader(offer["spec"], stream.StreamReader(offer, 30, lambda n: staging.take(n, larger=True))) as reader:
        assert _load(restored, reader, plan, "n") is not None
    for got, want in zip(_state(restored), _state(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    assert staging.nbytes <= 2 * (largest + 64)


def _restore_copy_of(monkeypatch, reader, model, plan):
    from ckptmgr.ray import memory_restore

    monkeypatch.setattr(memory_restore, "_open_copy", lambda step, copy, timeout_s: reader)
    return memory_restore.restore_copy(model, plan, {"keeper": "k", "node": "n"}, 30)


def test_a_stream_that_stalls_is_waited_for_once_then_reported_unreadable(monkeypatch):
    """Keras's loaders go on to the next layer after one fails: a stalled
    stream must not make each of them wait out the timeout."""
    from ckptmgr.ray import stream
    from ckptmgr.ray.memory_restore import _CopyReader

    _, snapshot, plan = _trained_wide()
    offer = stream.offer_stream(snapshot, timeout_s=30)
    held = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as stalling:  # accepts, sends 100 bytes, then nothing
        def stall():
            conn, _ = stalling.accept()
            with conn:
                conn.recv(stream.TOKEN_BYTES)
                conn.sendall(stream.ACK + b"\0" * 100)
                held.wait(30)

        threading.Thread(target=stall, daemon=True).start()
        reader = _CopyReader(offer["spec"], stream.StreamReader(
            dict(offer, host="127.0.0.1", port=stalling.getsockname()[1]), timeout_s=1.0))
        started = time.monotonic()
        manifest, problem = _restore_copy_of(monkeypatch, reader, _wide(), plan)
        elapsed = time.monotonic() - started
        held.set()
    assert manifest is None and "unreadable" in problem and "timed out" in problem
    assert elapsed < 2.5  # one timeout, not one per layer that streams (three here)


def test_damage_to_a_shape_is_a_damaged_copy_and_another_model_is_a_misfit(monkeypatch):
    from ckptmgr.errors import IncompatibleCheckpointError
    from ckptmgr.ray.memory_restore import _CopyReader

    _, snapshot, plan = _trained_wide()
    bias = next(g for g in snapshot.groups if g.path == "layers/dense_2/vars")
    bias.arrays = [(k, np.zeros(3, a.dtype) if k == "1" else a) for k, a in bias.arrays]  # (2,) -> (3,)
    manifest, problem = _restore_copy_of(monkeypatch, _CopyReader(snapshot), _wide(), plan)
    assert manifest is None and "is damaged" in problem

    _, intact, plan = _trained_wide()
    other = keras.Sequential([keras.Input((256,)), keras.layers.Dense(3)])
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(IncompatibleCheckpointError, match="does not fit this model"):
        _restore_copy_of(monkeypatch, _CopyReader(intact), other, plan)


def test_a_failure_of_this_process_is_raised_not_blamed_on_the_copy(monkeypatch):
    """Blaming the copy would vote down every good copy in turn."""
    from ckptmgr import state
    from ckptmgr.ray.memory_restore import _CopyReader

    _, snapshot, plan = _trained_wide()

    def out_of_memory(model):
        raise MemoryError("building the optimizer's slots")

    monkeypatch.setattr(state, "ensure_built_optimizer", out_of_memory)
    with pytest.raises(MemoryError, match="optimizer's slots"):
        _restore_copy_of(monkeypatch, _CopyReader(snapshot), _wide(), plan)

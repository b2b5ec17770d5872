"""Restore that reads an archive straight into host arrays (``ckptmgr.restore_direct``).

For several model families (each with datasets large enough to get buffers of
their own), a checkpoint restored through the direct path must equal, bit for
bit, the same checkpoint loaded through Keras's h5py path and the saved model:
weights, optimizer slots and iteration count, assets; and one more training
step from each must give identical weights (the adopted buffers behave like
any tensor). Archives ckptmgr did not lay out take Keras's path; corrupt
bytes anywhere are caught chunk by chunk before the model is touched.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging  # noqa: E402
import shutil  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import CorruptCheckpointError  # noqa: E402
from ckptmgr.io.checksums import StreamDigest  # noqa: E402
from ckptmgr.io.direct_read import read_direct, survey  # noqa: E402
from ckptmgr.io.manifest import FileEntry  # noqa: E402
from ckptmgr.io.snapshot import INLINE_BYTES  # noqa: E402
from ckptmgr.restore_direct import adoptable, restore_archive  # noqa: E402

PKG = "ckptmgr_test_restore_direct"
WIDTH = 128  # a 128 x 128 float32 kernel is 64 KiB: read into a buffer of its own
N = 8


@keras.saving.register_keras_serializable(package=PKG)
class Transposed(keras.layers.Layer):
    """User code that loads its own way (no buffer is lent to it)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], WIDTH), name="kernel")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel)

    def save_own_variables(self, store):
        store["kernel_t"] = np.asarray(self.kernel).T

    def load_own_variables(self, store):
        self.kernel.assign(np.asarray(store["kernel_t"]).T.copy())


def data(d_in=WIDTH, d_out=4, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(N, d_in)).astype("float32"), r.normal(size=(N, d_out)).astype("float32")


def build_adam_batchnorm():
    inputs = keras.Input((WIDTH,))
    h = keras.layers.Dense(WIDTH, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, data()


def build_bfloat16():
    inputs = keras.Input((WIDTH,))
    h = keras.layers.Dense(2 * WIDTH, dtype="bfloat16")(inputs)  # bfloat16 kernel and slots, 64 KiB
    h = keras.layers.Dense(WIDTH, dtype="mixed_bfloat16")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, dtype="float32")(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, data()


VOCAB = np.array(["red", "green", "blue", "green", "red", "red", "violet", "blue"])


def build_assets(adapt=True):
    lookup = keras.layers.StringLookup(name="colors")
    if adapt:
        lookup.adapt(VOCAB)
    inputs = keras.Input((1,), dtype="string")
    h = keras.layers.Embedding(8, 4 * WIDTH)(lookup(inputs))  # 8 x 512 float32 = 16 KiB...
    h = keras.layers.Dense(WIDTH)(keras.layers.Flatten()(h))  # ...and a 256 KiB kernel
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, (tf.constant(VOCAB.reshape(-1, 1)), data()[1])


def build_own_loader():
    model = keras.Sequential([keras.Input((WIDTH,)), Transposed(), keras.layers.Dense(4)])
    model.compile(keras.optimizers.SGD(1e-2, momentum=0.9), "mse")
    return model, data()


def build_loss_scale_conv_normalization():
    inputs = keras.Input((8, 8, 16))
    h = keras.layers.Normalization(axis=-1, mean=0.5, variance=2.0)(inputs)
    h = keras.layers.Conv2D(WIDTH, 3, padding="same")(h)  # 3 x 3 x 16 x 128 float32 = 72 KiB
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)), "mse")
    r = np.random.default_rng(2)
    return model, (r.normal(size=(N, 8, 8, 16)).astype("float32"), data()[1])


def build_int8():
    model = keras.Sequential([keras.Input((2 * WIDTH,)), keras.layers.Dense(2 * WIDTH), keras.layers.Dense(4)])
    model.quantize("int8")  # a 256 x 256 int8 kernel: 64 KiB
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, data(2 * WIDTH)


FAMILIES = {
    "adam_batchnorm": (build_adam_batchnorm, None),
    "bfloat16": (build_bfloat16, None),
    "assets_string_lookup": (build_assets, lambda: build_assets(adapt=False)[0]),
    "user_loader": (build_own_loader, None),
    "loss_scale_conv_normalization": (build_loss_scale_conv_normalization, None),
    "int8_quantized": (build_int8, None),
}


def values(variables) -> list[tuple[str, tuple, bytes]]:
    return [(str(v.dtype), tuple(v.shape), np.asarray(v).tobytes()) for v in variables]


def state(model) -> list:
    return values(model.weights) + values(model.optimizer.variables)


def trained(build):
    keras.utils.set_random_seed(1234)
    model, (x, y) = build()
    model.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    return model, (x, y)


def fresh_model(build, fresh):
    keras.utils.set_random_seed(99)  # other initial weights
    return fresh() if fresh else build()[0]


def keras_path(model, path: str) -> None:
    """What ckptmgr does for archives it did not lay out: Keras's loader over h5py."""
    with open(path, "rb") as f:
        from ckptmgr.restore_direct import _apply_h5

        _apply_h5(model, f)


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quantize` method")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_direct_restore_equals_keras_path_bit_for_bit(name, tmp_path, caplog):
    build, fresh = FAMILIES[name]
    model, (x, y) = trained(build)
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(2, model)
    path = mgr.local_archive_path(2)
    spots = survey(open(path, "rb"))
    assert spots is not None and any(s.nbytes >= INLINE_BYTES for s in spots)

    direct, reference = fresh_model(build, fresh), fresh_model(build, fresh)
    assert state(direct) != state(model)
    with caplog.at_level(logging.DEBUG, logger="ckptmgr"):
        assert mgr.restore(direct).step == 2
    assert "read directly" in caplog.text
    keras_path(reference, path)
    assert state(direct) == state(reference) == state(model)
    assert int(direct.optimizer.iterations) == 2
    if name.startswith("assets"):
        assert direct.get_layer("colors").get_vocabulary() == model.get_layer("colors").get_vocabulary()

    # Training on continues identically from either restore (and from the original).
    for m in (direct, reference, model):
        m.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    assert state(direct) == state(reference) == state(model)
    mgr.close()


def test_model_save_archive_takes_keras_path(tmp_path):
    model, _ = trained(build_adam_batchnorm)
    path = str(tmp_path / "stock.keras")
    model.save(path)
    assert survey(open(path, "rb")) is None
    target = fresh_model(build_adam_batchnorm, None)
    entry = entry_of(path)
    assert restore_archive(target, path, where="stock", entry=entry) is False
    assert state(target) == state(model)
    # ...after the whole archive is verified: a flipped byte is caught first.
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x04
    Path(path).write_bytes(bytes(data))
    untouched = fresh_model(build_adam_batchnorm, None)
    before = state(untouched)
    with pytest.raises(CorruptCheckpointError, match="stock is corrupt"):
        restore_archive(untouched, path, where="stock", entry=entry)
    assert state(untouched) == before


def entry_of(path, chunk_bytes=None) -> FileEntry:
    digest = StreamDigest("crc32c", chunk_bytes)
    data = Path(path).read_bytes()
    digest.update(data)
    return FileEntry(bytes=len(data), crc32c=digest.result()[0], chunk_bytes=digest.chunks.chunk_bytes)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One checkpoint of the Adam model: (its path, the saved state)."""
    model, _ = trained(build_adam_batchnorm)
    mgr = CheckpointManager(tmp_path_factory.mktemp("direct") / "ck")
    mgr.save(1, model)
    yield mgr.local_archive_path(1), state(model)
    mgr.close()


def test_small_chunks_verify_and_restore(archive):
    """Chunks that do not line up with the buffers (1000 bytes) check the same bytes."""
    path, saved = archive
    target = fresh_model(build_adam_batchnorm, None)
    assert restore_archive(target, path, where="here", entry=entry_of(path, 1000)) is True
    assert state(target) == saved


@pytest.mark.parametrize("where", ["zip header", "hdf5 metadata", "large dataset", "small dataset", "tail"])
def test_flipped_byte_is_caught_before_the_model_is_touched(archive, tmp_path, where):
    path, _ = archive
    entry = entry_of(path, 4096)
    spots = survey(open(path, "rb"))
    large = next(s for s in spots if s.nbytes >= INLINE_BYTES)
    small = next(s for s in spots if s.nbytes < INLINE_BYTES)
    position = {"zip header": 10, "hdf5 metadata": spots[0].start - 100, "large dataset": large.start + 12345,
                "small dataset": small.start + 1, "tail": entry.bytes - 30}[where]
    damaged = tmp_path / "damaged.keras"
    data = bytearray(Path(path).read_bytes())
    data[position] ^= 0x01
    damaged.write_bytes(bytes(data))
    target = fresh_model(build_adam_batchnorm, None)
    before = state(target)
    with pytest.raises(CorruptCheckpointError) as info:
        restore_archive(target, str(damaged), where="step 1: x.keras", entry=entry)
    chunk = position // 4096
    assert f"(chunk {chunk + 1} of {len(entry.crc32c)})" in str(info.value)
    assert str(info.value).startswith("step 1: x.keras is corrupt")
    assert state(target) == before


def test_corrupt_newest_falls_back_through_the_manager(tmp_path, caplog):
    model, (x, y) = trained(build_adam_batchnorm)
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, model)
    good = state(model)
    model.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    mgr.save(2, model)
    path = Path(mgr.local_archive_path(2))
    large = next(s for s in survey(open(path, "rb")) if s.nbytes >= INLINE_BYTES)
    data = bytearray(path.read_bytes())
    data[large.start + 7] ^= 0x80
    path.write_bytes(bytes(data))
    target = fresh_model(build_adam_batchnorm, None)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.restore(target).step == 1
    assert "step 2:" in caplog.text and "is corrupt (CRC32C" in caplog.text
    assert state(target) == good
    untouched = fresh_model(build_adam_batchnorm, None)
    before = state(untouched)
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(untouched, 2)
    assert state(untouched) == before
    mgr.close()


@pytest.mark.parametrize("how", ["sha256 manifest", "caller verified"])
def test_already_verified_archives_are_read_directly(tmp_path, how, caplog):
    model, _ = trained(build_bfloat16)
    mgr = CheckpointManager(tmp_path / "ck", checksum="sha256" if how == "sha256 manifest" else "crc32c")
    mgr.save(3, model)
    target = fresh_model(build_bfloat16, None)
    with caplog.at_level(logging.DEBUG, logger="ckptmgr"):
        mgr.restore(target, 3, verified=how == "caller verified")
    assert "read directly" in caplog.text
    assert state(target) == state(model)
    mgr.close()


def test_layout_other_than_surveyed_is_not_read_directly(archive):
    """If the verified bytes are laid out otherwise (the file changed after
    the survey), nothing is handed out."""
    path, _ = archive
    with open(path, "rb") as f:
        spots = survey(f)
        moved = spots[:-1] + [replace(spots[-1], start=spots[-1].start - 4)]
        with read_direct(f, os.fstat(f.fileno()).st_size, moved, None, "x") as verified:
            assert verified is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_lent_buffer_becomes_the_variable_and_is_lent_once(dtype):
    import ml_dtypes

    numpy_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    raw = np.empty(WIDTH * WIDTH * numpy_dtype.itemsize + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    array = raw[skip:skip + WIDTH * WIDTH * numpy_dtype.itemsize].view(numpy_dtype).reshape(WIDTH, WIDTH)
    array[...] = (np.arange(WIDTH * WIDTH) % 100).reshape(WIDTH, WIDTH).astype(numpy_dtype)
    expected = array.copy()
    lent = adoptable(array)
    first = keras.Variable(np.zeros((WIDTH, WIDTH)), dtype=dtype)
    second = keras.Variable(np.zeros((WIDTH, WIDTH)), dtype=dtype)
    first.assign(lent)
    second.assign(lent)  # a second conversion copies
    assert address(first) == array.ctypes.data != address(second)
    assert not lent.flags.writeable
    first.assign_add(np.ones((WIDTH, WIDTH)).astype(numpy_dtype))
    assert np.asarray(second).tobytes() == expected.tobytes()
    # Another dtype converts as Keras would (no lending).
    doubles = keras.Variable(np.zeros((WIDTH, WIDTH), "float64"))
    doubles.assign(adoptable(expected.copy()))
    np.testing.assert_array_equal(np.asarray(doubles), expected.astype("float64"))


def address(variable) -> int:
    tensor = variable.value.read_value()
    return tensor._numpy().ctypes.data


def test_copy_of_a_checkpoint_directory_restores_directly(archive, tmp_path):
    """Nothing in the direct path depends on the writer's process (plan, buffers)."""
    path, saved = archive
    copy = tmp_path / "copy.keras"
    shutil.copy(path, copy)
    target = fresh_model(build_adam_batchnorm, None)
    assert restore_archive(target, str(copy), where="copy", entry=entry_of(copy)) is True
    assert state(target) == saved


def test_repeated_restores_reuse_only_buffers_nothing_holds(tmp_path):
    model, (x, y) = trained(build_adam_batchnorm)
    mgr = CheckpointManager(tmp_path / "ck")
    saved = {}
    for step in (1, 2):
        model.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
        mgr.save(step, model)
        saved[step] = state(model)
    target = fresh_model(build_adam_batchnorm, None)
    mgr.restore(target, 1)
    mgr.restore(target, 2)  # the target still holds step 1's buffers: new ones
    held = mgr._restore_buffers.nbytes
    kernel = target.weights[0]
    other = keras.Variable(np.zeros(kernel.shape, "float32"))
    other.assign(kernel)  # shares the kernel's memory (a buffer of the pool) inside TensorFlow
    expected = np.asarray(other).tobytes()
    for step in (1, 2, 1, 2):
        mgr.restore(target, step)
        assert state(target) == saved[step]
        assert np.asarray(other).tobytes() == expected  # its memory was never read into again
    # Reused, not grown per restore: at most one buffer more (the one `other` keeps).
    assert held <= mgr._restore_buffers.nbytes <= held + kernel.shape[0] * kernel.shape[1] * 4 + 64
    target.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    model_again = fresh_model(build_adam_batchnorm, None)
    mgr.restore(model_again, 2)
    model_again.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    assert state(target) == state(model_again)
    mgr.prepare(target)  # training starts: the kept buffers are let go
    assert mgr._restore_buffers is None
    mgr.close()


def test_buffer_pool_reuses_idle_buffers_and_forgets_old_ones():
    from ckptmgr.io.direct_read import BufferPool

    pool = BufferPool(keep_s=0.2)
    pool.begin()
    first = pool.take(1000)
    address_of_first = first.ctypes.data
    assert first.ctypes.data % 64 == 0
    pool.begin()
    held = pool.take(1000)  # the first is still referenced: another buffer
    assert held.ctypes.data != address_of_first and pool.nbytes == 2 * (1000 + 64)
    del first
    pool.begin()
    assert pool.take(1000).ctypes.data == address_of_first  # idle again: reused
    pool.begin()
    pool.begin()  # the one before the last could still take it
    assert pool.nbytes == 2 * (1000 + 64)
    pool.begin()  # older than the last two restores: an idle buffer is forgotten, a held one kept
    assert pool.nbytes == 1000 + 64
    pool.release_later()
    import time

    time.sleep(0.6)
    assert pool.nbytes == 0
    assert held.sum() is not None  # still usable: forgetting frees nothing in use

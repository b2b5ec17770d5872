"""A ckptmgr checkpoint is what ``model.save`` writes, for the model families
Keras's own saving tests use (issue 9, "Parity with Keras").

For each model (compiled, trained two steps so optimizer state exists), the
archive written by ``CheckpointManager.save`` is compared with ``model.save``
of the same model: same zip members (assets included, all stored), same
config, and dataset by dataset the same ``model.weights.h5`` (paths, HDF5
types, shapes, attributes, bytes). ``export_weights`` is compared the same way
with ``model.save_weights``. Then the checkpoint is restored into a fresh
instance (``mgr.restore``) and opened with stock ``keras.saving.load_model``;
weights, optimizer variables (and assets) must come back exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import io  # noqa: E402
import json  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402

PKG = "ckptmgr_test_parity"  # unique: other test files register similar names
N = 8  # samples: two training steps of 4


# --------------------------------------------------------------------------
# Custom objects
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PKG)
class Block(keras.layers.Layer):
    """A layer holding two sublayers (nested state: layers/block/dense...)."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu")
        self.out = keras.layers.Dense(units)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.out.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, x):
        return self.out(self.inner(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PKG)
class OwnVariables(keras.layers.Layer):
    """Saves its state in its own layout: the kernel transposed, plus a
    computed checksum, so the stored arrays are not the variables themselves."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return ops.matmul(x, self.kernel) + self.bias

    def save_own_variables(self, store):
        store["kernel_t"] = np.asarray(self.kernel).T
        store["bias"] = np.asarray(self.bias)
        store["sum"] = np.asarray(np.asarray(self.kernel).sum(), dtype="float64")

    def load_own_variables(self, store):
        kernel = np.asarray(store["kernel_t"]).T
        assert np.asarray(store["sum"]) == kernel.sum(dtype="float32").astype("float64")
        self.kernel.assign(kernel)
        self.bias.assign(store["bias"])

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PKG)
class Subclassed(keras.Model):
    def __init__(self, hidden=5, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.first = keras.layers.Dense(hidden, activation="tanh")
        self.block = Block(3)
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.block(self.first(x)))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}


@keras.saving.register_keras_serializable(package=PKG)
class Notes(keras.layers.Layer):
    """State outside variables, saved as asset files (one in a subdirectory)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table_json = "{}"

    def call(self, x):
        return x

    def save_assets(self, dir_path):
        os.makedirs(os.path.join(dir_path, "tables"), exist_ok=True)
        with open(os.path.join(dir_path, "tables", "table.json"), "w") as f:
            f.write(self.table_json)
        with open(os.path.join(dir_path, "raw.bin"), "wb") as f:
            f.write(bytes(range(256)))

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "tables", "table.json")) as f:
            self.table_json = f.read()
        with open(os.path.join(dir_path, "raw.bin"), "rb") as f:
            assert f.read() == bytes(range(256))


@keras.saving.register_keras_serializable(package=PKG)
class ModelWithAssets(keras.Model):
    """Assets at the model's own path (``assets/summary.txt``) and a layer's."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.notes = Notes(name="notes")
        self.head = keras.layers.Dense(2)
        self.summary_text = "untrained"

    def call(self, x):
        return self.head(self.notes(x))

    def save_assets(self, dir_path):
        with open(os.path.join(dir_path, "summary.txt"), "w") as f:
            f.write(self.summary_text)

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "summary.txt")) as f:
            self.summary_text = f.read()


# --------------------------------------------------------------------------
# The models: each builder makes a fresh, compiled, built (untrained) model
# --------------------------------------------------------------------------


def rng(seed=0):
    return np.random.default_rng(seed)


def xy(d_in=4, d_out=2):
    r = rng()
    return r.normal(size=(N, d_in)).astype("float32"), r.normal(size=(N, d_out)).astype("float32")


def build_functional():
    inputs = keras.Input((4,), name="x")
    h = keras.layers.Dense(6, activation="relu")(inputs)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Dense(2)(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse", metrics=["mae"])
    return model, xy()


def build_sequential():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(2)])
    model.compile(keras.optimizers.RMSprop(1e-2, momentum=0.5), "mse")
    return model, xy()


def build_subclassed():
    model = Subclassed()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = xy()
    model(x[:1])
    return model, (x, y)


def build_nested_shared():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    shared = keras.layers.Dense(3, name="shared")
    inner = keras.Sequential([keras.layers.Dense(3), Block(3)], name="inner_seq")
    h = keras.layers.Concatenate()([shared(a), shared(b)])
    outputs = keras.layers.Dense(2)(inner(h))
    model = keras.Model([a, b], outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = xy()
    return model, ([x, x[::-1].copy()], y)


def build_own_variables():
    model = keras.Sequential([keras.Input((4,)), OwnVariables(3), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(1e-2, momentum=0.9), "mse")
    return model, xy()


def build_loss_scale():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2), initial_scale=128.0)
    model.compile(optimizer, "mse")
    return model, xy()


def build_ema():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=None), "mse")
    return model, xy()


def build_lr_schedule():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9), "mse")
    return model, xy()


VOCAB_TEXT = np.array(["red", "green", "blue", "green", "red", "red", "violet", "blue"])


def build_assets(adapt=True):
    """A StringLookup adapted inside the model: its vocabulary is an asset."""
    lookup = keras.layers.StringLookup(name="colors")
    if adapt:
        lookup.adapt(VOCAB_TEXT)
    inputs = keras.Input((1,), dtype="string")
    h = keras.layers.Embedding(8, 3)(lookup(inputs))
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, (tf.constant(VOCAB_TEXT.reshape(-1, 1)), xy()[1])


def build_custom_assets(written=True):
    model = ModelWithAssets()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x, y = xy()
    model(x[:1])
    if written:
        model.summary_text = "trained on 8 samples"
        model.notes.table_json = json.dumps({"seen": 8, "labels": ["a", "b"]})
    return model, (x, y)


def build_bfloat16():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, dtype="bfloat16")(inputs)  # bfloat16 variables (and Adam slots)
    h = keras.layers.Dense(3, dtype="mixed_bfloat16")(h)  # float32 variables, bfloat16 compute
    outputs = keras.layers.Dense(2, dtype="float32")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, xy()


def build_int8():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    model.quantize("int8")
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model, xy()


def build_dict_io():
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([keras.layers.Dense(3)(a), b])
    outputs = {
        "reg": keras.layers.Dense(1, name="reg")(h),
        "cls": keras.layers.Dense(2, activation="softmax", name="cls")(h),
    }
    model = keras.Model({"a": a, "b": b}, outputs)
    model.compile(keras.optimizers.Adam(1e-2), loss={"reg": "mse", "cls": "categorical_crossentropy"})
    r = rng(1)
    x = {"a": r.normal(size=(N, 4)).astype("float32"), "b": r.normal(size=(N, 2)).astype("float32")}
    y = {"reg": r.normal(size=(N, 1)).astype("float32"), "cls": np.eye(2, dtype="float32")[r.integers(0, 2, N)]}
    return model, (x, y)


@dataclass
class Case:
    build: Callable[[], tuple[Any, tuple]]
    fresh: Callable[[], Any] | None = None  # another instance (default: build again)
    check: Callable[[Any, Any], None] | None = None  # more checks on a restored/loaded model


def check_vocabulary(original, other):
    vocabulary = original.get_layer("colors").get_vocabulary()
    assert vocabulary[0] == "[UNK]" and {"red", "blue"} <= set(vocabulary)
    assert other.get_layer("colors").get_vocabulary() == vocabulary


def check_custom_assets(original, other):
    assert original.summary_text.startswith("trained")
    assert (other.summary_text, other.notes.table_json) == (original.summary_text, original.notes.table_json)


def check_bfloat16(original, other):
    dtypes = [v.dtype for v in other.weights]
    assert "bfloat16" in dtypes and dtypes == [v.dtype for v in original.weights]


def check_int8(original, other):
    assert "int8" in {v.dtype for v in other.weights}


CASES = {
    "functional": Case(build_functional),
    "sequential": Case(build_sequential),
    "subclassed": Case(build_subclassed),
    "nested_shared": Case(build_nested_shared),
    "save_own_variables": Case(build_own_variables),
    "loss_scale_optimizer": Case(build_loss_scale),
    "ema": Case(build_ema),
    "lr_schedule": Case(build_lr_schedule),
    "assets_string_lookup": Case(build_assets, fresh=lambda: build_assets(adapt=False)[0], check=check_vocabulary),
    "assets_custom_layer_and_model": Case(
        build_custom_assets, fresh=lambda: build_custom_assets(written=False)[0], check=check_custom_assets
    ),
    "bfloat16": Case(build_bfloat16, check=check_bfloat16),
    "int8_quantized": Case(build_int8, check=check_int8),
    "dict_io": Case(build_dict_io),
}


# --------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------


def h5_entries(source) -> dict[str, tuple]:
    """Every group and dataset of an HDF5 file: kind, HDF5 type, shape, attrs, bytes."""
    entries = {}
    with h5py.File(source, "r") as f:
        entries["/"] = ("group", _attrs(f))

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                htype = obj.id.get_type()
                tag = htype.get_tag() if isinstance(htype, h5py.h5t.TypeOpaqueID) else None
                value = np.asarray(obj[()])
                entries[name] = ("dataset", str(obj.dtype), htype.get_class(), tag, obj.shape,
                                 _attrs(obj), value.tobytes())
            else:
                entries[name] = ("group", _attrs(obj))

        f.visititems(visit)
    return entries


def _attrs(obj) -> dict:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}


def assert_same_h5(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name


def zip_members(path) -> tuple[list[zipfile.ZipInfo], dict[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return zf.infolist(), {i.filename: zf.read(i) for i in zf.infolist()}


def assert_archive_matches_model_save(archive, reference) -> dict[str, bytes]:
    """Same members (in Keras's order, all stored), same config, same HDF5.
    Returns the asset members."""
    our_infos, ours = zip_members(archive)
    ref_infos, theirs = zip_members(reference)
    names = [i.filename for i in our_infos]
    assert names[:3] == ["metadata.json", "config.json", "model.weights.h5"]
    assert names[3:] == sorted(names[3:]) and all(n.startswith("assets/") for n in names[3:])
    assert sorted(names) == sorted(i.filename for i in ref_infos)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in our_infos + ref_infos)
    assert json.loads(ours["config.json"]) == json.loads(theirs["config.json"])
    assert json.loads(ours["metadata.json"]).keys() == json.loads(theirs["metadata.json"]).keys()
    assets = {n: data for n, data in ours.items() if n.startswith("assets/")}
    assert assets == {n: data for n, data in theirs.items() if n.startswith("assets/")}
    assert_same_h5(h5_entries(io.BytesIO(ours["model.weights.h5"])),
                   h5_entries(io.BytesIO(theirs["model.weights.h5"])))
    return assets


def values(variables) -> list[tuple[str, tuple, bytes]]:
    """Dtype, shape and bytes of each variable, in order (paths carry
    instance-numbered names like ``dense_7``)."""
    return [(str(v.dtype), tuple(v.shape), np.asarray(v).tobytes()) for v in variables]


def assert_same_state(original, other) -> None:
    """Every model variable and every optimizer variable, bit for bit."""
    assert values(other.weights) == values(original.weights)
    assert len(original.optimizer.variables) > 2  # real slots, not just iterations and lr
    assert values(other.optimizer.variables) == values(original.optimizer.variables)


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have a `quantize` method")
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_is_what_model_save_writes(name, tmp_path):
    case = CASES[name]
    model, (x, y) = case.build()
    model.fit(x, y, batch_size=N // 2, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 2

    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(1, model)
    archive = mgr.local_archive_path(1)
    reference = tmp_path / "reference.keras"
    model.save(reference)

    # 1. The archive is model.save's, member by member and dataset by dataset.
    assets = assert_archive_matches_model_save(archive, reference)
    assert bool(assets) == name.startswith("assets_")
    assert mgr.verify(1)[0].ok

    # 2. export_weights is save_weights, dataset by dataset.
    exported = tmp_path / "out" / "ours.weights.h5"
    mgr.export_weights(str(exported))
    model.save_weights(tmp_path / "reference.weights.h5")
    assert_same_h5(h5_entries(exported), h5_entries(tmp_path / "reference.weights.h5"))

    # 3. Restore into a fresh instance: weights and optimizer state exactly.
    keras.utils.set_random_seed(99)  # other initial weights
    fresh = case.fresh() if case.fresh else case.build()[0]
    assert values(fresh.weights) != values(model.weights)
    assert mgr.restore(fresh).step == 1
    assert_same_state(model, fresh)
    np.testing.assert_array_equal(_predict(fresh, x), _predict(model, x))
    if case.check:
        case.check(model, fresh)

    # 4. Stock Keras loads the checkpoint like its own file.
    for path in (archive, reference):
        loaded = keras.saving.load_model(path)
        assert_same_state(model, loaded)
        np.testing.assert_array_equal(_predict(loaded, x), _predict(model, x))
        if case.check:
            case.check(model, loaded)
    mgr.close()


def _predict(model, x) -> np.ndarray:
    out = model(x, training=False)
    parts = [out[k] for k in sorted(out)] if isinstance(out, dict) else [out]
    return np.concatenate([np.asarray(ops.convert_to_numpy(p), dtype="float32").ravel() for p in parts])

"""Every checkpoint is an ordinary ``.keras`` file: stock Keras opens it.

The models follow the examples of Keras's serialization guide
(https://keras.io/guides/serialization_and_saving/): registered custom layers
and functions, unregistered ones passed as ``custom_objects``, a layer passed
into another layer's ``__init__``, a subclassed ``Model`` with ``build``, a
multi-input/multi-output functional model and a Sequential with Dropout and
BatchNormalization. Each is trained a step or two, saved with
``CheckpointManager.save`` and opened three ways: ``keras.saving.load_model``
on the archive, ``mgr.load()`` and ``mgr.restore(fresh_model)``. Predictions,
optimizer state and compile config must come back exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import io  # noqa: E402
import json  # noqa: E402
import zipfile  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import CkptmgrError, UnknownCustomObjectError  # noqa: E402

PKG = "ckptmgr_test_format"  # unique: other test files may register similar names
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------
# Custom objects, as in the serialization guide
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=PKG)
class CustomLayer(keras.layers.Layer):
    """Registered custom layer with its own weights and config."""

    def __init__(self, units=4, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.factor = factor

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel"
        )
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return self.factor * (ops.matmul(x, self.kernel) + self.bias)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "factor": self.factor})
        return config


@keras.saving.register_keras_serializable(package=PKG, name="custom_fn")
def custom_fn(x):
    """Registered custom function, used as an activation (guide: x**2)."""
    return x**2


@keras.saving.register_keras_serializable(package=PKG, name="custom_loss")
def custom_loss(y_true, y_pred):
    """Registered custom function, used as the loss."""
    return ops.mean(ops.square(y_true - y_pred), axis=-1)


class UnregisteredLayer(keras.layers.Layer):
    """NOT registered: loading needs ``custom_objects``."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel"
        )

    def call(self, x):
        return ops.tanh(ops.matmul(x, self.kernel))

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units})
        return config


@keras.saving.register_keras_serializable(package=PKG)
class LayerWithInner(keras.layers.Layer):
    """A layer that receives other layers in ``__init__`` (guide: nested objects)."""

    def __init__(self, first_layer, second_layer=None, **kwargs):
        super().__init__(**kwargs)
        self.first_layer = first_layer
        self.second_layer = second_layer if second_layer is not None else keras.layers.Dense(3)

    def call(self, x):
        return self.second_layer(self.first_layer(x))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "first_layer": keras.saving.serialize_keras_object(self.first_layer),
                "second_layer": keras.saving.serialize_keras_object(self.second_layer),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config["first_layer"] = keras.saving.deserialize_keras_object(config["first_layer"])
        config["second_layer"] = keras.saving.deserialize_keras_object(config["second_layer"])
        return cls(**config)


@keras.saving.register_keras_serializable(package=PKG)
class SubclassedModel(keras.Model):
    """A subclassed model with get_config/from_config and an explicit build."""

    def __init__(self, hidden=6, outputs=2, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden
        self.outputs_dim = outputs
        self.dense1 = keras.layers.Dense(hidden, activation="relu")
        self.dense2 = keras.layers.Dense(outputs)

    def build(self, input_shape):
        self.dense1.build(input_shape)
        self.dense2.build((*input_shape[:-1], self.hidden))

    def call(self, x):
        return self.dense2(self.dense1(x))

    def get_config(self):
        return {"name": self.name, "hidden": self.hidden, "outputs": self.outputs_dim}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------
# Model builders: (build_fn, inputs, targets, custom_objects)
# --------------------------------------------------------------------------


def _x(n=8, d=4):
    return RNG.normal(size=(n, d)).astype("float32")


def build_registered():
    inputs = keras.Input((4,))
    h = CustomLayer(5, factor=0.5, name="custom")(inputs)
    h = keras.layers.Dense(3, activation=custom_fn, name="dense_custom_act")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss=custom_loss)
    return model


def build_unregistered():
    model = keras.Sequential(
        [keras.Input((4,)), UnregisteredLayer(3, name="unreg"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=0.005), loss="mse")
    return model


def build_nested():
    inputs = keras.Input((4,))
    outer = LayerWithInner(CustomLayer(6, name="inner_custom"), keras.layers.Dense(3, name="inner_dense"), name="outer")
    outputs = keras.layers.Dense(2)(outer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="mse")
    return model


def build_subclassed():
    model = SubclassedModel(hidden=6, outputs=2, name="subclassed")
    model.build((None, 4))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.02), loss="mae")
    return model


def build_multi_io():
    a = keras.Input((4,), name="in_a")
    b = keras.Input((3,), name="in_b")
    h = keras.layers.Concatenate()([keras.layers.Dense(5, activation="relu")(a), b])
    out_reg = keras.layers.Dense(2, name="out_reg")(h)
    out_cls = keras.layers.Dense(1, activation="sigmoid", name="out_cls")(h)
    model = keras.Model({"in_a": a, "in_b": b}, {"out_reg": out_reg, "out_cls": out_cls})
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.01),
        loss={"out_reg": "mse", "out_cls": "binary_crossentropy"},
        loss_weights={"out_reg": 1.0, "out_cls": 0.5},
    )
    return model


def build_dropout_bn():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    return model


def data_single():
    return _x(), RNG.normal(size=(8, 2)).astype("float32")


def data_multi():
    x = {"in_a": _x(8, 4), "in_b": _x(8, 3)}
    y = {
        "out_reg": RNG.normal(size=(8, 2)).astype("float32"),
        "out_cls": (RNG.random((8, 1)) > 0.5).astype("float32"),
    }
    return x, y


CASES = {
    "registered": (build_registered, data_single, None),
    "unregistered": (build_unregistered, data_single, {"UnregisteredLayer": UnregisteredLayer}),
    "nested": (build_nested, data_single, None),
    "subclassed": (build_subclassed, data_single, None),
    "multi_io": (build_multi_io, data_multi, None),
    "dropout_bn": (build_dropout_bn, data_single, None),
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def train(model, x, y, steps=2):
    model.fit(x, y, batch_size=8 // steps, epochs=1, shuffle=False, verbose=0)


def predict(model, x):
    """Inference-mode outputs as a flat list of numpy arrays (sorted by key)."""
    out = model(x, training=False)
    if isinstance(out, dict):
        return [np.asarray(out[k]) for k in sorted(out)]
    if isinstance(out, (list, tuple)):
        return [np.asarray(o) for o in out]
    return [np.asarray(out)]


def assert_same_predictions(a, b, x):
    pa, pb = predict(a, x), predict(b, x)
    assert len(pa) == len(pb)
    for u, v in zip(pa, pb):
        np.testing.assert_array_equal(u, v)


def optimizer_values(model):
    return [np.asarray(v) for v in model.optimizer.variables]


def assert_same_optimizer(original, loaded):
    assert type(loaded.optimizer) is type(original.optimizer)
    assert float(loaded.optimizer.learning_rate) == float(original.optimizer.learning_rate)
    strip = lambda c: {k: v for k, v in c.items() if k != "name"}  # noqa: E731
    assert strip(loaded.optimizer.get_config()) == strip(original.optimizer.get_config())
    assert int(loaded.optimizer.iterations) == int(original.optimizer.iterations) > 0
    a, b = optimizer_values(original), optimizer_values(loaded)
    assert len(a) == len(b) > 2  # iterations, learning rate and real slots
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def assert_same_state(original, loaded):
    """Every variable (trainable and not) has the same value."""
    a = [np.asarray(v) for v in original.weights]
    b = [np.asarray(v) for v in loaded.weights]
    assert [v.shape for v in a] == [v.shape for v in b]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def assert_same_compile(original, loaded):
    assert loaded.compiled
    assert loaded.get_compile_config() == original.get_compile_config()


def h5_tree(data: bytes) -> dict[str, tuple]:
    """{name: ("group", attrs) | ("dataset", shape, dtype, attrs)} of an HDF5 image."""
    tree = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        tree["/"] = ("group", dict(f.attrs))

        def visit(name, obj):
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                tree[name] = ("dataset", obj.shape, str(obj.dtype), attrs)
            else:
                tree[name] = ("group", attrs)

        f.visititems(visit)
    return tree


def h5_values(data: bytes) -> dict[str, np.ndarray]:
    values = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(
            lambda name, obj: values.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return values


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture
def mgr(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    yield manager
    manager.close()


# --------------------------------------------------------------------------
# Round trips of the guide's examples
# --------------------------------------------------------------------------


def extra_registered(model, loaded):
    assert isinstance(loaded.get_layer("custom"), CustomLayer)
    assert loaded.get_layer("custom").factor == 0.5
    assert loaded.get_layer("dense_custom_act").activation is custom_fn
    assert loaded.loss is custom_loss


def extra_unregistered(model, loaded):
    assert isinstance(loaded.get_layer("unreg"), UnregisteredLayer)


def extra_nested(model, loaded):
    outer = loaded.get_layer("outer")
    assert isinstance(outer, LayerWithInner)
    assert isinstance(outer.first_layer, CustomLayer) and outer.first_layer.units == 6
    assert isinstance(outer.second_layer, keras.layers.Dense)
    assert outer.first_layer is not model.get_layer("outer").first_layer
    np.testing.assert_array_equal(
        np.asarray(outer.first_layer.kernel), np.asarray(model.get_layer("outer").first_layer.kernel)
    )


def extra_subclassed(model, loaded):
    assert isinstance(loaded, SubclassedModel)
    assert (loaded.hidden, loaded.outputs_dim) == (6, 2)


def extra_multi_io(model, loaded):
    assert isinstance(loaded.input, dict) and sorted(loaded.input) == ["in_a", "in_b"]
    assert isinstance(loaded.output, dict) and sorted(loaded.output) == ["out_cls", "out_reg"]


def extra_dropout_bn(model, loaded):
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    # Training moved the moving statistics away from their initial values...
    assert not np.allclose(np.asarray(bn.moving_mean), 0.0)
    assert len(model.non_trainable_weights) == 2
    # ...and those non-trainable variables come back exactly.
    for a, b in zip(model.non_trainable_weights, loaded.non_trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(isinstance(layer, keras.layers.Dropout) for layer in loaded.layers)


EXTRA = {
    "registered": extra_registered,
    "unregistered": extra_unregistered,
    "nested": extra_nested,
    "subclassed": extra_subclassed,
    "multi_io": extra_multi_io,
    "dropout_bn": extra_dropout_bn,
}


def assert_layout_matches_model_save(archive_path, model, tmp_path):
    """Same zip members (all stored), same config, same HDF5 tree and values."""
    reference = tmp_path / "reference.keras"
    model.save(reference)
    with zipfile.ZipFile(archive_path) as ours, zipfile.ZipFile(reference) as ref:
        our_infos, ref_infos = ours.infolist(), ref.infolist()
        assert [i.filename for i in our_infos] == ["metadata.json", "config.json", "model.weights.h5"]
        assert sorted(i.filename for i in our_infos) == sorted(i.filename for i in ref_infos)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in our_infos)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in ref_infos)
        assert ours.testzip() is None  # every member's CRC is right

        our_meta = json.loads(ours.read("metadata.json"))
        ref_meta = json.loads(ref.read("metadata.json"))
        assert set(our_meta) == set(ref_meta)
        assert our_meta["keras_version"] == ref_meta["keras_version"] == keras.__version__
        assert json.loads(ours.read("config.json")) == json.loads(ref.read("config.json"))
        our_h5, ref_h5 = ours.read("model.weights.h5"), ref.read("model.weights.h5")

    our_tree, ref_tree = h5_tree(our_h5), h5_tree(ref_h5)
    assert sorted(our_tree) == sorted(ref_tree)
    assert our_tree == ref_tree  # kinds, shapes, dtypes and attributes too
    assert any(name.startswith("optimizer/vars/") for name in our_tree)
    our_values, ref_values = h5_values(our_h5), h5_values(ref_h5)
    assert our_values.keys() == ref_values.keys()
    for name in ref_values:
        np.testing.assert_array_equal(our_values[name], ref_values[name], err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_stock_load_model_manager_load_and_restore(case, mgr, tmp_path):
    build, data, custom_objects = CASES[case]
    model = build()
    x, y = data()
    train(model, x, y)
    manifest = mgr.save(3, model)
    assert manifest.step == 3

    path = mgr.local_archive_path(3)
    assert path is not None and path.endswith(mgr.manifest(3).archive) and path.endswith(".keras")
    assert zipfile.is_zipfile(path)

    # 1. Stock Keras opens it, compile config and optimizer state included.
    stock = keras.saving.load_model(path, custom_objects=custom_objects)
    assert type(stock) is type(model)
    assert_same_predictions(model, stock, x)
    assert_same_state(model, stock)
    assert_same_compile(model, stock)
    assert_same_optimizer(model, stock)
    EXTRA[case](model, stock)

    # 2. The manager's own load gives the same.
    loaded = mgr.load(custom_objects=custom_objects)
    assert type(loaded) is type(model)
    assert_same_predictions(model, loaded, x)
    assert_same_state(model, loaded)
    assert_same_compile(model, loaded)
    assert_same_optimizer(model, loaded)
    EXTRA[case](model, loaded)

    # 3. Restore into a fresh, untrained model of the same architecture.
    keras.utils.set_random_seed(99)  # different initial weights
    fresh = build()
    with pytest.raises(AssertionError):
        assert_same_state(model, fresh)
    restored = mgr.restore(fresh)
    assert restored.step == 3
    assert_same_predictions(model, fresh, x)
    assert_same_state(model, fresh)
    assert_same_optimizer(model, fresh)

    # 4. The archive is laid out exactly as model.save() lays it out.
    assert_layout_matches_model_save(path, model, tmp_path)

    # 5. Training goes on identically from the loaded and the original model.
    #    (Dropout draws from seed generators, which .keras files do not store.)
    if case != "dropout_bn":
        train(model, x, y, steps=1)
        train(stock, x, y, steps=1)
        assert_same_state(model, stock)
        assert_same_optimizer(model, stock)


def test_unregistered_layer_with_custom_object_scope(mgr):
    model = build_unregistered()
    x, y = data_single()
    train(model, x, y)
    mgr.save(1, model)
    with keras.saving.custom_object_scope({"UnregisteredLayer": UnregisteredLayer}):
        stock = keras.saving.load_model(mgr.local_archive_path(1))
        loaded = mgr.load()
    for other in (stock, loaded):
        assert isinstance(other.get_layer("unreg"), UnregisteredLayer)
        assert_same_predictions(model, other, x)
        assert_same_optimizer(model, other)


@pytest.fixture
def unregistered_ckpt(mgr):
    mgr.save(1, build_unregistered())
    return mgr


def test_unregistered_layer_without_custom_objects_is_one_line_error(unregistered_ckpt):
    mgr = unregistered_ckpt
    with pytest.raises(UnknownCustomObjectError) as info:
        mgr.load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("step 1: ")
    assert "custom_objects" in message
    assert isinstance(info.value, TypeError)  # still catchable as Keras's error type
    # Stock Keras fails too: the archive is not the problem.
    with pytest.raises(TypeError, match="UnregisteredLayer"):
        keras.saving.load_model(mgr.local_archive_path(1))


def test_unknown_custom_object_error_names_the_class(unregistered_ckpt):
    with pytest.raises(UnknownCustomObjectError) as info:
        unregistered_ckpt.load()
    message = str(info.value)
    assert "'UnregisteredLayer'" in message
    assert "Sequential" not in message


def test_lambda_layer_refused_in_safe_mode_loads_when_unsafe(mgr):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t * 2.0 + 1.0)]
    )
    model.compile(optimizer="sgd", loss="mse")
    x, y = _x(), RNG.normal(size=(8, 3)).astype("float32")
    train(model, x, y)
    mgr.save(1, model)
    with pytest.raises(CkptmgrError) as info:
        mgr.load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("step 1: ")
    assert "safe_mode" in message and "lambda" in message
    loaded = mgr.load(safe_mode=False)
    assert_same_predictions(model, loaded, x)
    # Stock Keras agrees on both counts.
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(mgr.local_archive_path(1))
    stock = keras.saving.load_model(mgr.local_archive_path(1), safe_mode=False)
    assert_same_predictions(model, stock, x)


def test_large_variables_are_streamed_and_still_match_model_save(mgr, tmp_path):
    """Arrays above the inline threshold (64 KiB) take the streaming path."""
    model = keras.Sequential([keras.Input((300,)), keras.layers.Dense(200), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    x, y = RNG.normal(size=(4, 300)).astype("float32"), RNG.normal(size=(4, 1)).astype("float32")
    train(model, x, y, steps=1)
    mgr.save(1, model)
    path = mgr.local_archive_path(1)
    with zipfile.ZipFile(path) as ours:
        our_values = h5_values(ours.read("model.weights.h5"))
    assert max(v.nbytes for v in our_values.values()) > 64 * 1024
    assert_layout_matches_model_save(path, model, tmp_path)
    stock = keras.saving.load_model(path)
    assert_same_predictions(model, stock, x)
    assert_same_optimizer(model, stock)


def test_large_bfloat16_variables_are_streamed_tagged_as_keras_does(mgr, tmp_path):
    """bfloat16 above the inline threshold: streamed, stored as Keras stores it
    (opaque 2-byte HDF5 type, ``dtype="bfloat16"`` attribute), loaded back."""
    model = keras.Sequential([keras.Input((300,)), keras.layers.Dense(200, dtype="bfloat16"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    x, y = RNG.normal(size=(4, 300)).astype("float32"), RNG.normal(size=(4, 1)).astype("float32")
    train(model, x, y, steps=1)
    mgr.save(1, model)
    path = mgr.local_archive_path(1)
    with zipfile.ZipFile(path) as ours, h5py.File(io.BytesIO(ours.read("model.weights.h5")), "r") as f:
        kernel = f["layers/dense/vars/0"]
        assert kernel.nbytes > 64 * 1024 and kernel.dtype == np.dtype("V2")
        assert kernel.attrs["dtype"] == "bfloat16"
        assert f["optimizer/vars/2"].attrs["dtype"] == "bfloat16"  # Adam's slot for it
        assert kernel[()].tobytes() == np.asarray(model.layers[0].kernel).tobytes()
    assert_layout_matches_model_save(path, model, tmp_path)
    for other in (keras.saving.load_model(path), restored_clone(model, mgr)):
        assert other.layers[0].kernel.dtype == "bfloat16"
        assert_same_state(model, other)
        assert_same_optimizer(model, other)


def restored_clone(model, mgr):
    """A re-initialized copy of ``model``, restored from ``mgr``."""
    fresh = keras.models.clone_model(model)
    fresh.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    mgr.restore(fresh)
    return fresh


# --------------------------------------------------------------------------
# Exports (one trained checkpoint shared by the export tests)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(5)
    model = build_dropout_bn()
    x, y = data_single()
    train(model, x, y)
    manager = CheckpointManager(tmp_path_factory.mktemp("export") / "ckpt")
    manager.save(1, model)
    return manager, model, x


def h5_datasets(path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_export_weights_is_what_save_weights_writes(exported, tmp_path):
    """Dataset by dataset, optimizer included (issue 9), and load_weights reads it."""
    mgr, model, x = exported
    out = tmp_path / "export" / "model.weights.h5"
    mgr.export_weights(str(out))
    reference = tmp_path / "reference.weights.h5"
    model.save_weights(str(reference))
    ours, theirs = h5_datasets(out), h5_datasets(reference)
    assert sorted(ours) == sorted(theirs) and any(k.startswith("optimizer/") for k in ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    keras.utils.set_random_seed(7)
    fresh = build_dropout_bn()
    fresh.load_weights(str(out))
    assert_same_predictions(model, fresh, x)
    assert_same_state(model, fresh)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_export_weights_without_the_optimizer(exported, tmp_path):
    mgr, model, x = exported
    out = tmp_path / "export" / "model.weights.h5"
    mgr.export_weights(str(out), include_optimizer=False)
    with h5py.File(out, "r") as f:
        assert "optimizer" not in f  # model state only
    fresh = build_dropout_bn()
    fresh.load_weights(str(out))
    assert_same_predictions(model, fresh, x)


def test_export_keras_is_a_loadable_copy(exported, tmp_path):
    mgr, model, x = exported
    out = tmp_path / "export" / "copy.keras"
    mgr.export_keras(str(out))
    with open(out, "rb") as a, open(mgr.local_archive_path(1), "rb") as b:
        assert a.read() == b.read()
    stock = keras.saving.load_model(out)
    assert_same_predictions(model, stock, x)


def test_export_saved_model_serves_same_predictions(exported, tmp_path):
    import tensorflow as tf

    mgr, model, x = exported
    out = tmp_path / "export" / "saved_model"
    mgr.export_saved_model(str(out))
    assert (out / "saved_model.pb").is_file()
    assert (out / "variables").is_dir()
    served = tf.saved_model.load(str(out))
    result = np.asarray(served.serve(tf.constant(x)))
    # Graph rewrites (op fusion) may legitimately differ from eager by an ulp.
    np.testing.assert_allclose(result, predict(model, x)[0], rtol=1e-6, atol=0)

"""One test per private Keras API ckptmgr relies on (``ckptmgr/keras_compat.py``).

Each test states one assumption about Keras internals and fails with the
installed Keras version in its message when a Keras release breaks it, so a
new Keras in CI (which installs the newest release) says at once what moved.
A last test checks that no other ckptmgr module imports ``keras.src``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import keras_compat  # noqa: E402
from ckptmgr.errors import UnsupportedModelError  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "ckptmgr"
KERAS = f"Keras {keras.__version__} (ckptmgr tested {keras_compat.TESTED_KERAS})"


def model_with_state(name: str = "probe"):
    """Nested layers, Dropout (a seed generator), a compiled and built Adam."""
    inner = keras.Sequential([keras.layers.Dense(3), keras.layers.Dropout(0.5)], name="inner")
    model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1)], name=name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def saved_archive(model, tmp_path) -> zipfile.ZipFile:
    path = tmp_path / "model.keras"
    model.save(path)
    return zipfile.ZipFile(path)


def h5_group_paths(archive: zipfile.ZipFile, tmp_path) -> set[str]:
    import h5py

    path = tmp_path / "model.weights.h5"
    path.write_bytes(archive.read("model.weights.h5"))
    found: set[str] = set()
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: found.add(name) if name.endswith("vars") else None)
    return {p for p in found if p.split("/")[-1] == "vars"}


# -- saving_lib ----------------------------------------------------------------------


def test_saving_lib_has_the_private_names():
    from keras.src.saving import saving_lib

    missing = [n for n in keras_compat.SAVING_LIB_NAMES if not hasattr(saving_lib, n)]
    assert not missing, f"{KERAS}: keras.src.saving.saving_lib lost {missing}"
    assert keras_compat.saving_lib() is saving_lib


def test_save_state_signature():
    params = list(inspect.signature(keras_compat.saving_lib()._save_state).parameters)
    assert params[:5] == ["saveable", "weights_store", "assets_store", "inner_path", "visited_saveables"], (
        f"{KERAS}: saving_lib._save_state{params} is not the walk ckptmgr calls"
    )


def test_save_state_makes_a_group_right_before_each_saveable_writes(tmp_path):
    """``_save_state`` calls ``weights_store.make(path)`` with the saveable in
    a local named ``saveable``, and that saveable writes the group's values;
    the groups are those ``model.save`` writes."""
    saving_lib = keras_compat.saving_lib()
    model = model_with_state()
    calls: list[tuple[str, object, list[str]]] = []

    class Probe(saving_lib.H5IOStore):
        def __init__(self):  # no file behind it
            self.mode = "w"

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            saveable = sys._getframe(1).f_locals.get("saveable", "<no local named saveable>")
            calls.append((f"{path}/vars" if path else "vars", saveable, []))
            return self

        def __setitem__(self, key, value):
            calls[-1][2].append(str(key))

        def __len__(self):
            return len(calls[-1][2]) if calls else 0

        def keys(self):
            return list(calls[-1][2]) if calls else []

        def close(self):
            pass

    saving_lib._save_state(model, weights_store=Probe(), assets_store=None, inner_path="",
                           visited_saveables=set())
    assert calls, f"{KERAS}: saving_lib._save_state never called weights_store.make"
    for path, saveable, keys in calls:
        assert hasattr(saveable, "save_own_variables"), (
            f"{KERAS}: _save_state called make({path!r}) without a local 'saveable' that saves "
            f"variables (found {saveable!r}); ckptmgr's capture plan reads that local"
        )
        own: dict = {}
        saveable.save_own_variables(own)
        assert sorted(own) == sorted(keys), (
            f"{KERAS}: the values written after make({path!r}) are not {type(saveable).__name__}'s"
        )
    written = {p for p, _, _ in calls}
    expected = h5_group_paths(saved_archive(model, tmp_path), tmp_path)
    assert written == expected, f"{KERAS}: _save_state's groups differ from model.save's: {written ^ expected}"


def test_save_state_makes_an_assets_dir_right_before_save_assets():
    """Assets: ``assets_store.make(path)`` comes right before
    ``saveable.save_assets``, with the saveable in the local ``saveable``."""
    from ckptmgr.state import StatePlan

    lookup = keras.layers.StringLookup(name="lookup")
    lookup.adapt(["a", "b", "c"])  # an adapted vocabulary is an asset (a given one is config)
    model = keras.Sequential([keras.Input((1,), dtype="string"), lookup], name="with_assets")
    try:
        plan = StatePlan(model)
    except UnsupportedModelError as exc:
        pytest.fail(f"{KERAS}: {exc}")
    owners = [saveable for _, saveable in plan.assets.owners]
    assert lookup in owners, f"{KERAS}: the StringLookup's save_assets was not seen: {owners}"
    assert any(b"a" in data for data in plan.assets.capture().values())


def test_load_state_collects_failures_instead_of_raising(tmp_path):
    saving_lib = keras_compat.saving_lib()
    params = inspect.signature(saving_lib._load_state).parameters
    for name in ("saveable", "weights_store", "assets_store", "inner_path", "visited_saveables",
                 "failed_saveables", "error_msgs"):
        assert name in params, f"{KERAS}: saving_lib._load_state has no parameter {name!r}"
    source = model_with_state()
    path = tmp_path / "w.weights.h5"
    source.save_weights(path)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7), keras.layers.Dense(1)])
    failed: set = set()
    errors: dict = {}
    store = saving_lib.H5IOStore(path, mode="r")
    try:
        saving_lib._load_state(other, weights_store=store, assets_store=None, inner_path="",
                               visited_saveables=set(), failed_saveables=failed, error_msgs=errors)
    except Exception as exc:  # noqa: BLE001 - the assumption is that it does not raise
        pytest.fail(f"{KERAS}: _load_state raised instead of collecting: {type(exc).__name__}: {exc}")
    finally:
        store.close()
    assert failed and errors, f"{KERAS}: _load_state did not report the mismatched layers"
    obj, error = next(iter(errors.values()))
    assert hasattr(obj, "name") and str(error), f"{KERAS}: error_msgs values are not (saveable, error)"


def test_h5iostore_sets_only_the_attributes_ckptmgr_sets(tmp_path):
    """ckptmgr reads an already open HDF5 file through a store that sets the
    attributes H5IOStore's ``__init__`` sets; a new one would be missing."""
    saving_lib = keras_compat.saving_lib()
    path = tmp_path / "w.weights.h5"
    model_with_state().save_weights(path)
    store = saving_lib.H5IOStore(path, mode="r")
    try:
        extra = set(vars(store)) - keras_compat.H5IOSTORE_ATTRIBUTES
    finally:
        store.close()
    assert not extra, f"{KERAS}: H5IOStore.__init__ now also sets {sorted(extra)}; see keras_compat.H5IOSTORE_ATTRIBUTES"


def test_state_round_trips_through_an_open_h5_file(tmp_path):
    """The store over an open file (ckptmgr.state.apply_weights) restores
    weights and optimizer state exactly."""
    import h5py

    from ckptmgr.state import apply_weights

    source = model_with_state()
    source.optimizer.iterations.assign(7)
    path = tmp_path / "w.weights.h5"
    source.save_weights(path)
    target = model_with_state("target")
    with h5py.File(path, "r") as h5:
        apply_weights(target, h5)
    for a, b in zip(source.weights + source.optimizer.variables,
                    target.weights + target.optimizer.variables):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{KERAS}: {a.path} not restored"


def test_disk_io_store_reads_an_assets_directory(tmp_path):
    saving_lib = keras_compat.saving_lib()
    (tmp_path / "layers" / "lookup").mkdir(parents=True)
    (tmp_path / "layers" / "lookup" / "vocabulary.txt").write_text("a\n")
    store = saving_lib.DiskIOStore(str(tmp_path), mode="r")
    got = store.get("layers/lookup")
    assert Path(got) == tmp_path / "layers" / "lookup", f"{KERAS}: DiskIOStore.get gave {got!r}"


# -- variables, optimizers, serialization, RNG ----------------------------------------


def test_every_variable_is_a_keras_variable():
    base = keras_compat.variable_class()
    model = model_with_state()
    variables = model.variables + model.optimizer.variables + model.metrics_variables
    odd = [v for v in variables if not isinstance(v, base)]
    assert not odd and issubclass(keras.Variable, base), f"{KERAS}: not {base}: {odd[:3]}"


def test_every_optimizer_is_a_base_optimizer_saving_variables_by_index():
    base = keras_compat.base_optimizer_class()
    model = model_with_state()
    for optimizer in (model.optimizer, keras.optimizers.SGD(),
                      keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())):
        assert isinstance(optimizer, base), f"{KERAS}: {type(optimizer).__name__} is not a {base}"
    store: dict = {}
    model.optimizer.save_own_variables(store)
    variables = model.optimizer.variables
    assert sorted(store, key=int) == [str(i) for i in range(len(variables))], (
        f"{KERAS}: BaseOptimizer.save_own_variables keys are not 0..{len(variables) - 1}: {sorted(store)}"
    )
    for key, value in store.items():
        assert np.array_equal(np.asarray(value), np.asarray(variables[int(key)])), f"{KERAS}: key {key}"


def test_object_sharing_scope_gives_the_config_model_save_writes(tmp_path):
    from ckptmgr.state import model_config_json

    model = model_with_state()
    ours = json.loads(model_config_json(model))
    theirs = json.loads(saved_archive(model, tmp_path).read("config.json"))
    assert ours == theirs, f"{KERAS}: config.json differs from ObjectSharingScope + serialize_keras_object"


def test_global_seed_generator_state_advances_with_unseeded_random_calls():
    generator = keras_compat.global_seed_generator_function()()
    state = generator.state
    before = np.asarray(state).copy()
    keras.random.normal((2,))
    assert isinstance(state, keras_compat.variable_class()), f"{KERAS}: global seed state is {type(state)}"
    assert not np.array_equal(before, np.asarray(generator.state)), (
        f"{KERAS}: an unseeded keras.random call did not advance global_seed_generator().state"
    )


def test_flatten_layers_and_seed_generators():
    """``Layer._flatten_layers(include_self=False)`` reaches nested layers and
    ``Layer._seed_generators`` holds a Dropout's generator (ckptmgr/state.py)."""
    model = model_with_state()
    layers = list(model._flatten_layers(include_self=False))
    dropout = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    assert dropout, f"{KERAS}: Model._flatten_layers does not reach nested layers: {layers}"
    generators = getattr(dropout[0], "_seed_generators", None)
    assert generators and all(hasattr(g, "state") for g in generators), (
        f"{KERAS}: Dropout._seed_generators is {generators!r}, not a list of SeedGenerators"
    )


# -- fit() and model.train_function ----------------------------------------------------


def test_fit_calls_train_function_as_the_batch_skipper_expects():
    """``fit()`` calls ``model.train_function`` with the iterator last (on JAX
    the state first, expecting it back), after ``on_train_begin``: a skipper
    installed there consumes 2 of 6 batches without training on them, then
    puts the real function back. (On JAX: ``tests/test_jax_backend.py``.)"""
    model = model_with_state()
    x, y = np.zeros((12, 4), "float32"), np.zeros((12, 1), "float32")

    class Skip(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model.train_function = keras_compat.batch_skipper(self.model, 2)

    try:
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[Skip()])
    except Exception as exc:  # noqa: BLE001 - the assumption broke: say on which Keras
        pytest.fail(f"{KERAS}: fit() calls model.train_function otherwise: {type(exc).__name__}: {exc}")
    assert int(model.optimizer.iterations) == 4, f"{KERAS}: the skipper did not replace 2 training steps"


# -- the multi-worker fit() fix ---------------------------------------------------------


def test_tensorflow_trainer_has_what_the_fix_replaces():
    mod = keras_compat._trainer_module()
    assert mod is not None, f"{KERAS}: not on the TensorFlow backend"
    for name in ("_collective_all_reduce_multi_worker", "reduce_per_replica"):
        assert hasattr(mod, name), f"{KERAS}: keras.src.backend.tensorflow.trainer has no {name}"
    assert "_maybe_symbolic_build" in mod.TensorFlowTrainer.__dict__, (
        f"{KERAS}: TensorFlowTrainer has no _maybe_symbolic_build of its own"
    )


def test_tree_map_structure():
    assert keras_compat.tree().map_structure(lambda x: x + 1, {"a": (1, 2)}) == {"a": (2, 3)}, KERAS


# -- the accessors fail in one line, naming the version ----------------------------------


def test_a_missing_private_module_or_name_is_one_clear_error():
    with pytest.raises(UnsupportedModelError, match=f"Keras {keras.__version__}.*keras.src.no_such"):
        keras_compat._private("no_such_module")
    with pytest.raises(UnsupportedModelError, match=f"Keras {keras.__version__}.*no_such_name"):
        keras_compat._private("saving.saving_lib", "_save_state", "no_such_name")


def test_no_other_module_imports_keras_src():
    """Private Keras imports live in keras_compat.py alone."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "keras_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {n}"
                          for n in names if n == "keras.src" or n.startswith("keras.src.")]
    assert not offenders, f"keras.src imported outside ckptmgr/keras_compat.py: {offenders}"

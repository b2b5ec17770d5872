"""Capture a Keras model's state to host arrays, and apply it back (worker side).

Capture walks the model with Keras's own traversal (``saving_lib._save_state``)
through a store that *records* instead of writing HDF5, so the paths are
exactly those ``model.save`` would write, optimizer included. The recording
(a :class:`StatePlan`) is made once per model and reused: each save then only
copies every variable into a reusable host buffer, which is the one step that
blocks training. Restore reads the archive's HDF5 through Keras's own
``_load_state``, so custom ``load_own_variables`` keep working. Assets (a
lookup layer's vocabulary) are planned, captured and restored the same way, by
:mod:`ckptmgr.assets`.

State that ``.keras`` files leave out but exact resumption needs (random seed
generators, metric accumulators, Python and NumPy global RNGs) is captured
separately as a small JSON-able :class:`TrainingState`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptmgr import keras_compat
from ckptmgr.assets import AssetPlan, asset_recorder_class, assets_store
from ckptmgr.io.archive import ModelSnapshot, VarGroup
from ckptmgr.errors import IncompatibleCheckpointError


def _keras():
    import keras  # deferred: the coordinator never imports TensorFlow

    return keras


@dataclass
class _PlannedGroup:
    path: str
    attrs: dict[str, str]
    values: list[tuple[str, Any]] = field(default_factory=list)
    saveable: Any = None  # the layer/optimizer whose save_own_variables made it
    dynamic: bool = False  # values are computed: re-ask the saveable each capture

    def resolve(self) -> None:
        """Point every value at a live variable, or mark the group dynamic."""
        if all(_is_variable(v) for _, v in self.values):
            return
        variables = list(getattr(self.saveable, "variables", []))
        if _is_optimizer(self.saveable) and len(variables) == len(self.values):
            # BaseOptimizer.save_own_variables stores variables[i].numpy() as "i".
            self.values = [(k, variables[int(k)]) for k, _ in self.values]
        else:
            self.dynamic = True

    def current_values(self) -> list[tuple[str, Any]]:
        if not self.dynamic:
            return self.values
        store = _recording_store_class()()
        self.saveable.save_own_variables(store.make(self.path[: -len("/vars")] if self.path != "vars" else ""))
        return store.groups[0].values if store.groups else []


def _is_variable(value) -> bool:
    return isinstance(value, keras_compat.variable_class())


def _is_optimizer(obj) -> bool:
    return isinstance(obj, keras_compat.base_optimizer_class())


@functools.lru_cache(maxsize=None)
def _recording_store_class():
    saving_lib = keras_compat.saving_lib()

    class RecordingStore(saving_lib.H5IOStore):
        """Looks like Keras's H5 store; remembers which variable goes where."""

        def __init__(self):  # noqa: D401 - no HDF5 file behind it
            self.mode = "w"
            self.groups: list[_PlannedGroup] = []
            self._current: _PlannedGroup | None = None
            self._registered = False

        def __bool__(self) -> bool:
            return True

        def make(self, path, metadata=None):
            group_path = f"{path}/vars" if path else "vars"
            # _save_state calls make() right before saveable.save_own_variables.
            saveable = sys._getframe(1).f_locals.get("saveable")
            self._current = _PlannedGroup(group_path, dict(metadata or {}), saveable=saveable)
            self._registered = False
            if metadata:
                self._register()
            return self

        def _register(self):
            if not self._registered:
                self.groups.append(self._current)
                self._registered = True

        def __setitem__(self, key, value):
            self._register()
            self._current.values.append((str(key), value))

        def __len__(self):
            return len(self._current.values) if self._current else 0

        def keys(self):
            return [k for k, _ in self._current.values] if self._current else []

        def close(self):
            pass

    return RecordingStore


def _all_layers(model):
    return [model] + list(model._flatten_layers(include_self=False))


class StatePlan:
    """Where every piece of a model's state goes in ``model.weights.h5``.

    Made once per model; holds references to the live variables, so it lives on
    the worker. :meth:`capture` copies their values into reusable host buffers.
    """

    def __init__(self, model):
        keras = _keras()
        saving_lib = keras_compat.saving_lib()

        store = _recording_store_class()()
        with asset_recorder_class()() as assets:
            saving_lib._save_state(
                model,
                weights_store=store,
                assets_store=assets,
                inner_path="",
                visited_saveables=set(),
            )
        self.assets = AssetPlan(assets.owners)
        self.groups: list[_PlannedGroup] = store.groups
        for group in self.groups:
            group.resolve()
        self._model = model
        self._signature = _variable_signature(model)
        self._buffers: dict[tuple[int, int, str], np.ndarray] = {}  # (set, group, key)
        self._keras_version = keras.__version__

    def is_current(self, model) -> bool:
        """False when any tracked variable object changed since planning: a new
        optimizer (a recompile), added layers, a changed ``trainable``."""
        return model is self._model and _variable_signature(model) == self._signature

    @property
    def nbytes(self) -> int:
        return sum(_host(v).nbytes for g in self.groups for _, v in g.values)

    def capture(self, *, reuse_buffers: bool = True, buffer_set: int = 0) -> ModelSnapshot:
        """Copy all state to host memory: a true snapshot, safe from later steps.

        With ``reuse_buffers`` the copy goes into buffers kept from the last
        capture into the same ``buffer_set`` (no page faults; ~memcpy speed).
        The caller must not reuse a set while a snapshot in it is still being
        written or waits to be; two sets let one be written while the next
        save copies into the other (see :mod:`ckptmgr.pipeline`), each set
        costing the size of the state in host memory.
        """
        groups, copies = [], []
        for gi, group in enumerate(self.groups):
            arrays = []
            for key, value in group.current_values():
                source = _host(value)
                buf = self._buffers.get((buffer_set, gi, key)) if reuse_buffers else None
                if buf is None or buf.shape != source.shape or buf.dtype != source.dtype:
                    buf = np.empty(source.shape, source.dtype)
                    if reuse_buffers:
                        self._buffers[(buffer_set, gi, key)] = buf
                copies.append((buf, source))
                arrays.append((key, buf))
            groups.append(VarGroup(group.path, dict(group.attrs), arrays))
        _copy_all(copies)
        return ModelSnapshot(
            config_json=model_config_json(self._model),
            metadata_json=json.dumps(
                {
                    "keras_version": self._keras_version,
                    "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                }
            ),
            groups=groups,
            assets=self.assets.capture(),
        )

    def warm(self, buffer_sets: int = 1) -> None:
        """Allocate and touch every buffer set now (at train begin), so that no
        save pays the page faults of fresh memory."""
        for buffer_set in range(buffer_sets):
            self.capture(buffer_set=buffer_set)


_COPY_THREADS = min(4, os.cpu_count() or 1)
_COPY_SPLIT_BYTES = 8 * 1024 * 1024  # arrays above this are split across threads
_copy_pool = None


def _copy_all(copies: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``np.copyto`` every pair, large ones split across a few threads.

    numpy releases the GIL while copying, so on two cores two threads finish
    the blocking copy ~25 % sooner than one.
    """
    global _copy_pool
    small = [(d, s) for d, s in copies if d.nbytes < _COPY_SPLIT_BYTES or _COPY_THREADS < 2]
    for dst, src in small:
        np.copyto(dst, src)
    pieces = []
    for dst, src in copies:
        if dst.nbytes >= _COPY_SPLIT_BYTES and _COPY_THREADS >= 2:
            flat_dst, flat_src = dst.reshape(-1), np.ascontiguousarray(src).reshape(-1)
            bounds = np.linspace(0, flat_dst.size, _COPY_THREADS + 1).astype(int)
            pieces += [(flat_dst[a:b], flat_src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if not pieces:
        return
    if _copy_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="ckptmgr-copy")
    list(_copy_pool.map(lambda pair: np.copyto(*pair), pieces))


def plan_for(model, plan: "StatePlan | None" = None) -> "StatePlan":
    """``plan`` if it still describes ``model``, else a new one."""
    return plan if plan is not None and plan.is_current(model) else StatePlan(model)


def _variable_signature(model) -> tuple:
    """The identity of every tracked variable, and whether it trains.

    Identities, not counts: a recompile with a new optimizer of the same size
    has the same counts but other objects. (A plan holds references to the
    variables it planned, so their ids cannot be reused while it lives.)
    """
    optimizer = getattr(model, "optimizer", None)
    optimizer_vars = list(optimizer.variables) if optimizer is not None else []
    return (
        id(optimizer),
        tuple((id(v), bool(getattr(v, "trainable", True))) for v in model.variables),
        tuple(id(v) for v in optimizer_vars),
    )


def _host(value) -> np.ndarray:
    """A host view of a variable's current value, zero-copy where possible.

    TensorFlow's ``.numpy()`` copies; ``read_value()._numpy()`` is a view of
    the tensor's host buffer (on a GPU it is the one device-to-host copy). A
    JAX array has neither: ``np.asarray`` gives the same view or copy. The
    caller copies the view into its own buffer at once, while training waits,
    so later steps cannot change what is written.
    """
    inner = getattr(value, "value", value)
    read = getattr(inner, "read_value", None)
    tensor = read() if callable(read) else inner
    view = getattr(tensor, "_numpy", None)
    if callable(view):
        try:
            return np.asarray(view())
        except Exception:  # noqa: BLE001 - fall back to the copying path
            pass
    if hasattr(tensor, "numpy"):
        return np.asarray(tensor.numpy())
    return np.asarray(value)


def model_config_json(model) -> str:
    """The ``config.json`` Keras writes: architecture, compile and build config."""
    keras = _keras()
    with keras_compat.object_sharing_scope():
        return json.dumps(keras.saving.serialize_keras_object(model))


def ensure_built_optimizer(model) -> None:
    """Build the optimizer's slots as ``fit()`` would (under the model's
    distribution strategy), so its state has somewhere to go on restore and a
    plan made at train begin covers it (Keras builds it only at the first step)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.variables:
        return
    strategy = getattr(model, "distribute_strategy", None)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        optimizer.build(model.trainable_variables)


def apply_weights(model, h5file) -> None:
    """Load weights and optimizer state from an open ``model.weights.h5``, and
    assets (vocabularies) from the archive it was opened from, if any (see
    ``archive.open_weights``)."""
    with assets_store(getattr(h5file, "archive", None)) as assets:
        _load_state(model, keras_compat.reading_store_class()(h5file), assets)


def apply_snapshot_arrays(model, snapshot: ModelSnapshot, *,
                          resolve: Callable[[str, Any], Any] | None = None) -> None:
    """Load a snapshot's arrays (weights and optimizer state) into ``model``
    straight from host memory, through the same Keras traversal as an archive
    (the memory tier's restore: no archive is laid out). Assets need files:
    a snapshot with assets goes through its archive instead.

    ``resolve(name, value)``: the array to load for ``name`` (``group
    path/key``) when Keras's loader asks for it, given the snapshot's value
    there (an array, or an :class:`~ckptmgr.io.snapshot.ArraySpec` whose data
    is read only then: a stream). Each variable's ``assign`` copies into its
    own memory, so the arrays may be views of Ray's object store."""
    if snapshot.assets:
        raise ValueError("a snapshot with assets is applied through its archive")
    groups = {group.path: dict(group.arrays) for group in snapshot.groups}

    class _SnapshotStore(keras_compat.reading_store_class()):
        """No HDF5 file: the arrays are the snapshot's."""

        def get(self, path):
            self._group_path = f"{path}/vars" if path else "vars"
            self._h5_entry_group = groups.get(self._group_path, {})
            return self

        def has_path(self, path):
            return any(p == path or p.startswith(f"{path}/") for p in groups)

        def __getitem__(self, key):
            value = self._h5_entry_group[key]
            return value if resolve is None else resolve(f"{self._group_path}/{key}", value)

        def __len__(self):
            return len(self._h5_entry_group)

        def keys(self):
            return self._h5_entry_group.keys()

    _load_state(model, _SnapshotStore(None, entered=True), None)


def _load_state(model, weights_store, assets) -> None:
    """Keras's own traversal of ``model`` over ``weights_store``; a model that
    does not fit is refused in one line."""
    saving_lib = keras_compat.saving_lib()
    ensure_built_optimizer(model)
    failed: set[int] = set()
    errors: dict[int, Any] = {}
    saving_lib._load_state(
        model,
        weights_store=weights_store,
        assets_store=assets,
        inner_path="",
        visited_saveables=set(),
        failed_saveables=failed,
        error_msgs=errors,
    )
    if failed:
        obj, error = next(iter(errors.values()))
        name = getattr(obj, "name", type(obj).__name__)
        raise IncompatibleCheckpointError(
            f"The checkpoint does not fit this model: {name!r}: {_first_line(error)}. "
            "Restore into the same architecture that was saved."
        )


def build_if_needed(model, config: dict[str, Any]) -> None:
    """Build an unbuilt model from the checkpoint's ``build_config``, as
    ``load_model`` does; refuse in one line when that gives no variables
    (restoring into a model without variables would load nothing)."""
    if model.variables:
        return
    build_config = config.get("build_config")
    name = getattr(model, "name", model)
    if build_config:
        try:
            model.build_from_config(build_config)
        except Exception as exc:  # noqa: BLE001 - the model's own code: say what failed
            raise IncompatibleCheckpointError(
                f"Cannot build model {name!r} from the checkpoint's build_config "
                f"{build_config}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
    if not model.variables:
        raise IncompatibleCheckpointError(
            f"Cannot restore into model {name!r}: it is not built (no variables) and "
            f"the checkpoint's build_config {build_config} does not build it. Build it "
            "first, e.g. model.build(input_shape) or call it on one batch, or use "
            "CheckpointManager.load() to get a new model."
        )


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# -- training-loop state that .keras files leave out -------------------------


@dataclass
class TrainingState:
    """RNG and metric state for exact resumption (stored in the manifest)."""

    seed_generators: list[list[int]] = field(default_factory=list)
    metrics: list[list[float]] = field(default_factory=list)
    python_random: Any = None
    numpy_random: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "seed_generators": self.seed_generators,
            "metrics": self.metrics,
            "python_random": self.python_random,
            "numpy_random": self.numpy_random,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "TrainingState":
        return cls(**(data or {}))


def _seed_states(model) -> list:
    keras = _keras()
    global_seed_generator = keras_compat.global_seed_generator_function()
    states = []
    for layer in _all_layers(model):
        states += [sg.state for sg in getattr(layer, "_seed_generators", [])]
    try:
        states.append(global_seed_generator().state)
    except Exception:  # noqa: BLE001 - no global generator on this backend yet
        pass
    del keras
    return states


def capture_training_state(model) -> TrainingState:
    """Small state (copied to Python lists) needed for bit-identical resumes."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    return TrainingState(
        seed_generators=[np.asarray(s.numpy()).tolist() for s in _seed_states(model)],
        metrics=[np.asarray(v.numpy()).reshape(-1).tolist() for v in model.metrics_variables],
        python_random=[py_state[0], list(py_state[1]), py_state[2]],
        numpy_random=[np_state[0], np_state[1].tolist(), *np_state[2:]],
    )


def apply_training_state(model, state: TrainingState) -> None:
    """Put RNG and metric state back; silently skips parts that do not match."""
    seeds = _seed_states(model)
    if len(seeds) == len(state.seed_generators):
        for var, value in zip(seeds, state.seed_generators):
            var.assign(np.asarray(value, dtype=var.dtype))
    metric_vars = model.metrics_variables
    if len(metric_vars) == len(state.metrics):
        for var, value in zip(metric_vars, state.metrics):
            var.assign(np.asarray(value, dtype=var.dtype).reshape(var.shape))
    if state.python_random:
        version, internal, gauss = state.python_random
        random.setstate((version, tuple(internal), gauss))
    if state.numpy_random:
        name, keys, pos, has_gauss, cached = state.numpy_random
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))

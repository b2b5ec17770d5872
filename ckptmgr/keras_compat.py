"""Every private Keras API ckptmgr relies on, in one module.

Keras's public API has no way to walk a model's state the way ``model.save``
does, nor to read it back from an open HDF5 file, so ckptmgr uses a few
private parts of ``keras.src``. They are imported here and nowhere else
(``ckptmgr/state.py`` and ``ckptmgr/assets.py`` call the accessors below), and
``tests/test_keras_private.py`` has one test per assumption, each failing with
the installed Keras version in its message when a Keras release changes it:

- ``saving.saving_lib._save_state`` walks a model as ``model.save`` does,
  calling ``weights_store.make(path, metadata)`` right before
  ``saveable.save_own_variables`` and ``assets_store.make(path)`` right before
  ``saveable.save_assets``, with the saveable in a local named ``saveable``.
- ``saving.saving_lib._load_state`` reads it back and collects failures
  (``failed_saveables``, ``error_msgs``) instead of raising.
- ``saving.saving_lib.H5IOStore`` is the weights store; its ``__init__`` sets
  no attribute outside :data:`H5IOSTORE_ATTRIBUTES`, so a store over an
  already open ``h5py.File`` can be made by setting those.
- ``saving.saving_lib.DiskIOStore`` is the assets store:
  ``DiskIOStore(root, mode="r")``.
- ``backend.common.variables.Variable`` is the base class of every variable.
- ``optimizers.base_optimizer.BaseOptimizer`` is the base of every optimizer;
  its ``save_own_variables`` stores ``variables[i]`` under the key ``"i"``.
- ``saving.serialization_lib.ObjectSharingScope`` around
  ``serialize_keras_object(model)`` gives the ``config.json`` ``model.save``
  writes.
- ``random.seed_generator.global_seed_generator()`` is the global RNG; its
  ``state`` is a variable.
- ``backend.tensorflow.trainer`` and ``tree.map_structure``: the multi-worker
  ``fit()`` fix below.
- ``fit()`` calls ``model.train_function`` as its backend's trainer made it
  (:func:`batch_skipper`): TensorFlow ``f(iterator) -> logs``, JAX
  ``f(state, iterator) -> (logs, state)``, each call drawing
  ``steps_per_execution`` batches from the iterator.

Two private *attributes* are used outside this module and tested the same way:
``Layer._flatten_layers`` and ``Layer._seed_generators`` (``ckptmgr/state.py``).

Each accessor raises :class:`~ckptmgr.errors.UnsupportedModelError` naming the
Keras version when what it needs is gone. No accessor imports Keras until it is
called: importing this module costs nothing (the coordinator never imports
Keras).

Fix: Keras 3 ``fit()`` under multi-worker ``MultiWorkerMirroredStrategy``
======================================================================

Why
---
With the TensorFlow backend, Keras 3 (verified on 3.15.1 with TensorFlow 2.21)
cannot run ``model.fit()`` / ``model.evaluate()`` under
``tf.distribute.MultiWorkerMirroredStrategy`` (MWMS) once the cluster has two
or more workers -- with or without Ray.  It fails with::

    ValueError: Attempt to convert a value (PerReplica:{...}) with an
    unsupported type (<class '...values.PerReplica'>) to a Tensor.

Upstream reports: keras-team/keras#20585 and ray-project/ray#47464.
Single-worker MWMS and ``MirroredStrategy`` are not affected.

There are two root causes, both in ``keras/src/backend/tensorflow/trainer.py``:

1. ``TensorFlowTrainer._maybe_symbolic_build`` builds the model from the first
   distributed batch by calling ``strategy.reduce("MEAN", batch, axis=None)``.
   In multi-worker mode that eager cross-worker reduce of a *data* batch
   fails with the error above.  A symbolic build only needs shapes and dtypes,
   so the fix takes the first local replica's batch instead
   (``strategy.experimental_local_results(x)[0]``).
2. Once past that, the module-level ``reduce_per_replica`` (called by
   ``TensorFlowTrainer._make_function`` on the train/test step outputs) reduces
   every metric with ``strategy.reduce("MEAN", v, axis=0)`` under a
   multi-worker collective strategy.  Metric values are scalars, so this
   fails with ``Invalid reduction dimension 0``.  The fix reduces *scalar*
   values with ``axis=None`` in that one case and leaves everything else to the
   original function.

Both fixes only change behaviour when the strategy is MWMS in multi-worker mode
(Keras's own ``_collective_all_reduce_multi_worker`` test); in every other case
the original Keras code runs.  Weights stay identical across workers.

How
---
:func:`apply_multiworker_fit_patch` swaps in the two replacements in memory
(``TensorFlowTrainer._maybe_symbolic_build`` and the trainer module's
``reduce_per_replica`` global) and keeps the originals, so
:func:`remove_multiworker_fit_patch` restores them exactly.  No file in
site-packages is touched.  Applying is idempotent and thread-safe; call it in
every worker process before ``model.fit()``.

Each half is applied only if :func:`multiworker_fit_patch_needed` style
feature detection finds the buggy code in the installed Keras (it inspects the
source of the two functions), so a Keras release that fixes the bug, or
changes the code so that these replacements would no longer be faithful, is
left alone.

Removing this module
--------------------
When Keras ships the fix, :func:`multiworker_fit_patch_needed` returns False
and :func:`apply_multiworker_fit_patch` becomes a no-op.  Then: drop the call
sites, delete this module and ``tests/test_keras_compat.py``, and raise the
``keras`` lower bound in ``pyproject.toml`` to the fixed release.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from typing import Any, Callable

__all__ = [
    "H5IOSTORE_ATTRIBUTES",
    "apply_multiworker_fit_patch",
    "base_optimizer_class",
    "batch_skipper",
    "global_seed_generator_function",
    "keras_version",
    "object_sharing_scope",
    "reading_store_class",
    "saving_lib",
    "tree",
    "variable_class",
    "multiworker_fit_patch_applied",
    "multiworker_fit_patch_needed",
    "remove_multiworker_fit_patch",
]

KERAS_ISSUE = "https://github.com/keras-team/keras/issues/20585"
RAY_ISSUE = "https://github.com/ray-project/ray/issues/47464"

# Marker set on our replacement functions, so a second apply (even from a
# reloaded copy of this module) can tell the patch is already in place.
_MARKER = "__ckptmgr_mwms_patch__"

_lock = threading.Lock()
# name -> original object, for the parts that are currently patched.
_originals: dict[str, Any] = {}

# What the buggy code looks like (whitespace-insensitive source matching).
_SYMBOLIC_BUILD_BUG = re.compile(r"distribute_strategy\.reduce\(")
_SCALAR_REDUCE_BUG = re.compile(r"strategy\.reduce\(\s*\"MEAN\"\s*,\s*v\s*,\s*axis\s*=\s*0\s*\)")


# --------------------------------------------------------------------------
# Private Keras APIs (see the table in the module docstring)
# --------------------------------------------------------------------------

# The Keras releases these assumptions were tested with (see README, "Installing").
TESTED_KERAS = "3.11 to 3.15"

# Every attribute ``saving_lib.H5IOStore.__init__`` may set, across the tested
# releases. The store ckptmgr/state.py makes over an already open h5py.File
# sets all of them but the path (``root_path`` in older releases, then
# ``path_or_io``), which only opening and closing the file use.
H5IOSTORE_ATTRIBUTES = frozenset({
    "root_path", "path_or_io", "mode", "archive", "io_file", "h5_file",
    "_h5_entry_path", "_h5_entry_group", "_h5_entry_metadata", "_h5_entry_initialized",
})
SAVING_LIB_NAMES = ("_save_state", "_load_state", "H5IOStore", "DiskIOStore")


def keras_version() -> str:
    import keras

    return keras.__version__


def _private(module: str, *names: str):
    """``keras.src.<module>`` with ``names`` checked, or one clear error."""
    import importlib

    from ckptmgr.errors import UnsupportedModelError

    try:
        mod = importlib.import_module(f"keras.src.{module}")
    except ImportError as exc:
        raise UnsupportedModelError(
            f"Keras {keras_version()} has no keras.src.{module}, which ckptmgr relies on "
            f"(tested with Keras {TESTED_KERAS}; see ckptmgr/keras_compat.py): {exc}"
        ) from exc
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise UnsupportedModelError(
            f"Keras {keras_version()}: keras.src.{module} has no {', '.join(missing)}, which "
            f"ckptmgr relies on (tested with Keras {TESTED_KERAS}; see ckptmgr/keras_compat.py)."
        )
    return mod


def saving_lib():
    """``keras.src.saving.saving_lib`` (``_save_state``, ``_load_state``,
    ``H5IOStore``, ``DiskIOStore``)."""
    return _private("saving.saving_lib", *SAVING_LIB_NAMES)


@functools.lru_cache(maxsize=None)
def reading_store_class() -> type:
    """A base for weights stores that Keras's ``_load_state`` reads from without
    this store opening a file: ``ReadingStore(h5)`` over an already open
    ``h5py.File``, or ``ReadingStore(None, entered=True)`` for a subclass that
    serves its own groups. It sets every attribute of :data:`H5IOSTORE_ATTRIBUTES`
    but the file's path, which only opening and closing use."""

    class ReadingStore(saving_lib().H5IOStore):
        def __init__(self, h5=None, *, entered: bool = False):  # noqa: D401 - nothing to open
            self.h5_file, self.mode, self.archive, self.io_file = h5, "r", None, None
            self._h5_entry_path = None
            self._h5_entry_group = {}
            self._h5_entry_metadata = None
            self._h5_entry_initialized = entered

        def __bool__(self) -> bool:  # Keras skips a falsy store; ours is never "empty"
            return True

        def close(self):
            pass  # the file, if any, belongs to the caller

    return ReadingStore


def variable_class() -> type:
    """The base class of every Keras variable, on any backend."""
    return _private("backend.common.variables", "Variable").Variable


def base_optimizer_class() -> type:
    """The base class of every Keras optimizer (``LossScaleOptimizer`` too)."""
    return _private("optimizers.base_optimizer", "BaseOptimizer").BaseOptimizer


def object_sharing_scope():
    """A new ``ObjectSharingScope``: serialize as ``model.save`` does."""
    return _private("saving.serialization_lib", "ObjectSharingScope").ObjectSharingScope()


def global_seed_generator_function():
    """The function that returns Keras's global ``SeedGenerator`` (made on
    first use), whose ``state`` unseeded ``keras.random`` calls advance."""
    return _private("random.seed_generator", "global_seed_generator").global_seed_generator


def tree():
    """``keras.src.tree`` (``map_structure``)."""
    return _private("tree", "map_structure")


# Backends whose fit() loop calls train_function with the iterator last, and
# whether it passes the training state through (JAX's stateless step).
_TRAIN_FUNCTION_STATEFUL = {"tensorflow": False, "jax": True}


def batch_skipper(model, batches: int) -> Callable:
    """A ``model.train_function`` for ``fit()`` that draws ``batches`` batches
    without training on them, then puts ``model.train_function`` back.

    ``fit()`` calls what its backend's trainer made (``steps_per_execution``
    batches a call): on TensorFlow ``f(iterator) -> logs``, on JAX
    ``f(state, iterator) -> (logs, state)``; the state goes back untouched.
    """
    import keras

    from ckptmgr.errors import UnsupportedModelError

    backend = keras.backend.backend()
    if backend not in _TRAIN_FUNCTION_STATEFUL:
        raise UnsupportedModelError(
            f"Resuming inside an epoch needs the TensorFlow or JAX backend: Received: "
            f"backend={backend!r}. Save at epoch ends (save_freq='epoch') on this backend."
        )
    stateful = _TRAIN_FUNCTION_STATEFUL[backend]
    real = model.train_function
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    remaining = [batches]

    def skip_trained_batches(*args):
        iterator = args[-1]
        for _ in range(min(per_call, remaining[0])):
            next(iterator)
        remaining[0] -= per_call
        if remaining[0] <= 0:
            model.train_function = real
        return ({}, args[0]) if stateful else {}

    return skip_trained_batches


# --------------------------------------------------------------------------
# Introspection helpers
# --------------------------------------------------------------------------


def _trainer_module():
    """The Keras TF trainer module, or None if Keras isn't on the TF backend."""
    try:
        import keras
    except ImportError:  # pragma: no cover - keras is a hard dependency
        return None
    if keras.backend.backend() != "tensorflow":
        return None
    return _private("backend.tensorflow.trainer", "TensorFlowTrainer")


def _unpatched(mod, name: str):
    """The original Keras object `name`, even while the patch is applied."""
    if name in _originals:
        return _originals[name]
    if name == "_maybe_symbolic_build":
        return mod.TensorFlowTrainer.__dict__.get(name)
    return getattr(mod, name, None)


def _source_matches(obj, pattern: re.Pattern) -> bool:
    if obj is None:
        return False
    try:
        src = inspect.getsource(obj)
    except (OSError, TypeError):
        # No source to inspect: we cannot prove the replacement is faithful.
        return False
    return bool(pattern.search(src))


def _needed_parts(mod) -> dict[str, bool]:
    has_helpers = hasattr(mod, "_collective_all_reduce_multi_worker")
    return {
        "_maybe_symbolic_build": has_helpers
        and _source_matches(_unpatched(mod, "_maybe_symbolic_build"), _SYMBOLIC_BUILD_BUG),
        "reduce_per_replica": has_helpers
        and _source_matches(_unpatched(mod, "reduce_per_replica"), _SCALAR_REDUCE_BUG),
    }


# --------------------------------------------------------------------------
# Replacements
# --------------------------------------------------------------------------


def _make_symbolic_build(mod, original: Callable) -> Callable:
    """Replacement for ``TensorFlowTrainer._maybe_symbolic_build``.

    Identical to Keras's version except that, under multi-worker MWMS, the
    first local replica's batch is used for the symbolic build instead of a
    cross-worker ``strategy.reduce("MEAN", batch)``.
    """
    import tensorflow as tf

    keras_tree = tree()

    @functools.wraps(original)
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if (
            strategy is None
            or iterator is None
            or not mod._collective_all_reduce_multi_worker(strategy)
        ):
            return original(self, iterator=iterator, data_batch=data_batch)

        def first_local(x):
            if isinstance(x, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(x)[0]
            return x

        # As in Keras: the TF epoch iterator yields (begin, end, iterator).
        for _, _, it in iterator:
            data_batch = keras_tree.map_structure(first_local, next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    setattr(_maybe_symbolic_build, _MARKER, True)
    return _maybe_symbolic_build


def _make_reduce_per_replica(mod, original: Callable) -> Callable:
    """Replacement for the trainer module's ``reduce_per_replica``.

    Under multi-worker MWMS with a mean reduction, scalar values are reduced
    with ``axis=None``; every other value (and every other case) goes to the
    original function unchanged.
    """
    keras_tree = tree()

    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not mod._collective_all_reduce_multi_worker(
            strategy
        ):
            return original(values, strategy, reduction)

        def _reduce(v):
            local = strategy.experimental_local_results(v)
            shape = getattr(local[0], "shape", None) if local else None
            if shape is not None and shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original(v, strategy, reduction)

        return keras_tree.map_structure(_reduce, values)

    setattr(reduce_per_replica, _MARKER, True)
    return reduce_per_replica


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def multiworker_fit_patch_needed() -> bool:
    """Whether the installed Keras has the multi-worker ``fit()`` bug.

    Feature detection, not a version check: True when Keras runs on the
    TensorFlow backend and the source of ``TensorFlowTrainer._maybe_symbolic_build``
    or of ``reduce_per_replica`` still contains the failing reduce call.  It
    reports on Keras's own code, so it stays True while the patch is applied.
    """
    mod = _trainer_module()
    if mod is None:
        return False
    with _lock:
        return any(_needed_parts(mod).values())


def multiworker_fit_patch_applied() -> bool:
    """Whether any part of the patch is currently in place."""
    mod = _trainer_module()
    if mod is None:
        return False
    return bool(
        getattr(mod.TensorFlowTrainer.__dict__.get("_maybe_symbolic_build"), _MARKER, False)
        or getattr(getattr(mod, "reduce_per_replica", None), _MARKER, False)
    )


def apply_multiworker_fit_patch() -> bool:
    """Patch Keras so ``fit()`` works under multi-worker MWMS.

    Returns True if this call patched something, False if nothing was needed
    (bug absent, non-TensorFlow backend) or the patch was already applied.
    Safe to call many times, from any thread.
    """
    mod = _trainer_module()
    if mod is None:
        return False
    with _lock:
        needed = _needed_parts(mod)
        patched = False
        cls = mod.TensorFlowTrainer

        current = cls.__dict__.get("_maybe_symbolic_build")
        if needed["_maybe_symbolic_build"] and not getattr(current, _MARKER, False):
            _originals["_maybe_symbolic_build"] = current
            cls._maybe_symbolic_build = _make_symbolic_build(mod, current)
            patched = True

        current = getattr(mod, "reduce_per_replica")
        if needed["reduce_per_replica"] and not getattr(current, _MARKER, False):
            _originals["reduce_per_replica"] = current
            mod.reduce_per_replica = _make_reduce_per_replica(mod, current)
            patched = True
        return patched


def remove_multiworker_fit_patch() -> bool:
    """Restore Keras's original functions. Returns True if anything was restored."""
    mod = _trainer_module()
    if mod is None:
        return False
    with _lock:
        restored = False
        original = _originals.pop("_maybe_symbolic_build", None)
        if original is not None:
            mod.TensorFlowTrainer._maybe_symbolic_build = original
            restored = True
        original = _originals.pop("reduce_per_replica", None)
        if original is not None:
            mod.reduce_per_replica = original
            restored = True
        return restored

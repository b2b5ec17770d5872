"""Compatibility fix: Keras 3 ``fit()`` under multi-worker ``MultiWorkerMirroredStrategy``.

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
    "apply_multiworker_fit_patch",
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
    from keras.src.backend.tensorflow import trainer as tf_trainer

    return tf_trainer


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
    from keras.src import tree

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
            data_batch = tree.map_structure(first_local, next(it))
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
    from keras.src import tree

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

        return tree.map_structure(_reduce, values)

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

"""Restore a model from a local archive read straight into host arrays (worker side).

:mod:`ckptmgr.io.direct_read` reads and verifies an archive ckptmgr laid out
into one buffer per large dataset. Loading still goes through Keras's own
traversal (``saving_lib._load_state``), so every layer's and optimizer's
``load_own_variables`` and ``load_assets`` run as in ``model.save``/
``load_model`` (derived state such as ``Normalization``'s is rebuilt); only
the store they read from is ours: it serves those buffers instead of reading
h5py datasets, and everything else (small datasets, attributes, assets) from
the verified bytes in memory.

Why this is fast: Keras's ``Variable.assign`` of a numpy array makes
TensorFlow copy it into a fresh tensor. A buffer we read is ours alone, so
for Keras's own loaders (:func:`adopts`) the store hands it out as an
:class:`Adoptable` array: when TensorFlow converts it to the variable's
dtype, it takes the buffer as the tensor's memory (DLPack, no copy). Any
other loader (user code) gets a plain array, as from Keras. Each buffer is
handed out once; a second request for the same dataset is read from the
in-memory HDF5 like Keras would. Buffers come from a
:class:`~ckptmgr.io.direct_read.BufferPool`, so a later restore reads into
memory an earlier one used once nothing holds it any more, instead of
faulting in fresh pages.

Archives ckptmgr did not lay out (``model.save``), and anything unexpected,
take Keras's path over h5py instead, after the whole archive is verified.

Private Keras API used (through :mod:`ckptmgr.keras_compat`):
``saving_lib._load_state``, ``saving_lib.H5IOStore`` (its reading half),
``saving_lib.safe_get_h5_dataset`` (if gone, every value is read through
h5py, as Keras does) and ``_load_state`` calling ``weights_store.get(path)``
right before ``saveable.load_own_variables``, with the saveable in a local
named ``saveable`` (if not, nothing is lent: values are plain arrays).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from typing import Any

import h5py
import numpy as np

from ckptmgr import keras_compat
from ckptmgr.assets import assets_store
from ckptmgr.errors import CorruptCheckpointError, IncompatibleCheckpointError
from ckptmgr.io.archive import CONFIG_FILENAME, open_weights, read_json_member
from ckptmgr.io.direct_read import BufferPool, VerifiedArchive, read_direct, survey, verify_file
from ckptmgr.io.localfs import open_regular
from ckptmgr.io.manifest import FileEntry

log = logging.getLogger("ckptmgr")


def restore_archive(model, path: str, *, where: str, entry: FileEntry | None = None,
                    pool: BufferPool | None = None) -> bool:
    """Load ``model`` from the local archive at ``path``; True if it was read
    directly, False if through Keras's h5py path.

    ``entry``: the manifest's record of the archive (chunk CRC32Cs, no
    sha256), checked as the archive is read, or in full before Keras's path
    reads it; ``None``: the caller verified the archive. Corrupt bytes raise
    ``CorruptCheckpointError`` (its message starting with ``where``) before
    the model is touched. ``pool``: where large datasets' buffers come from
    (and are kept for the next restore).
    """
    started = time.perf_counter()
    with open_regular(path, os.path.basename(path)) as f:
        size = os.fstat(f.fileno()).st_size
        if entry is not None and size != entry.bytes:
            raise CorruptCheckpointError(
                f"{where} is truncated or altered ({size} bytes, manifest says {entry.bytes})")
        spots = survey(f)
        if spots is not None:
            with read_direct(f, size, spots, entry, where, pool) as verified:
                if verified is not None:
                    apply_verified(model, verified)
                    log.debug("%s read directly: %d bytes in %.3f s", where, size,
                              time.perf_counter() - started)
                    return True
        if entry is not None:
            verify_file(f, size, entry, where)
        f.seek(0)
        _apply_h5(model, f)
    return False


def apply_verified(model, verified: VerifiedArchive) -> None:
    """Build ``model`` if needed, then load weights, optimizer state and
    assets from a verified in-memory archive through Keras's traversal."""
    from ckptmgr.state import build_if_needed, ensure_built_optimizer

    saving_lib = keras_compat.saving_lib()

    build_if_needed(model, read_json_member(verified.image, CONFIG_FILENAME))
    ensure_built_optimizer(model)
    failed: set[int] = set()
    errors: dict[int, Any] = {}
    with assets_store(verified.image) as assets:
        saving_lib._load_state(
            model, weights_store=_direct_store_class()(verified), assets_store=assets,
            inner_path="", visited_saveables=set(), failed_saveables=failed, error_msgs=errors,
        )
    verified.drop()
    if failed:
        raise _incompatible(errors)


def _apply_h5(model, f) -> None:
    """Keras's path: ``load_own_variables`` over h5py, through the zip window."""
    from ckptmgr.state import apply_weights, build_if_needed

    build_if_needed(model, read_json_member(f, CONFIG_FILENAME))
    with open_weights(f) as h5:
        apply_weights(model, h5)


def _incompatible(errors: dict[int, Any]) -> IncompatibleCheckpointError:
    """The message ``state.apply_weights`` gives for a saveable that failed."""
    obj, error = next(iter(errors.values()))
    name = getattr(obj, "name", type(obj).__name__)
    text = str(error).strip()
    first = text.splitlines()[0][:200] if text else type(error).__name__
    return IncompatibleCheckpointError(
        f"The checkpoint does not fit this model: {name!r}: {first}. "
        "Restore into the same architecture that was saved."
    )


@functools.lru_cache(maxsize=None)
def _direct_store_class():
    saving_lib = keras_compat.saving_lib()
    checked_dataset = getattr(saving_lib, "safe_get_h5_dataset", None)

    class DirectStore(keras_compat.reading_store_class()):
        """Keras's H5 store over a verified in-memory archive, serving the
        directly read arrays (each once)."""

        def __init__(self, verified: VerifiedArchive):
            super().__init__(verified.h5)
            self._verified = verified
            self._adopt = False

        def get(self, path):
            self._adopt = adopts(loading_saveable())
            return super().get(path)

        def __getitem__(self, key):
            group = self._h5_entry_group
            if isinstance(group, h5py.Group) and checked_dataset is not None:
                dataset = checked_dataset(group, key)  # Keras's own checks (no links...)
                array = self._verified.take(dataset)
                if array is not None:
                    return adoptable(array) if self._adopt and lendable(array) else array
            return super().__getitem__(key)

    return DirectStore


@functools.lru_cache(maxsize=None)
def _keras_loaders() -> frozenset:
    """Keras's own ``load_own_variables`` that only pass each value to
    ``Variable.assign`` (checked in Keras 3.15): safe to adopt buffers."""
    import keras

    classes = (keras.layers.Layer, keras.layers.Dense, keras.layers.EinsumDense,
               keras.layers.Embedding, keras.layers.Conv1D, keras.layers.Conv2D,
               keras.layers.Conv3D, keras.layers.Normalization, keras.optimizers.Optimizer)
    return frozenset(getattr(c, "load_own_variables") for c in classes)


def loading_saveable() -> Any:
    """What a reading store's ``get()`` is called for: Keras's ``_load_state``
    calls it right before ``saveable.load_own_variables(store)``, with the
    saveable in a local of that name (None if not)."""
    return sys._getframe(2).f_locals.get("saveable")


def adopts(saveable) -> bool:
    """Whether ``saveable`` loads with one of Keras's own loaders, which may
    be handed :func:`adoptable` arrays."""
    loader = getattr(type(saveable), "load_own_variables", None)
    try:
        return loader in _keras_loaders()
    except TypeError:  # an unhashable descriptor: user code
        return False


_TF_ALIGN = 64  # EIGEN_MAX_ALIGN_BYTES: TensorFlow's kernels require it of every buffer


class Adoptable(np.ndarray):
    """A verified array read into a buffer nothing else holds: converting it
    to a tensor of its own dtype lends TensorFlow its memory instead of
    copying it (once; afterwards it is read-only here). Any other dtype
    converts as a numpy array does."""

    _fresh = False

    def __tf_tensor__(self, dtype=None, name=None):
        import tensorflow as tf

        plain = self.view(np.ndarray)
        if self._fresh and (dtype is None or tf.as_dtype(dtype) == tf.as_dtype(plain.dtype)):
            tensor = _lend(plain, tf)
            if tensor is not None:
                self._fresh = False
                self.flags.writeable = False
                return tensor
        return tf.convert_to_tensor(plain, dtype=dtype, name=name)


def adoptable(array: np.ndarray) -> Adoptable:
    """``array`` (which the caller gives up) as an :class:`Adoptable`."""
    out = array.view(Adoptable)
    out._fresh = True
    return out


def lendable(array: np.ndarray) -> bool:
    """Whether TensorFlow can take ``array``'s memory (aligned, contiguous)."""
    return array.ctypes.data % _TF_ALIGN == 0 and array.flags.c_contiguous


def _lend(array: np.ndarray, tf) -> Any:
    """A tensor over ``array``'s memory (DLPack), or None if TensorFlow
    cannot take it; types DLPack does not know (bfloat16) travel as
    unsigned integers of their size and are bit-cast back."""
    if not lendable(array):
        return None  # TensorFlow would abort on a misaligned buffer
    from_dlpack = tf.experimental.dlpack.from_dlpack
    try:
        return from_dlpack(array.__dlpack__())
    except Exception:  # noqa: BLE001 - not lendable as is: try its bits, else copy
        pass
    try:
        bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        return tf.bitcast(from_dlpack(bits.__dlpack__()), tf.as_dtype(array.dtype))
    except Exception:  # noqa: BLE001 - the caller copies instead
        return None

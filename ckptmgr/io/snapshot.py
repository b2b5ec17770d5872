"""A model's state as plain host data: what an archive is written from.

No TensorFlow, no Keras: the Ray coordinator builds archives (or their plans)
from these alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INLINE_BYTES = 64 * 1024  # smaller arrays go straight into the HDF5 skeleton


@dataclass
class VarGroup:
    """One Keras ``vars`` group: where ``save_own_variables`` put its arrays.

    ``path`` is the HDF5 group path (``vars`` for the model itself,
    ``layers/dense/vars``, ``optimizer/vars``...), ``attrs`` its metadata
    (Keras records the layer's name), ``arrays`` the ``(key, array)`` pairs in
    the order Keras wrote them.
    """

    path: str
    attrs: dict[str, str] = field(default_factory=dict)
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)


@dataclass
class RowShards:
    """One dataset gathered from row ranges held by different ranks (axis 0).

    Written without concatenating: the parts are streamed one after another,
    which is exactly the row-major layout of the full array.
    """

    parts: list[np.ndarray]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts),) + tuple(self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def byte_views(self) -> list[memoryview]:
        return [memoryview(native(p).reshape(-1).view(np.uint8)) for p in self.parts]


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of an array whose data stays with its rank: enough to
    lay out the archive (see :mod:`ckptmgr.io.archive_plan`)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class ModelSnapshot:
    """Everything needed to write a ``.keras`` archive, as plain host data.

    ``assets`` maps a path under ``assets/`` (``layers/string_lookup/vocabulary.txt``)
    to the file's bytes; empty for most models.
    """

    config_json: str
    metadata_json: str
    groups: list[VarGroup]
    assets: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        arrays = sum(a.nbytes for g in self.groups for _, a in g.arrays)
        return arrays + sum(len(data) for data in self.assets.values())

    def spec(self) -> "ModelSnapshot":
        """The same snapshot with every large array replaced by its
        :class:`ArraySpec`: a few KB that lay out the whole archive."""
        groups = [
            VarGroup(g.path, dict(g.attrs), [(k, _spec_or_small(a)) for k, a in g.arrays])
            for g in self.groups
        ]
        return ModelSnapshot(self.config_json, self.metadata_json, groups, dict(self.assets))


def _spec_or_small(array) -> object:
    if isinstance(array, ArraySpec) or array.nbytes < INLINE_BYTES:
        return array
    if isinstance(array, RowShards):
        raise ValueError("row-sharded datasets are written by the coordinator, not laid out from a spec")
    return ArraySpec(tuple(array.shape), np.dtype(array.dtype))


def native(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, native-endian view (a copy only if it must be)."""
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def byte_views(array) -> list[memoryview]:
    """The bytes of an array (or of a :class:`RowShards`), in file order."""
    if isinstance(array, RowShards):
        return array.byte_views()
    return [memoryview(native(array).reshape(-1).view(np.uint8))]

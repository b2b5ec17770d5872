"""The ``.keras`` archive format: streaming writer and readers, no TensorFlow.

A ``.keras`` file is a zip of three stored entries: ``metadata.json``,
``config.json`` and ``model.weights.h5``, then ``assets/...`` files when
layers save assets (a lookup layer's vocabulary). Keras builds the weights file in a
``BytesIO`` and then copies it into the zip; we stream instead:

1. Build an HDF5 *skeleton* in a sparse local temp file: every group,
   attribute and dataset, with storage allocated early but no data written.
2. Read each dataset's byte offset in that file.
3. Emit the zip entry in file order: skeleton bytes for metadata, the host
   arrays' own buffers for data. Peak extra memory is one I/O chunk.

The result is byte-for-byte an ordinary HDF5 file, so stock Keras loads it.
This module runs on the coordinator as well as on workers; it needs only numpy,
h5py and zipfile.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import h5py
import numpy as np

from ckptmgr import faults
from ckptmgr.errors import CorruptCheckpointError

METADATA_FILENAME = "metadata.json"
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.weights.h5"
ASSETS_DIRNAME = "assets"
_CHUNK = 16 * 1024 * 1024
_INLINE_BYTES = 64 * 1024  # smaller arrays go straight into the skeleton
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


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
        return [memoryview(_native(p).reshape(-1).view(np.uint8)) for p in self.parts]


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


def write_keras_archive(out: BinaryIO, snapshot: ModelSnapshot, scratch_dir: str | None = None) -> None:
    """Stream ``snapshot`` as a ``.keras`` zip into the writable stream ``out``.

    The sparse HDF5 skeleton goes to ``scratch_dir`` (default: the system temp).
    Members come in Keras's order: metadata, config, weights, then assets.
    """
    for name in snapshot.assets:
        check_asset_name(name)
    with _h5_skeleton(snapshot, scratch_dir) as (skeleton_path, regions, total):
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_zipinfo(METADATA_FILENAME), snapshot.metadata_json)
            zf.writestr(_zipinfo(CONFIG_FILENAME), snapshot.config_json)
            info = _zipinfo(WEIGHTS_FILENAME)
            info.file_size = total
            with zf.open(info, "w") as entry, open(skeleton_path, "rb") as skel:
                _stream_h5(entry, skel, regions, total)
            for name in sorted(snapshot.assets):
                zf.writestr(_zipinfo(f"{ASSETS_DIRNAME}/{name}"), snapshot.assets[name])


def check_asset_name(name: str) -> None:
    """Refuse an asset path that could leave ``assets/`` when extracted."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            "Invalid asset path: it must be relative, with no empty, '.' or '..' "
            f"parts and no backslash. Received: name={name[:80]!r}"
        )


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=datetime.datetime.now().timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


@contextmanager
def _h5_skeleton(snapshot: ModelSnapshot, scratch_dir: str | None = None) -> Iterator[tuple[str, list, int]]:
    """Yield (path, [(offset, array)...] sorted, total size) of a sparse HDF5."""
    fd, path = tempfile.mkstemp(prefix="ckptmgr-skeleton-", suffix=".h5.part", dir=scratch_dir)
    os.close(fd)
    try:
        datasets = _create_skeleton(path, snapshot)
        regions, inline = [], []
        with h5py.File(path, "r") as f:
            for name, array in datasets:
                offset = f[name].id.get_offset()
                (inline if offset is None else regions).append(
                    (name if offset is None else int(offset), array)
                )
        if inline:  # HDF5 gave no offset: write those few directly
            with h5py.File(path, "r+") as f:
                for name, array in inline:
                    f[name][...] = array
        regions.sort(key=lambda r: r[0])
        total = os.path.getsize(path)
        if regions:
            total = max(total, regions[-1][0] + regions[-1][1].nbytes)
        yield path, regions, total
    finally:
        os.remove(path)


def _create_skeleton(path: str, snapshot: ModelSnapshot) -> list[tuple[str, np.ndarray]]:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    datasets = []
    with h5py.File(path, "w") as f:
        for group in snapshot.groups:
            g = f.require_group(group.path)
            for k, v in group.attrs.items():
                g.attrs[k] = v
            for key, array in group.arrays:
                if isinstance(array, RowShards) and array.nbytes < _INLINE_BYTES:
                    array = np.concatenate([_native(p) for p in array.parts])
                array = array if isinstance(array, RowShards) else _native(array)
                if array.nbytes < _INLINE_BYTES:
                    dataset = g.create_dataset(key, data=array)
                else:
                    dataset = g.create_dataset(key, shape=array.shape, dtype=array.dtype, dcpl=dcpl)
                    datasets.append((f"{group.path}/{key}", array))
                if array.dtype.name == "bfloat16":
                    # What Keras's H5IOStore does: HDF5 has no bfloat16, so the
                    # data is stored opaque (2 bytes) and tagged for the reader.
                    dataset.attrs["dtype"] = "bfloat16"
    return datasets


def _native(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, native-endian view (a copy only if it must be)."""
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _stream_h5(entry: BinaryIO, skeleton: BinaryIO, regions: list, total: int) -> None:
    position = 0
    for index, (offset, array) in enumerate(regions):
        if index == len(regions) // 2:
            faults.crash_point("archive_mid_stream")
        _copy_range(skeleton, entry, position, offset - position)
        views = array.byte_views() if isinstance(array, RowShards) else [
            memoryview(array.reshape(-1).view(np.uint8))
        ]
        for view in views:
            for start in range(0, len(view), _CHUNK):
                entry.write(view[start : start + _CHUNK])
        position = offset + array.nbytes
    _copy_range(skeleton, entry, position, total - position)


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    src.seek(start)
    while length > 0:
        chunk = src.read(min(length, _CHUNK))
        if not chunk:  # sparse tail beyond EOF: HDF5 reads it as zeros
            chunk = bytes(min(length, _CHUNK))
        dst.write(chunk)
        length -= len(chunk)


# -- reading ---------------------------------------------------------------


MAX_JSON_MEMBER_BYTES = 64 * 1024 * 1024  # config.json of a huge model is a few MB
_REQUIRED = (METADATA_FILENAME, CONFIG_FILENAME, WEIGHTS_FILENAME)


def check_layout(archive: BinaryIO, size: int) -> None:
    """Refuse archives that are not what a ``.keras`` file holds.

    Only ``metadata.json``, ``config.json``, ``model.weights.h5`` and
    ``assets/...`` may be members (Keras would extract anything else);
    declared sizes must fit in the file (stored) or a small bound (JSON).
    Reads only the zip's central directory.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"not a zip archive ({type(exc).__name__}: {exc})") from None
    names = {info.filename for info in infos}
    if len(names) != len(infos):
        raise CorruptCheckpointError("the archive holds duplicate member names")
    for info in infos:
        _check_member(info, size)
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise CorruptCheckpointError(f"the archive lacks {', '.join(missing)}")


def _check_member(info: zipfile.ZipInfo, size: int) -> None:
    name = info.filename
    parts = name.split("/")
    allowed = name in _REQUIRED or (parts[0] == "assets" and len(parts) > 1)
    if not allowed or name.startswith("/") or ".." in parts or "\\" in name:
        raise CorruptCheckpointError(
            f"unexpected member {name[:80]!r}; a .keras archive holds only "
            "metadata.json, config.json, model.weights.h5 and assets/"
        )
    if info.compress_size > size:
        raise CorruptCheckpointError(f"member {name!r} claims {info.compress_size} bytes, more than the file")
    stored = info.compress_type == zipfile.ZIP_STORED
    limit = size if stored else MAX_JSON_MEMBER_BYTES
    if (stored and info.file_size != info.compress_size) or info.file_size > limit:
        raise CorruptCheckpointError(
            f"member {name!r} declares {info.file_size} bytes unpacked; refused (zip bomb?)"
        )


def read_json_member(archive: BinaryIO, name: str) -> dict[str, Any]:
    """Parse one JSON member (config or metadata); reads at most a bounded amount."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(name) as member:
            data = member.read(MAX_JSON_MEMBER_BYTES + 1)
        if len(data) > MAX_JSON_MEMBER_BYTES:
            raise ValueError(f"larger than {MAX_JSON_MEMBER_BYTES} bytes")
        return json.loads(data)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, NotImplementedError,
            RecursionError) as exc:
        raise CorruptCheckpointError(
            f"Cannot read {name} from the archive: {type(exc).__name__}: {exc}"
        ) from None


def extract_assets(archive: BinaryIO, dest_dir: str) -> int:
    """Extract the ``assets/...`` members into ``dest_dir`` (``assets/a/b`` to
    ``dest_dir/a/b``), as Keras's loader would; returns how many.

    Names are checked again here (never written outside ``dest_dir``), and no
    member is read past the size it declares (``check_layout`` bounds those).
    """
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/", 1)
                if parts[0] != ASSETS_DIRNAME or info.is_dir():
                    continue
                check_asset_name(parts[1] if len(parts) > 1 else "")
                target = os.path.join(dest_dir, *parts[1].split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    _copy_bounded(src, dst, info.file_size, info.filename)
                count += 1
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise CorruptCheckpointError(
            f"Cannot read the archive's assets: {type(exc).__name__}: {exc}"
        ) from None
    return count


def _copy_bounded(src: BinaryIO, dst: BinaryIO, size: int, name: str) -> None:
    left = size
    while chunk := src.read(min(_CHUNK, left + 1)):
        left -= len(chunk)
        if left < 0:
            raise ValueError(f"member {name!r} is larger than it declares")
        dst.write(chunk)


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``[start, start+size)`` of another file."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class WeightsFile(h5py.File):
    """``model.weights.h5`` opened inside an archive; ``archive`` is that
    archive, so a restore can also read its ``assets/`` members."""

    archive: BinaryIO


@contextmanager
def open_weights(archive: BinaryIO) -> Iterator[WeightsFile]:
    """Open ``model.weights.h5`` inside an archive without extracting it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(WEIGHTS_FILENAME)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(
                f"{WEIGHTS_FILENAME} is compressed; ckptmgr reads stored entries only."
            )
        archive.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(archive.read(_LOCAL_HEADER.size))
        start = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
        window = _Window(archive, start, info.file_size)
        h5 = WeightsFile(window, "r")
        h5.archive = archive
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, OSError, struct.error) as exc:
        raise CorruptCheckpointError(
            f"Cannot open {WEIGHTS_FILENAME} in the archive: {type(exc).__name__}: {exc}"
        ) from None
    try:
        yield h5
    finally:
        h5.close()


def write_weights_only(archive: BinaryIO, out_path: str, *, include_optimizer: bool = True) -> None:
    """Write the ``.weights.h5`` that ``model.save_weights`` writes.

    That is the archive's ``model.weights.h5`` itself, optimizer state included
    for a compiled model (copied byte for byte); ``include_optimizer=False``
    leaves the ``optimizer`` group out.
    """
    if include_optimizer:
        with zipfile.ZipFile(archive) as zf, zf.open(WEIGHTS_FILENAME) as src, open(out_path, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        return
    with open_weights(archive) as src, h5py.File(out_path, "w") as dst:
        for key in src:
            if key != "optimizer":
                src.copy(src[key], dst, name=key)
        for k, v in src.attrs.items():
            dst.attrs[k] = v

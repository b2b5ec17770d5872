"""The ``.keras`` archive format: member names, and bounded readers (no TensorFlow).

A ``.keras`` file is a zip of stored entries: ``metadata.json``,
``config.json`` and ``model.weights.h5``, then ``assets/...`` files when
layers save assets (a lookup layer's vocabulary). Writing lives in
:mod:`ckptmgr.io.archive_plan`; this module reads archives without trusting
them: only the members a ``.keras`` file holds, declared sizes that fit, the
weights file opened in place (a window on the zip, no extraction). It runs on
the coordinator as well as on workers; it needs only h5py and zipfile.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import h5py

from ckptmgr.errors import CorruptCheckpointError
from ckptmgr.io.snapshot import ArraySpec, ModelSnapshot, RowShards, VarGroup  # noqa: F401 - re-exported

METADATA_FILENAME = "metadata.json"
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.weights.h5"
ASSETS_DIRNAME = "assets"
_CHUNK = 16 * 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


def check_asset_name(name: str) -> None:
    """Refuse an asset path that could leave ``assets/`` when extracted."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            "Invalid asset path: it must be relative, with no empty, '.' or '..' "
            f"parts and no backslash. Received: name={name[:80]!r}"
        )


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


class SeekableReader(io.RawIOBase):
    """A read-only, seekable raw file of ``_size`` bytes; subclasses read
    from ``_pos`` in ``readinto``."""

    _size: int
    _pos: int = 0

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


class _Window(SeekableReader):
    """A read-only, seekable view of ``[start, start+size)`` of another file."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

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


def weights_member(archive: BinaryIO) -> tuple[zipfile.ZipInfo, int]:
    """The weights member's zip entry and the archive offset of its first
    data byte (after the local header); it must be stored, not compressed."""
    try:
        with zipfile.ZipFile(archive) as zf:
            info = zf.getinfo(WEIGHTS_FILENAME)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(
                f"{WEIGHTS_FILENAME} is compressed; ckptmgr reads stored entries only."
            )
        archive.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(archive.read(_LOCAL_HEADER.size))
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, OSError, struct.error) as exc:
        raise CorruptCheckpointError(
            f"Cannot open {WEIGHTS_FILENAME} in the archive: {type(exc).__name__}: {exc}"
        ) from None
    return info, info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]


@contextmanager
def open_weights(archive: BinaryIO) -> Iterator[WeightsFile]:
    """Open ``model.weights.h5`` inside an archive without extracting it."""
    try:
        info, start = weights_member(archive)
        window = _Window(archive, start, info.file_size)
        h5 = WeightsFile(window, "r")
        h5.archive = archive
    except CorruptCheckpointError:
        raise
    except OSError as exc:
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

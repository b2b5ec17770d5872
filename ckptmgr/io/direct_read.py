"""Reading an archive ckptmgr wrote straight into host arrays, verifying as it reads.

Why: Keras's loader reads each dataset through h5py (through a zip window
here) into a fresh array, and TensorFlow then copies it again into a fresh
tensor. For a large model that is most of a restore. Our archives hold every
large dataset contiguous and uncompressed inside a stored zip member, at an
offset HDF5 itself reports (``dataset.id.get_offset()``), so each dataset's
bytes can be read with one positioned read into a buffer of its own.

How (no TensorFlow here; :mod:`ckptmgr.restore_direct` hands the arrays to
Keras):

1. :func:`survey` walks the (not yet verified) HDF5 once for where each
   dataset lies; an archive that ckptmgr did not lay out (``model.save``
   writes a zip member without a data descriptor, and HDF5 datasets
   allocated late) gives ``None``, and the caller takes Keras's path.
2. :func:`read_direct` maps the whole archive onto memory: each dataset of
   ``INLINE_BYTES`` or more into its own 64-byte aligned buffer, every other
   byte (zip records, HDF5 metadata, small datasets, assets) into one scratch
   buffer. A reader thread fills it chunk by chunk with ``preadv`` (the GIL
   is released) while this thread checks each chunk's CRC32C against the
   manifest, so reading and verifying overlap.
3. Only after every chunk matched, the archive is opened again from memory
   (:class:`ArchiveImage`): zip layout, HDF5 and assets all come from the
   verified bytes, and the survey is repeated on them; any difference from
   the first one (the file changed meanwhile) gives ``None`` too.
"""

from __future__ import annotations

import bisect
import os
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import h5py
import numpy as np

from ckptmgr.errors import CorruptCheckpointError
from ckptmgr.io.archive import SeekableReader, WeightsFile, check_layout, open_weights, weights_member
from ckptmgr.io.checksums import CHUNK_BYTES, crc32c
from ckptmgr.io.manifest import FileEntry
from ckptmgr.io.snapshot import INLINE_BYTES

_ALIGN = 64  # what TensorFlow needs to use a host buffer without copying it
_STREAMED = 0x08  # zip flag bit 3: data descriptor after the data (our writer's)
_IOV_BATCH = 512  # buffers per preadv call (Linux allows 1024)


@dataclass(frozen=True)
class Spot:
    """Where one dataset's bytes lie: its HDF5 name, archive offset, and the
    array Keras's loader would make of it (shape, dtype)."""

    name: str
    start: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.start + self.nbytes


def survey(archive: BinaryIO) -> list[Spot] | None:
    """Every dataset of an archive ckptmgr laid out, sorted by offset; None
    when the archive is not one (or anything about it is unexpected)."""
    try:
        info, base = weights_member(archive)
        if not info.flag_bits & _STREAMED:
            return None
        with open_weights(archive) as h5:
            spots = _spots(h5, base)
    except (CorruptCheckpointError, OSError, ValueError, KeyError, RuntimeError, TypeError):
        return None
    if spots is None or not _disjoint(spots, base, base + info.file_size):
        return None
    return spots


def _spots(h5: WeightsFile, base: int) -> list[Spot] | None:
    """Spots of the datasets read directly; None if a large one is not
    readable so, or was not laid out by our writer."""
    found: list[Spot] = []
    foreign: list[str] = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            spot, ours = _spot(obj, base)
            if spot is not None:
                found.append(spot)
            if (spot is None or not ours) and obj.id.get_storage_size() >= INLINE_BYTES:
                foreign.append(name)

    h5.visititems(visit)
    return None if foreign else sorted(found, key=lambda s: s.start)


def _spot(dataset: h5py.Dataset, base: int) -> tuple[Spot | None, bool]:
    """The dataset's spot if its bytes are exactly the array Keras reads
    (contiguous, unfiltered, allocated, native numbers or bfloat16), and
    whether our skeleton made it (allocated early, never filled)."""
    plist = dataset.id.get_create_plist()
    ours = (plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY
            and plist.get_fill_time() == h5py.h5d.FILL_TIME_NEVER)
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
        return None, ours
    dtype, shape, offset = _array_dtype(dataset), dataset.shape, dataset.id.get_offset()
    if dtype is None or offset is None or shape is None:  # shape None: an empty dataspace
        return None, ours
    spot = Spot(dataset.name, base + int(offset), tuple(shape), dtype)
    if spot.nbytes == 0 or dataset.id.get_storage_size() != spot.nbytes:
        return None, ours
    return spot, ours


def _array_dtype(dataset: h5py.Dataset) -> np.dtype | None:
    """The dtype of ``np.array(dataset)`` as Keras's ``H5IOStore`` makes it."""
    dtype = dataset.dtype
    if dtype.kind == "V" and dtype.itemsize == 2 and dataset.attrs.get("dtype") == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if dtype.kind not in "biufc" or not dtype.isnative or dtype.fields is not None:
        return None
    return dtype


def _disjoint(spots: list[Spot], low: int, high: int) -> bool:
    position = low
    for spot in spots:
        if spot.start < position or spot.end > high:
            return False
        position = spot.end
    return True


# -- the archive in memory ------------------------------------------------------------


class ArchiveImage(SeekableReader):
    """A read-only, seekable file over the archive's bytes in memory:
    ``pieces`` are ``(archive offset, bytes)``, sorted, covering ``[0, size)``."""

    def __init__(self, pieces: list[tuple[int, memoryview]], size: int):
        super().__init__()
        self._starts = [start for start, _ in pieces]
        self._views = [view for _, view in pieces]
        self._size, self._pos = size, 0

    def close(self) -> None:
        """Let go of the buffers (so a pool may hand them out again)."""
        self._starts, self._views = [0], [memoryview(b"")]
        super().close()

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out) and self._pos < self._size:
            index = bisect.bisect_right(self._starts, self._pos) - 1
            view = self._views[index][self._pos - self._starts[index]:]
            take = min(len(view), len(out) - done)
            out[done:done + take] = view[:take]
            done += take
            self._pos += take
        return done


class VerifiedArchive:
    """An archive read into memory and checked: ``image`` is the whole
    archive as a file, ``h5`` its weights file (``h5.archive`` is the image,
    for assets). :meth:`take` hands each directly read array out once."""

    def __init__(self, image: ArchiveImage, h5: WeightsFile, arrays: dict[int, np.ndarray]):
        self.image, self.h5 = image, h5
        self._arrays = arrays  # by the dataset's offset in the weights file

    def take(self, dataset: h5py.Dataset) -> np.ndarray | None:
        """The dataset's array the first time it is asked for (a buffer
        nothing else holds); None after that, or if it was not read directly."""
        offset = dataset.id.get_offset()
        array = None if offset is None else self._arrays.pop(int(offset), None)
        if array is not None and array.nbytes < INLINE_BYTES:  # a view of the scratch buffer
            return array.copy()
        return array

    def drop(self) -> None:
        """Let go of every array not handed out."""
        self._arrays.clear()


@contextmanager
def read_direct(f: BinaryIO, size: int, spots: list[Spot], entry: FileEntry | None,
                where: str, pool: "BufferPool | None" = None) -> Iterator[VerifiedArchive | None]:
    """Read the ``size``-byte local archive ``f`` into memory along ``spots``
    (from :func:`survey`), checking each chunk against ``entry``'s CRC32Cs
    (``None``: the caller verified the file already).

    Yields the verified archive, or None when its verified bytes are laid out
    otherwise than ``spots`` say (the file changed after the survey). Raises
    ``CorruptCheckpointError`` naming the first bad chunk, the message
    starting with ``where``. Large datasets' buffers come from ``pool``
    when given (see :class:`BufferPool`).
    """
    pool = pool or BufferPool(keep=False)
    pool.begin()
    pieces, arrays = _allocate(spots, size, pool)
    _read_and_check(f.fileno(), pieces, size, entry, where)
    image = ArchiveImage(pieces, size)
    del pieces
    try:
        try:
            check_layout(image, size)
        except CorruptCheckpointError as exc:  # verified, yet not what a .keras file holds
            raise CorruptCheckpointError(f"{where}: {exc}") from None
        if survey(image) != spots:
            yield None
            return
        base = weights_member(image)[1]
        by_offset = {spot.start - base: array for spot, array in zip(spots, arrays)}
        del arrays
        with open_weights(image) as h5:
            verified = VerifiedArchive(image, h5, by_offset)
            del by_offset
            try:
                yield verified
            finally:
                verified.drop()
    finally:
        image.close()


def _allocate(spots: list[Spot], size: int,
              pool: "BufferPool") -> tuple[list[tuple[int, memoryview]], list[np.ndarray]]:
    """Pieces covering ``[0, size)`` and each spot's array: a large dataset
    gets an aligned buffer of its own; every other byte goes to one scratch
    buffer, of which small datasets' arrays are views."""
    direct = [s for s in spots if s.nbytes >= INLINE_BYTES]
    scratch = np.empty(size - sum(s.nbytes for s in direct), np.uint8)
    pieces: list[tuple[int, memoryview]] = []
    own: dict[int, np.ndarray] = {}
    gaps: list[tuple[int, int]] = []  # (archive offset, scratch offset) where each gap starts
    position = used = 0
    for spot in direct + [None]:
        end = spot.start if spot is not None else size
        if end > position:
            pieces.append((position, memoryview(scratch[used:used + end - position])))
            gaps.append((position, used))
            used += end - position
        if spot is not None:
            own[spot.start] = pool.take(spot.nbytes)
            pieces.append((spot.start, memoryview(own[spot.start])))
            position = spot.end
    arrays = []
    for spot in spots:
        if spot.start in own:
            raw = own[spot.start]
        else:
            gap_start, at = gaps[bisect.bisect_right(gaps, (spot.start, size)) - 1]
            raw = scratch[at + spot.start - gap_start:][:spot.nbytes]
        arrays.append(raw.view(spot.dtype).reshape(spot.shape))
    return pieces, arrays


class BufferPool:
    """Aligned host buffers for large datasets, kept to be read into again.

    Why: a restore lends its buffers to the model's variables, and the
    variables' previous memory goes back to the system; every restore would
    otherwise fault in as much fresh memory as the state (on a virtual
    machine whose host reclaimed it, seconds per GB). Repeated restores into
    one model (evaluating every checkpoint, a benchmark) reuse the buffers
    of earlier ones that nothing references any more: a buffer still held by
    a variable, a tensor or an array anywhere is never handed out again.

    Bounded: only the buffers of the last two restores are kept (the newer
    ones are usually the variables' own memory), and none once ``keep_s``
    seconds passed after the last restore (:meth:`release_later`).
    ``keep=False``: allocate only, keep nothing.
    """

    def __init__(self, keep: bool = True, keep_s: float = 60.0):
        self._keep, self.keep_s = keep, keep_s
        self._raw: list[np.ndarray] = []
        self._restore: list[int] = []  # the restore that last took each buffer
        self._count = 0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def begin(self) -> None:
        """A restore starts: forget idle buffers older than the last two restores."""
        with self._lock:
            self._count += 1
            keep = [i for i in range(len(self._raw)) if self._restore[i] >= self._count - 2 or not self._idle(i)]
            self._raw = [self._raw[i] for i in keep]
            self._restore = [self._restore[i] for i in keep]

    def take(self, nbytes: int, *, larger: bool = False) -> np.ndarray:
        """A ``nbytes`` buffer, 64-byte aligned, that nothing else holds.
        ``larger``: part of the smallest idle buffer that is large enough will
        do (staging, copied out at once; a buffer lent to a variable must be
        its exact size)."""
        with self._lock:
            fits = [i for i in range(len(self._raw))
                    if (self._raw[i].nbytes >= nbytes + _ALIGN if larger else self._raw[i].nbytes == nbytes + _ALIGN)]
            for index in sorted(fits, key=lambda i: self._raw[i].nbytes):
                if self._idle(index):
                    self._restore[index] = self._count
                    return _aligned_in(self._raw[index], nbytes)
            raw = np.empty(nbytes + _ALIGN, np.uint8)
            if self._keep:
                self._raw.append(raw)
                self._restore.append(self._count)
            return _aligned_in(raw, nbytes)

    def release_later(self) -> None:
        """Forget every buffer ``keep_s`` from now, unless a restore comes first."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            if self._keep and self._raw:
                self._timer = threading.Timer(self.keep_s, self.clear)
                self._timer.daemon = True
                self._timer.start()

    def clear(self) -> None:
        """Forget every buffer (those in use stay alive with their users)."""
        with self._lock:
            self._raw, self._restore = [], []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _idle(self, index: int) -> bool:
        """Nothing but the pool refers to buffer ``index``: no view of it (an
        array, a tensor's DLPack capsule, a memoryview) is alive anywhere."""
        return sys.getrefcount(self._raw[index]) == 2  # the list, and getrefcount's argument

    @property
    def nbytes(self) -> int:
        return sum(raw.nbytes for raw in self._raw)


def _aligned_in(raw: np.ndarray, nbytes: int) -> np.ndarray:
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip:skip + nbytes]


# -- reading, overlapped with checking ----------------------------------------------


def _read_and_check(fd: int, pieces: list[tuple[int, memoryview]], size: int,
                    entry: FileEntry | None, where: str) -> None:
    """Fill ``pieces`` from ``fd`` in a reader thread, chunk by chunk, while
    this thread checks each finished chunk's CRC32C."""
    chunk = entry.chunk_bytes if entry is not None and entry.crc32c is not None else CHUNK_BYTES
    bounds = [(a, min(a + chunk, size)) for a in range(0, size, chunk)]
    views = [_views_in(pieces, a, b) for a, b in bounds]
    done: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def reader() -> None:
        try:
            for index, ((start, _), chunk_views) in enumerate(zip(bounds, views)):
                if stop.is_set():
                    return
                _preadv_all(fd, chunk_views, start, where)
                done.put(index)
        except BaseException as exc:  # noqa: BLE001 - handed to the checking thread
            done.put(exc)

    thread = threading.Thread(target=reader, name="ckptmgr-restore-read", daemon=True)
    thread.start()
    try:
        for _ in bounds:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            if entry is not None and entry.crc32c is not None:
                _check_chunk(entry, item, views[item], where)
    finally:
        stop.set()
        thread.join()


def verify_file(f: BinaryIO, size: int, entry: FileEntry, where: str) -> None:
    """Check a whole local archive against ``entry``'s chunk CRC32Cs, through
    one reused chunk buffer, then its members (before Keras's path reads it)."""
    buffer = memoryview(bytearray(entry.chunk_bytes or CHUNK_BYTES))
    for index in range(len(entry.crc32c or [])):
        start, end = entry.chunk_range(index)
        view = buffer[:end - start]
        _preadv_all(f.fileno(), [view], start, where)
        _check_chunk(entry, index, [view], where)
    try:
        check_layout(f, size)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _views_in(pieces: list[tuple[int, memoryview]], a: int, b: int) -> list[memoryview]:
    """The parts of ``pieces`` that hold archive bytes ``[a, b)``, in order."""
    out = []
    for start, view in pieces:
        end = start + len(view)
        if end > a and start < b:
            out.append(view[max(a, start) - start:min(b, end) - start])
    return out


def _preadv_all(fd: int, views: list[memoryview], offset: int, where: str) -> None:
    """``preadv`` until every view is full; a file that ends early is truncated."""
    pending = [v for v in views if len(v)]
    while pending:
        got = os.preadv(fd, pending[:_IOV_BATCH], offset)
        if got == 0:
            raise CorruptCheckpointError(f"{where} is truncated (ends at byte {offset})")
        offset += got
        while got:
            if got >= len(pending[0]):
                got -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][got:]
                got = 0


def _check_chunk(entry: FileEntry, index: int, views: list[memoryview], where: str) -> None:
    value = 0
    for view in views:
        value = crc32c(view, value)
    got = f"{value:08x}"
    if got != entry.crc32c[index]:
        start, end = entry.chunk_range(index)
        raise CorruptCheckpointError(
            f"{where} is corrupt (CRC32C of bytes {start}-{end} (chunk {index + 1} of "
            f"{len(entry.crc32c)}) is {got}, manifest says {entry.crc32c[index]})")

"""Writing ``.keras`` archives: every byte placed before any is written.

A ``.keras`` file is a zip of stored members: ``metadata.json``,
``config.json``, ``model.weights.h5``, then ``assets/...``. Keras builds the
weights file in a ``BytesIO`` and copies it into the zip; we plan instead:

1. Build an HDF5 *skeleton* in a sparse local temp file: every group,
   attribute and dataset, storage allocated early, large arrays not written.
2. Read each large dataset's byte offset in that file; lay out the zip around
   it (:mod:`ckptmgr.io.ziplayout`).
3. The archive is then a list of :class:`Segment` s: literal bytes (zip
   headers, small members), ranges of the skeleton (HDF5 metadata, small
   arrays), and ranges of the host arrays themselves.

Any byte range of the archive can then be written by anyone who holds the
arrays: one writer streams ``[0, prefix_end)`` then the tail; N data-parallel
replicas each write a slice (:func:`split_ranges`) and the coordinator writes
the tail. The tail (the weights' data descriptor, the members after it, the
central directory) needs only the weights member's CRC32, which combines from
the writers' pieces. The skeleton is deterministic, so every replica plans
the same bytes (:meth:`ArchivePlan.fingerprint` checks it). Peak extra memory
while writing is one I/O chunk; no copy of the archive is ever held.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import h5py
import numpy as np

from ckptmgr import faults
from ckptmgr.io.archive import (
    ASSETS_DIRNAME,
    CONFIG_FILENAME,
    METADATA_FILENAME,
    WEIGHTS_FILENAME,
    check_asset_name,
)
from ckptmgr.io.checksums import PiecewiseCrc32, crc32
from ckptmgr.io.snapshot import INLINE_BYTES, ArraySpec, ModelSnapshot, RowShards, byte_views, native
from ckptmgr.io.ziplayout import Member, ZipLayout

_PIECE = 16 * 1024 * 1024  # largest single write


@dataclass(frozen=True)
class Segment:
    """``length`` bytes at archive offset ``start``, from one source:
    ``data`` (in memory), the skeleton file at ``source_offset``, or array
    ``array`` (group index, array index) of the snapshot at ``source_offset``."""

    start: int
    length: int
    data: bytes | None = None
    array: tuple[int, int] | None = None
    source_offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ArchivePlan:
    """The archive as segments (``[0, prefix_end)``) plus a tail that needs
    only the weights member's CRC32."""

    segments: list[Segment]
    layout: ZipLayout
    weights_start: int  # first byte of the weights member's data
    prefix_end: int  # one past its last byte: the data descriptor follows
    after: bytes  # members after the weights (assets), headers and data
    skeleton_path: str

    @property
    def total(self) -> int:
        return self.prefix_end + len(self.tail(0))

    def tail(self, weights_crc: int) -> bytes:
        """Everything after the weights data: descriptor, later members, central directory."""
        return (self.layout.descriptor(WEIGHTS_FILENAME, weights_crc) + self.after
                + self.layout.central_directory({WEIGHTS_FILENAME: weights_crc}))

    def fingerprint(self) -> str:
        """sha256 of the layout and every planned byte not from an array:
        equal plans write equal archives from equal arrays."""
        digest = hashlib.sha256(f"{self.prefix_end}:{self.weights_start}:".encode())
        with open(self.skeleton_path, "rb") as skeleton:
            for segment in self.segments:
                digest.update(f"{segment.start}+{segment.length}:{segment.array}:".encode())
                if segment.array is None:
                    for piece in _literal_pieces(segment, skeleton, segment.start, segment.end):
                        digest.update(piece)
        digest.update(self.tail(0))
        return digest.hexdigest()


@contextmanager
def planned_archive(snapshot: ModelSnapshot, scratch_dir: str | None = None) -> Iterator[ArchivePlan]:
    """Plan ``snapshot``'s archive (its large arrays may be :class:`ArraySpec` s)."""
    for name in snapshot.assets:
        check_asset_name(name)
    with _h5_skeleton(snapshot, scratch_dir) as (path, regions, weights_bytes):
        small = _small_members(snapshot)
        layout = _zip_layout(small, weights_bytes)
        segments: list[Segment] = []
        after = b""
        weights = layout.member(WEIGHTS_FILENAME)
        for placed in layout.placed:
            name = placed.member.name
            if placed.header_offset > weights.header_offset:
                after += placed.header + small[name]
            elif name == WEIGHTS_FILENAME:
                segments.append(Segment(placed.header_offset, len(placed.header), data=placed.header))
                segments += _weights_segments(weights.data_offset, regions, weights_bytes)
            else:
                data = placed.header + small[name]
                segments.append(Segment(placed.header_offset, len(data), data=data))
        yield ArchivePlan(segments, layout, weights.data_offset, weights.data_end, after, path)


def write_keras_archive(out: BinaryIO, snapshot: ModelSnapshot, scratch_dir: str | None = None) -> None:
    """Stream ``snapshot`` as a ``.keras`` zip into the writable stream ``out``
    (one writer: the whole prefix, then the tail)."""
    with planned_archive(snapshot, scratch_dir) as plan:
        crc = write_range(out, plan, snapshot, 0, plan.prefix_end)
        out.write(plan.tail(crc))


def write_range(out: BinaryIO, plan: ArchivePlan, snapshot: ModelSnapshot, start: int, end: int) -> int:
    """Write archive bytes ``[start, end)`` (within the prefix) from ``snapshot``'s
    arrays; return the CRC32 of the weights member's bytes among them."""
    crc = PiecewiseCrc32()
    middle = (start + end) // 2
    with open(plan.skeleton_path, "rb") as skeleton:
        for segment in plan.segments:
            if segment.end <= start or segment.start >= end:
                continue
            a, b = max(segment.start, start), min(segment.end, end)
            if a <= middle < b:
                faults.crash_point("archive_mid_stream")
            if segment.array is not None:
                pieces = _array_pieces(snapshot, segment, a, b)
            else:
                pieces = _literal_pieces(segment, skeleton, a, b)
            for piece in pieces:
                if a >= plan.weights_start:
                    crc.add(piece)
                out.write(piece)
    return crc.value()


def split_ranges(plan: ArchivePlan, writers: int, align: int, min_bytes: int) -> list[tuple[int, int]]:
    """Cut ``[0, prefix_end)`` into at most ``writers`` contiguous ranges, each
    starting on a multiple of ``align`` (so chunk checksums stay whole) and
    none shorter than ``min_bytes`` (S3 parts are at least 5 MiB)."""
    chunks = -(-plan.prefix_end // align)
    per = max(-(-chunks // max(writers, 1)), -(-min_bytes // align), 1)
    bounds = [min(i * per * align, plan.prefix_end) for i in range(-(-chunks // per) + 1)]
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < min_bytes:  # a short last one joins the previous
        ranges[-2:] = [(ranges[-2][0], ranges[-1][1])]
    return ranges or [(0, plan.prefix_end)]


# -- building the plan ------------------------------------------------------------


def _small_members(snapshot: ModelSnapshot) -> dict[str, bytes]:
    """Every member but the weights, as bytes, in archive order."""
    members = {
        METADATA_FILENAME: snapshot.metadata_json.encode("utf-8"),
        CONFIG_FILENAME: snapshot.config_json.encode("utf-8"),
    }
    for name in sorted(snapshot.assets):
        members[f"{ASSETS_DIRNAME}/{name}"] = bytes(snapshot.assets[name])
    return members


def _zip_layout(small: dict[str, bytes], weights_bytes: int) -> ZipLayout:
    """Metadata, config, the weights (streamed, CRC32 in a data descriptor), assets;
    stamped with the snapshot's save time, so every replica plans the same bytes."""
    members = []
    for name, data in small.items():
        members.append(Member(name, len(data), crc32(data)))
        if name == CONFIG_FILENAME:
            members.append(Member(WEIGHTS_FILENAME, weights_bytes))
    return ZipLayout(members, _saved_at(small[METADATA_FILENAME]))


def _saved_at(metadata_json: bytes) -> datetime.datetime | None:
    """The ``date_saved`` Keras metadata records (``%Y-%m-%d@%H:%M:%S``), if any."""
    try:
        return datetime.datetime.strptime(json.loads(metadata_json)["date_saved"], "%Y-%m-%d@%H:%M:%S")
    except (ValueError, KeyError, TypeError):
        return None


def _weights_segments(base: int, regions: list, total: int) -> list[Segment]:
    """Skeleton ranges around the large arrays, at archive offset ``base``."""
    segments, position = [], 0
    for offset, ref, nbytes in regions:
        if offset > position:
            segments.append(Segment(base + position, offset - position, source_offset=position))
        segments.append(Segment(base + offset, nbytes, array=ref))
        position = offset + nbytes
    if total > position:
        segments.append(Segment(base + position, total - position, source_offset=position))
    return segments


@contextmanager
def _h5_skeleton(snapshot: ModelSnapshot, scratch_dir: str | None = None) -> Iterator[tuple[str, list, int]]:
    """Yield (path, [(offset, (group, array) index, nbytes)...] sorted, size) of a sparse HDF5."""
    fd, path = tempfile.mkstemp(prefix="ckptmgr-skeleton-", suffix=".h5.part", dir=scratch_dir)
    os.close(fd)
    try:
        datasets = _create_skeleton(path, snapshot)
        regions = []
        with h5py.File(path, "r") as f:
            for name, ref, nbytes in datasets:
                offset = f[name].id.get_offset()
                if offset is None:  # early allocation always gives one
                    raise RuntimeError(f"HDF5 gave no offset for {name}")
                regions.append((int(offset), ref, nbytes))
        regions.sort(key=lambda r: r[0])
        total = os.path.getsize(path)
        if regions:
            total = max(total, regions[-1][0] + regions[-1][2])
        yield path, regions, total
    finally:
        os.remove(path)


def _create_skeleton(path: str, snapshot: ModelSnapshot) -> list[tuple[str, tuple[int, int], int]]:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    datasets = []
    with h5py.File(path, "w") as f:
        for gi, group in enumerate(snapshot.groups):
            g = f.require_group(group.path)
            for k, v in group.attrs.items():
                g.attrs[k] = v
            for ai, (key, array) in enumerate(group.arrays):
                if array.nbytes < INLINE_BYTES:
                    data = np.concatenate([native(p) for p in array.parts]) if isinstance(array, RowShards) else native(array)
                    dataset = g.create_dataset(key, data=data)
                else:
                    # The bytes written come from native(array): declare the native byte order.
                    dtype = np.dtype(array.dtype).newbyteorder("=")
                    dataset = g.create_dataset(key, shape=array.shape, dtype=dtype, dcpl=dcpl)
                    datasets.append((f"{group.path}/{key}", (gi, ai), array.nbytes))
                if np.dtype(array.dtype).name == "bfloat16":
                    # What Keras's H5IOStore does: HDF5 has no bfloat16, so the
                    # data is stored opaque (2 bytes) and tagged for the reader.
                    dataset.attrs["dtype"] = "bfloat16"
    return datasets


# -- reading the sources ------------------------------------------------------------


def _literal_pieces(segment: Segment, skeleton: BinaryIO, a: int, b: int) -> Iterator[memoryview]:
    """Bytes ``[a, b)`` of a data or skeleton segment, in pieces."""
    if segment.data is not None:
        view = memoryview(segment.data)[a - segment.start : b - segment.start]
        yield from (view[i : i + _PIECE] for i in range(0, len(view), _PIECE))
        return
    skeleton.seek(segment.source_offset + a - segment.start)
    remaining = b - a
    while remaining > 0:
        chunk = skeleton.read(min(remaining, _PIECE))
        if not chunk:  # sparse tail beyond EOF: HDF5 reads it as zeros
            chunk = bytes(min(remaining, _PIECE))
        remaining -= len(chunk)
        yield memoryview(chunk)


def _array_pieces(snapshot: ModelSnapshot, segment: Segment, a: int, b: int) -> Iterator[memoryview]:
    """Bytes ``[a, b)`` of an array segment, straight from the host array."""
    gi, ai = segment.array
    array = snapshot.groups[gi].arrays[ai][1]
    if isinstance(array, ArraySpec):
        raise ValueError(f"array {snapshot.groups[gi].path}/{snapshot.groups[gi].arrays[ai][0]} "
                         "has no data here (a spec): only a rank holding it can write this range")
    skip, want = segment.source_offset + a - segment.start, b - a
    for view in byte_views(array):
        if skip >= len(view):
            skip -= len(view)
            continue
        part = view[skip : skip + want]
        skip, want = 0, want - len(part)
        yield from (part[i : i + _PIECE] for i in range(0, len(part), _PIECE))
        if want == 0:
            return

"""State across data-parallel ranks: proving replicas agree, gathering row shards.

Pure functions of snapshots (no Ray, no TensorFlow): workers compute digests,
the coordinator compares them and gathers the rows of sharded datasets.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ckptmgr.errors import DistributedSaveError
from ckptmgr.io.checksums import crc32
from ckptmgr.io.snapshot import ModelSnapshot, RowShards, VarGroup


def gather_shards(step: int, by_rank: dict[int, dict]) -> dict[str, Any]:
    """Order every sharded dataset's row ranges; refuse gaps and overlaps."""
    paths = {path for shards in by_rank.values() for path in shards}
    gathered = {}
    for path in sorted(paths):
        pieces = sorted((start, stop, rank, rows) for rank, shards in by_rank.items()
                        for p, (start, stop, rows) in shards.items() if p == path)
        expected = 0
        for start, stop, rank, rows in pieces:
            if start != expected or rows.shape[0] != stop - start:
                raise DistributedSaveError(
                    f"step {step} refused: shards of {path} do not tile its rows "
                    f"(rank {rank} sent rows {start}:{stop}, expected to start at {expected}); "
                    "nothing was written."
                )
            expected = stop
        gathered[path] = RowShards([rows for *_, rows in pieces])
    return gathered


def with_shards(snapshot, shards: dict[str, Any]):
    """The snapshot with each sharded dataset replaced by its gathered rows."""
    groups = []
    for group in snapshot.groups:
        arrays = []
        for key, array in group.arrays:
            gathered = shards.get(f"{group.path}/{key}")
            if gathered is not None and gathered.shape != array.shape:
                raise DistributedSaveError(
                    f"sharded {group.path}/{key}: gathered shape {gathered.shape} differs "
                    f"from the variable's {array.shape}; nothing was written."
                )
            arrays.append((key, gathered if gathered is not None else array))
        groups.append(VarGroup(group.path, group.attrs, arrays))
    return ModelSnapshot(snapshot.config_json, snapshot.metadata_json, groups, snapshot.assets)


def shard_rows(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows of a sharded dataset that ``rank`` owns (even split)."""
    return rank * rows // world_size, (rank + 1) * rows // world_size


def snapshot_digest(snapshot, exclude: frozenset[str] = frozenset(),
                    crcs: dict[str, int] | None = None) -> str:
    """A fingerprint of the replicated state, to prove replicas agree (worker side).

    sha256 over every array's path, shape, dtype and CRC32, and every asset
    file's path, size and CRC32. It detects divergence (it is not a defence
    against an adversary), at ISA-L CRC32 speed (~30 GB/s), on every rank of
    every save. ``crcs``: the arrays' CRC32s by path, computed as they were
    read (a snapshot streamed array by array holds only their specs).
    """
    digest = hashlib.sha256()
    for group in snapshot.groups:
        for key, array in group.arrays:
            name = f"{group.path}/{key}"
            if name in exclude:
                continue
            crc = crcs[name] if crcs is not None else array_crc(array)
            digest.update(f"{name}:{tuple(array.shape)}:{array.dtype}:{crc:08x}".encode())
    for name in sorted(snapshot.assets):
        data = snapshot.assets[name]
        digest.update(f"assets/{name}:{len(data)}:{crc32(data):08x}".encode())
    return digest.hexdigest()


def array_crc(array) -> int:
    """The CRC32 of an array's bytes, as :func:`snapshot_digest` takes it."""
    return crc32(memoryview(array.reshape(-1).view("uint8")))

"""Worker side of the memory tier: restore a snapshot a keeper holds.

Every rank pulls the copy the coordinator names, recomputes its digest (the
one every rank agreed on when it was saved) and votes; only when all ranks
found it intact is it applied, exactly as a stored archive would be: the
snapshot is laid out as the same ``.keras`` archive in memory and loaded
through the same code, so a restore from memory and one from storage leave a
model in the same state, bit for bit.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from ckptmgr.io.checksums import CHUNK_BYTES
from ckptmgr.io.layout import archive_name
from ckptmgr.io.manifest import FileEntry, LoopState, Manifest

log = logging.getLogger("ckptmgr")

MEMORY_ATTEMPT = "memory"  # the attempt id a memory restore's manifest names


def named_copy(plan: dict[str, Any]) -> dict[str, str]:
    """``{"keeper", "node"}`` of the copy a memory plan names first: every
    rank's vote on the plan's step is a round named after it."""
    return plan["copies"][0]


def nearest_copy(plan: dict[str, Any]) -> dict[str, str]:
    """``{"keeper", "node"}`` of the copy to read: the one on this process's
    node when the plan lists one (read from the local object store, no
    transfer between nodes), else the one the plan names first."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return next((c for c in plan["copies"] if c["node"] == here), named_copy(plan))


def fetch_and_check(plan: dict[str, Any], timeout_s: float, copy: dict[str, str] | None = None,
                    take: Callable[[int], Any] | None = None) -> tuple[Any, str | None]:
    """(snapshot or None, problem or None) of ``copy`` (``{"keeper",
    "node"}``, the plan's first copy by default) of the plan's step; a copy
    streamed from another node is read into buffers from ``take`` (see
    :func:`ckptmgr.ray.stream.receive_stream`)."""
    from ckptmgr.replicas import snapshot_digest

    step, copy = plan["step"], copy or named_copy(plan)
    try:
        snapshot = _read_copy(step, copy, timeout_s, take)
    except Exception as exc:  # noqa: BLE001 - a lost keeper or node: another copy, or storage
        return None, f"memory copy of step {step} unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    digest = snapshot_digest(snapshot)
    if digest != plan["meta"]["digest"]:
        return None, (f"memory copy of step {step} is damaged: digest {digest[:12]} differs from "
                      f"{plan['meta']['digest'][:12]} recorded when it was saved")
    return snapshot, None


def _read_copy(step: int, copy: dict[str, str], timeout_s: float, take):
    """The keeper's copy of ``step``: from this node's object store when it
    is here (no transfer), else over a stream from the keeper
    (:mod:`ckptmgr.ray.stream`), else through Ray's own transfer."""
    import ray

    from ckptmgr.ray.keepers import NAMESPACE
    from ckptmgr.ray.stream import receive_stream

    actor = ray.get_actor(copy["keeper"], namespace=NAMESPACE)
    if copy["node"] != ray.get_runtime_context().get_node_id():
        try:
            return receive_stream(ray.get(actor.serve.remote(step, timeout_s), timeout=timeout_s), timeout_s, take)
        except (OSError, ray.exceptions.GetTimeoutError) as exc:
            log.warning("memory copy of step %d: no stream from node %s (%s: %s); reading it through "
                        "Ray's object store instead", step, copy["node"][:12], type(exc).__name__, exc)
    refs = ray.get(actor.fetch.remote(step), timeout=timeout_s)
    snapshot = ray.get(refs[0], timeout=timeout_s)
    return snapshot if take is None else _into_buffers(snapshot, take)


def _into_buffers(snapshot, take):
    """``snapshot`` with its large read-only arrays (views of the object
    store) copied into buffers from ``take``: those can be lent to the
    variables (no fresh memory for TensorFlow's own copy; a pool's buffers
    are already mapped when restores repeat), and the object is let go."""
    import numpy as np

    from ckptmgr.io.snapshot import INLINE_BYTES

    for group in snapshot.groups:
        for index, (key, array) in enumerate(group.arrays):
            if array.nbytes >= INLINE_BYTES and not array.flags.writeable:
                buffer = take(array.nbytes).view(array.dtype).reshape(array.shape)
                np.copyto(buffer, array)
                group.arrays[index] = (key, buffer)
    return snapshot


def apply_snapshot(model, snapshot, plan: dict[str, Any], node: str) -> Manifest:
    """Load ``snapshot`` (the plan's step, read from ``node``) into ``model``
    as a restore of its archive would, and the manifest a stored checkpoint
    of it would carry (``extra.tier``, ``extra.node``).

    The arrays go straight from host memory through Keras's own traversal
    (:func:`ckptmgr.state.apply_snapshot_arrays`); only a model with assets
    (vocabulary files) has its archive laid out in memory first, because
    Keras reads assets from files."""
    import json

    from ckptmgr.io.archive import open_weights
    from ckptmgr.io.archive_plan import write_keras_archive
    from ckptmgr.state import apply_snapshot_arrays, apply_weights, build_if_needed

    build_if_needed(model, json.loads(snapshot.config_json))
    if not snapshot.assets:  # arrays streamed into our own buffers are lent, not copied
        apply_snapshot_arrays(model, snapshot, lend=True)
        return memory_manifest(plan, node, snapshot.nbytes)
    buffer = io.BytesIO()
    write_keras_archive(buffer, snapshot)
    with open_weights(buffer) as h5:
        apply_weights(model, h5)
    return memory_manifest(plan, node, buffer.getbuffer().nbytes)


def memory_manifest(plan: dict[str, Any], node: str, nbytes: int) -> Manifest:
    """The manifest of a memory copy: step, loop state, metrics, where it was.
    No archive of it is stored: ``files`` names an empty one, the copy's size
    is ``extra.memory_bytes`` and its integrity the digest every rank checked
    (``world.digest``)."""
    meta, step = plan["meta"], plan["step"]
    archive = archive_name(step, MEMORY_ATTEMPT)
    entry = FileEntry(bytes=0, crc32c=[], chunk_bytes=CHUNK_BYTES)
    return Manifest(
        step=step, created=datetime.fromtimestamp(meta.get("time", 0.0), tz=timezone.utc),
        archive=archive, attempt=MEMORY_ATTEMPT, files={archive: entry},
        metrics=meta.get("metrics") or {},
        extra=dict(meta.get("extra") or {}, tier="memory", node=node, memory_bytes=nbytes),
        loop=LoopState(**meta["loop"]) if meta.get("loop") else None,
        world={"world_size": meta.get("world_size"), "digest": meta["digest"]},
    )

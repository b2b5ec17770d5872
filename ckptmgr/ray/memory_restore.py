"""Worker side of the memory tier: restore a snapshot a keeper holds.

Every rank reads the copy the coordinator names (its own node's when it has
one) and loads it through Keras's own traversal, exactly as a stored archive
would be loaded, so a restore from memory and one from storage leave a model
in the same state, bit for bit. A copy on another node is streamed array by
array into a few reused buffers and each array is copied into its variable
as it arrives: the restore needs memory for its largest arrays, not a second
copy of the state (on a fresh process that memory would first have to be
faulted in, seconds per GB on some virtual machines).

Each array's CRC is taken as it is loaded; the digest of all of them must
equal the one every rank agreed on when the snapshot was saved. A copy that
fails (damaged, cut short) may have been partly loaded: the rank votes
against it and every rank goes on to the next candidate, another copy or a
stored checkpoint, whose restore overwrites every variable; when none is
left the restore raises (:meth:`ckptmgr.distributed.CoordinatorClient.restore`),
so a partly loaded model is never trained from.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone
from typing import Any

from ckptmgr.errors import IncompatibleCheckpointError
from ckptmgr.io.checksums import CHUNK_BYTES
from ckptmgr.io.layout import archive_name
from ckptmgr.io.manifest import FileEntry, LoopState, Manifest
from ckptmgr.io.snapshot import ArraySpec, ModelSnapshot, VarGroup

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


def restore_copy(model, plan: dict[str, Any], copy: dict[str, str],
                 timeout_s: float) -> tuple[Manifest | None, str | None]:
    """Load ``copy`` (``{"keeper", "node"}``) of the plan's step into
    ``model``: (its manifest, None), or (None, the problem) when the copy is
    unreadable or damaged, and the model may be partly loaded (see the
    module's docstring). A model that does not fit raises."""
    step = plan["step"]
    try:
        reader = _open_copy(step, copy, timeout_s)
    except Exception as exc:  # noqa: BLE001 - a lost keeper or node: another copy, or storage
        return None, _unreadable(step, exc)
    with reader:
        try:
            manifest = _load(model, reader, plan, copy["node"])
        except Exception as exc:
            problem = _copy_problem(reader, plan, exc)
            if problem is None:
                raise  # this model, this process: not the copy's fault
            return None, problem
        return (manifest, None) if manifest else (None, _damaged(plan, reader.digest()))


def _copy_problem(reader: "_CopyReader", plan: dict[str, Any], exc: Exception) -> str | None:
    """What was wrong with the copy when loading it raised ``exc``, or None
    when the copy is not to blame: a read that failed (Keras's loaders
    report it as a misfit), or a misfit whose copy's digest is not the
    agreed one (damage to a shape or a small array). A misfit with the right
    digest (another model) and any other error are the caller's to raise."""
    if reader.failure is None and not isinstance(exc, IncompatibleCheckpointError):
        return None
    try:
        digest = reader.digest() if reader.failure is None else None
    except Exception as read_error:  # noqa: BLE001 - reading the rest failed: the copy is unreadable
        return _unreadable(plan["step"], reader.failure or read_error)
    if reader.failure is not None:
        return _unreadable(plan["step"], reader.failure)
    return _damaged(plan, digest) if digest != plan["meta"]["digest"] else None


def fetch_and_check(plan: dict[str, Any], timeout_s: float,
                    copy: dict[str, str] | None = None) -> tuple[ModelSnapshot | None, str | None]:
    """(the whole snapshot of ``copy`` of the plan's step (the plan's first
    copy by default), or None; the problem, or None): read and checked
    against the plan's digest, nothing loaded."""
    step, copy = plan["step"], copy or named_copy(plan)
    try:
        with _open_copy(step, copy, timeout_s) as reader:
            snapshot = reader.whole()
    except Exception as exc:  # noqa: BLE001 - a lost keeper or node
        return None, _unreadable(step, exc)
    if reader.digest() != plan["meta"]["digest"]:
        return None, _damaged(plan, reader.digest())
    return snapshot, None


def apply_snapshot(model, snapshot: ModelSnapshot, plan: dict[str, Any], node: str) -> Manifest:
    """Load a whole ``snapshot`` (the plan's step, read from ``node`` and
    checked) into ``model``, and the manifest a stored checkpoint of it would
    carry (``extra.tier``, ``extra.node``)."""
    return _load(model, _CopyReader(snapshot), plan, node, check=False)


def _load(model, reader: "_CopyReader", plan: dict[str, Any], node: str, check: bool = True) -> Manifest | None:
    """Load the copy ``reader`` reads into ``model``; its manifest, or None
    when ``check`` and the digest of what was loaded is not the plan's.

    The arrays go straight from host memory through Keras's own traversal
    (:func:`ckptmgr.state.apply_snapshot_arrays`); only a model with assets
    (vocabulary files) has its archive laid out in memory first, because
    Keras reads assets from files: that copy is checked before it is loaded."""
    from ckptmgr.io.archive import open_weights
    from ckptmgr.io.archive_plan import write_keras_archive
    from ckptmgr.state import apply_snapshot_arrays, apply_weights, build_if_needed

    digest = plan["meta"]["digest"]
    build_if_needed(model, json.loads(reader.spec.config_json))
    if not reader.spec.assets:
        apply_snapshot_arrays(model, reader.spec, resolve=reader.array)
        return memory_manifest(plan, node, reader.spec.nbytes) if not check or reader.digest() == digest else None
    snapshot = reader.whole()
    if check and reader.digest() != digest:
        return None
    buffer = io.BytesIO()
    write_keras_archive(buffer, snapshot)
    with open_weights(buffer) as h5:
        apply_weights(model, h5)
    return memory_manifest(plan, node, buffer.getbuffer().nbytes)


class _CopyReader:
    """The arrays of one memory copy as they are asked for, each CRC'd on the
    way: the digest of what was read. ``spec`` is the snapshot, its large
    arrays :class:`~ckptmgr.io.snapshot.ArraySpec` placeholders when they
    come from ``stream``; ``failure`` the error a read raised, if any."""

    def __init__(self, spec: ModelSnapshot, stream=None):
        self.spec, self._stream = spec, stream
        self._crcs: dict[str, int] = {}
        self._digest: str | None = None
        self.failure: Exception | None = None

    def array(self, name: str, value):
        from ckptmgr.replicas import array_crc

        if self.failure is not None:  # Keras's loaders go on to the next layer: fail at once
            raise self.failure
        if isinstance(value, ArraySpec):
            try:
                value = self._stream.array(name)
            except Exception as exc:
                self.failure = exc
                self._stream.close()
                raise
        self._crcs[name] = array_crc(value)
        return value

    def whole(self) -> ModelSnapshot:
        """The snapshot with every array read."""
        groups = [VarGroup(g.path, dict(g.attrs), [(key, self.array(f"{g.path}/{key}", a)) for key, a in g.arrays])
                  for g in self.spec.groups]
        return ModelSnapshot(self.spec.config_json, self.spec.metadata_json, groups, dict(self.spec.assets))

    def digest(self) -> str:
        """The digest of the whole copy (arrays Keras never asked for are read now)."""
        from ckptmgr.replicas import snapshot_digest

        if self._digest is None:
            for group in self.spec.groups:
                for key, value in group.arrays:
                    if f"{group.path}/{key}" not in self._crcs:
                        self.array(f"{group.path}/{key}", value)
            self._digest = snapshot_digest(self.spec, crcs=self._crcs)
        return self._digest

    def __enter__(self) -> "_CopyReader":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._stream is not None:
            self._stream.close()


def _open_copy(step: int, copy: dict[str, str], timeout_s: float) -> _CopyReader:
    """A reader of the keeper's copy of ``step``: this node's object store
    when the copy is here (no transfer), else a stream from the keeper
    (:mod:`ckptmgr.ray.stream`) into a few reused buffers, else Ray's own
    transfer when the stream cannot be opened."""
    import ray

    from ckptmgr.io.direct_read import BufferPool
    from ckptmgr.ray.keepers import NAMESPACE
    from ckptmgr.ray.stream import StreamReader

    actor = ray.get_actor(copy["keeper"], namespace=NAMESPACE)
    if copy["node"] != ray.get_runtime_context().get_node_id():
        try:
            offer = ray.get(actor.serve.remote(step, timeout_s), timeout=timeout_s)
            staging = BufferPool()  # each array is copied out at once: a few buffers serve them all
            return _CopyReader(offer["spec"], StreamReader(offer, timeout_s, lambda n: staging.take(n, larger=True)))
        except (OSError, ray.exceptions.GetTimeoutError) as exc:
            log.warning("memory copy of step %d: no stream from node %s (%s: %s); reading it through "
                        "Ray's object store instead", step, copy["node"][:12], type(exc).__name__, exc)
    refs = ray.get(actor.fetch.remote(step), timeout=timeout_s)
    return _CopyReader(ray.get(refs[0], timeout=timeout_s))


def _unreadable(step: int, exc: BaseException) -> str:
    return f"memory copy of step {step} unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"


def _damaged(plan: dict[str, Any], digest: str) -> str:
    return (f"memory copy of step {plan['step']} is damaged: digest {digest[:12]} differs from "
            f"{plan['meta']['digest'][:12]} recorded when it was saved")


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

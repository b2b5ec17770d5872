"""The memory tier: a run's newest snapshots kept in host RAM on other nodes.

A *keeper* is a small Ray actor (no CPU reserved) pinned to one node. It pulls
a snapshot that rank 0 put in the object store, checks it against the digest
every rank agreed on (:func:`ckptmgr.replicas.snapshot_digest`), and puts its
own copy in its node's object store: the keeper owns that copy, so it survives
the loss of the node (and the worker) that produced it. Each keeper holds the
newest ``retain`` snapshots with their manifest-like metadata (loop state,
metrics, digest), enough to verify and restore them exactly.

Keepers are named after the run's directory and their node, detached, so a
restarted driver (``ckptmgr resume``) finds them; when the whole cluster
restarted, none is left and restore falls back to storage.

:class:`MemoryTier` is the coordinator's side: where to place copies (never
only on the producing node, never on a node being drained), storing a step on
``replicas`` nodes, and finding the newest held step for a restore.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ckptmgr")

NAMESPACE = "ckptmgr"
KEEPER_PREFIX = "ckptmgr-keeper:"


def keeper_name(directory: str, node_id: str) -> str:
    """The actor name of ``directory``'s keeper on ``node_id``."""
    return f"{KEEPER_PREFIX}{str(directory).rstrip('/')}@{node_id}"


class Keeper:
    """Ray actor body: the newest snapshots of one run, held on one node."""

    def __init__(self, directory: str, retain: int):
        self.directory = directory
        self.retain = max(1, int(retain))
        self._held: dict[int, tuple[list, dict]] = {}  # step -> ([own ObjectRef], meta)
        self._streams_broken = False  # fault injection (tests): offers a wrong token

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def keep(self, step: int, refs: list, meta: dict) -> dict:
        """Copy the snapshot behind ``refs[0]`` to this node and own it.

        Refuses (raises) a copy whose digest differs from ``meta["digest"]``:
        a snapshot damaged in transfer is never held.
        """
        import ray

        from ckptmgr.replicas import snapshot_digest

        started = time.perf_counter()
        snapshot = ray.get(refs[0])
        pulled = time.perf_counter()
        digest = snapshot_digest(snapshot)
        if digest != meta["digest"]:
            raise ValueError(f"memory snapshot of step {step} arrived damaged "
                             f"(digest {digest[:12]} vs {meta['digest'][:12]}); not kept")
        self._make_room(step)
        own = ray.put(snapshot)  # our copy, in this node's object store
        del snapshot
        self._held[step] = ([own], dict(meta, node=self.node_id(), kept_at=time.time()))
        for old in sorted(self._held)[:-self.retain]:
            del self._held[old]
        return {"step": step, "node": self._held[step][1]["node"],
                "keep_s": time.perf_counter() - started, "pull_s": pulled - started}

    def _make_room(self, step: int) -> None:
        """Drop the oldest held steps *before* ``step``'s copy is put, keeping
        ``retain - 1`` (at least 1): while it is put this node holds the
        pulled copy too, so the peak is ``retain + 1`` copies, not ``retain + 2``
        (an object store that overflows spills to disk: seconds per GB, in the
        middle of an emergency snapshot)."""
        others = sorted(s for s in self._held if s != step)
        for old in others[:max(0, len(others) - max(1, self.retain - 1))]:
            del self._held[old]

    def held(self) -> list[dict]:
        """Metadata of every held step, oldest first."""
        return [dict(meta, step=step) for step, (_, meta) in sorted(self._held.items())]

    def fetch(self, step: int) -> list:
        """``[ObjectRef]`` of the held snapshot of ``step`` (a reader pulls it)."""
        return list(self._held[step][0])

    def serve(self, step: int, timeout_s: float) -> dict:
        """An offer to stream the held copy of ``step`` to one reader on
        another node, faster than Ray's transfer (see :mod:`ckptmgr.ray.stream`)."""
        import ray

        from ckptmgr.ray.stream import TOKEN_BYTES, offer_stream

        offer = offer_stream(ray.get(self._held[step][0][0]), timeout_s)
        return dict(offer, token=bytes(TOKEN_BYTES)) if self._streams_broken else offer

    def break_streams(self) -> None:
        """Fault injection (tests): every later stream refuses its reader."""
        self._streams_broken = True

    def drop_after(self, step: int | None) -> list[int]:
        """Forget steps newer than ``step`` (all for None): a run that continues
        from an older step writes those step numbers again."""
        dropped = [s for s in self._held if step is None or s > step]
        for old in dropped:
            del self._held[old]
        return dropped

    def damage(self, step: int) -> None:
        """Fault injection (tests): replace the held copy of ``step`` with one
        whose first large array has one flipped bit, as a bit flip in host RAM
        would leave it. The metadata (and its digest) stay as they were."""
        import ray

        snapshot = ray.get(self._held[step][0][0])
        for group in snapshot.groups:
            for index, (key, array) in enumerate(group.arrays):
                if array.size:
                    bad = array.copy()
                    bad.reshape(-1).view("uint8")[0] ^= 1
                    group.arrays[index] = (key, bad)
                    self._held[step] = ([ray.put(snapshot)], self._held[step][1])
                    return


@dataclass
class HeldCopy:
    """One keeper's copy of a step: where, and the metadata to restore it."""

    step: int
    keeper: str  # actor name
    node: str
    meta: dict[str, Any] = field(default_factory=dict)
    handle: Any = field(default=None, repr=False, compare=False)  # the keeper actor


class MemoryTier:
    """Coordinator side of the memory tier of one run."""

    def __init__(self, directory: str, *, replicas: int = 2, retain: int = 2, timeout_s: float = 120.0):
        self.directory = str(directory).rstrip("/")
        self.replicas = max(1, int(replicas))
        self.retain = retain
        self.timeout_s = timeout_s
        self._warned_single_node = False
        self._handles: dict[str, Any] = {}  # node -> keeper; a lookup by name is an RPC

    # -- placement -----------------------------------------------------------------
    def target_nodes(self, producer: str | None, draining: set[str]) -> list[str]:
        """``replicas`` alive nodes that are not being drained: other nodes
        than ``producer`` first (a copy only on the producer's node dies with
        it), this process's node first among them (the coordinator persists
        an emergency snapshot from there without a transfer)."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        usable = [n for n in alive if n not in draining]
        others = sorted((n for n in usable if n != producer), key=lambda n: (n != here, n))
        chosen = others[: self.replicas]
        if len(chosen) < self.replicas and producer in usable:
            chosen.append(producer)
        if len(set(chosen)) < min(2, self.replicas) and not self._warned_single_node:
            self._warned_single_node = True
            log.warning("memory tier: only %d usable node(s) for %d replica(s); a node loss "
                        "there loses the memory copies (storage still has the persisted steps)",
                        len(set(chosen)), self.replicas)
        return chosen

    def keeper_on(self, node_id: str):
        """The run's keeper on ``node_id``, created on first use, then cached
        (until a call to it fails: :meth:`store` forgets it)."""
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node_id not in self._handles:
            actor_cls = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(Keeper)
            self._handles[node_id] = actor_cls.options(
                name=keeper_name(self.directory, node_id), namespace=NAMESPACE, get_if_exists=True,
                lifetime="detached",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.directory, self.retain)
        return self._handles[node_id]

    def warm(self, producer: str | None) -> None:
        """Start the keepers now (a worker process each takes seconds), so the
        first snapshot, maybe an emergency one, does not wait for them."""
        import ray

        handles = [self.keeper_on(node) for node in self.target_nodes(producer, set())]
        ray.get([h.node_id.remote() for h in handles], timeout=self.timeout_s)

    # -- storing -------------------------------------------------------------------
    def store(self, step: int, ref, meta: dict, *, producer: str | None,
              draining: set[str] = frozenset()) -> dict:
        """Hold ``step`` on ``replicas`` nodes; the nodes that hold it. Raises
        when no node could keep it."""
        import ray

        started = time.perf_counter()
        nodes = self.target_nodes(producer, set(draining))
        calls = {node: self.keeper_on(node).keep.remote(step, [ref], meta) for node in nodes}
        held, problems, each_s = [], [], []
        for node, call in calls.items():
            try:
                kept = ray.get(call, timeout=self.timeout_s)
                held.append(kept["node"])
                each_s.append((round(kept["pull_s"], 3), round(kept["keep_s"], 3)))
            except Exception as exc:  # noqa: BLE001 - one keeper's failure; the others may hold it
                self._handles.pop(node, None)  # dead or stuck: looked up (or started) again next time
                problems.append(f"node {node[:12]}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        if not held:
            raise RuntimeError(f"memory snapshot of step {step} kept nowhere ({'; '.join(problems) or 'no usable node'})")
        if problems:
            log.warning("memory snapshot of step %d: %s", step, "; ".join(problems))
        return {"memory": True, "step": step, "nodes": held,
                "keep_s": round(time.perf_counter() - started, 3), "keeper_s": each_s}

    # -- finding -------------------------------------------------------------------
    def keepers(self) -> dict[str, Any]:
        """Live keepers of this run: {actor name: handle}."""
        import ray

        prefix = keeper_name(self.directory, "")
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)]
        found = {}
        for name in names:
            try:
                found[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue  # gone meanwhile
        return found

    def copies(self) -> list[HeldCopy]:
        """Every copy held by a live keeper, newest step first."""
        import ray

        copies = []
        for name, handle in self.keepers().items():
            try:
                held = ray.get(handle.held.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a keeper on a lost node: nothing there
                continue
            copies += [HeldCopy(m["step"], name, m.get("node", ""), m, handle) for m in held]
        return sorted(copies, key=lambda c: (-c.step, c.keeper))

    def drop_after(self, step: int | None) -> None:
        import ray

        for handle in self.keepers().values():
            try:
                ray.get(handle.drop_after.remote(step), timeout=30)
            except Exception:  # noqa: BLE001 - a lost keeper holds nothing anyway
                continue

    def stop(self) -> int:
        """Kill every keeper of this run; how many."""
        import ray

        found = self.keepers()
        for handle in found.values():
            ray.kill(handle)
        self._handles.clear()
        return len(found)

"""The coordinator's memory-tier and preemption-notice duties (a mixin).

- Keeping: a complete step submitted with ``extra["tier"] == "memory"`` is not
  written to storage: rank 0's snapshot is held by keepers on ``replicas``
  nodes (:class:`ckptmgr.ray.keepers.MemoryTier`), beside the persistent
  writes, newest wins. An *emergency* memory step is then also persisted
  from a keeper's copy in the background: it survives the drained node, and
  reaches storage even when the write could not fit before the deadline.
- Restoring: :meth:`restore_plan` names the newest snapshot worth trying, of
  either tier (ties prefer memory: it is faster to read); ranks verify it and
  vote (:meth:`memory_vote`); a copy any rank found damaged is never offered
  again, so the next copy, or storage, is tried.
- Notices: ranks register their node; a node of the run being drained
  (:mod:`ckptmgr.ray.drain`) becomes a notice that the ranks' polls see
  (:meth:`notice`), and they agree on an emergency step as after a SIGTERM.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ckptmgr.errors import DistributedSaveError
from ckptmgr.io.manifest import LoopState
from ckptmgr.ray.drain import DrainNotice

log = logging.getLogger("ckptmgr")


class MemoryTierMixin:
    """Mixed into :class:`ckptmgr.coordinator.Coordinator` (uses its state)."""

    # -- keeping ---------------------------------------------------------------------
    def _keep(self, step: int, parts: dict) -> dict:
        """The memory pipeline's job: hold ``step`` on the keepers' nodes."""
        lead = parts[0]
        if self._tier is None:
            raise RuntimeError(f"step {step}: the memory tier is off for this run "
                               "(checkpoint.memory_tier.every_steps / CoordinatorOptions.memory_replicas)")
        extra = {k: v for k, v in lead.extra.items() if k not in ("tier", "node")}
        meta = {
            "digest": lead.digest, "metrics": lead.metrics, "extra": extra, "loop": lead.loop,
            "time": time.time(), "blocked_s": max(p.blocked_s for p in parts.values()),
            "world_size": self.options.world_size, "ranks": sorted(parts),
        }
        try:
            outcome = self._tier.store(step, lead.snapshot_ref[0], meta, producer=lead.extra.get("node"),
                                       draining=set(self._drain.draining))
        except Exception as exc:  # noqa: BLE001 - training goes on; storage still has its steps
            if extra.get("emergency"):
                raise DistributedSaveError(f"emergency step {step}: {exc}") from None
            return {"memory": False, "step": step, "error": str(exc)[:500]}
        self._metrics.memory(step)
        self._events.add("memory", step=step, nodes=list(outcome["nodes"]), emergency=bool(extra.get("emergency")))
        log.info("kept step %d in memory on node(s) %s (%.2f s)", step,
                 ", ".join(n[:12] for n in outcome["nodes"]), outcome["keep_s"])
        if extra.get("emergency"):
            self._persist_later(step, meta)
        return outcome

    def _persist_later(self, step: int, meta: dict) -> None:
        """Queue a persistent write of the emergency step, read from a keeper.

        The copies are borrowed now (references to the keepers' objects):
        training may go on (Ray Train) and newer memory steps make the keepers
        drop this one before the writer gets to it; a borrowed object stays
        until the write is done. Each copy is tried in turn.
        """
        import ray

        started = time.monotonic()
        borrowed = []
        for copy in self._tier.copies():
            if copy.step == step:
                try:
                    borrowed.append(ray.get(copy.handle.fetch.remote(step), timeout=30)[0])
                except Exception as exc:  # noqa: BLE001 - the other copies may do
                    log.warning("emergency step %d: keeper %s lent no copy (%s)", step, copy.keeper, exc)

        def persist() -> dict:
            try:
                snapshot = _first_readable(step, borrowed)
            finally:
                borrowed.clear()  # the keepers' objects may go now
            manifest = self.manager.write_snapshot(
                step, snapshot, metrics=meta["metrics"], extra=meta["extra"],
                loop=LoopState(**meta["loop"]) if meta["loop"] else None, blocked_s=meta["blocked_s"],
                world={"world_size": self.options.world_size, "ranks": meta["ranks"],
                       "digest": meta["digest"], "from": "memory"},
            )
            self._committed(step, manifest.stats, from_memory=True)
            log.info("emergency step %d persisted from memory %.1f s after the notice", step,
                     time.monotonic() - started)
            return {"step": step, "manifest": manifest.model_dump(mode="json")}

        future = self._writer.submit(step, persist, may_drop=False, report=False, sticky=True)
        future.add_done_callback(lambda f: f.exception() is None or self._not_persisted(step, f.exception()))

    def _not_persisted(self, step: int, exc: BaseException) -> None:
        log.error("emergency step %d not persisted from memory: %s", step, exc)
        self._failed(step, exc)

    def flush_writes(self, timeout_s: float) -> bool:
        """Wait until memory keeps and storage writes queued so far are done
        (a preempted run's driver waits for the emergency step to be persisted
        before it exits); False on timeout."""
        try:
            self._keeping.flush(timeout_s)
            self._writer.flush(timeout_s)
        except TimeoutError:
            return False
        return True

    def memory_copies(self) -> list[dict]:
        """Every copy the memory tier holds, newest first (for ``ckptmgr`` and tests)."""
        if self._tier is None:
            return []
        return [{"step": c.step, "keeper": c.keeper, "node": c.node, "loop": c.meta.get("loop"),
                 "metrics": c.meta.get("metrics"), "emergency": bool(c.meta["extra"].get("emergency"))}
                for c in self._tier.copies()]

    def damage_memory(self, step: int) -> int:
        """Fault injection (tests): flip a bit in every held copy of ``step``."""
        copies = [c for c in self._tier.copies() if c.step == step]
        for c in copies:
            c.handle.damage.remote(step)
        return len(copies)

    # -- restoring -------------------------------------------------------------------
    def restore_plan(self) -> dict[str, Any] | None:
        """The newest snapshot worth trying, of either tier; None when none is.

        ``{"tier": "memory", "step", "meta", "copies"}`` or
        ``{"tier": "storage", "step"}``; ``copies`` are every good copy of the
        step (``{"keeper", "node"}``), the one every rank reads by default
        first: a rank reads the one on its own node when there is one (no
        transfer).
        """
        stored = self.restore_step()
        good = [c for c in (self._tier.copies() if self._tier is not None else [])
                if (c.step, c.keeper) not in self._bad_memory]
        if good and (stored is None or good[0].step >= stored):
            newest = good[0]
            return {"tier": "memory", "step": newest.step, "meta": newest.meta,
                    "copies": [{"keeper": c.keeper, "node": c.node} for c in good if c.step == newest.step]}
        return None if stored is None else {"tier": "storage", "step": stored}

    def memory_vote(self, step: int, keeper: str, rank: int, problem: str | None,
                    timeout_s: float, read: str | None = None) -> str | None:
        """Like ``restore_vote``, for the copies of ``step`` the ranks read
        (the round is named by ``keeper``, the plan's first copy; a rank read
        ``read``, its own node's copy, or ``keeper``). A copy a rank found damaged or
        unreadable is never offered again; the others stay."""
        read = read or keeper
        if problem is not None and (step, read) not in self._bad_memory:
            self._bad_memory.add((step, read))  # before the round ends: every rank's retry sees it
            log.warning("memory copy of step %d on %s: rank %d: %s; trying the next copy", step,
                        read.rsplit("@", 1)[-1][:12], rank, problem)
        return self._votes.vote(("memory", step, keeper), rank, problem, timeout_s)

    def forget_memory_after(self, step: int | None) -> None:
        """Drop memory copies newer than ``step`` (a run continuing from ``step``)."""
        if self._tier is not None:
            self._tier.drop_after(step)

    # -- preemption notices -------------------------------------------------------------
    def request_emergency(self, step: int, margin: int = 2) -> int:
        """A worker got SIGTERM (or saw a drain notice) at ``step``: every rank
        saves at the returned step."""
        with self._lock:
            if self._emergency is None or self._emergency < step:
                self._emergency = step + margin
            return self._emergency

    def emergency_step(self) -> int | None:
        return self._emergency

    def register_node(self, rank: int, node_id: str) -> None:
        """Rank ``rank`` trains on ``node_id`` (its drain is the run's notice)."""
        self._rank_nodes[rank] = node_id
        if rank == 0 and self._tier is not None:
            threading.Thread(target=self._warm_keepers, args=(node_id,), daemon=True).start()

    def _warm_keepers(self, producer: str) -> None:
        try:
            self._tier.warm(producer)
        except Exception as exc:  # noqa: BLE001 - the first keep starts them instead
            log.warning("memory tier: could not start keepers ahead (%s)", exc)

    def rank_nodes(self) -> dict[int, str]:
        """The node each rank registered from (at its train begin)."""
        return dict(self._rank_nodes)

    def _on_drain_notice(self, notice: DrainNotice) -> None:
        left = notice.seconds_left()
        log.warning("node %s is being drained (%s): taking an emergency snapshot%s",
                    notice.node[:12], "no deadline" if left is None else f"{left:.1f} s left",
                    " into the memory tier" if self._tier is not None else "")
        self._notice = notice
        self._events.add("drain", node=notice.node, seconds_left=left)

    def notice(self) -> dict[str, Any]:
        """What the ranks' polls read: the agreed emergency step, if any, and
        a drain notice not yet turned into one (a rank then requests it)."""
        drain = self._notice
        return {
            "step": self._emergency,
            "drain": None if drain is None else {"node": drain.node, "deadline_ms": drain.deadline_ms},
        }


def _first_readable(step: int, refs: list) -> Any:
    """The first of the borrowed copies of ``step`` that can be read."""
    import ray

    problems = []
    for ref in refs:
        try:
            return ray.get(ref, timeout=300)
        except Exception as exc:  # noqa: BLE001 - a lost node takes its copy along
            problems.append(f"{type(exc).__name__}: {exc}"[:200])
    raise DistributedSaveError(f"emergency step {step}: no copy in memory could be read "
                               f"({'; '.join(problems) or 'none was lent'})")

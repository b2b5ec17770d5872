"""Retention, sweeping and one run's history: the pruning half of
:class:`ckptmgr.manager.CheckpointManager` (a mixin; it uses the manager's
storage, lease, listing and retention policy).

Deleting is a separate step from deciding (:mod:`ckptmgr.retention` is pure):
it removes the manifest first, so a crash mid-prune leaves only an unlisted
orphan, and a writer checks its lease before deleting anything.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from ckptmgr.history import SupersededCheckpoint
from ckptmgr.io.layout import archive_name
from ckptmgr.io.manifest import Manifest, now_utc
from ckptmgr.retention import CheckpointInfo, RetentionDecision, RetentionPolicy, check_grace

log = logging.getLogger("ckptmgr")


@dataclass(frozen=True)
class PruneReport:
    decision: RetentionDecision
    deleted: tuple[int, ...]
    dry_run: bool
    newest: int | None = None  # the newest committed step when pruning began


class Pruning:
    """Pin, prune, sweep, supersede (mixed into ``CheckpointManager``)."""

    def pin(self, step: int, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned."""
        self.storage.write_pin(self._resolve_step(step), pinned)

    def plan_prune(self, retention: RetentionPolicy | None = None, now: datetime | None = None) -> RetentionDecision:
        policy = retention or self.retention
        return policy.decide(self._infos(self.manifests()), now or now_utc())

    def _infos(self, manifests: list[Manifest]) -> list[CheckpointInfo]:
        pinned = self.storage.pinned_steps()
        return [CheckpointInfo(m.step, m.created, m.metrics, m.step in pinned) for m in manifests]

    def prune(self, dry_run: bool = False, retention: RetentionPolicy | None = None,
              protect: Collection[int] = ()) -> PruneReport:
        """Delete what the retention policy does not keep; never the newest,
        never a step in ``protect``.

        Deletion removes the manifest first, so a crash mid-prune leaves only an
        unlisted orphan (swept later), never a listed checkpoint without data.
        A writer checks its lease before deleting: a fenced one deletes nothing.
        """
        steps = self.steps()  # one listing: manifests, newest and sweep all use it
        manifests = self._read_manifests(steps)
        decision = (retention or self.retention).decide(self._infos(manifests), now_utc())
        for warning in decision.warnings:
            log.warning("%s", warning)
        newest = steps[-1] if steps else None
        if dry_run:
            return PruneReport(decision, (), True, newest)
        doomed = [s for s in decision.delete if s < newest and s not in protect]  # never the newest
        kept = functools.cache(self._history.kept_archives)  # one read of superseded/ per prune
        archives = self._deletable_archives(kept()) if doomed else []
        for step in doomed:
            self.lease.check(f"pruning step {step}")
            self.storage.delete(step, archives)
        if doomed:
            log.info("pruned steps %s", short_list(doomed))
        self._sweep(self.sweep_grace_s, manifests, kept)
        return PruneReport(decision, tuple(doomed), False, newest)

    # -- one run's history (see ckptmgr.history) ---------------------------------
    def supersede_after(self, step: int | None, reason: str) -> list[int]:
        """Move committed steps newer than ``step`` (all, for None) to
        ``superseded/`` before training writes those steps again; takes the
        writer lease if not held. Returns the steps moved."""
        if self.lease.held is None:
            self.claim()
        return self._history.supersede_after(step, reason)

    def superseded(self) -> list[SupersededCheckpoint]:
        """Steps moved aside (never restored; kept until :meth:`delete_superseded`)."""
        return self._history.list()

    def delete_superseded(self) -> list[SupersededCheckpoint]:
        """Delete every superseded step and its archive; return them."""
        live = {m.step: m.archive for m in self.manifests()}
        return self._history.delete(live)

    def _deletable_archives(self, kept: set[str]):
        """Every archive in the root but ``kept`` (those superseded records
        keep): a step written afresh after a fallback has the old attempt's
        archive beside its own, and only ``delete_superseded`` may remove it."""
        return [a for a in self.storage.archives() if archive_name(a.step, a.attempt) not in kept]

    def sweep(self, older_than_s: float | None = None) -> list[str]:
        """Remove leftovers of interrupted writes; return their URLs.

        Only files no manifest claims, older than ``older_than_s`` (default:
        ``sweep_grace_s``) and older than the newest manifest, so an attempt
        another writer has in flight survives.
        """
        grace = self.sweep_grace_s if older_than_s is None else check_grace(older_than_s, "older_than_s")
        return self._sweep(grace, self.manifests())

    def _sweep(self, grace: float, manifests: list[Manifest], kept=None) -> list[str]:
        """``manifests`` must have been read before the sweep lists the root."""
        self.lease.check("sweeping leftovers")
        claimed = {m.step: m.archive for m in manifests}
        return self.storage.sweep(grace, claimed, kept or self._history.kept_archives)

    def leftovers(self, older_than_s: float | None = None) -> list[str]:
        """What :meth:`sweep` would remove now (names relative to the directory)."""
        grace = self.sweep_grace_s if older_than_s is None else check_grace(older_than_s, "older_than_s")
        claimed = {m.step: m.archive for m in self.manifests()}
        return self.storage.orphans(grace, claimed, self._history.kept_archives)



def short_list(steps: list[int]) -> str:
    """The last ten steps, for one log line."""
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[-10:])
    return shown if len(steps) <= 10 else f"... {shown}"

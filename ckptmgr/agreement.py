"""Coordinator side of a distributed restore: every rank verifies a share of
the candidate checkpoint, then all agree on it or all fall back together.

Ranks must restore the same step, so a corrupt chunk found by any one rank
rejects the step for all. :class:`RestoreVotes` is the barrier: each rank
votes (its problem, or None) on a step and waits until every rank has voted.

The coordinator outlives jobs (it is detached), so a vote round of an earlier
session may be left incomplete by a crash. A rank voting again on a step it
already voted on starts a new round; ranks still waiting in the old round
notice it was replaced and vote again in the new one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ckptmgr.errors import DistributedSaveError


@dataclass
class _Round:
    votes: dict[int, str | None] = field(default_factory=dict)


class RestoreVotes:
    """Per-step vote rounds of ``world_size`` ranks."""

    def __init__(self, world_size: int):
        self._world_size = world_size
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}

    def vote(self, step: int, rank: int, problem: str | None, timeout_s: float) -> str | None:
        """Record ``rank``'s verdict on ``step``; wait for every rank. Returns
        None when all found it good, else the first problem (naming its rank).
        Raises ``DistributedSaveError`` when a rank does not vote in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            round_ = self._enter(step, rank, problem)
            while len(round_.votes) < self._world_size:
                if self._rounds.get(step) is not round_:  # a new session started over
                    round_ = self._enter(step, rank, problem)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self._world_size)) - set(round_.votes))
                    raise DistributedSaveError(
                        f"Restore stopped: ranks {missing} did not verify their share of step "
                        f"{step} within {timeout_s:.0f} s (save_timeout_s); check those workers.")
                self._cond.wait(min(left, 1.0))
            problems = [f"rank {r}: {p}" for r, p in sorted(round_.votes.items()) if p]
            return problems[0] if problems else None

    def _enter(self, step: int, rank: int, problem: str | None) -> _Round:
        round_ = self._rounds.get(step)
        if round_ is None or rank in round_.votes:
            round_ = self._rounds[step] = _Round()
        round_.votes[rank] = problem
        self._cond.notify_all()
        return round_

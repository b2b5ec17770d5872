"""The restore barrier: every rank votes on its share of a step; all agree or
all fall back together (issue 10, item 6)."""

from __future__ import annotations

import threading

import pytest

from ckptmgr.agreement import RestoreVotes
from ckptmgr.errors import DistributedSaveError


def _vote_all(votes: RestoreVotes, step: int, problems: dict[int, str | None]) -> dict[int, str | None]:
    verdicts: dict[int, str | None] = {}

    def run(rank):
        verdicts[rank] = votes.vote(step, rank, problems[rank], timeout_s=10)

    threads = [threading.Thread(target=run, args=(r,)) for r in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return verdicts


def test_all_good_means_every_rank_proceeds():
    assert _vote_all(RestoreVotes(3), 7, {0: None, 1: None, 2: None}) == {0: None, 1: None, 2: None}


def test_one_bad_share_rejects_the_step_for_every_rank():
    verdicts = _vote_all(RestoreVotes(3), 7, {0: None, 1: "chunk 2 of 9 is corrupt", 2: None})
    assert set(verdicts.values()) == {"rank 1: chunk 2 of 9 is corrupt"}


def test_a_stale_round_from_a_crashed_session_is_started_over():
    votes = RestoreVotes(2)
    with pytest.raises(DistributedSaveError, match=r"ranks \[1\] did not verify"):
        votes.vote(7, 0, None, timeout_s=0.2)  # the earlier session: rank 1 never came
    assert _vote_all(votes, 7, {0: None, 1: None}) == {0: None, 1: None}


def test_a_rank_that_never_votes_stops_the_restore_naming_it():
    votes = RestoreVotes(3)
    errors: dict[int, Exception] = {}

    def run(rank):
        try:
            votes.vote(7, rank, None, timeout_s=0.3)
        except DistributedSaveError as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(errors) == [0, 1]
    assert all("ranks [2] did not verify their share of step 7" in str(e) for e in errors.values())


def test_a_step_written_afresh_is_not_judged_by_the_old_attempts_verdict(tmp_path):
    """Review finding: the detached coordinator remembered 'step 10 is corrupt'
    after step 10 was superseded and written again, so the next job restored
    step 9 and moved the good step 10 aside."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from writer_worker import snapshot

    from ckptmgr.coordinator import Coordinator, CoordinatorOptions

    coordinator = Coordinator(CoordinatorOptions(directory=str(tmp_path / "run"), world_size=1))
    try:
        manager = coordinator.manager
        for step in (9, 10):
            manager.write_snapshot(step, snapshot(step))
        assert coordinator.restore_vote(10, 0, "chunk 3 of 9 is corrupt", 5.0) == "rank 0: chunk 3 of 9 is corrupt"
        assert coordinator.restore_step() == 9
        coordinator.supersede_after(9, "training resumed from step 9")
        manager.write_snapshot(10, snapshot(10))
        assert coordinator.restore_step() == 10  # the next job: the new attempt of step 10
    finally:
        coordinator.shutdown()

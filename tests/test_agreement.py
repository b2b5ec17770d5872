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

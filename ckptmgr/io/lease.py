"""The writer lease: one writing process per checkpoint directory, newest wins.

A writer claims a directory by creating ``.lease/lease-<N+1>.json``
create-only, where N is the highest lease there (a lost race retries with the
next number). From then on it is the holder, until someone claims N+2. Before
every commit and every delete the holder lists ``.lease/``; if a higher lease
exists it has been *fenced*: it raises :class:`WriterFencedError` naming the
new holder and never writes a manifest or deletes anything again.

Why newest wins: after a preemption the restarted job must be able to write
at once, while the old driver may still be alive somewhere (a zombie). It
cannot tell a dead holder from a slow one, so it takes over and the old one
stops at its next save. A duplicate launch does the same to the first launch.

What the fence cannot stop: a zombie that passed its check in the
milliseconds before a takeover may still create one manifest. That checkpoint
is complete (its own archive, create-only manifest), so nothing is corrupted;
the new holder sees the step taken and keeps the other writer's checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptmgr.errors import CheckpointExistsError, CkptmgrError, WriterFencedError
from ckptmgr.io.manifest import now_utc

if TYPE_CHECKING:
    from ckptmgr.io.storage import Storage

log = logging.getLogger("ckptmgr")

_CLAIM_TRIES = 16
_KEEP_OLD_LEASES = 2  # older lease files are deleted by the new holder


@dataclass(frozen=True)
class Lease:
    """One claim: its token and who made it."""

    token: int
    owner: str  # "host:pid"
    acquired: str  # ISO time

    def describe(self) -> str:
        return f"lease {self.token} held by {self.owner} since {self.acquired}"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"token": self.token, "owner": self.owner, "acquired": self.acquired}, indent=2
        ).encode()


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WriterLease:
    """This process's claim on one directory (created unclaimed)."""

    def __init__(self, storage: "Storage"):
        self._storage = storage
        self.held: Lease | None = None

    def acquire(self) -> Lease:
        """Claim the directory; whoever held it before is fenced from now on."""
        for _ in range(_CLAIM_TRIES):
            tokens = self._storage.lease_tokens()
            previous = tokens[-1] if tokens else 0
            lease = Lease(previous + 1, _this_process(), now_utc().isoformat(timespec="seconds"))
            try:
                self._storage.create_lease(lease.token, lease.to_bytes())
            except CheckpointExistsError:
                continue  # another writer claimed that number first: go above it
            self.held = lease
            if previous:
                log.warning(
                    "claimed %s as lease %d; the previous writer (%s) is fenced from now on",
                    self._storage.url, lease.token, self._describe(previous),
                )
            self._forget_old(tokens)
            return lease
        raise WriterFencedError(
            f"Could not claim {self._storage.url}: {_CLAIM_TRIES} other writers claimed it at the same time."
        )

    def ensure(self, doing: str) -> Lease:
        """Claim on first use; afterwards check we still hold it."""
        if self.held is None:
            return self.acquire()
        self.check(doing)
        return self.held

    def check(self, doing: str) -> None:
        """Raise :class:`WriterFencedError` if a newer lease exists."""
        if self.held is None:
            return
        newer = [t for t in self._storage.lease_tokens() if t > self.held.token]
        if newer:
            raise WriterFencedError(
                f"Not {doing}: {self._storage.url} was taken over by "
                f"{self._describe(newer[-1])}; this writer ({self.held.token}, "
                f"{self.held.owner}) is fenced and stops. Only one job may write "
                "a checkpoint directory; stop this one (the newest launch wins)."
            )

    def current(self) -> Lease | None:
        """The newest claim on the directory (None if nobody ever claimed it)."""
        tokens = self._storage.lease_tokens()
        if not tokens:
            return None
        return self._read(tokens[-1]) or Lease(tokens[-1], "?", "?")

    def _describe(self, token: int) -> str:
        lease = self._read(token)
        return lease.describe() if lease else f"lease {token}"

    def _read(self, token: int) -> Lease | None:
        """The lease file of ``token``, or None if it cannot be read or parsed."""
        try:
            raw = json.loads(self._storage.read_lease(token))
            return Lease(int(raw["token"]), str(raw["owner"]), str(raw["acquired"]))
        except (CkptmgrError, ValueError, KeyError, TypeError, RecursionError):
            return None

    def _forget_old(self, tokens: list[int]) -> None:
        for token in tokens[:-_KEEP_OLD_LEASES] if len(tokens) > _KEEP_OLD_LEASES else []:
            try:
                self._storage.delete_lease(token)
            except Exception as exc:  # noqa: BLE001 - tidying only
                log.debug("could not delete old lease %d: %s", token, exc)

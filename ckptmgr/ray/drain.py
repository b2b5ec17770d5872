"""Ray's own preemption notices: nodes being drained, with a deadline.

When the autoscaler, KubeRay or an operator (``ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N``) drains a node,
Ray's GCS records it with the time the node will be killed. The coordinator
polls that table (:class:`DrainWatch`); when a node running a rank of the run
is draining, the run takes an emergency snapshot into the memory tier on
nodes that are not, and stops before the deadline. This works for Ray Train
workers too, where no SIGTERM handler can be installed (the loop runs off the
main thread).

Ray exposes the table only through a private accessor
(``ray._private.state.state.get_draining_nodes()``, Ray 2.60); it is read here
and nowhere else, and ``tests/test_memory_tier.py`` fails loudly, naming the
Ray version, if it changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("ckptmgr")

POLL_S = 0.5


def draining_nodes() -> dict[str, int]:
    """``{node_id_hex: deadline_ms}`` of nodes Ray is draining (0: no deadline)."""
    from ray._private.state import state

    return {str(node): int(deadline) for node, deadline in state.get_draining_nodes().items()}


@dataclass(frozen=True)
class DrainNotice:
    """A node of the run is being drained: until ``deadline_ms`` (Unix ms; 0 = none)."""

    node: str
    deadline_ms: int
    seen_at: float  # time.time() when first seen

    def seconds_left(self) -> float | None:
        if not self.deadline_ms:
            return None
        return self.deadline_ms / 1000.0 - time.time()


class DrainWatch:
    """Polls Ray's draining nodes on a thread; calls ``on_notice`` once per
    newly draining node that ``nodes_of_run()`` names."""

    def __init__(self, nodes_of_run: Callable[[], set[str]], on_notice: Callable[[DrainNotice], None],
                 poll_s: float = POLL_S):
        self._nodes_of_run = nodes_of_run
        self._on_notice = on_notice
        self._poll_s = poll_s
        self._seen: set[str] = set()
        self.draining: dict[str, int] = {}
        self._stop = threading.Event()
        self._failed_once = False
        threading.Thread(target=self._loop, name="ckptmgr-drain-watch", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.draining = draining_nodes()
            except Exception as exc:  # noqa: BLE001 - keep watching; say once why it cannot
                if not self._failed_once:
                    self._failed_once = True
                    log.warning("cannot read Ray's draining nodes (%s: %s); preemption notices "
                                "come from SIGTERM only", type(exc).__name__, exc)
                continue
            for node in sorted(set(self.draining) & self._nodes_of_run() - self._seen):
                self._seen.add(node)
                self._on_notice(DrainNotice(node, self.draining[node], time.time()))

    def stop(self) -> None:
        self._stop.set()


def wait_until_drained(no_deadline_s: float = 60.0, most_s: float = 300.0, poll_s: float = 0.5) -> list[str]:
    """Wait until no node is being drained: each goes at its deadline (plus a
    few seconds), one without a deadline is waited for ``no_deadline_s``, and
    never longer than ``most_s``. A run restarting after a preemption then
    cannot place a rank on a node about to die. The nodes still draining
    when it gives up (none when Ray's table cannot be read)."""
    started = time.monotonic()
    while True:
        try:
            draining = draining_nodes()
        except Exception:  # noqa: BLE001 - no table, nothing to wait for
            return []
        if not draining:
            return []
        now_ms = time.time() * 1000
        waits = [(deadline - now_ms) / 1000.0 + 5.0 if deadline else no_deadline_s - (time.monotonic() - started)
                 for deadline in draining.values()]
        if max(waits) <= 0 or time.monotonic() - started >= most_s:
            return sorted(draining)
        time.sleep(poll_s)

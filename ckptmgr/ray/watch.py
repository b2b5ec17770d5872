"""A run you can watch: what the coordinator saw, shown on the driver.

The coordinator keeps a short log of what happened to the run
(:class:`RunEvents`: saves committed, failed, or replaced because the writer
was busy, snapshots kept in memory, drain notices, the restore the ranks
agreed on, epochs' ends) and rank 0's latest progress
(step, epoch, loss), which rank 0 sends at most twice a second and at each
epoch's end, fire and forget. The driver (``ckptmgr run``/``resume``) polls it while the ranks
train (:class:`RunWatch`): on a terminal a progress bar (steps, loss, last
checkpoint, newest snapshot in memory) with one line per event above it;
piped, plain lines: one per save, restore, epoch and notice (routine memory
snapshots, every few steps, only on the bar). Both go to stderr, so ``--json`` keeps stdout.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

_KEPT_EVENTS = 200  # a slow driver misses the oldest, never blocks the run
_NOW = 1 << 62  # a cursor past every event: "from now on"


def log_to_stderr() -> None:
    """In a Ray worker or the coordinator: ckptmgr's INFO lines (restores, saves)
    on this process's stderr, which Ray forwards to the driver when asked
    (``ray.init(log_to_driver=True)``, ``ckptmgr run --verbose``). Python's
    default shows only warnings. Leaves a logger the user configured alone."""
    log = logging.getLogger("ckptmgr")
    if not log.handlers and log.level == logging.NOTSET:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class RunEvents:
    """The coordinator's side: an ordered, bounded event log and the latest progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._next = 0  # sequence number of the next event
        self._progress: dict[str, Any] | None = None

    def add(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._events.append({"seq": self._next, "kind": kind, "time": time.time(), **fields})
            self._next += 1
            del self._events[:-_KEPT_EVENTS]

    def progress(self, fields: dict[str, Any]) -> None:
        with self._lock:
            self._progress = dict(fields)

    def since(self, cursor: int) -> dict[str, Any]:
        """Events numbered ``cursor`` and later, the next cursor, and the progress."""
        with self._lock:
            return {"events": [e for e in self._events if e["seq"] >= cursor],
                    "cursor": self._next, "progress": self._progress}


def describe(event: dict[str, Any]) -> str:
    """One line for one event, as the user reads it."""
    kind, step = event["kind"], event.get("step")
    if kind == "saved":
        size = f"{event['bytes'] / 1e6:.1f} MB in {event['write_s']:.2f} s"
        source = ", persisted from memory" if event.get("from_memory") else ""
        return f"saved step {step} ({size}{source})"
    if kind == "memory":
        return f"emergency snapshot of step {step} kept in memory on {len(event['nodes'])} node(s)"
    if kind == "failed":
        return f"save of step {step} failed: {event['error']}"
    if kind == "restored":
        return f"restored step {step} from {event['tier']}"
    if kind == "epoch":
        total = f"/{event['total_steps']}" if event.get("total_steps") else ""
        return ", ".join(x for x in (f"{_epoch(event)} done: step {step}{total}", _loss(event)) if x)
    if kind == "dropped":
        return event["text"]
    if kind == "drain":
        left = event.get("seconds_left")
        return (f"node {event['node'][:12]} is being drained "
                f"({'no deadline' if left is None else f'{left:.0f} s left'}): emergency snapshot")
    return f"{kind} {step}"


def _epoch(p: dict[str, Any]) -> str:
    return f"epoch {p['epoch']}/{p['epochs']}" if p.get("epochs") else f"epoch {p['epoch']}"


def _loss(p: dict[str, Any]) -> str:
    return "" if p.get("loss") is None else f"loss {p['loss']:.4g}"


class RunWatch:
    """The driver's side: polls a coordinator and shows what it reports."""

    def __init__(self, coordinator, stream: TextIO | None = None, *, terminal: bool | None = None):
        self.coordinator = coordinator
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._cursor = 0
        self._last_saved: int | None = None
        self._in_memory: int | None = None
        self._bar = None
        self._task = None

    def __enter__(self) -> RunWatch:
        self._cursor = self._fetch(_NOW)["cursor"]  # what an earlier attempt or run saw is not news
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # Fits 80 columns: "step 40/64 ━━━━━━━━━━ epoch 2/2 · loss 0.5371 · saved 50 · memory 55 0:00:12"
            self._bar = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=10),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=Console(file=self.stream, force_terminal=True),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=None, status="starting")
        return self

    def __exit__(self, *exc_info) -> None:
        self.tick()  # the last saves and the final step
        if self._bar is not None:
            self._bar.stop()

    def tick(self) -> None:
        """Fetch what happened since the last tick and show it (never raises:
        a slow or restarting coordinator must not stop the run)."""
        news = self._fetch(self._cursor)
        self._cursor = news["cursor"]
        for event in news["events"]:
            if event["kind"] == "saved":
                self._last_saved = event["step"]
            if event["kind"] == "memory" and not event.get("emergency"):
                self._in_memory = event["step"]  # frequent: the bar shows it, no line
                continue
            self._line(describe(event))
        if news["progress"]:
            self._show(news["progress"])

    def _fetch(self, cursor: int) -> dict[str, Any]:
        import ray

        try:
            return ray.get(self.coordinator.watch.remote(cursor), timeout=5)
        except Exception:  # noqa: BLE001 - the run's own error handling reports a lost coordinator
            return {"events": [], "cursor": self._cursor, "progress": None}

    def _show(self, p: dict[str, Any]) -> None:
        if self._bar is None:
            return  # piped: the epoch events are the progress
        saved = "" if self._last_saved is None else f"saved {self._last_saved}"
        memory = "" if self._in_memory is None else f"memory {self._in_memory}"
        status = " · ".join(x for x in (_epoch(p), _loss(p), saved, memory) if x)
        self._bar.update(self._task, completed=p["step"], total=p.get("total_steps"), status=status)

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"ckptmgr: {text}", highlight=False, markup=False)
        else:
            print(f"ckptmgr: {text}", file=self.stream, flush=True)

"""``save_freq="auto"``: how often to checkpoint, from measured costs (Young/Daly).

Pure code (no TensorFlow, no I/O), run by the callback on every worker.

**The rule.** A checkpoint every ``T`` seconds of training costs ``C`` seconds
of training each (an overhead of ``C/T``); a failure loses, on average, the
``T/2`` seconds trained since the last checkpoint, plus the restart. With ``M``
the job's mean time between failures, the interval that wastes least is

- Young (1974), "A first order approximation to the optimum checkpoint
  interval", Communications of the ACM 17(9): 530-531:
  ``T = sqrt(2 C M)``;
- Daly (2006), "A higher order estimate of the optimum checkpoint interval for
  restart dumps", Future Generation Computer Systems 22(3): 303-312:
  ``T = sqrt(2 C M) [1 + 1/3 sqrt(C / 2M) + 1/9 (C / 2M)] - C`` for ``C < 2M``,
  else ``T = M``. This is what ckptmgr uses.

**C, the cost to training.** Saves are asynchronous: ``fit()`` pays the copy to
host memory (``stats.blocked_s``), and the background write then competes with
training for CPU and memory bandwidth (hashing, zip CRC, page-cache copies),
so steps that overlap a write run slower. That slowdown is measured, not
guessed: the callback times every step and splits the times by whether a write
was running. If steps overlapping a write are ``s`` times slower (``s`` =
busy/idle - 1), a write of ``W`` wall seconds costs ``W s / (1 + s)`` of
training. So ``C = blocked_s + write_s * s / (1 + s)``; a blocking save
(``async_save=False``) costs ``blocked_s + write_s``. Counting the whole write
would overstate the cost on a GPU node, where the write uses otherwise idle
host cores; counting only the copy would understate it on a small CPU machine.

**Never faster than the writer.** The interval is at least ``WRITER_MARGIN``
(1.5) times the measured write time, so the writer is idle a third of the time
and a save rarely waits for the previous one; and at least one step.

**MTBF.** ``DEFAULT_MTBF`` is 24 h per node. Google Compute Engine stops a
preemptible VM after at most 24 hours of running
(https://cloud.google.com/compute/docs/instances/preemptible), so a preemptible
node lives no longer than that; Spot VMs (GCP) have no maximum runtime and no
minimum either. AWS's Spot Instance Advisor reports, per instance type, the
share of Spot capacity reclaimed over the trailing month in bands from "< 5 %"
to "> 20 %" (https://aws.amazon.com/ec2/spot/instance-advisor/), a per-node MTBF
of months for most types. 24 h therefore errs toward saving more often, which
costs little when saves are asynchronous; pass your own measured rate when you
have one. A job of ``N`` nodes stops when any node fails: its MTBF is the
node's divided by ``N`` (independent failures), see :func:`job_mtbf_s`.

**Measurements.** Each save's costs come from its committed manifest (the
write time is known only once the background write ends): ``stats.blocked_s``
and ``stats.write_s``, and the step time and slowdown the callback recorded in
``loop.cadence``. The interval uses the median of the last ``window`` saves, so
one slow save does not swing it. Because every input comes from manifests,
every rank of a distributed run computes the same interval, and a resumed run
starts from the restored checkpoint's measurements.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ckptmgr.errors import ConfigError
from ckptmgr.io.manifest import Manifest, SaveCadence
from ckptmgr.retention import format_duration, parse_duration

log = logging.getLogger("ckptmgr")

DEFAULT_MTBF = "24h"  # per node; see the module docstring for the source
WRITER_MARGIN = 1.5  # interval >= this x the background write time
FIRST_SAVE_STEPS = 10  # the first save, taken early to measure the cost
WINDOW = 5  # saves whose median sets the interval
LOG_CHANGE = 0.2  # log the interval again when it moves by more than 20 %


# -- the rule ---------------------------------------------------------------------


def young_interval(cost_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum, ``sqrt(2 C M)`` seconds."""
    return math.sqrt(2.0 * cost_s * mtbf_s)


def daly_interval(cost_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum in seconds (``M`` when ``C >= 2M``)."""
    if cost_s >= 2.0 * mtbf_s:
        return mtbf_s
    x = cost_s / (2.0 * mtbf_s)
    return young_interval(cost_s, mtbf_s) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - cost_s


@dataclass(frozen=True)
class Interval:
    """A chosen save interval: ``steps``, and ``reason`` in one line."""

    steps: int
    rule: str  # "first" (measuring), "young-daly" or "writer"
    reason: str


def choose_interval(*, cost_s: float, write_s: float, step_s: float, mtbf_s: float,
                    margin: float = WRITER_MARGIN) -> Interval:
    """Daly's optimum in steps, at least ``margin`` x the write time and one step."""
    optimum_s = daly_interval(cost_s, mtbf_s)
    floor_s = margin * write_s
    optimum = max(1, round(optimum_s / step_s))
    floor = math.ceil(floor_s / step_s - 1e-9)
    if floor > optimum:
        return Interval(floor, "writer", (
            f"writer: {margin:g} x write {write_s:.3g} s = {floor_s:.3g} s, longer than the "
            f"Young/Daly optimum {optimum_s:.3g} s (cost {cost_s:.3g} s, MTBF {_human(mtbf_s)})"))
    return Interval(optimum, "young-daly", (
        f"Young/Daly: cost {cost_s:.3g} s per save, MTBF {_human(mtbf_s)}: every "
        f"{optimum_s:.3g} s (write {write_s:.3g} s)"))


@dataclass(frozen=True)
class Waste:
    """What an interval costs, per the model behind the rule (first order)."""

    lost_per_failure_s: float  # T/2 + restart
    overhead: float  # C / T: share of training time spent on checkpoints
    expected: float  # overhead + lost_per_failure / M: share of time wasted in all


def waste(interval_s: float, *, cost_s: float, mtbf_s: float, restart_s: float = 0.0) -> Waste:
    """Expected lost work per failure and total waste of one save interval."""
    lost = interval_s / 2.0 + restart_s
    overhead = cost_s / interval_s
    return Waste(lost, overhead, overhead + lost / mtbf_s)


# -- mtbf ---------------------------------------------------------------------------


def parse_mtbf(value: str | float | int) -> float:
    """Seconds from ``"24h"``-style durations or a number of seconds > 0."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value, option="mtbf").total_seconds()
        except ConfigError:
            seconds = math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"Invalid mtbf: Received: mtbf={value!r}. Use a duration such as '24h' or "
            "a number of seconds > 0 (the mean time between failures of one node)."
        )
    return seconds


def job_mtbf_s(node_mtbf: str | float | int | None, nodes: int = 1) -> float:
    """The job's MTBF: one node's (default ``DEFAULT_MTBF``) divided by the nodes."""
    return parse_mtbf(DEFAULT_MTBF if node_mtbf is None else node_mtbf) / max(1, int(nodes))


# -- measurements ----------------------------------------------------------------------


@dataclass(frozen=True)
class SaveCost:
    """One committed save's measured costs."""

    blocked_s: float
    write_s: float
    step_s: float
    slowdown: float = 0.0  # steps overlapping a write were this much slower (0.1 = 10 %)

    def cost_s(self, async_save: bool = True) -> float:
        """Seconds of training one save costs (see the module docstring)."""
        if not async_save:
            return self.blocked_s + self.write_s
        return self.blocked_s + self.write_s * self.slowdown / (1.0 + self.slowdown)

    @classmethod
    def of(cls, manifest: Manifest | None) -> SaveCost | None:
        """From a manifest written with ``save_freq="auto"``; None otherwise."""
        record = manifest.loop.cadence if manifest is not None and manifest.loop else None
        if record is None or record.step_s <= 0:
            return None
        return cls(manifest.stats.blocked_s, manifest.stats.write_s, record.step_s, record.slowdown)


class CadenceEstimator:
    """The interval from the median of the last ``window`` saves' costs."""

    def __init__(self, mtbf_s: float, *, async_save: bool = True, window: int = WINDOW,
                 margin: float = WRITER_MARGIN, first_steps: int = FIRST_SAVE_STEPS):
        self.mtbf_s = mtbf_s
        self.async_save = async_save
        self.margin = margin
        self.first_steps = first_steps
        self.costs: collections.deque[SaveCost] = collections.deque(maxlen=window)

    @property
    def measured(self) -> bool:
        return bool(self.costs)

    def add(self, cost: SaveCost) -> None:
        self.costs.append(cost)

    def interval(self) -> Interval:
        if not self.costs:
            return Interval(self.first_steps, "first",
                            f"first save after {self.first_steps} steps, to measure its cost")
        return choose_interval(
            cost_s=statistics.median(c.cost_s(self.async_save) for c in self.costs),
            write_s=statistics.median(c.write_s for c in self.costs),
            step_s=statistics.median(c.step_s for c in self.costs),
            mtbf_s=self.mtbf_s, margin=self.margin,
        )


class StepTimer:
    """Wall time per training step, split by whether a background write ran."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, window: int = 64):
        self.clock = clock
        self.window = window
        self.reset()

    def reset(self) -> None:
        self._last: float | None = None
        self.all: collections.deque[float] = collections.deque(maxlen=self.window)
        self.idle: collections.deque[float] = collections.deque(maxlen=self.window)
        self.busy: collections.deque[float] = collections.deque(maxlen=self.window)

    def restart(self) -> None:
        """Start timing from now: what happened since (a save) is not a step."""
        self._last = self.clock()

    def tick(self, busy: bool, steps: int = 1) -> None:
        """Call at every batch end; ``busy``: a background write is running."""
        now = self.clock()
        if self._last is not None and steps > 0:
            per_step = (now - self._last) / steps
            self.all.append(per_step)
            (self.busy if busy else self.idle).append(per_step)
        self._last = now

    def step_s(self) -> float | None:
        return statistics.median(self.all) if self.all else None

    def slowdown(self) -> float:
        """busy / idle - 1 from the medians (0 until each has 3 samples)."""
        if len(self.idle) < 3 or len(self.busy) < 3:
            return 0.0
        idle = statistics.median(self.idle)
        return max(0.0, statistics.median(self.busy) / idle - 1.0) if idle > 0 else 0.0


# -- the callback's schedule ------------------------------------------------------------


class AutoSaveFreq:
    """``save_freq="auto"`` for one callback: when the next save is due, and why.

    Args:
        mtbf_s: the job's MTBF in seconds (see :func:`job_mtbf_s`).
        async_save: whether saves write in the background (what they cost).
        clock: the step timer's clock (tests inject one).
    """

    def __init__(self, mtbf_s: float, *, async_save: bool = True,
                 clock: Callable[[], float] = time.perf_counter, first_steps: int = FIRST_SAVE_STEPS):
        self.estimator = CadenceEstimator(mtbf_s, async_save=async_save, first_steps=first_steps)
        self.timer = StepTimer(clock)
        self.interval = self.estimator.interval()
        self.next_step = first_steps
        self._logged: int | None = None

    @property
    def mtbf_s(self) -> float:
        return self.estimator.mtbf_s

    def start(self, step: int, restored: Manifest | None = None) -> None:
        """Train begin at ``step``; a restored manifest's costs seed the estimate."""
        self.estimator.costs.clear()
        self.learn(restored)
        self.timer.reset()
        self.timer.restart()
        self.schedule(step)

    def learn(self, manifest: Manifest | None) -> None:
        """Take a committed save's costs into account (None: nothing learnt)."""
        cost = SaveCost.of(manifest)
        if cost is not None:
            self.estimator.add(cost)
        self.interval = self.estimator.interval()

    def schedule(self, step: int) -> None:
        """After a save (or train begin) at ``step``: the next one is due one interval on."""
        self.next_step = step + self.interval.steps
        if self._logged is None or abs(self.interval.steps - self._logged) > LOG_CHANGE * self._logged:
            self._logged = self.interval.steps
            log.info("save_freq='auto': a checkpoint every %d steps (%s)",
                     self.interval.steps, self.interval.reason)

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def record(self) -> SaveCadence:
        """What the next manifest keeps: the interval and this rank's measurements."""
        step_s, slowdown = self.timer.step_s(), self.timer.slowdown()
        return SaveCadence(
            interval_steps=self.interval.steps,
            reason=self.interval.reason,
            step_s=step_s if step_s is not None and math.isfinite(step_s) else 0.0,
            slowdown=slowdown if math.isfinite(slowdown) else 0.0,
            mtbf_s=self.mtbf_s,
        )


def committed_manifest(result: Any) -> Manifest | None:
    """The manifest a save's result carries: a Manifest (local), a dict (Ray client)."""
    if isinstance(result, Manifest):
        return result
    if isinstance(result, dict) and isinstance(result.get("manifest"), dict):
        try:
            return Manifest.model_validate(result["manifest"])
        except ValueError:
            return None
    return None


def _human(seconds: float) -> str:
    whole = int(round(seconds))
    return format_duration(timedelta(seconds=whole)) if whole >= 1 else f"{seconds:.3g}s"

"""Crash consistency of the storage layer as a property (issue 8).

A seeded random schedule of rounds runs against one checkpoint directory, on
local disk and on gs:// (fake-gcs-server). Each round is a fresh writer
process (``schedule_worker.py``, numpy-only snapshots through
``write_snapshot``: no TensorFlow) doing a few operations: saves of
increasing steps (some pinned; after a killed save, sometimes the same step
again, as a restarted job would), explicit prunes, sweeps and listings, with
``keep_last`` of 1, 2, 3 or none and a sweep grace of 0 s or an hour. Most
rounds are killed with SIGKILL: at a named crash point before a chosen
operation (``CKPTMGR_CRASH_AT``), at the N-th crash point reached whatever its
name (``CKPTMGR_CRASH_AFTER``, see ``ckptmgr.faults``), or from outside after
a random short delay. A few rounds spread over the schedule surely die at
each crash point in turn (the test checks every point fired). Each new
process claims the writer lease, fencing the dead one: that is expected.

The writer prints a journal (the steps it lists before each operation, what
each operation returned) and the test, as observer, lists and verifies after
every round. Over that whole history of listings it checks:

(a) every listed step verifies (``verify()`` may also report orphans of
    unlisted steps: allowed leftovers, never failures), and a listed step's
    manifest never changes (a committed checkpoint is never modified);
(b) a committed step stays listed until a retention rule prunes it: it may
    vanish only during a save or prune of a round with ``keep_last=K``, when
    at most what was listed or being saved then held at least K newer steps;
    a pinned step never vanishes;
(c) the newest committed step is never deleted: the highest listed step
    never decreases, and is at least any step a save returned;
(d) nothing partial is ever listed: a step appears only while a save of it
    ran, and a save killed before its commit point leaves it unlisted;
(e) after the schedule, a fresh commit then ``sweep(older_than_s=0)`` leaves
    no leftovers, and everything then verifies without orphans.

The schedule is fixed by ``SEED``; outside kills land wherever timing puts
them, so those rounds differ run to run. ``CKPTMGR_SCHEDULE_SEED`` and
``CKPTMGR_SCHEDULE_ROUNDS`` override seed and round count (to explore).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.faults import COUNT_ENV_VAR, ENV_VAR
from schedule_worker import snapshot

WORKER = Path(__file__).with_name("schedule_worker.py")
REPO = Path(__file__).resolve().parents[1]

SEED = int(os.environ.get("CKPTMGR_SCHEDULE_SEED", "1234"))
ROUNDS = {"local": 40, "gcs": 32}
if os.environ.get("CKPTMGR_SCHEDULE_ROUNDS"):
    ROUNDS = {k: int(os.environ["CKPTMGR_SCHEDULE_ROUNDS"]) for k in ROUNDS}

# Crash points each backend reaches (grep "crash_point(" in ckptmgr/).
POINTS = {
    "local": ["archive_mid_stream", "archive_before_fsync", "before_manifest",
              "manifest_before_rename", "delete_after_manifest"],
    "gcs": ["archive_mid_stream", "before_manifest", "delete_after_manifest"],
}
# Reached only while saving, before the manifest exists (manifest_before_rename
# also guards the lease file: a claim, which commits nothing either).
PRE_COMMIT = {"archive_mid_stream", "archive_before_fsync", "before_manifest", "manifest_before_rename"}
# Crash points one save reaches at most (without pruning), for CKPTMGR_CRASH_AFTER.
POINTS_PER_SAVE = {"local": 5, "gcs": 2}
# Outside kills: uniformly within this long after the writer says it is ready
# (a round's operations take about 0.03 s on local disk, 0.12 s on
# fake-gcs-server; some kills then land after the last one, which is fine).
KILL_WINDOW_S = {"local": 0.06, "gcs": 0.2}
WORKER_TIMEOUT_S = 120


@dataclass
class Round:
    index: int
    keep_last: int | None
    sweep_grace_s: float
    ops: list
    kill: str  # "none", "named", "counter", "external"
    crash_at: dict | None = None
    crash_after: int | None = None
    kill_after_s: float | None = None

    def describe(self) -> str:
        if self.kill == "named":
            how = f"CKPTMGR_CRASH_AT={self.crash_at['name']} before op {self.crash_at['before_op']}"
        elif self.kill == "counter":
            how = f"CKPTMGR_CRASH_AFTER={self.crash_after}"
        elif self.kill == "external":
            how = f"SIGKILL {self.kill_after_s:.3f}s after ready"
        else:
            how = "not killed"
        return (f"round {self.index}: keep_last={self.keep_last} sweep_grace_s={self.sweep_grace_s} "
                f"ops={self.ops} ({how})")


def plan_round(rng: random.Random, backend: str, index: int, next_step: int,
               resume_step: int | None, forced_point: str | None = None) -> tuple[Round, int]:
    """Draw one round; returns it and the next fresh step number.

    With ``forced_point`` the round surely dies there: ``keep_last=1``, two
    saves, the crash point armed before the second, whose save reaches every
    pre-commit point and whose prune deletes the first step.
    """
    keep_last = rng.choice([1, 1, 2, 2, 3, None]) if forced_point is None else 1
    grace = rng.choice([0.0, 3600.0])
    ops: list = []
    if resume_step is not None and (forced_point or rng.random() < 0.5):
        ops.append(["save", resume_step, False])  # a restarted job redoes its step
    elif forced_point:
        ops.append(["save", next_step, False])
        next_step += 1
    if forced_point:
        ops.append(["save", next_step, False])
        next_step += 1
    for _ in range(rng.randint(2, 5) if forced_point is None else rng.randint(0, 2)):
        kind = rng.choices(["save", "prune", "sweep", "list"], weights=[11, 3, 2, 4])[0]
        if kind == "save":
            ops.append(["save", next_step, rng.random() < 0.08])
            next_step += rng.choice([1, 1, 2, 5])
        else:
            ops.append([kind])
    kill = rng.choices(["none", "named", "counter", "external"], weights=[1, 3, 3, 3])[0]
    rnd = Round(index, keep_last, grace, ops, "named" if forced_point else kill)
    if forced_point:
        rnd.crash_at = {"name": forced_point, "before_op": 1}
    elif kill == "named":
        rnd.crash_at = {"name": rng.choice(POINTS[backend]), "before_op": rng.randrange(len(ops))}
    elif kill == "counter":
        rnd.crash_after = rng.randint(1, POINTS_PER_SAVE[backend] * len(ops) + 1)
    elif kill == "external":
        rnd.kill_after_s = rng.uniform(0.0, KILL_WINDOW_S[backend])
    return rnd, next_step


@dataclass
class Outcome:
    rc: int
    events: list[dict]
    stderr: str
    crash_name: str | None  # where the writer died, when known

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def run_round(rnd: Round, url: str, options: dict) -> Outcome:
    spec = {"url": url, "options": options, "keep_last": rnd.keep_last,
            "sweep_grace_s": rnd.sweep_grace_s, "ops": rnd.ops, "crash_at": rnd.crash_at}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(ENV_VAR, None)
    env.pop(COUNT_ENV_VAR, None)
    if rnd.crash_after is not None:
        env[COUNT_ENV_VAR] = str(rnd.crash_after)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            if rnd.kill == "external":
                head = proc.stdout.readline()  # "ready", or EOF if it died
                time.sleep(rnd.kill_after_s)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                out = head + proc.stdout.read()
                proc.wait(timeout=WORKER_TIMEOUT_S)
            else:
                out, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read()
    events = [json.loads(line) for line in out.splitlines(keepends=True) if line.endswith("\n")]
    crash_name = None
    if proc.returncode == -signal.SIGKILL:
        if rnd.kill == "named":
            crash_name = rnd.crash_at["name"]
        elif rnd.kill == "counter":
            found = re.search(r"ckptmgr crash point (\w+) #", stderr)
            crash_name = found.group(1) if found else None
    return Outcome(proc.returncode, events, stderr, crash_name)


@dataclass
class History:
    """Every listing seen, in order, and what ran between two of them."""

    where: str = ""
    current: set[int] = field(default_factory=set)  # listed or saved since
    max_listed: int = -1
    max_saved: int = -1
    pinned: set[int] = field(default_factory=set)
    ops_since: list[tuple[list, int | None]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        tail = "\n  ".join(self.log[-30:])
        pytest.fail(f"{self.where}: {message}\nlast events:\n  {tail}", pytrace=False)

    def op(self, op: list, keep_last: int | None) -> None:
        self.log.append(f"op {op} keep_last={keep_last}")
        self.ops_since.append((op, keep_last))

    def saved(self, step: int, mine: bool) -> None:
        self.log.append(f"saved {step} mine={mine}")
        self.current.add(step)
        self.max_saved = max(self.max_saved, step)

    def listing(self, steps: list[int], who: str) -> None:
        self.log.append(f"{who} lists {steps}")
        listed = set(steps)
        if steps != sorted(listed):
            self.fail(f"{who}: steps() not ascending and unique: {steps}")
        being_saved = {op[1] for op, _ in self.ops_since if op[0] == "save"}
        rules = [k for op, k in self.ops_since if op[0] in ("save", "prune") and k]
        for step in sorted(self.current - listed):
            if step in self.pinned:
                self.fail(f"(b) pinned step {step} vanished (listed before: {sorted(self.current)})")
            if not rules:
                self.fail(f"(b) step {step} vanished, but nothing that prunes by a rule ran "
                          f"since the last listing (ops: {[op for op, _ in self.ops_since]})")
            newer = sorted(s for s in self.current | being_saved if s > step)
            if len(newer) < min(rules):
                self.fail(f"(b) step {step} vanished with keep_last={min(rules)}, but at most "
                          f"{newer} were newer (listed before: {sorted(self.current)})")
        for step in sorted(listed - self.current):
            if step not in being_saved:
                self.fail(f"(d) step {step} appeared, but no save of it ran since the last "
                          f"listing (listed before: {sorted(self.current)})")
        if steps:
            if steps[-1] < self.max_listed:
                self.fail(f"(c) the newest listed step went from {self.max_listed} to {steps[-1]}")
            if steps[-1] < self.max_saved:
                self.fail(f"(c) step {self.max_saved} was saved, but the newest listed is {steps[-1]}")
        elif self.max_listed >= 0 or self.max_saved >= 0:
            self.fail(f"(c) nothing listed any more (newest listed before: {self.max_listed})")
        self.max_listed = max(self.max_listed, steps[-1] if steps else -1)
        self.current = listed
        self.ops_since = []


def replay(history: History, rnd: Round, outcome: Outcome) -> None:
    """Feed the writer's journal into the history; fail on its errors."""
    for event in outcome.events:
        ev = event["ev"]
        if ev == "before":
            history.listing(event["steps"], f"writer before op {event['i']}")
            history.op(event["op"], rnd.keep_last)
        elif ev == "saved":
            history.saved(event["step"], event["mine"])
        elif ev == "listed":
            history.listing(event["steps"], "writer")
        elif ev == "pruned":
            history.log.append(f"pruned {event['deleted']}")
        elif ev == "swept":
            history.log.append(f"swept {len(event['removed'])} leftovers")
        elif ev == "error":
            history.fail(f"the writer failed in op {event['op']}: {event['error']}\n{event['trace']}")
    done = bool(outcome.events) and outcome.events[-1]["ev"] == "done"
    if outcome.rc == 0 and done:
        return
    if outcome.killed and rnd.kill != "none":
        history.log.append(f"writer killed ({outcome.crash_name or 'from outside'})")
        return
    history.fail(f"the writer exited with {outcome.rc} (done={done}); stderr:\n{outcome.stderr[-3000:]}")


def observe(history: History, manager: CheckpointManager, attempts: dict[int, str]) -> list[int]:
    """List and verify as a reader; check (a) and feed the listing to (b)-(d)."""
    steps = manager.steps()
    history.listing(steps, "observer")
    for step in steps:
        result = manager.verify(step)[0]
        if not result.ok:
            history.fail(f"(a) listed step {step} does not verify: {result.problem}")
        attempt = manager.manifest(step).attempt
        if attempts.setdefault(step, attempt) != attempt:
            history.fail(f"(a) the manifest of listed step {step} changed: attempt "
                         f"{attempts[step]} became {attempt}")
    for result in manager.verify():
        if not result.ok and (result.step in steps or "orphan archive" not in result.problem):
            history.fail(f"(a) verify() reports a problem that is not an orphan: {result}")
    history.pinned |= manager.storage.pinned_steps() & set(steps)
    return steps


def killed_save(outcome: Outcome) -> tuple[int, bool] | None:
    """(step, listed before) of the save the writer was in when it died."""
    befores = [e for e in outcome.events if e["ev"] == "before"]
    if not outcome.killed or not befores or befores[-1]["op"][0] != "save":
        return None
    if outcome.events[-1]["ev"] not in ("before",):  # died after the save returned
        return None
    step = befores[-1]["op"][1]
    return step, step in befores[-1]["steps"]


def run_schedule(backend: str, url: str, options: dict) -> dict:
    rng = random.Random(SEED)
    manager = CheckpointManager(url, storage_options=options)
    history = History()
    attempts: dict[int, str] = {}
    next_step, resume_step = 1, None
    stats = {"rounds": 0, "interrupted": 0, "points": {}}
    # Every crash point surely fires once, in rounds spread over the schedule.
    stride = max(1, ROUNDS[backend] // len(POINTS[backend]))
    forced = {i * stride: point for i, point in enumerate(POINTS[backend])}
    for index in range(ROUNDS[backend]):
        rnd, next_step = plan_round(rng, backend, index, next_step, resume_step, forced.get(index))
        history.where = f"{backend}, SEED={SEED}, {rnd.describe()}"
        history.log.append(f"--- {rnd.describe()}")
        outcome = run_round(rnd, url, options)
        replay(history, rnd, outcome)
        steps = observe(history, manager, attempts)
        interrupted = killed_save(outcome)
        if interrupted is not None and outcome.crash_name in PRE_COMMIT:
            step, was_listed = interrupted
            if not was_listed and step in steps:
                history.fail(f"(d) the save of step {step} died at {outcome.crash_name}, before "
                             f"its commit, yet step {step} is listed: {steps}")
        resume_step = interrupted[0] if interrupted is not None else None
        stats["rounds"] += 1
        if outcome.killed and (not outcome.events or outcome.events[-1]["ev"] != "done"):
            stats["interrupted"] += 1
            name = outcome.crash_name or "outside"
            stats["points"][name] = stats["points"].get(name, 0) + 1

    # (e) a fresh commit, then sweeping with no grace leaves nothing behind.
    history.where = f"{backend}, SEED={SEED}, after the schedule"
    final = CheckpointManager(url, storage_options=options, keep_last=2)
    history.op(["save", next_step, False], 2)
    manifest = final.write_snapshot(next_step, snapshot(next_step))
    history.saved(next_step, True)
    steps = observe(history, manager, attempts)
    assert steps[-1] == next_step and manifest.step == next_step
    final.sweep(older_than_s=0)
    left = final.leftovers(older_than_s=0)
    if left:
        history.fail(f"(e) leftovers after a fresh commit and sweep(older_than_s=0): {left}")
    bad = [r for r in final.verify() if not r.ok]
    if bad:
        history.fail(f"(e) after sweeping, verify() still reports: {bad}")
    return stats


def check_coverage(stats: dict, backend: str) -> None:
    """The schedule must really interrupt writers, at several kinds of points."""
    assert stats["interrupted"] >= stats["rounds"] // 4, (backend, stats)
    missing = set(POINTS[backend]) - set(stats["points"])
    assert not missing, f"{backend}: no writer died at {sorted(missing)}: {stats}"


def test_crash_consistency_on_local_disk(tmp_path):
    stats = run_schedule("local", str(tmp_path / "ckpts"), {})
    check_coverage(stats, "local")
    tmp_dir = tmp_path / "ckpts" / ".tmp"
    assert not tmp_dir.exists() or list(tmp_dir.iterdir()) == []


def test_crash_consistency_on_gcs(gcs_server):
    stats = run_schedule("gcs", gcs_server.new_url(), gcs_server.storage_options)
    check_coverage(stats, "gcs")

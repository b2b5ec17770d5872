"""``on_busy="newest"`` (the default): training never waits on the writer.

A save due while the previous one is still writing copies into a second set of
host buffers and is written next; a newer save replaces it until then. These
tests use a real storage whose archive writes sleep or wait on a gate (the
real writer runs afterwards), real Keras models and a real ``fit()``. They
check correctness only: saves return without waiting for a write, no buffer
set is reused while its snapshot is pending or writing, an older step is
never written after a newer one, the final state is always written, and every
replaced or skipped save is logged and counted in the next manifest.
The coordinator's side (ranks agreeing on replaced steps) is in
``tests/test_distributed.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import ConfigError  # noqa: E402
from ckptmgr.io.manifest import SaveStats  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402
from ckptmgr.pipeline import SavePipeline  # noqa: E402


def make_model(width: int = 64) -> keras.Model:
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(width), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def set_marker(model, value: float) -> None:
    for v in model.weights:
        v.assign(np.full(v.shape, value, "float32"))


def marker_of(path) -> float:
    weights = keras.saving.load_model(path, compile=False).get_weights()
    values = {float(w.flat[0]) for w in weights}
    assert len(values) == 1
    return values.pop()


def archive_of(directory, step: int) -> Path:
    found = sorted(Path(directory).glob(f"ckpt-{step:09d}-*.keras"))
    assert found, f"no archive of step {step}"
    return found[0]


class SlowStorage:
    """Every archive write of ``manager`` first sleeps ``delay_s``, or waits for
    :meth:`open` when gated; the real write follows. Records the steps whose
    writes started and the order steps commit in."""

    def __init__(self, manager, monkeypatch, *, delay_s: float = 0.0, gated: bool = False):
        self.started: list[int] = []
        self.commits: list[int] = []
        self.entered = threading.Event()
        self._release = threading.Event()
        if not gated:
            self._release.set()
        storage = manager.storage
        open_writer, write_manifest = storage.open_archive_writer, storage.write_manifest

        @contextmanager
        def slow(name, *args, **kwargs):
            self.started.append(int(name[len("ckpt-"):].split("-")[0]))
            self.entered.set()
            assert self._release.wait(30), "gate never opened"
            time.sleep(delay_s)
            with open_writer(name, *args, **kwargs) as writer:
                yield writer

        def recording(step, data):
            write_manifest(step, data)
            self.commits.append(step)

        monkeypatch.setattr(storage, "open_archive_writer", slow)
        monkeypatch.setattr(storage, "write_manifest", recording)

    def open(self, after_s: float = 0.0) -> None:
        if after_s:
            threading.Timer(after_s, self._release.set).start()
        else:
            self._release.set()


def dropped_warnings(caplog, kind: str) -> list[str]:
    word = "replaced by" if kind == "replaced" else "skipping"
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


# --------------------------------------------------------------------------
# fit() with a slow writer
# --------------------------------------------------------------------------


def test_fit_with_a_slow_writer_blocks_only_for_the_copy(tmp_path, monkeypatch, caplog):
    delay_s, steps = 0.6, 40
    directory = tmp_path / "run"
    mgr = CheckpointManager(directory)
    assert mgr.on_busy == "newest"  # the default
    slow = SlowStorage(mgr, monkeypatch, delay_s=delay_s)
    blocked: list[float] = []
    real_save = mgr.save

    def timed_save(*args, **kwargs):
        started = time.perf_counter()
        result = real_save(*args, **kwargs)
        blocked.append(time.perf_counter() - started)
        return result

    monkeypatch.setattr(mgr, "save", timed_save)
    model = make_model(width=256)
    x = np.random.default_rng(0).normal(size=(steps * 8, 16)).astype("float32")
    y = x[:, :1].copy()
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[CheckpointCallback(mgr, save_freq=1)])
    final = [w.copy() for w in model.get_weights()]

    # The copy alone, measured here on the same plan and buffers.
    copies = []
    for _ in range(7):
        started = time.perf_counter()
        mgr._plan.capture(reuse_buffers=True, buffer_set=0)
        copies.append(time.perf_counter() - started)
    copy_s = statistics.median(copies)

    assert len(blocked) == steps
    # Never waited for a write (each takes >= delay_s); typically near the copy.
    # (The first save may re-plan: Keras builds the optimizer at the first step.)
    assert max(blocked[1:]) < delay_s / 2 and blocked[0] < delay_s, (blocked, copy_s)
    assert statistics.median(blocked) < 10 * copy_s + 0.02, (statistics.median(blocked), copy_s)

    committed = mgr.steps()
    assert slow.commits == sorted(slow.commits) and len(set(slow.commits)) == len(slow.commits)
    assert slow.commits == committed  # strictly increasing in commit order
    assert committed[-1] == steps  # the last step of training is always written
    assert 2 <= len(committed) < steps  # the writer fell behind: saves were replaced
    replaced = dropped_warnings(caplog, "replaced")
    assert len(replaced) == steps - len(committed)  # each logged once
    assert all("save_freq >= " in line for line in replaced)
    manifests = mgr.manifests()
    assert sum(m.stats.replaced for m in manifests) == steps - len(committed)
    assert all(m.stats.skipped == 0 for m in manifests)
    assert all(r.ok for r in mgr.verify())
    stored = keras.saving.load_model(mgr.local_archive_path(steps), compile=False).get_weights()
    for got, want in zip(stored, final):
        np.testing.assert_array_equal(got, want)
    mgr.close()


# --------------------------------------------------------------------------
# The policy, step by step, with the writer held on a gate
# --------------------------------------------------------------------------


def test_pending_save_is_replaced_by_a_newer_one_and_never_written(tmp_path, monkeypatch, caplog):
    directory = tmp_path / "run"
    mgr = CheckpointManager(directory)
    gate = SlowStorage(mgr, monkeypatch, gated=True)
    model = make_model()
    set_marker(model, 1.0)
    first = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    # Write 1 is held: these return at once (they would hang if they waited).
    set_marker(model, 2.0)
    second = mgr.save(2, model, blocking=False)
    set_marker(model, 3.0)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        third = mgr.save(3, model, blocking=False)
    set_marker(model, 4.0)  # training goes on: must not reach any snapshot
    assert second.result(timeout=5) is None  # replaced, not an error
    assert not first.done() and not third.done()
    lines = dropped_warnings(caplog, "replaced")
    assert len(lines) == 1 and lines[0].startswith("step 2 replaced by step 3")
    assert "step 1 still writing" in lines[0]
    gate.open()
    assert mgr.wait_until_finished().step == 3  # the pending one is written first
    assert first.result().step == 1 and third.result().step == 3
    assert gate.started == [1, 3] and gate.commits == [1, 3] == mgr.steps()
    assert marker_of(archive_of(directory, 1)) == 1.0  # set 0, not reused while writing
    assert marker_of(archive_of(directory, 3)) == 3.0  # set 1, copied over pending step 2
    assert not list(Path(directory).glob("ckpt-000000002*"))
    assert mgr.manifest(3).stats.replaced == 1 and mgr.manifest(1).stats.replaced == 0
    mgr.close()


def test_close_writes_the_pending_snapshot(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "run")
    gate = SlowStorage(mgr, monkeypatch, gated=True)
    model = make_model()
    mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    pending = mgr.save(2, model, blocking=False)
    gate.open(after_s=0.2)
    mgr.close()
    assert pending.done() and pending.result().step == 2
    assert mgr.steps() == [1, 2]


def test_a_blocking_save_replaces_the_pending_one_and_is_written(tmp_path, monkeypatch):
    """The emergency save is blocking: it waits for the write in progress,
    takes the pending one's place, and nothing can replace it."""
    directory = tmp_path / "run"
    mgr = CheckpointManager(directory)
    gate = SlowStorage(mgr, monkeypatch, gated=True)
    model = make_model()
    set_marker(model, 1.0)
    mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    set_marker(model, 2.0)
    pending = mgr.save(2, model, blocking=False)
    set_marker(model, 3.0)
    gate.open(after_s=0.3)
    manifest = mgr.save(3, model, extra={"emergency": True})  # blocking
    assert manifest.step == 3 and manifest.extra == {"emergency": True}
    assert pending.result(timeout=5) is None
    assert gate.commits == [1, 3] == mgr.steps()
    assert marker_of(archive_of(directory, 3)) == 3.0
    mgr.close()


def test_callback_emergency_save_is_written_while_a_save_is_pending(tmp_path, monkeypatch):
    """SIGTERM mid-fit with a slow writer: the emergency step is committed
    (after the write in progress), training stops, nothing older follows it."""
    from ckptmgr import preemption

    mgr = CheckpointManager(tmp_path / "run")
    slow = SlowStorage(mgr, monkeypatch, delay_s=0.3)
    model = make_model()
    x = np.zeros((160, 16), "float32")
    y = np.zeros((160, 1), "float32")

    class Preempt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                preemption.request_preemption()

    callback = CheckpointCallback(mgr, save_freq=1)
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Preempt(), callback])
    finally:
        preemption.clear_preemption()
    assert callback.preempted
    emergency = [m for m in mgr.manifests() if m.extra.get("emergency")]
    assert [m.step for m in emergency] == [6]  # the step of the batch that saw the signal
    assert slow.commits == sorted(slow.commits) and slow.commits[-1] == 6
    mgr.close()


def test_an_older_step_is_never_written_after_a_newer_one(tmp_path):
    """A step that arrives after a newer one was queued (a coordinator's
    parts can complete out of order) is replaced at once."""
    pipeline = SavePipeline("newest")
    release, order = threading.Event(), []

    def job(step):
        def run():
            release.wait(10)
            order.append(step)
            return step
        return run

    five = pipeline.submit(5, job(5))
    seven = pipeline.submit(7, job(7))
    six = pipeline.submit(6, job(6), replaced=lambda by: ("replaced", by))
    assert six.result(timeout=1) == ("replaced", 7)
    release.set()
    assert pipeline.wait_until_finished() == 7
    assert five.result() == 5 and seven.result() == 7 and order == [5, 7]
    assert pipeline.take_counts() == {"replaced": 1, "skipped": 0}


def test_buffer_sets_are_never_handed_out_while_held():
    pipeline = SavePipeline("newest", buffer_sets=2)
    release = threading.Event()
    first = pipeline.admit(1)
    assert first.buffer_set == 0
    running = pipeline.submit(1, lambda: release.wait(10), ticket=first)
    second = pipeline.admit(2)
    assert second.buffer_set == 1  # set 0 is being written
    pending = pipeline.submit(2, lambda: "two", ticket=second, replaced=lambda by: f"replaced by {by}")
    third = pipeline.admit(3)
    assert third.buffer_set == 1  # the pending save's set: it is replaced before the copy
    assert pending.result(timeout=1) == "replaced by 3"
    pipeline.submit(3, lambda: "three", ticket=third)
    release.set()
    assert pipeline.wait_until_finished() == "three"
    assert running.result() is True


def test_prepare_allocates_both_buffer_sets(tmp_path):
    model = make_model()
    newest = CheckpointManager(tmp_path / "a")
    newest.prepare(model)
    arrays = sum(len(g.values) for g in newest._plan.groups)
    assert {key[0] for key in newest._plan._buffers} == {0, 1}
    assert len(newest._plan._buffers) == 2 * arrays
    waiting = CheckpointManager(tmp_path / "b", on_busy="wait")
    waiting.prepare(model)
    assert {key[0] for key in waiting._plan._buffers} == {0}


# --------------------------------------------------------------------------
# "skip" and "wait" stay available
# --------------------------------------------------------------------------


def test_skipped_saves_are_logged_with_the_keep_up_hint_and_counted(tmp_path, monkeypatch, caplog):
    mgr = CheckpointManager(tmp_path / "run", on_busy="skip")
    gate = SlowStorage(mgr, monkeypatch, gated=True)
    model = make_model()
    mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.save(2, model, blocking=False) is None
        assert mgr.save(3, model, blocking=False) is None
    lines = dropped_warnings(caplog, "skipped")
    assert len(lines) == 2 and lines[0].startswith("skipping the save of step 2")
    assert "save_freq >= " in lines[1] and "at least" in lines[1]  # no write finished yet
    gate.open()
    assert mgr.wait_until_finished().step == 1
    manifest = mgr.save(4, model)
    assert (manifest.stats.skipped, manifest.stats.replaced) == (2, 0)
    assert mgr.steps() == [1, 4]
    mgr.close()


def test_wait_policy_writes_every_save(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "run", on_busy="wait")
    slow = SlowStorage(mgr, monkeypatch, delay_s=0.1)
    model = make_model()
    for step in (1, 2, 3):
        mgr.save(step, model, blocking=False)
    mgr.close()
    assert slow.commits == [1, 2, 3] == mgr.steps()
    assert all(m.stats.replaced == m.stats.skipped == 0 for m in mgr.manifests())


def test_on_busy_is_checked_and_old_stats_still_parse():
    with pytest.raises(ConfigError, match="'newest'"):
        SavePipeline("later")
    old = SaveStats.model_validate({"bytes": 10, "blocked_s": 0.1, "write_s": 0.2, "mb_per_s": 1.0})
    assert (old.replaced, old.skipped) == (0, 0)


def test_a_sticky_save_replaces_pending_ones_but_is_never_replaced():
    """The coordinator's emergency step: newest wins up to it, then it stays."""
    pipeline = SavePipeline("newest")
    release = threading.Event()
    pipeline.submit(1, lambda: release.wait(10))
    two = pipeline.submit(2, lambda: 2, replaced=lambda by: f"replaced by {by}")
    three = pipeline.submit(3, lambda: 3, sticky=True)
    four = pipeline.submit(4, lambda: 4)
    assert two.result(timeout=1) == "replaced by 3"
    release.set()
    assert pipeline.wait_until_finished() == 4
    assert three.result() == 3 and four.result() == 4

"""One directory, one run's history (issue 9, items 1 and 3).

After a fallback to step S the steps newer than S are an abandoned future:
they are moved to ``superseded/`` before training writes those steps again.
A fresh run over another run's checkpoints is refused unless ``new_run``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import tensorflow as tf  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.errors import ConfigError  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402
from test_exact_resume import BATCH, EPOCHS, SAMPLES, _data, _fit, _model, _state  # noqa: E402
from writer_worker import snapshot  # noqa: E402

TOTAL = EPOCHS * SAMPLES // BATCH  # 18 steps


@pytest.fixture(autouse=True)
def _determinism():
    tf.config.experimental.enable_op_determinism()


def _flip_archive_byte(manager: CheckpointManager, step: int) -> str:
    path = manager.local_archive_path(step)
    with open(path, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


def _edit_manifest_digit(directory, step: int) -> None:
    path = directory / f"ckpt-{step:09d}.json"
    body = json.loads(path.read_text())
    body["loop"]["next_batch"] += 1  # a bit flip the checksum must catch
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("damage", ["archive", "manifest"])
def test_fallback_then_training_passes_the_abandoned_steps(tmp_path, damage, caplog):
    """Issue 9: after falling back from a corrupt step 8 to step 4, resumed
    training crashed with CheckpointExistsError at step 8 (or kept the corrupt
    one). Now step 8 is moved aside, written afresh, and the run ends exactly
    like an uninterrupted one."""
    import logging

    reference, _, _ = _fit(tmp_path / "reference", 4)
    run = tmp_path / "run"
    _fit(run, 4, interrupt_at=11)
    manager = CheckpointManager(run)
    assert manager.steps() == [4, 8]
    if damage == "archive":
        old_archive = _flip_archive_byte(manager, 8)
    else:
        old_archive = manager.local_archive_path(8)
        _edit_manifest_digit(run, 8)

    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        resumed, callback, history = _fit(run, 4)

    assert history is not None and callback.restored_step == 4
    assert manager.steps() == [4, 8, 12, 16, TOTAL]
    assert all(r.ok for r in manager.verify()), manager.verify()  # no orphan reported either
    assert manager.local_archive_path(8) != old_archive
    superseded = manager.superseded()
    assert [s.step for s in superseded] == [8]
    assert superseded[0].reason == "training resumed from step 4"
    assert superseded[0].archive == old_archive.rsplit("/", 1)[-1]
    assert (run / superseded[0].archive).exists()  # kept, never overwritten
    assert any("fell back from step 8 to step 4" in r.getMessage() for r in caplog.records)
    assert any("moved to" in r.getMessage() and "superseded" in r.getMessage() for r in caplog.records)
    for ref, got in zip(_state(reference), _state(resumed), strict=True):
        np.testing.assert_array_equal(ref, got)

    # The superseded archive survives sweeping; only an explicit delete removes it.
    manager.sweep(older_than_s=0)
    assert (run / superseded[0].archive).exists()
    deleted = manager.delete_superseded()
    assert [d.step for d in deleted] == [8]
    assert not (run / superseded[0].archive).exists()
    assert manager.superseded() == [] and all(r.ok for r in manager.verify())


def test_crash_after_a_fallback_resumes_the_new_history(tmp_path):
    """The abandoned future is moved aside at train begin, not when training
    reaches it: a crash before then must not resume from the abandoned step."""
    run = tmp_path / "run"
    _fit(run, 4, interrupt_at=13)
    manager = CheckpointManager(run)
    assert manager.steps() == [4, 8, 12]
    _flip_archive_byte(manager, 12)
    manager.pin(8)
    _fit(run, 4, interrupt_at=2)  # falls back to step 8, crashes after 2 batches
    assert manager.steps() == [4, 8] and [s.step for s in manager.superseded()] == [12]
    _, callback, history = _fit(run, 4)
    assert callback.restored_step == 8 and history is not None
    assert 8 in manager.storage.pinned_steps()  # the step resumed from keeps its pin


def _fresh_fit(directory, **options):
    model = _model()
    x, y = _data()
    callback = CheckpointCallback(directory, save_freq=4, **options)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    return callback


def test_fresh_run_over_old_checkpoints_is_refused(tmp_path):
    """Issue 9: restore=False into a directory holding another run's steps had
    each new save pruned at once (keep_last) or crashed later."""
    run = tmp_path / "run"
    _fit(run, 4)
    manager = CheckpointManager(run)
    before = {s: manager.manifest(s) for s in manager.steps()}
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: step 18\) and restore=False"):
        _fresh_fit(run, restore=False, keep_last=3)
    assert {s: manager.manifest(s) for s in manager.steps()} == before


def test_new_run_moves_the_old_history_aside(tmp_path):
    run = tmp_path / "run"
    _fit(run, 4)
    manager = CheckpointManager(run)
    old = {s: manager.manifest(s).archive for s in manager.steps()}
    _fresh_fit(run, restore=False, new_run=True, keep_last=3)
    assert manager.steps() == [4, 6]  # one epoch of 6 batches: step 4 and the final save
    assert {s.step: s.archive for s in manager.superseded()} == old
    assert all((run / name).exists() for name in old.values())
    assert all(r.ok for r in manager.verify())


def test_a_reused_callback_continues_its_own_run_without_restoring(tmp_path):
    """restore=False refuses only *another* run's checkpoints: a second fit()
    with the same callback continues its own history."""
    model = _model()
    x, y = _data()
    callback = CheckpointCallback(tmp_path / "run", save_freq=4, restore=False)
    for _ in range(2):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    manager = CheckpointManager(tmp_path / "run")
    assert manager.steps() == [4, 6, 8, 12] and manager.superseded() == []


def test_supersede_on_every_backend(backend):
    """The storage side of superseding: create-only record, uncommit, archive
    kept by sweeps and not an orphan, the step writable again, idempotent."""
    manager = CheckpointManager(backend.url, storage_options=backend.storage_options)
    first = {s: manager.write_snapshot(s, snapshot(s)).archive for s in (1, 2, 3)}
    manager.pin(3)
    assert manager.supersede_after(1, "test") == [2, 3]
    assert manager.supersede_after(1, "test") == []  # nothing left to move
    assert manager.steps() == [1]
    assert manager.storage.pinned_steps() == set()
    listed = manager.superseded()
    assert [(s.step, s.archive, s.reason) for s in listed] == [(2, first[2], "test"), (3, first[3], "test")]
    assert manager.sweep(older_than_s=0) == []
    assert manager.leftovers(older_than_s=0) == []
    second = manager.write_snapshot(2, snapshot(2))
    assert second.archive != first[2]
    assert [r.step for r in manager.verify() if not r.ok] == []
    assert {a.step for a in manager.storage.archives()} == {1, 2, 3}
    manager.delete_superseded()
    assert manager.superseded() == []
    assert sorted(a.step for a in manager.storage.archives()) == [1, 2]
    assert manager.steps() == [1, 2] and all(r.ok for r in manager.verify())


def test_supersede_is_fenced(tmp_path):
    """Only the lease holder moves steps aside."""
    from ckptmgr.errors import WriterFencedError

    old = CheckpointManager(tmp_path / "run")
    for step in (1, 2):
        old.write_snapshot(step, snapshot(step))
    CheckpointManager(tmp_path / "run").claim()
    with pytest.raises(WriterFencedError):
        old.supersede_after(1, "zombie")
    assert old.steps() == [1, 2]


def test_cli_lists_and_prunes_superseded_steps(tmp_path):
    from test_cli import cli

    url = str(tmp_path / "run")
    manager = CheckpointManager(url)
    for step in (1, 2, 3):
        manager.write_snapshot(step, snapshot(step))
    manager.supersede_after(1, "training resumed from step 1")

    listed = cli("list", url)
    assert listed.returncode == 0, listed.stderr
    assert "superseded" in listed.stdout
    assert "step 2 (training resumed from step 1; moved aside" in listed.stdout
    assert json.loads(cli("list", url, "--json").stdout)[0]["step"] == 1  # JSON: the live history

    dry = cli("prune", url, "--superseded", "--dry-run")
    assert dry.returncode == 0 and "would delete superseded step 3" in dry.stdout
    assert len(manager.superseded()) == 2
    done = cli("prune", url, "--superseded")
    assert done.returncode == 0 and "delete superseded step 2" in done.stdout
    assert manager.superseded() == [] and manager.steps() == [1]
    assert [a.step for a in manager.storage.archives()] == [1]


def test_pruning_a_step_written_afresh_keeps_the_superseded_archive_of_that_step(tmp_path):
    """Review finding: retention deleted every archive of a pruned step number,
    the superseded attempt's included, while list still showed it."""
    from ckptmgr.retention import RetentionPolicy

    manager = CheckpointManager(tmp_path / "run")
    old = {s: manager.write_snapshot(s, snapshot(s)).archive for s in (1, 2, 3)}
    manager.supersede_after(1, "test")
    for step in (2, 3, 4):
        manager.write_snapshot(step, snapshot(step))
    report = manager.prune(retention=RetentionPolicy.from_options(keep_last=1))
    assert report.deleted == (1, 2, 3)
    assert {s.step: s.archive for s in manager.superseded()} == {2: old[2], 3: old[3]}
    assert all((tmp_path / "run" / old[s]).exists() for s in (2, 3))
    assert not (tmp_path / "run" / old[1]).exists()
    assert manager.verify() and all(r.ok for r in manager.verify())


def test_an_unparseable_manifest_moved_aside_twice_makes_one_record(tmp_path):
    """Review finding: a random tag for an unparseable manifest meant a retry
    after a crash (record made, manifest not yet removed) added a second record."""
    manager = CheckpointManager(tmp_path / "run")
    for step in (1, 2):
        manager.write_snapshot(step, snapshot(step))
    (tmp_path / "run" / "ckpt-000000002.json").write_bytes(b"\x00garbage, not JSON")
    from ckptmgr.history import _record

    raw = (tmp_path / "run" / "ckpt-000000002.json").read_bytes()
    tag, _ = _record(2, raw, "x")
    manager.storage.supersede(2, tag, b"{}")  # the crashed attempt's record...
    (tmp_path / "run" / "ckpt-000000002.json").write_bytes(raw)  # ...and its manifest still there
    assert manager.supersede_after(1, "retry") == [2]
    assert [(s.step, s.tag) for s in manager.superseded()] == [(2, tag)]
    assert manager.steps() == [1]


def test_a_restarted_run_fences_the_old_writer_before_reading_where_to_continue(tmp_path):
    """Found trying two processes on one directory: the new run read the newest
    step, then claimed the lease; the old writer's commits in between became
    part of the new run's history. Now nothing the old writer commits after
    the new run looked is accepted."""
    from ckptmgr.errors import WriterFencedError

    zombie_model = _model()
    old = CheckpointManager(tmp_path / "run")
    for step in (2, 4):
        old.save(step, zombie_model)
    callback = CheckpointCallback(tmp_path / "run", save_freq=4)
    real_restore = callback.manager.restore
    attempts = []

    def restore_while_the_old_writer_saves(model, step=None):
        try:
            old.save(6, zombie_model)  # the old writer's next save, mid-restore
            attempts.append("committed")
        except WriterFencedError:
            attempts.append("fenced")
        return real_restore(model, step)

    callback.manager.restore = restore_while_the_old_writer_saves
    model = _model()
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    assert attempts == ["fenced"]
    assert callback.restored_step == 4
    assert 6 not in [m.step for m in CheckpointManager(tmp_path / "run").manifests() if m.writer.token == 1]

"""SIGKILL a saving process at several points; only complete checkpoints are seen.

Each case runs ``crash_worker.py`` in a subprocess that commits steps 1 and 2,
then dies (SIGKILL, no cleanup) at a named point while saving step 3. The
parent then checks listing, verification, restore and the storage tree, and
that a new save of step 3 succeeds after the leftovers are swept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from ckptmgr import CheckpointManager

WORKER = Path(__file__).with_name("crash_worker.py")

# (crash point, keep_last, steps listed afterwards, is an orphan left behind?)
CASES = {
    "archive_mid_stream": (0, [1, 2], None),
    "archive_before_fsync": (0, [1, 2], None),
    "before_manifest": (0, [1, 2], True),
    "manifest_before_rename": (0, [1, 2], True),
    # keep_last=1: step 3 commits, then pruning dies after removing step 2's manifest.
    "delete_after_manifest": (1, [3], True),
}


def _run_until_killed(url: str, options: dict, keep_last: int, point: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, str(WORKER), url, json.dumps(options), str(keep_last), point],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return proc.stdout


def _fresh_model():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512), keras.layers.Dense(256), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _check_after_crash(manager: CheckpointManager, point: str) -> None:
    keep_last, listed, orphan = CASES[point]
    assert manager.steps() == listed
    results = manager.verify()
    assert all(r.ok for r in results if r.step in listed), results
    # Anything else verify reports is an orphan, named as such.
    assert all("orphan archive" in r.problem for r in results if r.step not in listed), results
    restored = manager.restore(_fresh_model())
    assert restored.step == listed[-1]
    if 3 not in listed:  # the interrupted step is free: write it again
        manager.save(3, _fresh_model())
        assert manager.steps() == [1, 2, 3]
        assert manager.verify(3)[0].ok
    # Leftovers are never listed; once older than the newest manifest they go.
    if orphan:
        assert manager.leftovers(older_than_s=0), f"{point}: expected an unlisted leftover"
    manager.sweep(older_than_s=0)
    assert manager.leftovers(older_than_s=0) == []
    assert all(r.ok for r in manager.verify()), manager.verify()


@pytest.mark.parametrize("point", list(CASES))
def test_sigkill_on_local_disk(tmp_path, point):
    url = str(tmp_path / "ckpts")
    out = _run_until_killed(url, {}, CASES[point][0], point)
    assert "saved 2" in out and "saved 3" not in out
    manager = CheckpointManager(url)
    _check_after_crash(manager, point)
    tmp_dir = Path(url) / ".tmp"
    assert not tmp_dir.exists() or list(tmp_dir.iterdir()) == []


@pytest.mark.parametrize("point", ["archive_mid_stream", "before_manifest", "delete_after_manifest"])
def test_sigkill_on_gcs(gcs_server, point):
    url = gcs_server.new_url()
    options = gcs_server.storage_options
    _run_until_killed(url, options, CASES[point][0], point)
    _check_after_crash(CheckpointManager(url, storage_options=options), point)

"""Two writers on one directory (issue 8): a zombie after a preemption, or
the same job launched twice. Real processes on local disk, fake-gcs-server
and moto.

What must hold: every listed checkpoint verifies; a committed checkpoint is
never modified (each step's manifest and archive stay those of the first
commit); the older writer is fenced with the documented one-line error; the
newer writer never fails, whatever the older one or a concurrent prune does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.errors import WriterFencedError
from writer_worker import snapshot

WORKER = Path(__file__).with_name("writer_worker.py")
REPO = Path(__file__).resolve().parents[1]


def start_writer(url: str, options: dict, steps: list[int], pause: float = 0.0, keep_last: int = 0):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, str(WORKER), url, json.dumps(options), json.dumps(steps), str(pause), str(keep_last)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def saves_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_for_steps(manager: CheckpointManager, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(manager.steps()) < count:
        assert time.monotonic() < deadline, "first writer made no progress"
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["local", "gcs", "s3"], indirect=True)
def test_second_writer_fences_the_first_and_nothing_committed_changes(backend):
    """A (the zombie) saves 1..40 slowly; B (the restarted job) starts once A
    committed a few steps and saves the same steps 3..12 and its own 100..104."""
    url, options = backend.url, backend.storage_options
    observer = CheckpointManager(url, storage_options=options)
    a = start_writer(url, options, list(range(1, 41)), pause=0.1)
    wait_for_steps(observer, 3)
    b = start_writer(url, options, list(range(3, 13)) + list(range(100, 105)))
    b_out, b_err = b.communicate(timeout=180)
    a_out, a_err = a.communicate(timeout=180)

    assert b.returncode == 0, b_out + b_err  # the live writer never fails
    assert a.returncode == 3, a_out + a_err  # the zombie is fenced...
    fenced = a_out.strip().splitlines()[-1]
    assert fenced.startswith("FENCED Not ") and "taken over by lease 2" in fenced, fenced
    assert "\n" not in fenced  # ...with one line that names the new holder
    assert len(saves_of(a_out)) < 40  # it stopped at its first commit after the takeover

    committed = {}  # step -> the first commit that claimed it
    for save in saves_of(a_out) + saves_of(b_out):
        if save["mine"]:
            assert save["step"] not in committed, f"step {save['step']} committed twice"
            committed[save["step"]] = save
    steps = observer.steps()
    assert set(steps) == set(committed)
    assert set(range(100, 105)) <= set(steps) and set(range(3, 13)) <= set(steps)
    for step in steps:
        manifest = observer.manifest(step)
        assert (manifest.attempt, manifest.archive_entry.crc32c) == (
            committed[step]["attempt"], committed[step]["crc32c"]
        ), f"step {step} was modified after its commit"
    results = observer.verify()
    assert all(r.ok for r in results if r.step in steps), results
    # B, when it found a step A had committed, kept A's checkpoint.
    kept = [s for s in saves_of(b_out) if not s["mine"]]
    assert all(committed[s["step"]]["attempt"] == s["attempt"] for s in kept)


def test_fenced_writer_never_deletes(tmp_path):
    """A fenced writer with retention does not prune: the live writer's
    checkpoints are not its to delete."""
    url = str(tmp_path / "run")
    zombie = CheckpointManager(url, keep_last=1)
    live = CheckpointManager(url, keep_last=10)
    _save(zombie, 1)
    _save(live, 2)
    _save(live, 3)
    with pytest.raises(WriterFencedError) as info:
        _save(zombie, 4)
    assert "taken over by lease 2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WriterFencedError):
        zombie.prune()
    assert live.steps() == [1, 2, 3]
    _save(live, 5)  # the live writer is untouched by all this
    assert live.steps() == [1, 2, 3, 5]


@pytest.mark.parametrize("backend", ["local", "gcs", "s3"], indirect=True)
def test_concurrent_prune_never_fails_a_save(backend):
    """A second process pruning hard (keep_last=1) while the writer saves with
    its own retention: every save returns its manifest; nothing partial lists."""
    url, options = backend.url, backend.storage_options
    pruner = CheckpointManager(url, storage_options=options, keep_last=1, sweep_grace_s=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def prune_loop():
        while not stop.is_set():
            try:
                pruner.prune()
            except Exception as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)

    thread = threading.Thread(target=prune_loop)
    writer = start_writer(url, options, list(range(1, 31)), keep_last=2)
    thread.start()
    try:
        out, err = writer.communicate(timeout=180)
    finally:
        stop.set()
        thread.join()
    assert writer.returncode == 0, out + err
    assert len(saves_of(out)) == 30
    assert 30 in pruner.steps()
    assert all(r.ok for r in pruner.verify() if r.step in pruner.steps())
    assert not errors, errors


def _save(manager: CheckpointManager, step: int):
    return manager.write_snapshot(step, snapshot(step))


def test_cli_lease_names_the_holder(tmp_path):
    url = str(tmp_path / "run")
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "ckptmgr.cli", "lease", url], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120,
    )
    os.makedirs(url)
    assert run().stdout.strip() == f"no writer has claimed {url}"
    manager = CheckpointManager(url)
    manager.claim()
    CheckpointManager(url).claim()
    out = run().stdout.strip()
    assert out.startswith("lease 2 held by ") and f":{os.getpid()} since " in out

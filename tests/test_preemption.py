"""SIGTERM as a preemption notice that never swallows the signal (issue 11,
items 3 and 6): the emergency checkpoint is taken, then the handler that was
there before fit() runs (or the default action ends the process), and a
preempted run never exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class SigtermAt(keras.callbacks.Callback):
    """Send this process SIGTERM after ``batch`` batches (a preemption notice)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.seen = batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_a_handler_installed_before_fit_runs_after_the_emergency_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    calls = []

    def users_handler(signum, frame):
        calls.append((signum, CheckpointManager(directory).latest_step()))

    before = signal.signal(signal.SIGTERM, users_handler)
    try:
        callback = CheckpointCallback(directory, save_freq=100)
        model = _model()
        model.fit(np.ones((64, 4)), np.ones((64, 1)), batch_size=4, epochs=3, verbose=0,
                  callbacks=[callback, SigtermAt(5)])
        assert callback.preempted
        manager = CheckpointManager(directory)
        emergency = manager.manifest()
        # The notice came after batch 5 (SigtermAt runs after the callback): saved at 6.
        assert emergency.extra.get("emergency") is True and emergency.step == 6
        # Called once, after the emergency checkpoint was committed.
        assert calls == [(signal.SIGTERM, 6)]
        assert signal.getsignal(signal.SIGTERM) is users_handler  # put back at train end
    finally:
        signal.signal(signal.SIGTERM, before)


def test_without_a_handler_the_default_action_ends_the_process_after_the_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from test_preemption import SigtermAt, _model
        from ckptmgr.keras import CheckpointCallback
        model = _model()
        model.fit(np.ones((64, 4)), np.ones((64, 1)), batch_size=4, epochs=3, verbose=0,
                  callbacks=[CheckpointCallback({str(tmp_path / "ck")!r}, save_freq=100), SigtermAt(5)])
        print("fit returned: the signal was swallowed", flush=True)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "swallowed" not in proc.stdout
    manifest = CheckpointManager(tmp_path / "ck").manifest()
    assert manifest.step == 6 and manifest.extra.get("emergency") is True


def _cli(*args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, "-m", "ckptmgr.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_preempted_cli_run_exits_75_says_so_in_json_and_resume_finishes_it(tmp_path):
    import time

    directory = tmp_path / "ck"
    sets = ["--set", f"checkpoint.directory={directory}", "--set", "checkpoint.save_freq=4",
            "--set", "training.epochs=400", "--set", "training.samples=64"]
    run = _cli("run", "configs/local.yaml", "--no-ray", "--json", *sets)
    manager = CheckpointManager(directory)
    deadline = time.monotonic() + 120
    while manager.latest_step() is None and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 75, (out, err[-2000:])
    stopped = manager.manifest()
    assert stopped.extra.get("emergency") is True
    report = json.loads(out.strip().splitlines()[-1])  # --json: one object, what happened
    assert report == {"resumed_from": None, "final_step": stopped.step, "restarts": 0, "preempted": True,
                      "final_loss": report["final_loss"], "directory": str(directory), "exit_status": 75,
                      "nothing_to_do": False}
    # One batch per epoch: two more epochs than the emergency checkpoint completed.
    resume = _cli("resume", "configs/local.yaml", "--no-ray", *sets[:-4],
                  "--set", f"training.epochs={stopped.step + 2}",
                  "--set", "training.samples=64")
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, (out, err[-2000:])
    assert f"resumed from step {stopped.step}" in out and "stopped by preemption" not in out


def test_a_lost_node_is_status_75_not_1(monkeypatch, capsys):
    from ckptmgr import cli
    from ckptmgr.errors import JobStoppedError

    def lost(*args, **kwargs):
        raise JobStoppedError("The job stopped: worker rank 1 failed (ActorDiedError: node lost).")

    from ckptmgr import cli_run

    monkeypatch.setattr(cli_run, "run_job", lost)
    assert cli.main(["run", "configs/local.yaml"]) == 75
    assert capsys.readouterr().err.strip() == "error: The job stopped: worker rank 1 failed (ActorDiedError: node lost)."


def test_a_run_fenced_by_a_newer_launch_is_status_1_not_75(monkeypatch, capsys):
    """75 tells a supervisor to start the job again: a fenced one restarted
    would fence the newer launch back."""
    from ckptmgr import cli, cli_run
    from ckptmgr.errors import WriterFencedError

    def fenced(*args, **kwargs):
        raise WriterFencedError("Not saving step 8: ./checkpoints was taken over by lease 2; "
                                "this writer (1, vm:1) is fenced and stops.")

    monkeypatch.setattr(cli_run, "run_job", fenced)
    assert cli.main(["run", "configs/local.yaml"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: Not saving step 8: ./checkpoints was taken over")


def test_a_null_ray_address_starts_a_local_cluster_never_a_stale_one(monkeypatch):
    """ray.init() with no address joins the cluster /tmp/ray/ray_current_cluster
    names; a stale file (a cluster killed earlier) made `ckptmgr run` wait
    for minutes. null must mean a new local cluster, as configs/local.yaml says."""
    import ray

    from ckptmgr import ray_job
    from ckptmgr.config import apply_overrides, load_config

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(address=None, **kwargs):
        seen["address"] = address
        raise Stop()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    cfg = apply_overrides(load_config(REPO / "configs" / "local.yaml"), [])
    assert cfg.ray.address is None
    with pytest.raises(Stop):
        ray_job.run_on_ray(cfg, resume=False)
    assert seen["address"] == "local"


@pytest.mark.parametrize("as_json", [False, True])
def test_the_summary_of_a_preempted_run_never_says_it_finished(monkeypatch, capsys, as_json):
    from ckptmgr import cli, job

    def preempted(cfg, *, resume):
        return job.JobResult(final_step=7, restored_step=4, epochs=3, final_loss=0.5,
                             directory="/ck", preempted=True)

    monkeypatch.setattr(job, "run_local", preempted)
    assert cli.main(["run", "configs/local.yaml", "--no-ray", *(["--json"] if as_json else [])]) == 75
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out)["resumed_from"] == {"step": 4, "tier": "storage"}
    else:
        assert "stopped by preemption in this process at step 7" in out and "trained" not in out


def test_a_handler_not_installed_from_python_is_replaced_by_the_default(monkeypatch):
    """Review finding: getsignal() returns None for a handler installed outside
    Python, and signal.signal(SIGTERM, None) raised TypeError in on_train_end."""
    from ckptmgr import preemption

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(preemption.signal, "getsignal", lambda signum: None)
    guard = preemption.SigtermGuard()
    try:
        assert guard.install()
        guard.release()
        assert before is not None
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_max_restarts_flag_sets_the_restart_budget_of_the_run(monkeypatch, tmp_path, capsys):
    """`ckptmgr run --max-restarts N` is ray.max_restarts (issue 11, item 5);
    a negative count is a usage error."""
    from ckptmgr import cli, ray_job

    seen = {}

    def fake_run_on_ray(cfg, *, resume, **options):
        seen["max_restarts"] = cfg.ray.max_restarts
        raise ray_job.JobStoppedError("The job stopped: stop here (test).")

    monkeypatch.setattr(ray_job, "run_on_ray", fake_run_on_ray)
    sets = ["--set", f"checkpoint.directory={tmp_path / 'ck'}"]
    assert cli.main(["run", "configs/local.yaml", "--max-restarts", "3", *sets]) == 75
    assert seen == {"max_restarts": 3}
    assert cli.main(["run", "configs/local.yaml", "--max-restarts", "-1", *sets]) == 2
    assert "--max-restarts" in capsys.readouterr().err


def test_verbose_streams_the_workers_logs_to_the_driver(monkeypatch, tmp_path):
    """Issue 12: `ckptmgr run` hid the workers' output (log_to_driver=False)
    even with --debug; --verbose asks Ray to stream it."""
    import ray

    from ckptmgr import cli

    seen = []

    class Stop(Exception):
        pass

    def fake_init(address=None, **kwargs):
        seen.append(kwargs.get("log_to_driver"))
        raise Stop()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    sets = ["--set", f"checkpoint.directory={tmp_path / 'ck'}"]
    for flags in (["--verbose"], []):
        with pytest.raises(Stop):
            cli.main(["--debug", "run", "configs/local.yaml", *flags, *sets])
    assert seen == [True, False]

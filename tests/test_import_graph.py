"""What each side imports: the coordinator never imports TensorFlow or Keras,
and the CLI's list/inspect/verify/prune do not either (issue 12).

Each check runs in a fresh interpreter of this venv, which has TensorFlow and
Keras installed, so an import anywhere on the path shows up in
``sys.modules``. A recorder on ``sys.meta_path`` notes the ckptmgr frames that
first asked for a forbidden module, so a failure names the import chain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("tensorflow", "keras", "jax", "torch")

# Prepended to each child script: records who imports a forbidden module first.
RECORDER = textwrap.dedent(
    f"""
    import importlib.abc, sys, traceback, json, atexit
    FORBIDDEN = {FORBIDDEN!r}
    chains = {{}}

    class Recorder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in FORBIDDEN and top not in chains:
                frames = traceback.extract_stack()[:-1]
                chains[top] = [f"{{f.filename.split('site-packages/')[-1]}}:{{f.lineno}} {{f.line}}"
                               for f in frames if "ckptmgr" in f.filename or "<string>" in f.filename]
            return None

    sys.meta_path.insert(0, Recorder())

    def report():
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(FORBIDDEN))
        print("IMPORTED=" + json.dumps({{"loaded": loaded, "chains": chains}}), file=sys.stderr)

    atexit.register(report)
    """
)


def run_child(body: str, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="200")
    env.pop("KERAS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", RECORDER + textwrap.dedent(body), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("IMPORTED=")]
    assert lines, f"the child did not report (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1][len("IMPORTED="):])


def explain(imported: dict) -> str:
    return "\n".join(f"{name} imported via:\n  " + "\n  ".join(chain)
                     for name, chain in imported["chains"].items() if name in imported["loaded"])


COORDINATOR_SIDE = """
    import importlib, importlib.util, json, pkgutil, sys
    import numpy as np

    # What a coordinator process loads: the actor's module, the Ray-side
    # package, and the modules its writes, restores and retention call.
    import ckptmgr.coordinator
    if importlib.util.find_spec("ckptmgr.ray") is not None:
        import ckptmgr.ray
        for info in pkgutil.iter_modules(ckptmgr.ray.__path__):
            importlib.import_module(f"ckptmgr.ray.{info.name}")
    import ckptmgr.io
    for info in pkgutil.iter_modules(ckptmgr.io.__path__):
        importlib.import_module(f"ckptmgr.io.{info.name}")
    for name in ("agreement", "cadence", "commit", "history", "integrity", "manager", "pipeline",
                 "pruning", "ranged_write", "replicas", "retention", "errors", "config"):
        importlib.import_module(f"ckptmgr.{name}")

    # The coordinator's own work, on a snapshot of plain arrays: stream an
    # archive, commit, list, verify, prune.
    from ckptmgr.manager import CheckpointManager
    from ckptmgr.io.snapshot import ModelSnapshot, VarGroup

    config = {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": []},
              "registered_name": None}
    snapshot = ModelSnapshot(
        config_json=json.dumps(config),
        metadata_json=json.dumps({"keras_version": "3.15.1", "date_saved": "2026-12-01@00:00:00"}),
        groups=[VarGroup("layers/dense/vars", {"name": "dense"},
                         [("0", np.ones((4, 3), np.float32)), ("1", np.zeros(3, np.float32))])],
    )
    manager = CheckpointManager(sys.argv[1], keep_last=1)
    for step in (1, 2):
        manager.write_snapshot(step, snapshot, metrics={"loss": 1.0 / step})
    assert manager.steps() == [2], manager.steps()
    assert all(r.ok for r in manager.verify()), manager.verify()
    print("coordinator work done")
"""


def test_coordinator_side_imports_neither_tensorflow_nor_keras(tmp_path):
    proc, imported = run_child(COORDINATOR_SIDE, str(tmp_path / "ckpts"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "coordinator work done" in proc.stdout
    assert not imported["loaded"], (
        f"the coordinator side imported {imported['loaded']}:\n{explain(imported)}"
    )


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """Two checkpoints of a real Keras model (made in this process)."""
    import keras
    import numpy as np

    from ckptmgr import CheckpointManager

    directory = tmp_path_factory.mktemp("imports") / "ckpts"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    manager = CheckpointManager(directory)
    for step in (10, 20):
        manager.save(step, model, metrics={"loss": 1.0 / step})
    return directory


@pytest.mark.parametrize("command", [
    ["list"], ["list", "--json"], ["inspect"], ["verify"], ["prune", "--keep-last", "1", "--dry-run"],
])
def test_cli_reading_commands_import_no_ml_framework(saved_dir, command):
    body = """
        import runpy, sys
        sys.argv = ["ckptmgr", sys.argv[1], sys.argv[2], *sys.argv[3:]]
        runpy.run_module("ckptmgr", run_name="__main__")
    """
    proc, imported = run_child(body, command[0], str(saved_dir), *command[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not imported["loaded"], f"ckptmgr {' '.join(command)} imported {imported['loaded']}:\n{explain(imported)}"

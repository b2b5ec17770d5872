"""Your own model on a Ray cluster, two ways (issue 12), and the README's examples.

- Ray Train: a ``TensorflowTrainer`` whose loop builds a subclassed model
  defined here and passes ``CheckpointCallback(dir)``; each committed
  checkpoint is reported to Ray Train as a reference (no copy of the ``.keras``).
- Plain actors: ``ckptmgr.ray.fit_on_ray`` with a functional model defined
  here; a worker dies mid-run (SIGKILL), the helper restarts the ranks, and
  the run ends bit-identical to an uninterrupted one.
- The README's Python blocks: each one either runs verbatim (in a fresh
  interpreter joined to this module's cluster) or is marked, with its reason,
  as one that cannot run here.

One ``ray.cluster_utils.Cluster`` (a head and two worker nodes) serves the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
import keras  # noqa: E402
from ray_cluster import local_cluster  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.coordinator import find  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402
from ckptmgr.ray import checkpoint_ref, fit_on_ray, stop_coordinator  # noqa: E402
from ckptmgr.ray.runners import weights_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FEATURES = 8
STEPS_PER_EPOCH = 8  # 256 samples, global batch 32


@pytest.fixture(scope="module")
def cluster():
    # Workers import this module (the model, the loop) by name.
    with local_cluster({"worker0": {}, "worker1": {}}) as (c, _):
        yield c


# -- the user's code: a model and data this package knows nothing about --------------------
@keras.saving.register_keras_serializable(package="test_ray_train")
class Residual(keras.Model):
    """A small subclassed model: a hidden layer plus a linear skip."""

    def __init__(self, units: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.head = keras.layers.Dense(1)
        self.skip = keras.layers.Dense(1, use_bias=False)

    def call(self, x):
        return self.head(self.hidden(x)) + self.skip(x)

    def get_config(self):
        return {"units": self.units, "name": self.name}


def make_data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(256, FEATURES)).astype("float32")
    return x, np.sin(x).sum(axis=1, keepdims=True).astype("float32")


def build_functional():
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    return model


class CrashOnce(keras.callbacks.Callback):
    """Kills this worker process (SIGKILL) after batch ``step`` on rank ``rank``,
    the first time only (a marker file remembers): a rank lost mid-run."""

    def __init__(self, step: int, rank: int, marker: str):
        super().__init__()
        self.step, self.rank, self.marker = step, rank, marker
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
        if self.seen == self.step and tf_config["task"]["index"] == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)


class TakeOverAt(keras.callbacks.Callback):
    """On rank 0 after batch ``step``: another launch claims the directory
    (its writer lease), as a second ``ckptmgr run`` on it would; writes the
    lease number it got to ``out``."""

    def __init__(self, step: int, directory: str, out: str):
        super().__init__()
        self.step, self.directory, self.out = step, directory, out
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
        if self.seen == self.step and tf_config["task"]["index"] == 0:
            other = CheckpointManager(self.directory)
            deadline = time.monotonic() + 60
            while not other.steps() and time.monotonic() < deadline:  # the earlier save lands first
                time.sleep(0.05)
            other.claim()
            Path(self.out).write_text(str(other.lease.held.token))


def train_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``, as a user writes it."""
    import ray.train
    import tensorflow as tf

    from ckptmgr.distributed import CoordinatorClient

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = Residual()
        model.compile(optimizer="adam", loss="mse")
    x, y = make_data()
    callback = CheckpointCallback(config["directory"], save_freq=8, keep_last=2)
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, callbacks=[callback], verbose=0)
    # What this rank saw, for the test (Ray Train 2.60's Result keeps only the
    # metrics of checkpoint reports).
    newest = ray.train.get_checkpoint()  # rank 0 reported the checkpoints
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
        "seen_step": checkpoint_ref(newest).step if newest is not None else None,
        "distributed": isinstance(callback.manager, CoordinatorClient),
        "weights_sha256": weights_digest(model),
    }))


# -- Ray Train ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_train_reports_each_committed_checkpoint_of_your_own_model(cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    directory = str(tmp_path / "ckpts")
    trainer = TensorflowTrainer(
        train_loop,
        # No coordinator yet: the callback creates it.
        train_loop_config={"directory": directory, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="own-model", storage_path=str(tmp_path / "ray_results")),
    )
    result = trainer.fit()
    assert result.error is None
    manager = CheckpointManager(directory)
    assert manager.steps() == [16, 24]  # 3 epochs of 8 steps, every 8, keep_last=2
    assert manager.manifest().world["ranks"] == [0, 1]  # both ranks through the coordinator
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["distributed"] for r in ranks)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    ref = checkpoint_ref(result.checkpoint)
    assert ref.step == manager.latest_step() == 24
    assert ref.directory == directory
    assert result.metrics["step"] == 24 and result.metrics["loss"] > 0  # rank 0's, with the checkpoint
    assert ranks[0]["seen_step"] == 24  # ray.train.get_checkpoint() on rank 0 after fit()
    # Every committed save was reported, in order; the references hold no archive.
    reported = [checkpoint_ref(c).step for c, _ in result.best_checkpoints]
    assert reported == [8, 16, 24]
    files = [p for p in Path(result.checkpoint.path).rglob("*") if p.is_file()]
    assert files and not any(p.suffix == ".keras" for p in files)
    assert sum(p.stat().st_size for p in files) < 4096
    assert result.checkpoint.path.startswith(str(tmp_path / "ray_results"))

    loaded = keras.saving.load_model(ref.archive)  # stock Keras, the archive itself
    assert isinstance(loaded, Residual)
    assert weights_digest(loaded) == ranks[0]["weights_sha256"]  # the final weights
    assert stop_coordinator(directory) is True  # the callback created it (detached)
    assert find(directory) is None


# -- plain actors -------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_on_ray_commits_and_a_restart_resumes_exactly(cluster, tmp_path):
    fit = {"epochs": 5, "batch_size": 32, "shuffle": False}  # 40 steps
    options = {"save_freq": 4, "keep_last": 3}
    ref_dir = str(tmp_path / "reference")
    reference = fit_on_ray(build_functional, make_data, num_workers=2, checkpoint=ref_dir, seed=7,
                           checkpoint_options=options, fit_kwargs=fit, return_weights=True)
    assert (reference.final_step, reference.restored_step, reference.restarts) == (40, None, 0)
    assert CheckpointManager(ref_dir).steps() == [32, 36, 40]
    assert len(reference.history["loss"]) == 5
    assert find(ref_dir) is None  # stopped when the run finished

    directory = str(tmp_path / "run")
    marker = tmp_path / "crashed"
    crash = CrashOnce(step=14, rank=1, marker=str(marker))  # mid-epoch 2, after the save of step 12
    result = fit_on_ray(build_functional, make_data, num_workers=2, checkpoint=directory, seed=7,
                        checkpoint_options=options, fit_kwargs={**fit, "callbacks": [crash]},
                        max_restarts=1, return_weights=True)
    assert marker.exists()  # rank 1 did die
    assert result.restarts == 1
    assert 4 <= result.restored_step <= 12  # the newest committed step when rank 1 died
    manager = CheckpointManager(directory)
    assert result.final_step == 40 and manager.steps() == [32, 36, 40]
    assert manager.manifest().world["ranks"] == [0, 1]
    assert all(r.ok for r in manager.verify())
    assert result.weights_sha256 == reference.weights_sha256
    for got, want in zip(result.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_run_fenced_by_a_newer_launch_stops_in_one_line_and_is_not_restarted(cluster, tmp_path):
    """A second launch on the same directory fenced the first, which then
    printed tracebacks, was reported as a lost rank (exit 75: "resume to
    continue") and, with restarts allowed, would start again and fence the
    newer launch back."""
    from ckptmgr.errors import WriterFencedError

    directory, claimed = str(tmp_path / "run"), tmp_path / "claimed"
    takeover = TakeOverAt(step=6, directory=directory, out=str(claimed))
    with pytest.raises(WriterFencedError) as error:
        fit_on_ray(build_functional, make_data, num_workers=2, checkpoint=directory, max_restarts=2,
                   checkpoint_options={"save_freq": 4}, fit_kwargs={"epochs": 2, "callbacks": [takeover]})
    assert type(error.value) is WriterFencedError  # the rank's own error, not Ray's wrapper
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert "Not saving step 8" in message and "is fenced and stops" in message
    token = int(claimed.read_text())
    # Nobody claimed the directory after the takeover: no restart fenced it back.
    assert CheckpointManager(directory).lease.current().token == token
    assert CheckpointManager(directory).steps() == [4]
    stop_coordinator(directory)


# -- the README's examples ----------------------------------------------------------------------
# Python blocks of README.md that run verbatim. A block that cannot run here is
# marked on the line before its fence with `<!-- readme-test: skip: REASON -->`;
# such blocks are fragments (names defined elsewhere) or need storage this
# machine cannot reach (gs:// and s3:// buckets without credentials). The count
# is fixed so that a runnable block cannot drop out unnoticed.
RUNNABLE_BLOCKS = 2
SKIP_MARK = re.compile(r"^<!-- readme-test: skip: (?P<reason>.+?) -->$")


def readme_python_blocks() -> list[dict]:
    """Every ```python block: its first line number, code, and skip reason (or None)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            mark = SKIP_MARK.match(lines[i - 1].strip()) if i > 0 else None
            blocks.append({"line": start + 1, "code": "\n".join(lines[start:end]) + "\n",
                           "skip": mark["reason"] if mark else None})
            i = end
        i += 1
    return blocks


def test_every_readme_python_block_runs_or_says_why_not():
    blocks = readme_python_blocks()
    runnable = [b for b in blocks if b["skip"] is None]
    assert len(runnable) == RUNNABLE_BLOCKS, [b["line"] for b in runnable]
    for block in blocks:
        compile(block["code"], f"README.md:{block['line']}", "exec")  # every block is Python
        if block["skip"] is not None:
            assert len(block["skip"]) > 10, f"README.md:{block['line']}: say why it cannot run"
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- readme-test: skip:") == len(blocks) - RUNNABLE_BLOCKS  # no stray marks


RUNNER = """
import json, sys
ns = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print(f"README.md:{block['line']}: running", flush=True)
    exec(compile(block["code"], f"README.md:{block['line']}", "exec"), ns)
    print(f"README.md:{block['line']}: ok", flush=True)
"""


@pytest.mark.slow
def test_readme_examples_run_verbatim(cluster, tmp_path):
    runnable = [b for b in readme_python_blocks() if b["skip"] is None]
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    env = dict(os.environ, RAY_ADDRESS=cluster.address, TF_CPP_MIN_LOG_LEVEL="3",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    env.pop("PYTHONPATH", None)  # the examples import only ckptmgr, as a user's script does
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for block in runnable:
        assert f"README.md:{block['line']}: ok" in proc.stdout
    # What the README says a print() shows, where it says it literally.
    said = [c for b in runnable for c in re.findall(r"^print\(.*\)  # (.+)$", b["code"], re.M)
            if not re.search(r"\.\.\.|<", c)]
    assert said, "no print() with its literal output in the README examples"
    for expected in said:
        assert expected in proc.stdout.splitlines(), (expected, proc.stdout[-2000:])
    # What the examples wrote: committed checkpoints under ./checkpoints.
    written = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert written, "the README examples wrote no checkpoints"
    for name in written:
        assert CheckpointManager(str(tmp_path / "checkpoints" / name)).latest_step() is not None
        stop_coordinator(str(tmp_path / "checkpoints" / name))


# -- one-line errors ----------------------------------------------------------------------------
def test_ray_train_loop_without_the_example_config_says_how_in_one_line():
    from ckptmgr.errors import ConfigError
    from ckptmgr.ray_job import ray_train_loop

    with pytest.raises(ConfigError) as caught:
        ray_train_loop({})  # what the README once showed: no train_loop_config
    message = str(caught.value)
    assert "\n" not in message and "train_loop_config" in message and "'cfg'" in message


def test_a_ray_checkpoint_ckptmgr_did_not_report_is_refused_in_one_line(tmp_path):
    from ray.train import Checkpoint

    from ckptmgr.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        checkpoint_ref(Checkpoint.from_directory(str(tmp_path)))
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and "CheckpointCallback" in message

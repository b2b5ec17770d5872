"""CLI polish (issue 12, item 5), through the installed console script on real
checkpoints of real Keras models: ``list`` at 80 columns (snapshot),
``inspect``'s per-layer parameter counts, ``export`` without ``--force``,
``verify --json``, one-line usage errors, epochs counted from 1, and ``run``/
``resume`` answering without Ray when there is nothing to do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from ckptmgr import CheckpointManager
from ckptmgr.io.manifest import LoopState
from test_cli import CKPTMGR, REPO_ROOT, assert_clean_failure, cli, tiny_model
from test_cli import copy_of, saved  # noqa: F401 - fixtures

SNAPSHOTS = Path(__file__).parent / "snapshots"


def cli_at(columns: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS=str(columns), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([CKPTMGR, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


# -- list at 80 columns ------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_steps(tmp_path_factory):
    """Steps 5, 120000 (pinned) and 220000000 with five metrics each."""
    directory = tmp_path_factory.mktemp("list") / "run"
    model = tiny_model()
    model.fit(np.zeros((4, 4)), np.zeros((4, 1)), verbose=0)
    manager = CheckpointManager(directory)
    metrics = {"loss": 0.123456, "val_loss": 0.2345, "mae": 0.5, "val_mae": 0.61, "accuracy": 0.9}
    for epoch, step in enumerate((5, 120000, 220000000)):
        manager.save(step, model, metrics=metrics,
                     loop=LoopState(epoch=epoch, batch=3, next_epoch=epoch + 1, next_batch=0))
    manager.pin(120000)
    return directory


def normalized(text: str, directory: Path) -> str:
    """Times and sizes vary from run to run: same-width placeholders."""
    text = text.replace(str(directory), "DIR")
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "YYYY-MM-DDTHH:MM:SSZ", text)
    text = re.sub(r"\d+\.\d KiB", lambda m: "N.N KiB".rjust(len(m.group())), text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def test_list_at_80_columns_matches_the_snapshot(long_steps):
    result = cli_at(80, "list", long_steps)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines[:-1]) <= 80  # the last line is the note
    for step in ("5", "120000", "220000000"):  # never truncated
        assert any(line.split()[:1] == [step] for line in lines), step
    assert "…" not in result.stdout
    expected = (SNAPSHOTS / "list_80_columns.txt").read_text()
    assert normalized(result.stdout, long_steps) == expected


def test_list_drops_columns_by_priority_and_keeps_them_when_wide(long_steps):
    wide = cli_at(200, "list", long_steps).stdout
    header = wide.splitlines()[1].split()
    assert header == ["step", "created", "size", "epoch", "blocked", "write", "MB/s", "metrics", "pinned"]
    assert "not shown" not in wide
    narrow = cli_at(60, "list", long_steps).stdout
    assert narrow.splitlines()[1].split() == ["step", "size", "metrics"]
    assert "220000000" in narrow and "val_mae=0.61" in narrow
    assert "(not shown at 60 columns: created, pinned, epoch, blocked, write, MB/s;" in narrow


# -- inspect: parameters per layer --------------------------------------------------------


@keras.saving.register_keras_serializable(package="test_cli_polish")
class Block(keras.layers.Layer):
    """A custom layer holding another layer (its weights nest under its group)."""

    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.gain = self.add_weight(shape=(self.units,), initializer="ones", name="gain")

    def call(self, x):
        return self.inner(x) * self.gain

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(5)
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.encoder(x))


def sequential():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="out")],
                            name="seq")


def functional():
    inputs = keras.Input((6, 4), name="features")
    h = keras.layers.Conv1D(3, 2, name="conv")(inputs)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.Sequential([keras.Input((15,)), keras.layers.Dense(4), keras.layers.Dense(4)], name="inner")(h)
    h = Block(3, name="block")(h)
    h = keras.layers.Dense(2, name="dense_a")(h)
    outputs = keras.layers.Dense(1, name="dense_b")(h)
    return keras.Model(inputs, outputs, name="func")


@pytest.mark.parametrize("build, shape", [(sequential, (4,)), (functional, (6, 4)), (Subclassed, (4,))],
                         ids=["sequential", "functional", "subclassed"])
def test_inspect_counts_parameters_per_layer_as_keras(build, shape, tmp_path):
    model = build()
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, *shape), "float32"), np.ones((4, 1 if build is not Subclassed else 2)), verbose=0)
    CheckpointManager(tmp_path / "ck").save(1, model)
    result = cli("inspect", tmp_path / "ck", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["model"]
    got = {layer["name"]: layer["params"] for layer in summary["layers"] if layer["class"] != "InputLayer"}
    if build is Subclassed:  # no layer list in the config: the attributes that hold the layers
        want = {"encoder": model.encoder.count_params(), "head": model.head.count_params()}
    else:
        want = {layer.name: layer.count_params() for layer in model.layers
                if not isinstance(layer, keras.layers.InputLayer)}
    assert got == want, f"keras {keras.__version__}: the weights file's layer groups moved"
    assert summary["params"] == model.count_params()
    text = cli("inspect", tmp_path / "ck").stdout
    assert f"{model.count_params():,} parameters" in text


# -- export, verify --json --------------------------------------------------------------------


def test_export_refuses_to_overwrite_without_force(saved, tmp_path):
    directory, _ = saved
    out = tmp_path / "model.keras"
    assert cli("export", directory, "--step", "10", "--format", "keras", "-o", out).returncode == 0
    first = out.read_bytes()
    line = assert_clean_failure(cli("export", directory, "--format", "keras", "-o", out))
    assert f"{out} exists: pass --force" in line
    assert out.read_bytes() == first
    result = cli("export", directory, "--format", "keras", "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    newest = CheckpointManager(directory).manifest(30).archive
    assert out.read_bytes() == (directory / newest).read_bytes() != first
    weights = tmp_path / "m.weights.h5"
    assert cli("export", directory, "--format", "weights", "-o", weights).returncode == 0
    assert "--force" in assert_clean_failure(cli("export", directory, "--format", "weights", "-o", weights))
    assert cli("export", directory, "--format", "weights", "-o", weights, "--overwrite").returncode == 0


def test_verify_json(copy_of):
    archive = copy_of / CheckpointManager(copy_of).manifest(20).archive
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    result = cli("verify", copy_of, "--json")
    assert result.returncode == 1
    rows = json.loads(result.stdout)
    assert [(r["step"], r["ok"]) for r in rows] == [(10, True), (20, False), (30, True)]
    assert rows[0]["problem"] is None and "step 20" in rows[1]["problem"] and archive.name in rows[1]["problem"]
    result = cli("verify", copy_of, "--step", "30", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == [{"step": 30, "ok": True, "problem": None}]


# -- usage errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["list", "DIR", "--bogus"], "No such option: --bogus. Try 'ckptmgr list --help'."),
    (["export", "DIR", "--format", "zip", "-o", "x"], "'zip' is not one of 'weights', 'keras', 'savedmodel'. Try 'ckptmgr export --help'."),
    (["list"], "Missing argument 'URL'. Try 'ckptmgr list --help'."),
    (["export", "DIR", "--format", "keras"], "Try 'ckptmgr export --help'."),
    (["lst", "DIR"], "No such command 'lst'"),
    (["prune", "DIR", "--keep-last", "0"], "--keep-last"),
])
def test_usage_errors_are_one_line_with_the_hint(saved, args, needle):
    result = cli(*[saved[0] if a == "DIR" else a for a in args])
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and "--help" in result.stderr
    assert needle in result.stderr
    assert not set("╭╰│─") & set(result.stderr)


def test_no_arguments_prints_the_help():
    result = cli()
    assert result.returncode == 2
    assert "Commands" in result.stdout + result.stderr and "Traceback" not in result.stderr


# -- run / resume without Ray when there is nothing to do -------------------------------------

BLOCKED = textwrap.dedent('''
    import sys

    attempts = []


    class Blocked:
        """Records and refuses any import of Ray, TensorFlow or Keras."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "tensorflow", "keras"):
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None


    sys.meta_path.insert(0, Blocked())
    from ckptmgr.cli import main

    code = main(sys.argv[1:])
    assert not attempts, attempts
    assert "ckptmgr.ray_job" not in sys.modules and "ckptmgr.job" not in sys.modules
    sys.exit(code)
''')


def cli_without_ray(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where importing Ray, TensorFlow or Keras fails."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)


def test_resume_with_nothing_to_resume_starts_no_ray(tmp_path):
    config = REPO_ROOT / "configs" / "local.yaml"
    for extra in ([], ["--no-ray"]):
        result = cli_without_ray("resume", config, "--set", f"checkpoint.directory={tmp_path / 'none'}", *extra)
        line = assert_clean_failure(result)
        assert "nothing to resume" in line.lower() and "ckptmgr run" in line


def completed(directory: Path, loop: LoopState) -> None:
    model = tiny_model()
    model.fit(np.zeros((4, 4)), np.zeros((4, 1)), verbose=0)
    CheckpointManager(directory).save(12, model, loop=loop)


@pytest.mark.parametrize("loop", [
    LoopState(epoch=2, batch=4, next_epoch=3, next_batch=0),  # saved at the last epoch's end
    LoopState(epoch=2, batch=4, next_epoch=2, next_batch=4),  # a batch save on its last batch
], ids=["epoch-end", "last-batch"])
def test_a_complete_run_says_there_is_nothing_to_do_without_starting_ray(tmp_path, loop):
    directory = tmp_path / "ck"
    completed(directory, loop)
    small = ["--set", f"checkpoint.directory={directory}", "--set", "training.samples=128",
             "--set", "training.batch_size=32", "--set", "training.epochs=3"]  # 4 batches per epoch
    config = REPO_ROOT / "configs" / "local.yaml"
    for command in ("run", "resume"):
        result = cli_without_ray(command, config, *small)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == (
            f"example: nothing to do: the checkpoint at step 12 already completes 3 epochs "
            f"(training.epochs=3); raise it to train further, e.g. --set training.epochs=4; "
            f"checkpoints in {directory}")
    result = cli_without_ray("run", config, *small, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["nothing_to_do"] is True and info["final_step"] == 12 and info["exit_status"] == 0


def test_scientific_notation_in_a_config_through_the_cli(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"checkpoint: {{directory: {tmp_path / 'none'}}}\ntraining: {{learning_rate: 1e-3}}\n")
    line = assert_clean_failure(cli_without_ray("resume", config))
    assert "nothing to resume" in line.lower()  # the config was accepted
    line = assert_clean_failure(cli_without_ray("resume", config, "--set", "training.learning_rate=-2e-4"))
    assert "'training.learning_rate'" in line and "Received: learning_rate=-0.0002" in line


def test_resume_asks_ray_when_a_cluster_may_hold_the_run_in_memory(tmp_path):
    """Storage holds nothing, but a running cluster's memory tier may: then
    resume asks the cluster (here Ray is blocked, so the import is the proof)."""
    config = tmp_path / "job.yaml"
    config.write_text(f"checkpoint: {{directory: {tmp_path / 'none'}, memory_tier: {{every_steps: 5}}}}\n"
                      "ray: {address: 'ray://head:10001'}\n")
    result = cli_without_ray("resume", config)
    assert result.returncode != 0 and "ray is blocked in this test" in result.stderr
    line = assert_clean_failure(cli_without_ray("resume", config, "--set", "ray.address=null"))
    assert "nothing to resume" in line.lower()  # a new local cluster holds nothing

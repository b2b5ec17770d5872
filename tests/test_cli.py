"""End-to-end tests of the installed ``ckptmgr`` console script (real Keras, no mocks).

A module-scoped fixture saves three checkpoints (steps 10, 20, 30) of a tiny
model with ``CheckpointManager.save``; tests that modify a directory work on a
copy. Each subprocess that imports TensorFlow costs a few seconds, so only
``export``, ``run`` and ``resume`` do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckptmgr import CheckpointManager
from ckptmgr.io.manifest import LoopState

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = (10, 20, 30)
CKPTMGR = shutil.which("ckptmgr", path=os.path.dirname(sys.executable)) or shutil.which("ckptmgr")


def cli(*args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    assert CKPTMGR, "the ckptmgr console script is not installed (pip install -e .)"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="200")
    return subprocess.run(
        [CKPTMGR, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr lines that are ours (TensorFlow may log its own start-up lines)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    return lines[0]


def tiny_model(compile: bool = True):
    import keras

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)],
        name="tiny",
    )
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory with steps 10, 20, 30; returns (dir, {step: weights})."""
    directory = tmp_path_factory.mktemp("cli") / "ckpts"
    model = tiny_model()
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(8, 4)), rng.normal(size=(8, 1)), verbose=0)
    manager = CheckpointManager(directory)
    weights = {}
    for i, step in enumerate(STEPS):
        model.set_weights([w + step for w in model.get_weights()])
        weights[step] = model.get_weights()
        manager.save(
            step,
            model,
            metrics={"loss": 1.0 / (i + 1), "mae": 0.5 + i},
            loop=LoopState(epoch=i, batch=5, next_epoch=i + 1, next_batch=0),
        )
    return directory, weights


@pytest.fixture
def copy_of(saved, tmp_path):
    """A private copy of the saved directory, for tests that change it."""
    target = tmp_path / "ckpts"
    shutil.copytree(saved[0], target)
    return target


def listed_steps(directory) -> list[int]:
    result = cli("list", directory, "--json")
    assert result.returncode == 0, result.stderr
    return [row["step"] for row in json.loads(result.stdout)]


# -- list / inspect -----------------------------------------------------------------


def test_cli_module_does_not_import_tensorflow():
    code = "import sys, ckptmgr.cli; sys.exit(int('tensorflow' in sys.modules or 'keras' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_list_table(saved):
    result = cli("list", saved[0])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for header in ("step", "created", "size", "metrics", "pinned"):
        assert header in result.stdout
    for step in STEPS:
        assert f" {step} " in result.stdout
    assert "loss=0.5" in result.stdout and "KiB" in result.stdout


def test_list_json_fields(saved):
    directory, _ = saved
    result = cli("list", directory, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == list(STEPS)
    first = rows[0]
    assert first["path"].endswith("/" + CheckpointManager(directory).manifest(10).archive)
    assert Path(first["path"].removeprefix("file://")).stat().st_size == first["bytes"] > 0
    assert first["created"].endswith("+00:00")
    assert first["metrics"] == {"loss": 1.0, "mae": 0.5}
    assert first["epoch"] == 0 and first["pinned"] is False
    assert first["stats"]["bytes"] == first["bytes"]


def test_list_empty_directory(tmp_path):
    result = cli("list", tmp_path, "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_inspect_shows_manifest_loop_model_optimizer_and_files(saved):
    directory, _ = saved
    result = cli("inspect", directory, "--step", "20")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "step 20" in out
    # Epochs and batches as Keras shows them (from 1); the manifest says epoch=1, next_epoch=2.
    assert "saved in epoch 2 after batch 5; resumes at the start of epoch 3" in out
    assert "Sequential 'tiny'" in out and "19 parameters" in out
    assert "Dense" in out and "units=3, activation=relu" in out
    assert "Adam" in out and "learning_rate=0.001" in out
    manifest = CheckpointManager(directory).manifest(20)
    assert "crc32c per 16.0 MiB chunk (1 chunk)" in out and manifest.archive_entry.crc32c
    assert manifest.archive in out and manifest.archive.startswith("ckpt-000000020-")


def test_inspect_json_defaults_to_newest(saved):
    result = cli("inspect", saved[0], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["step"] == 30
    assert info["loop"]["next_epoch"] == 3
    assert [layer["class"] for layer in info["model"]["layers"]][-1] == "Dense"
    assert info["optimizer"]["class"] == "Adam"
    assert list(info["files"]) == [CheckpointManager(saved[0]).manifest(30).archive]


# -- verify -----------------------------------------------------------------------


def test_verify_ok(saved):
    result = cli("verify", saved[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"ok step {s}" for s in STEPS]
    assert result.stderr == ""  # no progress bar when piped


def test_verify_reports_one_line_per_corrupt_checkpoint(copy_of):
    archive = copy_of / CheckpointManager(copy_of).manifest(20).archive
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    result = cli("verify", copy_of)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "ok step 10" in lines and "ok step 30" in lines
    bad = [line for line in lines if not line.startswith("ok ")]
    assert len(bad) == 1
    assert "step 20" in bad[0] and archive.name in bad[0]
    assert cli("verify", copy_of, "--step", "30").returncode == 0


# -- export -----------------------------------------------------------------------


def test_export_weights_keras_and_savedmodel(saved, tmp_path):
    import keras
    import tensorflow as tf

    directory, weights = saved

    out = tmp_path / "model.weights.h5"
    result = cli("export", directory, "--step", "20", "--format", "weights", "-o", out)
    assert result.returncode == 0, result.stderr
    model = tiny_model(compile=False)
    model.load_weights(out)
    for got, want in zip(model.get_weights(), weights[20]):
        np.testing.assert_array_equal(got, want)
    import h5py

    with h5py.File(out) as f:
        assert "optimizer" in f  # as model.save_weights writes for a compiled model
    lean = tmp_path / "lean.weights.h5"
    assert cli("export", directory, "--format", "weights", "--no-optimizer", "-o", lean).returncode == 0
    with h5py.File(lean) as f:
        assert "optimizer" not in f

    out = tmp_path / "model.keras"
    result = cli("export", directory, "--format", "keras", "-o", out)
    assert result.returncode == 0, result.stderr
    loaded = keras.saving.load_model(out)
    for got, want in zip(loaded.get_weights(), weights[30]):
        np.testing.assert_array_equal(got, want)

    out = tmp_path / "saved_model"
    result = cli("export", directory, "--format", "savedmodel", "-o", out)
    assert result.returncode == 0, result.stderr
    assert (out / "saved_model.pb").is_file()
    x = np.ones((2, 4), "float32")
    reloaded = tf.saved_model.load(str(out))  # keep a reference while serving
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(np.asarray(served), loaded.predict(x, verbose=0), rtol=1e-6)


def test_export_bad_weights_name_fails_cleanly(saved, tmp_path):
    result = cli("export", saved[0], "--format", "weights", "-o", tmp_path / "model.h5")
    assert ".weights.h5" in assert_clean_failure(result)


# -- prune / pin ---------------------------------------------------------------------


def test_prune_dry_run_deletes_nothing_and_prints_reasons(copy_of):
    result = cli("prune", copy_of, "--keep-last", "1", "--keep-every-n-steps", "20", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "keep   step 20: keep_every_n_steps=20" in lines
    assert "keep   step 30: newest, keep_last=1" in lines
    assert "would delete step 10" in lines
    assert listed_steps(copy_of) == list(STEPS)


def test_prune_keep_last_deletes(copy_of):
    result = cli("prune", copy_of, "--keep-last", "1")
    assert result.returncode == 0, result.stderr
    assert "delete step 10" in result.stdout and "delete step 20" in result.stdout
    assert listed_steps(copy_of) == [30]
    assert not list(copy_of.glob("ckpt-000000010*"))


def test_prune_keep_best(copy_of):
    result = cli("prune", copy_of, "--keep-best", "mae", "--mode", "min")
    assert result.returncode == 0, result.stderr
    assert "keep   step 10: keep_best=mae/min" in result.stdout.splitlines()
    assert listed_steps(copy_of) == [10, 30]


def test_pin_protects_from_prune_and_unpin_releases(copy_of):
    assert cli("pin", copy_of, "--step", "10").returncode == 0
    rows = json.loads(cli("list", copy_of, "--json").stdout)
    assert [r["pinned"] for r in rows] == [True, False, False]
    result = cli("prune", copy_of, "--keep-last", "1")
    assert "keep   step 10: pinned" in result.stdout.splitlines()
    assert listed_steps(copy_of) == [10, 30]
    assert cli("unpin", copy_of, "--step", "10").returncode == 0
    assert cli("prune", copy_of, "--keep-last", "1").returncode == 0
    assert listed_steps(copy_of) == [30]


# -- errors ------------------------------------------------------------------------


def test_missing_directory_is_one_line(tmp_path):
    for command in ("list", "verify", "inspect"):
        line = assert_clean_failure(cli(command, tmp_path / "nope"))
        assert "nope" in line


def test_missing_step_and_bad_storage_option(saved):
    assert "step 99" in assert_clean_failure(cli("verify", saved[0], "--step", "99"))
    line = assert_clean_failure(cli("list", saved[0], "--storage-option", "novalue"))
    assert "novalue" in line


def test_prune_needs_a_rule(saved):
    line = assert_clean_failure(cli("prune", saved[0]), code=2)
    assert "no retention rule given" in line
    assert listed_steps(saved[0]) == list(STEPS)


def test_bad_duration_and_usage_errors(saved):
    assert "7x" in assert_clean_failure(cli("prune", saved[0], "--keep-within", "7x"))
    result = cli("export", saved[0], "--format", "zip", "-o", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = cli("--debug", "list", tmp_path / "nope")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CheckpointNotFoundError" in result.stderr


# -- run / resume ----------------------------------------------------------------------


@pytest.fixture
def job_config(tmp_path):
    config = tmp_path / "local.yaml"
    shutil.copyfile(REPO_ROOT / "configs" / "local.yaml", config)
    return config


SMALL = [
    "--set", "training.samples=128",
    "--set", "training.batch_size=32",  # 4 batches per epoch
    "--set", "training.hidden=[8]",
    "--set", "training.features=4",
    "--set", "checkpoint.save_freq=3",
]


def test_unknown_config_field_fails_cleanly(job_config):
    line = assert_clean_failure(cli("run", job_config, "--set", "checkpoint.keep_lst=2"))
    assert "unknown field 'checkpoint.keep_lst'. Did you mean 'keep_last'?" in line
    job_config.write_text(job_config.read_text().replace("epochs: 3", "epoch: 3"))
    line = assert_clean_failure(cli("run", job_config))
    assert line.startswith(f"error: {job_config}: unknown field 'training.epoch'")


def test_resume_without_checkpoints_fails_cleanly(job_config, tmp_path):
    line = assert_clean_failure(
        cli("resume", job_config, "--set", f"checkpoint.directory={tmp_path / 'empty'}", *SMALL)
    )
    assert "nothing to resume" in line.lower() and "ckptmgr run" in line


def test_run_then_resume_continues(job_config, tmp_path):
    # A relative directory is resolved against the working directory.
    result = cli("run", job_config, "--set", "checkpoint.directory=ck", "--set", "training.epochs=1", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "started fresh" in result.stdout and "on Ray with 2 workers to step 4" in result.stdout
    # Piped: one plain line per save and epoch on stderr (a terminal gets a bar too).
    assert "ckptmgr: saved step 3 (" in result.stderr and "ckptmgr: saved step 4 (" in result.stderr
    assert "ckptmgr: epoch 1/1 done: step 4/4, loss " in result.stderr
    directory = tmp_path / "ck"
    assert listed_steps(directory) == [3, 4]

    # Written by 2 Ray workers, continued by one process: checkpoints do not
    # depend on the world size.
    result = cli(
        "resume", job_config, "--set", f"checkpoint.directory={directory}",
        "--set", "training.epochs=2", *SMALL, "--no-ray",
    )
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stdout and "trained in this process to step 8" in result.stdout
    assert listed_steps(directory) == [4, 6, 8]  # keep_last: 3 from the config
    assert cli("verify", directory).returncode == 0


def test_verbose_run_streams_the_save_lines_without_tensorflow_noise(job_config, tmp_path):
    result = cli("run", job_config, "--set", f"checkpoint.directory={tmp_path / 'ck'}",
                 "--set", "training.epochs=1", *SMALL, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "(Coordinator pid=" in result.stderr and "saved step 3: " in result.stderr  # its own log line
    for noise in ("oneDNN custom operations", "absl::InitializeLog"):
        assert noise not in result.stderr  # TensorFlow's start-up lines, from every worker


def test_prune_keep_best_on_a_metric_no_checkpoint_has_keeps_all_and_warns(copy_of):
    result = cli("prune", copy_of, "--keep-best", "val_loss")
    assert result.returncode == 0, result.stderr
    assert "warning: keep_best='val_loss': no checkpoint records 'val_loss'" in result.stderr
    assert "ckptmgr: ckptmgr" not in result.stderr and "warning: ckptmgr:" not in result.stderr
    assert "kept 3, deleted 0" in result.stdout
    assert listed_steps(copy_of) == list(STEPS)


def test_version_and_python_dash_m():
    from ckptmgr import __version__

    for command in (["ckptmgr"], [sys.executable, "-m", "ckptmgr"]):
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60,
                                cwd=REPO_ROOT, env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"ckptmgr {__version__}"

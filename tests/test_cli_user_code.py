"""The CLI loads user code: ``--custom-object NAME=MODULE:ATTR`` and ``--import
MODULE`` on ``inspect``, ``export``, ``verify --deep``, ``run`` and ``resume``
(issue 12, item 3), through the installed console script.

The user's module lives in a temporary directory that only the processes
that need it get on PYTHONPATH; this pytest process never imports it, and the
process that serves the exported SavedModel checks that it never did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_cli import CKPTMGR, REPO_ROOT, SMALL, assert_clean_failure

MYMODELS = textwrap.dedent('''
    import keras


    class CustomModel(keras.Model):
        """Seed 000's case: a subclassed model, not registered."""

        def __init__(self, hidden=8, **kwargs):
            super().__init__(**kwargs)
            self.hidden = hidden
            self.dense1 = keras.layers.Dense(hidden, activation="relu")
            self.dense2 = keras.layers.Dense(1)

        def call(self, x):
            return self.dense2(self.dense1(x))

        def get_config(self):
            return {**super().get_config(), "hidden": self.hidden}


    @keras.saving.register_keras_serializable(package="mine")
    class Scale(keras.layers.Layer):
        """A registered custom layer: --import is enough for it."""

        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}
''')

MAKE = textwrap.dedent('''
    import sys
    import numpy as np
    import keras
    from ckptmgr import CheckpointManager
    from mymodels import CustomModel, Scale

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model = CustomModel(hidden=8)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, x[:, :1], epochs=2, verbose=0)
    CheckpointManager(sys.argv[1]).save(7, model)
    np.save(sys.argv[3], model.predict(x[:3], verbose=0))
    np.save(sys.argv[4], x[:3])

    inputs = keras.Input((4,))
    scaled = keras.Model(inputs, keras.layers.Dense(2)(Scale(3.0)(inputs)))
    scaled.compile(optimizer="sgd", loss="mse")
    CheckpointManager(sys.argv[2]).save(1, scaled)
''')


def run_python(code: str, *args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO_ROOT)


def cli_env(*args: str, pythonpath: str | None = None, cwd: str | os.PathLike | None = None,
            tf_log_level: str | None = "3") -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    env.pop("PYTHONPATH", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if tf_log_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([CKPTMGR, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """``code/mymodels.py``; a checkpoint of CustomModel (step 7) with its
    predictions on 3 inputs, and one of a functional model with a Scale layer."""
    root = tmp_path_factory.mktemp("user_code")
    code = root / "code"
    code.mkdir()
    (code / "mymodels.py").write_text(MYMODELS)
    custom, scaled = root / "custom", root / "scaled"
    result = run_python(MAKE, str(custom), str(scaled), str(root / "y.npy"), str(root / "x.npy"),
                        pythonpath=str(code))
    assert result.returncode == 0, result.stderr
    assert "mymodels" not in sys.modules
    return {"root": root, "code": code, "custom": custom, "scaled": scaled,
            "x": root / "x.npy", "y": root / "y.npy"}


NOISE = ("absl::InitializeLog", "oneDNN custom operations", "rebuild TensorFlow")


def test_seed000_savedmodel_round_trip_through_the_cli(user, tmp_path):
    out = tmp_path / "serving"
    spec = "CustomModel=mymodels:CustomModel"

    # Without the class: one line saying which options load it.
    result = cli_env("export", user["custom"], "--format", "savedmodel", "-o", out)
    line = assert_clean_failure(result)
    assert "unknown custom object 'CustomModel'" in line and "--custom-object NAME=MODULE:ATTR" in line
    assert not out.exists()

    # The module is not on the path: the spec and what to do, before TensorFlow loads.
    line = assert_clean_failure(cli_env("export", user["custom"], "--format", "savedmodel", "-o", out,
                                        "--custom-object", spec))
    assert f"custom object '{spec}'" in line and "no module named 'mymodels'" in line and "PYTHONPATH" in line

    # With it (and no TF_CPP_MIN_LOG_LEVEL from us): exported, and no TensorFlow start-up noise.
    result = cli_env("export", user["custom"], "--format", "savedmodel", "-o", out, "--custom-object", spec,
                     pythonpath=str(user["code"]), tf_log_level=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported savedmodel to file://{out}"
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)], result.stderr

    serve = textwrap.dedent('''
        import sys
        import numpy as np
        import tensorflow as tf
        reloaded = tf.saved_model.load(sys.argv[1])
        served = reloaded.serve(tf.constant(np.load(sys.argv[2])))
        np.save(sys.argv[3], np.asarray(served))
        assert "mymodels" not in sys.modules
    ''')
    served = tmp_path / "served.npy"
    result = run_python(serve, str(out), str(user["x"]), str(served))  # no PYTHONPATH: no class
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(served), np.load(user["y"]), rtol=1e-5, atol=1e-6)

    # The module found from the current directory works as well as PYTHONPATH.
    again = cli_env("export", user["custom"], "--format", "savedmodel", "-o", tmp_path / "again",
                    "--custom-object", spec, cwd=user["code"])
    assert again.returncode == 0, again.stderr


def test_verify_deep_and_inspect_load_with_user_code(user):
    spec = "CustomModel=mymodels:CustomModel"
    result = cli_env("verify", user["custom"], "--deep")
    assert result.returncode == 1
    assert result.stdout.startswith("bad step 7: unknown custom object 'CustomModel'")
    assert "--custom-object" in result.stdout

    result = cli_env("verify", user["custom"], "--deep", "--json", "--custom-object", spec,
                     pythonpath=str(user["code"]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"step": 7, "ok": True, "problem": None, "loaded": True}]

    # A registered class needs only its module imported.
    assert cli_env("verify", user["scaled"], "--deep").returncode == 1
    result = cli_env("verify", user["scaled"], "--deep", "--import", "mymodels", pythonpath=str(user["code"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ok step 1 (loads)"]

    # inspect builds the model with the user's code: Keras's layers and counts.
    result = cli_env("inspect", user["custom"], "--json", "--custom-object", spec, pythonpath=str(user["code"]))
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["model"]
    assert model["class"] == "CustomModel" and model["params"] == 4 * 8 + 8 + 8 + 1
    assert [(layer["class"], layer["params"]) for layer in model["layers"]] == [("Dense", 40), ("Dense", 9)]


def test_bad_specs_are_one_line_naming_the_spec(user, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    (code / "empty.py").write_text("")
    cases = [
        # (args, exit code, what the line must say)
        (["verify", user["custom"], "--deep", "--custom-object", "CustomModel"], 2,
         ["--custom-object", "'CustomModel'", "NAME=MODULE:ATTR", "Try 'ckptmgr verify --help'"]),
        (["verify", user["custom"], "--deep", "--custom-object", "X=a b:C"], 2, ["'X=a b:C'"]),
        (["inspect", user["custom"], "--import", "code/mymodels.py"], 2,
         ["'code/mymodels.py', a file path", "--import mymodels", "PYTHONPATH=code"]),
        (["verify", user["custom"], "--import", "mymodels"], 2, ["apply to --deep"]),
        (["export", user["custom"], "--format", "keras", "-o", tmp_path / "x.keras", "--import", "mymodels"], 2,
         ["apply to --format savedmodel"]),
        (["verify", user["custom"], "--deep", "--import", "nosuch"], 1,
         ["import 'nosuch'", "no module named 'nosuch'", "PYTHONPATH"]),
        (["verify", user["custom"], "--deep", "--custom-object", "CustomModel=empty:CustomModel"], 1,
         ["custom object 'CustomModel=empty:CustomModel'", "empty has no attribute 'CustomModel'"]),
        (["verify", user["custom"], "--deep", "--custom-object", "CustomModel=mymodels:CustomModl"], 1,
         ["mymodels has no attribute 'CustomModl'", "Did you mean 'CustomModel'?"]),
        (["verify", user["custom"], "--deep", "--import", "broken"], 1,
         ["import 'broken'", "RuntimeError: no GPU here", "--debug"]),
    ]
    path = f"{code}{os.pathsep}{user['code']}"
    for args, status, needles in cases:
        result = cli_env(*args, pythonpath=path, cwd=user["root"])
        line = assert_clean_failure(result, code=status)
        for needle in needles:
            assert needle in line, (args, line)
    assert cli_env("export", user["custom"], "--format", "keras", "-o", tmp_path / "x.keras").returncode == 0


def test_run_imports_the_user_code_in_the_process_that_trains(tmp_path):
    """run --no-ray --import: the module runs before training (it writes a
    marker); a module that is not there fails before anything starts; the
    config's user_code section takes the same specs."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported.txt"
    (code / "hooks.py").write_text(f"open({str(marker)!r}, 'a').write('imported\\n')\n\n\ndef hook():\n    pass\n")
    config = tmp_path / "job.yaml"
    config.write_text(f"checkpoint: {{directory: {tmp_path / 'ck'}, save_freq: 3}}\n"
                      "training: {epochs: 1}\nuser_code: {custom_objects: {Hook: 'hooks:hook'}}\n")

    line = assert_clean_failure(cli_env("run", config, *SMALL, "--no-ray", "--import", "nosuch",
                                        pythonpath=str(code)))
    assert "import 'nosuch'" in line and "PYTHONPATH" in line
    assert not (tmp_path / "ck").exists() and not marker.exists()

    result = cli_env("--debug", "run", config, *SMALL, "--no-ray", "--import", "hooks", "--json",
                     pythonpath=str(code))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["final_step"] == 4
    # One prefix per log line: the level, never the logger's name again.
    ours = [line for line in result.stderr.splitlines() if line.startswith(("INFO: ", "DEBUG: ", "WARNING: "))]
    assert any("step 4" in line for line in ours), result.stderr
    assert "ckptmgr: ckptmgr" not in result.stderr and not [line for line in ours if ": ckptmgr:" in line]
    assert marker.read_text().splitlines() == ["imported"]  # once: cached after the first import

    config.write_text(config.read_text().replace("hooks:hook", "hooks"))
    line = assert_clean_failure(cli_env("run", config, pythonpath=str(code)))
    assert "user_code.custom_objects" in line and "NAME=MODULE:ATTR" in line

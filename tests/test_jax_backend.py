"""Keras 3 on JAX: capture, exact resume, and archives every backend opens.

Keras fixes its backend when it is imported, so every step runs in its own
process (``tests/backend_worker.py``), and this test compares the arrays they
leave behind:

1. JAX: an uninterrupted reference run, and a run that crashes mid-epoch
   (newest checkpoint: epoch 2, batch 2);
2. TensorFlow: stock ``keras.saving.load_model`` opens the JAX-written archive,
   and ``CheckpointManager.restore`` loads it; a short ``CheckpointCallback``
   run writes a TensorFlow checkpoint;
3. JAX, a fresh process: the crashed run resumes to the end; stock
   ``load_model`` opens the JAX-written archive; ``CheckpointManager.restore``
   loads the TensorFlow-written checkpoint.

JAX comes with the ``test`` extra (``make test`` installs it, so in CI this
never skips). Elsewhere the test skips when this interpreter has no jax,
unless ``CKPTMGR_JAX_PYTHON`` names one that has (with ckptmgr's
dependencies; this checkout goes first on its path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("backend_worker.py")
TOTAL_STEPS = 18  # backend_worker: 3 epochs of 6 batches


def _jax_python() -> str | None:
    override = os.environ.get("CKPTMGR_JAX_PYTHON")
    if override:
        return override
    return sys.executable if importlib.util.find_spec("jax") is not None else None


JAX_PYTHON = _jax_python()
pytestmark = pytest.mark.skipif(
    JAX_PYTHON is None,
    reason="jax is not importable here: pip install -e '.[test]' installs it "
    "(make test does), or set CKPTMGR_JAX_PYTHON to an interpreter that has it",
)


def _worker(python: str, backend: str, command: str, work: Path) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([python, str(WORKER), command, str(work)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{command} on {backend} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said == {"backend": backend, "command": command}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("backends")
    _worker(JAX_PYTHON, "jax", "train", work)
    _worker(sys.executable, "tensorflow", "tensorflow", work)
    _worker(JAX_PYTHON, "jax", "resume", work)
    return work


def _arrays(path: Path) -> list[np.ndarray]:
    """The variables a worker dumped: weights, then optimizer variables."""
    with np.load(path) as dumped:
        return [dumped[k] for k in sorted(k for k in dumped.files if k.startswith("v"))]


def _assert_equal(expected: Path, got: Path) -> None:
    """Same values, shapes and dtypes; only an integer's width may differ
    (Adam's ``iterations``: int64 on TensorFlow, int32 on JAX without x64)."""
    a, b = _arrays(expected), _arrays(got)
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        same_type = x.dtype == y.dtype or x.dtype.kind == y.dtype.kind == "i"
        assert same_type and x.shape == y.shape, f"variable {i}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        np.testing.assert_array_equal(x, y, err_msg=f"variable {i}")


def test_resume_under_jax_is_bit_identical(work):
    """A crash mid-epoch, a fresh process: weights, Adam's slots and iterations,
    and the last epoch's loss equal an uninterrupted JAX run's."""
    with np.load(work / "resumed.npz") as resumed, np.load(work / "reference.npz") as reference:
        assert resumed["restored"].tolist() == [8, 1, 2]  # step 8: epoch 2, 2 batches skipped
        assert resumed["loss"] == reference["loss"]
    _assert_equal(work / "reference.npz", work / "resumed.npz")
    iterations = [a for a in _arrays(work / "resumed.npz") if a.shape == () and a.dtype.kind == "i"]
    assert [int(a) for a in iterations] == [TOTAL_STEPS]


def test_jax_written_checkpoint_opens_on_jax_and_tensorflow(work):
    """Stock ``load_model`` on both backends, and ``restore`` on TensorFlow."""
    _assert_equal(work / "reference.npz", work / "jax_loaded.npz")
    _assert_equal(work / "reference.npz", work / "tf_loaded.npz")
    with np.load(work / "jax_restored_on_tf.npz") as restored:
        assert int(restored["step"]) == TOTAL_STEPS
    _assert_equal(work / "reference.npz", work / "jax_restored_on_tf.npz")


def test_tensorflow_written_checkpoint_restores_under_jax(work):
    with np.load(work / "tf_restored.npz") as restored:
        assert int(restored["step"]) == 6
    _assert_equal(work / "tf_written.npz", work / "tf_restored.npz")

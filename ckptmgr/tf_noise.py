"""TensorFlow's start-up noise, kept off the user's terminal.

Importing TensorFlow writes absl's "All log messages before
absl::InitializeLog() is called are written to STDERR" and the oneDNN notice
straight to file descriptor 2, once per native library (so twice), whatever
``TF_CPP_MIN_LOG_LEVEL`` says. Only ``TF_ENABLE_ONEDNN_OPTS=0`` stops the
notice, and it also turns oneDNN's kernels off (other numerics, slower CPU
training), so ckptmgr leaves it alone and filters these lines instead: the
import runs with fd 2 redirected to a file, and every line that is not
known noise is written back afterwards.

Used by the CLI (the process that imports Keras for ``export``, ``run``...).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|Could not find cuda drivers on your machine"
)


def quiet_environment() -> None:
    """Environment for a quiet TensorFlow; call before it is imported.

    ``TF_CPP_MIN_LOG_LEVEL=2`` hides TensorFlow's C++ INFO and WARNING logs
    (errors still show); a value the user set wins.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextmanager
def filtered_stderr(enabled: bool = True) -> Iterator[None]:
    """Drop :data:`NOISE` lines written to fd 2 inside the block; keep the rest."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True)
                    if not NOISE.search(line.decode("utf-8", "replace"))]
            if kept:
                os.write(2, b"".join(kept))


def import_keras_quietly(enabled: bool = True) -> None:
    """Import Keras (and with it its backend, TensorFlow) without the noise."""
    if "keras" in sys.modules:
        return
    quiet_environment()
    with filtered_stderr(enabled):
        import keras  # noqa: F401

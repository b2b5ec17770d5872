"""Exports out of the checkpoint directory: the exporting half of
:class:`ckptmgr.manager.CheckpointManager` (a mixin; it uses the manager's
verified reads). Exports never write into the checkpoint directory, never
overwrite a file unless asked, and leave nothing behind when they fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ckptmgr.errors import ConfigError
from ckptmgr.integrity import Progress
from ckptmgr.io.archive import write_weights_only
from ckptmgr.io.destination import copy_to_destination


class Exporting:
    """``export_weights``, ``export_keras``, ``export_saved_model`` (mixed into
    ``CheckpointManager``)."""

    def export_weights(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None, overwrite: bool = False, include_optimizer: bool = True) -> str:
        """Write the ``.weights.h5`` that ``model.save_weights`` writes (optimizer
        state included unless ``include_optimizer=False``); ``load_weights`` reads it."""
        if not str(path).endswith(".weights.h5"):
            raise ConfigError(
                f"Invalid export path: Received: path={path!r}. Keras requires "
                "weights files to end with '.weights.h5'."
            )
        self._check_destination(path)
        with self.verified_archive(step, progress=progress) as (_, archive), _local_staging() as tmp:
            out = os.path.join(tmp, "model.weights.h5")
            with open(archive, "rb") as f:
                write_weights_only(f, out, include_optimizer=include_optimizer)
            return copy_to_destination(out, str(path), storage_options, overwrite=overwrite)

    def export_keras(self, path: str, step: int | None = None, *, storage_options: dict[str, Any] | None = None, progress: Progress | None = None, overwrite: bool = False) -> str:
        """Copy a verified ``.keras`` archive out of the checkpoint directory."""
        self._check_destination(path)
        with self.verified_archive(step, progress=progress) as (_, archive):
            return copy_to_destination(archive, str(path), storage_options, overwrite=overwrite)

    def export_saved_model(self, path: str, step: int | None = None, *, custom_objects=None, storage_options: dict[str, Any] | None = None, safe_mode: bool = True, progress: Progress | None = None, overwrite: bool = False) -> str:
        """Export a TensorFlow SavedModel for serving (Keras ``model.export``)."""
        self._check_destination(path)
        model = self.load(step, custom_objects, compile=False, safe_mode=safe_mode)
        with _local_staging() as tmp:
            out = os.path.join(tmp, "saved_model")
            model.export(out, format="tf_saved_model", verbose=False)
            return copy_to_destination(out, str(path), storage_options, overwrite=overwrite)

    def _check_destination(self, path: str) -> None:
        if self.storage.contains(str(path)):
            raise ConfigError(
                f"Invalid export destination: Received: {path!r}, inside the checkpoint "
                f"directory {self.directory}. Export outside it; checkpoints are never overwritten."
            )



@contextmanager
def _local_staging() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="ckptmgr-export-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

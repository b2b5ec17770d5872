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
            try:
                model.export(out, format="tf_saved_model", verbose=False)
            except ValueError as exc:
                # A subclassed model rebuilt from its build_config was never
                # called, and Keras takes a subclassed model's signature from
                # its first call: give it the build_config's input shapes.
                signature = _signature_from_build_config(model)
                if "never called" not in str(exc) or signature is None:
                    raise
                shutil.rmtree(out, ignore_errors=True)
                model.export(out, format="tf_saved_model", verbose=False, input_signature=signature)
            return copy_to_destination(out, str(path), storage_options, overwrite=overwrite)

    def _check_destination(self, path: str) -> None:
        if self.storage.contains(str(path)):
            raise ConfigError(
                f"Invalid export destination: Received: {path!r}, inside the checkpoint "
                f"directory {self.directory}. Export outside it; checkpoints are never overwritten."
            )



def _signature_from_build_config(model) -> list[Any] | None:
    """``[InputSpec...]`` from ``model.get_build_config()["input_shape"]``
    (batch dimension left free), nested as the shapes are; None without one."""
    import keras

    shapes = (model.get_build_config() or {}).get("input_shape")

    def spec(structure):
        if isinstance(structure, dict):
            return {k: spec(v) for k, v in structure.items()}
        if isinstance(structure, (list, tuple)) and all(d is None or isinstance(d, int) for d in structure):
            return keras.InputSpec(shape=(None, *structure[1:]), dtype=model.input_dtype)
        if isinstance(structure, (list, tuple)):
            return [spec(v) for v in structure]
        raise ValueError(f"unexpected input_shape {structure!r}")

    if not shapes:
        return None
    try:
        return [spec(shapes)]
    except ValueError:
        return None


@contextmanager
def _local_staging() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="ckptmgr-export-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

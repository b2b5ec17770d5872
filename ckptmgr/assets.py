"""Assets (files a layer saves, such as a lookup table's vocabulary): captured
into memory on the worker, restored from the archive's ``assets/`` members.

Keras's ``saving_lib`` gives every saveable that has ``save_assets`` the
directory ``assets/<its inner path>`` and zips whatever files it writes there.
:class:`AssetRecorder` joins the capture plan's one traversal of the model and
notes which saveables those are, and where. Each capture then asks only them to
write into a temporary directory and reads the files back as bytes (assets are
small), since a vocabulary can change between saves (re-adapted) without any
variable changing. A model without such layers (the common case) does no disk
round trip at all.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ckptmgr import keras_compat
from ckptmgr.errors import UnsupportedModelError
from ckptmgr.io.archive import extract_assets


@functools.lru_cache(maxsize=None)
def asset_recorder_class():
    """Keras's asset store type, recording instead of keeping files (worker side)."""
    saving_lib = keras_compat.saving_lib()

    class AssetRecorder(saving_lib.DiskIOStore):
        """Notes ``(inner_path, saveable)`` for each ``save_assets`` call.

        Use inside ``with recorder:``: the files written at planning time go to
        a scratch directory that is removed afterwards.
        """

        def __init__(self):  # noqa: D401 - no archive behind it
            self.mode, self.archive, self.tmp_dir = "w", None, None
            self.root_path = self.working_dir = ""
            self.owners: list[tuple[str, Any]] = []

        def __enter__(self):
            self.tmp_dir = tempfile.mkdtemp(prefix="ckptmgr-assets-")
            self.working_dir = self.root_path = self.tmp_dir
            return self

        def __exit__(self, *exc) -> None:
            import shutil

            shutil.rmtree(self.tmp_dir, ignore_errors=True)

        def make(self, path):
            # _save_state calls make() right before saveable.save_assets.
            saveable = sys._getframe(1).f_locals.get("saveable")
            if saveable is None or not hasattr(saveable, "save_assets"):
                raise UnsupportedModelError(
                    f"Cannot tell which layer saves the assets at {path or '<model>'!r}: "
                    "this Keras version's saving traversal differs from the one "
                    "ckptmgr knows. Received: keras saving_lib._save_state without a "
                    "'saveable' local."
                )
            self.owners.append((path, saveable))
            return super().make(path)

        def close(self):
            pass

    return AssetRecorder


class AssetPlan:
    """The saveables that write assets, each with its Keras inner path."""

    def __init__(self, owners: list[tuple[str, Any]]):
        self.owners = owners

    def capture(self) -> dict[str, bytes]:
        """Every asset file as ``{path under assets/: bytes}``; ``{}`` at no
        cost when no saveable writes assets."""
        if not self.owners:
            return {}
        with tempfile.TemporaryDirectory(prefix="ckptmgr-assets-") as root:
            for path, saveable in self.owners:
                target = os.path.join(root, *path.split("/")) if path else root
                os.makedirs(target, exist_ok=True)
                saveable.save_assets(target)
            return _read_tree(root)


def _read_tree(root: str) -> dict[str, bytes]:
    """The regular files under ``root`` (what Keras zips), by relative path."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            with open(full, "rb") as f:
                files[rel] = f.read()
    return files


@contextmanager
def assets_store(archive) -> Iterator[Any]:
    """Keras's asset store over the archive's ``assets/`` files, extracted to
    a temporary directory; ``None`` when the archive has none (as Keras does)."""
    if archive is None:
        yield None
        return
    saving_lib = keras_compat.saving_lib()

    with tempfile.TemporaryDirectory(prefix="ckptmgr-assets-") as root:
        if not extract_assets(archive, root):
            yield None
            return
        yield saving_lib.DiskIOStore(root, mode="r")

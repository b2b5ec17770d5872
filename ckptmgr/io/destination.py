"""Export destinations: single user-given paths or URLs, outside any checkpoint directory.

An export never overwrites an existing file unless asked, and a failed export
leaves nothing at the destination (local: a temp name then ``os.replace``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ckptmgr.errors import ConfigError
from ckptmgr.io.backend_errors import translated
from ckptmgr.io.storage import check_url


def copy_to_destination(local_path: str, dest: str, storage_options: dict[str, Any] | None = None,
                        *, overwrite: bool = False) -> str:
    """Copy a local file or directory to ``dest`` (a path or URL); return its URL."""
    check_url(dest, "destination")
    try:
        fs, path = fsspec.core.url_to_fs(dest, skip_instance_cache=True, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise ConfigError(f"Invalid export destination: Received: {dest!r} ({exc}).") from None
    with translated(dest, "exporting"):
        existed = fs.exists(path)
        if existed and not overwrite:
            raise ConfigError(
                f"Export destination exists: Received: {dest!r}. Choose a new path "
                "or pass overwrite=True (CLI: --overwrite)."
            )
        if isinstance(fs, LocalFileSystem):
            _copy_local(local_path, path, overwrite)
        else:
            _copy_remote(fs, local_path, path, existed)
    return fs.unstrip_protocol(path)


def _copy_local(src: str, path: str, overwrite: bool) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    try:
        if os.path.isdir(src):
            shutil.copytree(src, tmp)
            if overwrite and os.path.isdir(path):
                shutil.rmtree(path)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def _copy_remote(fs, src: str, path: str, existed: bool) -> None:
    try:
        fs.put(src, path, recursive=os.path.isdir(src))
    except BaseException:
        try:  # an object store shows nothing partial, but a directory put may be half done
            if not existed and fs.exists(path):
                fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - already failing
            pass
        raise

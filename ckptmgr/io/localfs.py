"""Local-disk primitives that never follow a symlink and never replace a file.

Used by :mod:`ckptmgr.io.storage` for the ``file://`` backend only.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from ckptmgr import faults
from ckptmgr.errors import CorruptCheckpointError


@dataclass(frozen=True)
class RootEntry:
    """A name in a directory, and whether it is a plain file."""

    name: str
    regular: bool
    what: str = "file"  # "symlink", "directory", "FIFO"... when not regular


def local_entries(where: str) -> list[RootEntry]:
    try:
        scan = list(os.scandir(where))
    except FileNotFoundError:
        return []
    entries = []
    for item in scan:
        if item.is_symlink():
            entries.append(RootEntry(item.name, False, "symlink"))
        elif item.is_file(follow_symlinks=False):
            entries.append(RootEntry(item.name, True))
        elif item.is_dir(follow_symlinks=False):
            entries.append(RootEntry(item.name, False, "directory"))
        else:
            entries.append(RootEntry(item.name, False, "special file (FIFO, socket or device)"))
    return entries


@contextmanager
def open_regular(path: str, name: str) -> Iterator[BinaryIO]:
    """Open a local file for reading only if it is a regular file, not a link.

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; ``O_NOFOLLOW`` keeps a
    symlink to ``/dev/zero`` (or anywhere else) from being read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise CorruptCheckpointError(f"{name} is a symlink; ckptmgr reads only regular files.") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{name} is not a regular file.")
    with os.fdopen(fd, "rb") as f:
        yield f


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_create(path: str, data: bytes, tmp_dir: str) -> None:
    """Write a complete file, then ``link`` it into place: create-if-absent."""
    tmp = f"{tmp_dir}/{os.path.basename(path)}.{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            faults.crash_point("manifest_before_rename")
            os.fsync(f.fileno())
        os.link(tmp, path)  # FileExistsError if taken
        fsync_dir(os.path.dirname(path))
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)

"""One archive written (or read) in byte ranges by several processes: the storage side.

Part of :class:`ckptmgr.io.storage.Storage` (a mixin, so that storage stays
the one owner of paths). Every writer writes a disjoint byte range of the
same archive (see :mod:`ckptmgr.io.archive_plan`); the coordinator then
writes the small tail and makes the archive appear under its final,
attempt-unique name in one step:

- local or shared POSIX disk (``pwrite``): ranks write at their offsets into
  one preallocated sparse file in ``.tmp/``; the coordinator writes the tail,
  fsyncs, and links the file to its final name (create-only).
- GCS (``compose``): ranks upload their ranges as objects in ``.tmp/``; the
  coordinator uploads the tail and composes them server-side (32 sources per
  call, so larger lists compose in rounds), then deletes the parts.
- S3 (``multipart``): the same with a multipart upload of part copies
  (``s3fs`` ``merge``); every part but the last must be at least 5 MiB.

Other backends (``memory://``...) have no way to assemble: archives there are
written by one writer. Nothing appears under an archive name until assembly,
so a writer that dies mid-range leaves only ``.tmp/`` leftovers for the sweep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from ckptmgr.io import layout
from ckptmgr.io.checksums import CHUNK_BYTES, HashingWriter
from ckptmgr.io.localfs import fsync_dir, open_regular

ParallelKind = Literal["pwrite", "compose", "multipart"]
MIN_PART_BYTES = {"pwrite": 1, "compose": 1, "multipart": 5 * 1024 * 1024}
_COMPOSE_LIMIT = 32  # GCS: sources per compose call


def parallel_kind_of(url: str) -> ParallelKind | None:
    """:meth:`ParallelParts.parallel_kind` from the URL alone (no filesystem)."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    return {"file": "pwrite", "local": "pwrite", "gs": "compose", "gcs": "compose",
            "s3": "multipart", "s3a": "multipart"}.get(scheme)


class ParallelParts:
    """Storage methods for archives written in ranges (see the module docstring)."""

    def parallel_kind(self) -> ParallelKind | None:
        """How this backend assembles ranges, or None when it cannot."""
        if self.is_local:
            return "pwrite"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if {"gs", "gcs"} & set(protocols):
            return "compose"
        if {"s3", "s3a"} & set(protocols):
            return "multipart"
        return None

    def begin_parallel(self, name: str, total: int) -> None:
        """Before any range is written: the preallocated file (local), or a
        check that the bucket exists (object stores)."""
        with self._translate(f"preparing {name}"):
            if self.is_local:
                fd = os.open(self._assembling(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                try:
                    os.ftruncate(fd, total)  # sparse: ranks fill it in
                finally:
                    os.close(fd)
            elif self._bucket() is not None:
                self._require_bucket()

    @contextmanager
    def open_range_writer(self, name: str, index: int, offset: int) -> Iterator[HashingWriter]:
        """Write range ``index`` of archive ``name``, starting at ``offset``.

        The writer's chunk CRC32Cs are the archive's own when ``offset`` is a
        multiple of the chunk size (ranges are cut that way).
        """
        with self._translate(f"writing range {index} of {name}"):
            if self.is_local:
                fd = os.open(self._assembling(name), os.O_WRONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "wb", buffering=0) as raw:
                    os.lseek(fd, offset, os.SEEK_SET)
                    yield HashingWriter(raw)
                    os.fsync(fd)
                return
            raw = self.fs.open(self._path(self._part(name, index)), "wb", block_size=CHUNK_BYTES * 4)
            try:
                yield HashingWriter(raw)
            except BaseException:
                from ckptmgr.io.storage import _discard_upload

                _discard_upload(raw)
                raise
            raw.close()

    def finish_parallel(self, name: str, ranges: int, tail_offset: int, tail: bytes) -> None:
        """Write the tail and make the archive appear under ``name``."""
        with self._translate(f"assembling {name}"):
            if self.is_local:
                self._finish_local(name, tail_offset, tail)
                return
            self.fs.pipe_file(self._path(self._part(name, ranges)), tail)
            sources = [self._path(self._part(name, i)) for i in range(ranges + 1)]
            self._merge(self._path(name), sources, name)
            self.abandon_parallel(name, ranges + 1)

    def abandon_parallel(self, name: str, ranges: int) -> None:
        """Remove what the writers of ``name`` left (best effort; the sweep
        removes anything missed once it is older than the grace time)."""
        leftovers = [self._assembling(name)] if self.is_local else [
            self._path(self._part(name, i)) for i in range(ranges + 1)]
        for path in leftovers:
            try:
                with self._translate(f"removing a part of {name}"):
                    self._rm_if_exists(path)
            except Exception:  # noqa: BLE001 - tidying only
                pass

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, end)`` of archive ``name``: concurrent
        requests on object stores, ``pread`` on local disk (never through a link)."""
        with self._translate(f"reading {name}"):
            if self.is_local:
                with open_regular(self._path(name), name) as f:
                    return [os.pread(f.fileno(), end - start, start) for start, end in ranges]
            path = self._path(name)
            return self.fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])

    # -- helpers -------------------------------------------------------------------
    def _assembling(self, name: str) -> str:
        self._local_tmp_dir()  # a real directory, never a symlink
        return self._path(layout.assembling_name(name))

    @staticmethod
    def _part(name: str, index: int) -> str:
        return layout.range_part_name(name, index)

    def _finish_local(self, name: str, tail_offset: int, tail: bytes) -> None:
        path = self._assembling(name)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            written = 0
            while written < len(tail):  # pwrite may write less than asked
                written += os.pwrite(fd, tail[written:], tail_offset + written)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(path, self._path(name))  # create-only: never replaces anything
        fsync_dir(self.root)
        os.remove(path)

    def _merge(self, final: str, sources: list[str], name: str) -> None:
        """Server-side concatenation; GCS composes at most 32 sources a call."""
        if self.parallel_kind() == "compose":
            round_ = 0
            while len(sources) > _COMPOSE_LIMIT:
                merged = []
                for i in range(0, len(sources), _COMPOSE_LIMIT):
                    target = self._path(layout.range_part_name(name, 10_000 * (round_ + 1) + i // _COMPOSE_LIMIT))
                    self.fs.merge(target, sources[i : i + _COMPOSE_LIMIT])
                    merged.append(target)
                if round_:
                    for old in sources:
                        self._rm_if_exists(old)
                sources, round_ = merged, round_ + 1
            self.fs.merge(final, sources)
            if round_:
                for old in sources:
                    self._rm_if_exists(old)
            return
        self.fs.merge(final, sources)

"""Checksums computed while bytes stream past, off the writer's thread.

sha256 of every archive is recorded in its manifest and checked on every read.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_BYTES = 16 * 1024 * 1024
_HASH_QUEUE = 8  # chunks in flight to the hashing thread (views, not copies)


@dataclass(frozen=True)
class WriteResult:
    """What the archive writer saw go by: its size and sha256."""

    name: str
    bytes: int
    sha256: str


class HashingWriter(io.RawIOBase):
    """A write-only, non-seekable stream that hashes and counts what passes.

    Being non-seekable makes ``zipfile`` write sequentially (data descriptors),
    so the hash is of exactly the bytes stored, computed in one pass. sha256
    runs in its own thread (hashlib releases the GIL), overlapping the CRC32
    that ``zipfile`` computes and the writes themselves. Callers must not
    mutate a buffer after passing it to :meth:`write` (``zipfile`` and the
    archive writer pass immutable bytes or array views that outlive the write).
    """

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self._count = 0
        self._chunks: queue.Queue = queue.Queue(maxsize=_HASH_QUEUE)
        self._hasher = threading.Thread(target=self._hash_loop, name="ckptmgr-sha256", daemon=True)
        self._hasher.start()
        self._digest: str | None = None

    def _hash_loop(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._sha.update(chunk)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._count

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            self._chunks.put(chunk)
            _write_all(self._raw, chunk)
        self._count += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    @property
    def bytes_written(self) -> int:
        return self._count

    def hexdigest(self) -> str:
        """The sha256 of everything written (waits for the hashing thread)."""
        if self._digest is None:
            self._chunks.put(None)
            self._hasher.join()
            self._digest = self._sha.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._digest is None and self._hasher.is_alive():
            self._chunks.put(None)
            self._hasher.join()
        super().close()


def _write_all(raw: BinaryIO, chunk: memoryview) -> None:
    """Unbuffered files may write less than asked: loop until all is out."""
    while chunk:
        written = raw.write(chunk)
        if written is None:  # a stream that does not report: it took it all
            return
        chunk = chunk[written:]

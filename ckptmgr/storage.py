"""Storage layout and atomic commit over fsspec: the only module that builds paths.

Layout under a root URL::

    <root>/ckpt-000000500.keras   a complete .keras archive (stock Keras loads it)
    <root>/ckpt-000000500.json    its manifest; its presence means "committed"
    <root>/ckpt-000000500.pin     optional marker: never prune this step
    <root>/.tmp/...               in-flight local writes; never listed, swept later

Commit protocol (every backend): the archive is written completely under its
final name first (local disk: a temp file, fsync, ``os.replace``; object stores:
an upload only becomes visible once complete), then the manifest is written in
one atomic put. Readers trust only manifests. Deleting runs the other way:
manifest first, so a crash mid-delete leaves an unlisted orphan, never a
manifest pointing at missing data. Orphans are removed by :meth:`sweep`.

Backend errors are translated here and nowhere else: a missing object is
``CheckpointNotFoundError``; anything else is ``StorageError`` (a 403 never reads
as "not there").
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

# gcsfs makes an extra gRPC call per operation that fake-gcs-server (and plain
# HTTP endpoints) cannot answer; each then stalls 60 s. Must be set before
# gcsfs is imported. Users may still override it in their environment.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from ckptmgr import faults  # noqa: E402
from ckptmgr.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
)

_PREFIX = "ckpt-"
_NAME_RE = re.compile(r"^ckpt-(\d{9,})\.(keras|json|pin)$")
_TMP_DIR = ".tmp"
CHUNK_BYTES = 16 * 1024 * 1024
_HASH_QUEUE = 8  # chunks in flight to the hashing thread (views, not copies)


def archive_name(step: int) -> str:
    """File name of the archive of ``step`` (relative to the root)."""
    return f"{_PREFIX}{step:09d}.keras"


def manifest_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}.json"


def _pin_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}.pin"


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


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """Turn CLI ``key=value`` pairs into storage options (JSON-ish values)."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"Invalid storage option: Received: {pair!r}. Use key=value, "
                "e.g. --storage-option token=anon."
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


class Storage:
    """One checkpoint directory on one fsspec backend.

    Built from ``(url, storage_options)`` inside each process; never pickle the
    filesystem itself (this object pickles as its URL and options).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(
                f"Invalid checkpoint directory: Received: directory={url!r}. "
                "Pass a local path or an fsspec URL such as gs://bucket/run."
            )
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = dict(storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(
                self.url, skip_instance_cache=True, **self.storage_options
            )
        except (ValueError, ImportError, TypeError) as exc:
            raise ConfigError(
                f"Cannot open storage: Received: directory={url!r} "
                f"({type(exc).__name__}: {exc}). Check the URL scheme and "
                "storage options."
            ) from None
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(fs, LocalFileSystem)

    def __reduce__(self):
        return (Storage, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- names ---------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def archive_path(self, step: int) -> str:
        """Backend path of the archive (for fsspec calls on ``self.fs``)."""
        return self._path(archive_name(step))

    def archive_url(self, step: int) -> str:
        """User-facing URL of the archive of ``step`` (what ``list`` prints)."""
        return self.fs.unstrip_protocol(self.archive_path(step))

    def local_archive_path(self, step: int) -> str | None:
        """A path stock Keras can open directly, when storage is local disk."""
        return self.archive_path(step) if self.is_local else None

    # -- errors --------------------------------------------------------------
    @contextmanager
    def _translate(self, what: str, step: int | None = None) -> Iterator[None]:
        try:
            yield
        except (CheckpointNotFoundError, CheckpointExistsError, StorageError):
            raise
        except FileNotFoundError:
            at = f" step {step}" if step is not None else ""
            raise CheckpointNotFoundError(
                f"Checkpoint{at} not found: {what} is missing under {self.url}."
            ) from None
        except PermissionError as exc:
            raise StorageError(
                f"Permission denied while {what} under {self.url}: {exc}. "
                "Check credentials and storage options."
            ) from None
        except OSError as exc:
            raise StorageError(
                f"Storage failed while {what} under {self.url}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _exists(self, path: str) -> bool:
        """True if ``path`` exists; errors other than not-found propagate."""
        try:
            self._fresh_info(path)
            return True
        except FileNotFoundError:
            return False

    def _fresh_info(self, path: str) -> dict:
        """``fs.info`` that never answers from fsspec's listings cache."""
        self.fs.invalidate_cache(path)
        return self.fs.info(path)

    def _bucket(self) -> str | None:
        """The bucket of the root on object stores; None on real file systems."""
        split = getattr(self.fs, "split_path", None)
        if self.is_local or split is None:
            return None
        return split(self.root)[0]

    def _require_bucket(self) -> None:
        bucket = self._bucket()
        if bucket is None:
            return
        try:
            self._fresh_info(bucket)
        except FileNotFoundError:
            raise StorageError(
                f"Bucket {bucket!r} does not exist: Received: directory={self.url!r}. "
                "Create the bucket first or fix the URL."
            ) from None
        except PermissionError:
            pass  # may list objects without reading bucket metadata: can't tell

    # -- listing -------------------------------------------------------------
    def _names(self) -> list[str]:
        with self._translate("listing checkpoints"):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                self._require_bucket()
                return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def committed_steps(self) -> list[int]:
        """Steps that have a manifest, ascending. Archives alone never count."""
        steps = []
        for name in self._names():
            match = _NAME_RE.match(name)
            if match and match.group(2) == "json":
                steps.append(int(match.group(1)))
        return sorted(steps)

    def pinned_steps(self) -> set[int]:
        steps = set()
        for name in self._names():
            match = _NAME_RE.match(name)
            if match and match.group(2) == "pin":
                steps.add(int(match.group(1)))
        return steps

    def is_committed(self, step: int) -> bool:
        with self._translate("checking a manifest", step):
            return self._exists(self._path(manifest_name(step)))

    # -- writing -------------------------------------------------------------
    @contextmanager
    def open_archive_writer(self, step: int) -> Iterator[HashingWriter]:
        """Stream the archive of ``step``; it lands under its final name on exit.

        Refuses a step that is already committed. On error nothing is left
        that a reader would list.
        """
        if self.is_committed(step):
            raise CheckpointExistsError(
                f"Checkpoint step {step} already exists under {self.url}; "
                "steps are never overwritten. Delete it first or use a new step."
            )
        final = self.archive_path(step)
        with self._translate("writing an archive", step):
            if self.is_local:
                yield from self._write_local(final)
            else:
                yield from self._write_remote(final)

    def _write_local(self, final: str) -> Iterator[HashingWriter]:
        tmp_dir = self._path(_TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = f"{tmp_dir}/{os.path.basename(final)}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb", buffering=0) as raw:
                writer = HashingWriter(raw)
                yield writer
                faults.crash_point("archive_before_fsync")
                os.fsync(raw.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.root)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _write_remote(self, final: str) -> Iterator[HashingWriter]:
        if self._bucket() is None:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self._require_bucket()  # never create a bucket by accident
        raw = self.fs.open(final, "wb", block_size=CHUNK_BYTES * 4)
        try:
            writer = HashingWriter(raw)
            yield writer
        except BaseException:
            _discard_upload(raw)
            try:  # backends that write in place (memory://, sftp...) left a partial file
                self._rm_if_exists(final)
            except Exception:  # noqa: BLE001
                pass
            raise
        raw.close()

    def write_manifest(self, step: int, data: bytes) -> None:
        """The commit point: write the manifest of ``step`` atomically, last."""
        path = self._path(manifest_name(step))
        with self._translate("writing a manifest", step):
            if self._exists(path):
                raise CheckpointExistsError(
                    f"Checkpoint step {step} was committed concurrently under "
                    f"{self.url}; refusing to overwrite it."
                )
            try:
                if self.is_local:
                    _atomic_local_write(path, data, self._path(_TMP_DIR), exclusive=True)
                else:
                    self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise CheckpointExistsError(
                    f"Checkpoint step {step} was committed concurrently under "
                    f"{self.url}; refusing to overwrite it."
                ) from None

    def write_pin(self, step: int, pinned: bool) -> None:
        path = self._path(_pin_name(step))
        with self._translate("updating a pin", step):
            if pinned:
                self.fs.pipe_file(path, b"pinned\n")
            elif self._exists(path):
                self.fs.rm_file(path)

    # -- reading -------------------------------------------------------------
    def read_manifest_bytes(self, step: int) -> bytes:
        with self._translate("reading the manifest", step):
            return self.fs.cat_file(self._path(manifest_name(step)))

    def archive_size(self, step: int) -> int:
        with self._translate(f"reading {archive_name(step)}", step):
            return int(self._fresh_info(self.archive_path(step))["size"])

    @contextmanager
    def open_archive(self, step: int) -> Iterator[BinaryIO]:
        """A seekable, readable file of the archive of ``step``."""
        with self._translate(f"reading {archive_name(step)}", step):
            if self.is_local:
                with open(self.archive_path(step), "rb") as f:
                    yield f
            else:
                self.fs.invalidate_cache(self.archive_path(step))
                with self.fs.open(
                    self.archive_path(step), "rb", block_size=CHUNK_BYTES * 4
                ) as f:
                    yield f

    def iter_archive_chunks(self, step: int) -> Iterator[memoryview]:
        """The archive in order, through one reused buffer: use each chunk
        before asking for the next."""
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        with self.open_archive(step) as f:
            while n := f.readinto(buffer):
                yield view[:n]

    def scratch_dir(self) -> str | None:
        """Where local temp files of a write go (swept like other leftovers);
        None for object stores (the system temp directory is used)."""
        if not self.is_local:
            return None
        path = self._path(_TMP_DIR)
        os.makedirs(path, exist_ok=True)
        return path

    # -- deleting ------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Uncommit then remove: manifest, archive, pin, in that order."""
        with self._translate("deleting a checkpoint", step):
            self._rm_if_exists(self._path(manifest_name(step)))
            faults.crash_point("delete_after_manifest")
            self._rm_if_exists(self.archive_path(step))
            self._rm_if_exists(self._path(_pin_name(step)))

    def _rm_if_exists(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def orphans(self, older_than_s: float) -> list[str]:
        """Leftovers of interrupted writes or deletes, older than the grace time."""
        committed = set(self.committed_steps())
        now = time.time()
        found = []
        with self._translate("looking for leftovers"):
            for name in self._names():
                match = _NAME_RE.match(name)
                if match and match.group(2) != "json":
                    if int(match.group(1)) not in committed:
                        found.append(self._path(name))
            tmp_dir = self._path(_TMP_DIR)
            if self._exists(tmp_dir):
                found += [p for p in self.fs.ls(tmp_dir, detail=False)]
            return [p for p in found if self._age_s(p, now) >= older_than_s]

    def _age_s(self, path: str, now: float) -> float:
        try:
            modified = self.fs.modified(path)
        except (NotImplementedError, FileNotFoundError, OSError):
            return float("inf")
        return now - modified.timestamp()

    def sweep(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove leftovers older than ``older_than_s``; return their URLs.

        The grace time protects a write in flight in another process.
        """
        removed = []
        for path in self.orphans(older_than_s):
            with self._translate("sweeping leftovers"):
                self._rm_if_exists(path)
            removed.append(self.fs.unstrip_protocol(path))
        return removed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_local_write(path: str, data: bytes, tmp_dir: str, exclusive: bool = False) -> None:
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = f"{tmp_dir}/{os.path.basename(path)}.{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            faults.crash_point("manifest_before_rename")
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic create-if-absent: FileExistsError if taken
        else:
            os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _discard_upload(raw: Any) -> None:
    """Abandon an object-store upload so no partial object appears."""
    try:
        if hasattr(raw, "discard"):
            raw.discard()
        raw.closed = True  # fsspec buffered files: skip the final commit
    except Exception:  # noqa: BLE001 - best effort on an already failing path
        pass


def copy_to_destination(local_path: str, dest: str, storage_options: dict[str, Any] | None = None) -> str:
    """Copy a local file or directory to ``dest`` (a path or URL); return its URL.

    Used by exports, whose destinations are single user-given paths rather
    than checkpoint directories.
    """
    try:
        fs, path = fsspec.core.url_to_fs(dest, skip_instance_cache=True, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise ConfigError(f"Invalid export destination: Received: {dest!r} ({exc}).") from None
    try:
        if isinstance(fs, LocalFileSystem):
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            if os.path.isdir(local_path):
                if os.path.exists(path):
                    raise ConfigError(f"Export destination exists: Received: {dest!r}. Choose a new path.")
                import shutil

                shutil.copytree(local_path, path)
            else:
                import shutil

                tmp = f"{path}.{uuid.uuid4().hex}.part"
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, path)
        else:
            fs.put(local_path, path, recursive=os.path.isdir(local_path))
    except ConfigError:
        raise
    except OSError as exc:
        raise StorageError(f"Export to {dest} failed: {type(exc).__name__}: {exc}") from None
    return fs.unstrip_protocol(path)

"""One checkpoint directory over fsspec: paths, atomic commit, listing, sweeping.

The only module that joins paths (names come from :mod:`ckptmgr.io.layout`).

Commit protocol (every backend): the archive is written completely under a
name no other writer can produce (its attempt id; local disk: a temp file,
fsync, then a create-only ``link``; object stores: an upload becomes visible
only once complete), then the manifest is created only if absent (local
``link``, GCS ``ifGenerationMatch=0``, S3 ``If-None-Match: *``). Readers trust
only manifests, so a committed checkpoint is never modified by anyone.
Deleting runs the other way: manifest first, so a crash mid-delete leaves an
unlisted orphan, never a manifest pointing at missing data.

Odd entries in the root (symlinks, FIFOs, directories under checkpoint names,
names that are not canonical) are reported once and ignored; nothing follows a
symlink out of the root. Backend errors are translated by
:mod:`ckptmgr.io.backend_errors` and reach callers as ``CkptmgrError``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

# gcsfs makes an extra gRPC call per operation that fake-gcs-server (and plain
# HTTP endpoints) cannot answer; each then stalls 60 s. Must be set before
# gcsfs is imported. Users may still override it in their environment.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from ckptmgr import faults  # noqa: E402
from ckptmgr.extras import missing_for_url  # noqa: E402
from ckptmgr.errors import (  # noqa: E402
    ConfigError,
    CorruptCheckpointError,
    StorageError,
)
from ckptmgr.io import layout  # noqa: E402
from ckptmgr.io.backend_errors import translated  # noqa: E402
from ckptmgr.io.checksums import CHUNK_BYTES, Algorithm, HashingWriter  # noqa: E402
from ckptmgr.io.localfs import RootEntry, atomic_create, fsync_dir, local_entries, open_regular  # noqa: E402
from ckptmgr.io.manifest import MAX_MANIFEST_BYTES  # noqa: E402
from ckptmgr.io.parts import ParallelParts  # noqa: E402
from ckptmgr.io.urls import check_url, parse_storage_options  # noqa: E402,F401 - re-exported

log = logging.getLogger("ckptmgr")
_reported: set[tuple[str, str]] = set()  # (root, name) already warned about


class Storage(ParallelParts):
    """One checkpoint directory on one fsspec backend.

    Built from ``(url, storage_options)`` inside each process; never pickle the
    filesystem itself (this object pickles as its URL and options).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        check_url(url)
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = dict(storage_options or {})
        try:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.storage_options)
        except (ValueError, ImportError, TypeError) as exc:
            missing = missing_for_url(url) if isinstance(exc, ImportError) else None
            if missing:
                raise ConfigError(f"Cannot open {url!r}: {missing}") from None
            raise ConfigError(
                f"Cannot open storage: Received: directory={url!r} "
                f"({type(exc).__name__}: {exc}). Check the URL scheme and storage options."
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

    def url_of(self, name: str) -> str:
        """User-facing URL of a file in the root (what ``list`` prints)."""
        return self.fs.unstrip_protocol(self._path(name))

    def local_path_of(self, name: str) -> str | None:
        """A path stock Keras can open directly, when storage is local disk."""
        return self._path(name) if self.is_local else None

    def contains(self, url: str) -> bool:
        """True if ``url`` (same backend) lies inside this directory."""
        try:
            fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **self.storage_options)
        except (ValueError, ImportError, TypeError):
            return False
        if type(fs) is not type(self.fs):
            return False
        if self.is_local:
            path, root = os.path.realpath(path), os.path.realpath(self.root)
        else:
            root = self.root
        return path == root or path.startswith(root.rstrip("/") + "/")

    def _translate(self, what: str, step: int | None = None):
        return translated(self.url, what, step)

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
    def _entries(self, sub: str | None = None) -> list[RootEntry]:
        """Names directly under the root (or ``root/sub``), with their kind."""
        where = self._path(sub) if sub else self.root
        with self._translate("listing checkpoints"):
            if self.is_local:
                return local_entries(where)
            self.fs.invalidate_cache(where)
            try:
                found = self.fs.ls(where, detail=True)
            except FileNotFoundError:
                if sub is None:
                    self._require_bucket()
                return []
        entries = []
        for info in found:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            regular = info.get("type") == "file"
            entries.append(RootEntry(name, regular, "file" if regular else str(info.get("type"))))
        return entries

    def _recognised(self) -> list[tuple[layout.Entry, RootEntry]]:
        """Checkpoint files in the root; odd ones are reported once and skipped."""
        found = []
        for entry in self._entries():
            parsed = layout.parse_name(entry.name)
            if parsed is None:
                if entry.name.startswith(layout.PREFIX):
                    self._report(entry.name, "not a name ckptmgr writes")
                continue
            if not entry.regular:
                self._report(entry.name, f"a {entry.what}, not a regular file")
                continue
            found.append((parsed, entry))
        return found

    def _report(self, name: str, why: str) -> None:
        if (self.url, name) not in _reported:
            _reported.add((self.url, name))
            log.warning("ignoring %s: %s", self.url_of(name), why)

    def committed_steps(self) -> list[int]:
        """Steps that have a manifest, ascending. Archives alone never count."""
        return sorted(p.step for p, _ in self._recognised() if p.kind == "manifest")

    def pinned_steps(self) -> set[int]:
        return {p.step for p, _ in self._recognised() if p.kind == "pin"}

    def archives(self) -> list[layout.Entry]:
        """Every archive file in the root, committed or not."""
        return [p for p, _ in self._recognised() if p.kind == "archive"]

    def is_committed(self, step: int) -> bool:
        with self._translate("checking a manifest", step):
            try:
                self._fresh_info(self._path(layout.manifest_name(step)))
                return True
            except FileNotFoundError:
                return False

    # -- writing -------------------------------------------------------------
    @contextmanager
    def open_archive_writer(self, name: str, algorithm: Algorithm = "crc32c") -> Iterator[HashingWriter]:
        """Stream a new archive; it appears under ``name`` (never taken) on exit.

        On error nothing is left that a reader would list. ``algorithm``: see
        :mod:`ckptmgr.io.checksums`.
        """
        final = self._path(name)
        with self._translate(f"writing {name}"):
            if self.is_local:
                yield from self._write_local(final, algorithm)
            else:
                yield from self._write_remote(final, algorithm)

    def _write_local(self, final: str, algorithm: Algorithm) -> Iterator[HashingWriter]:
        tmp = f"{self._local_tmp_dir()}/{os.path.basename(final)}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb", buffering=0) as raw:
                writer = HashingWriter(raw, algorithm)
                yield writer
                faults.crash_point("archive_before_fsync")
                os.fsync(raw.fileno())
            os.link(tmp, final)  # create-only: never replaces anything
            fsync_dir(self.root)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)

    def _write_remote(self, final: str, algorithm: Algorithm) -> Iterator[HashingWriter]:
        if self._bucket() is None:
            self.fs.makedirs(self.root, exist_ok=True)
        else:
            self._require_bucket()  # never create a bucket by accident
        raw = self.fs.open(final, "wb", block_size=CHUNK_BYTES * 4)
        try:
            writer = HashingWriter(raw, algorithm)
            yield writer
        except BaseException:
            _discard_upload(raw)
            try:  # backends that write in place (memory://, sftp...) left a partial file
                self._rm_if_exists(final)
            except Exception:  # noqa: BLE001
                pass
            raise
        raw.close()

    def _local_tmp_dir(self) -> str:
        return self._own_local_dir(layout.TMP_DIR)

    def _own_local_dir(self, sub: str) -> str:
        """``root/sub`` as a real directory: never a symlink out of the root."""
        path = self._path(sub)
        if os.path.islink(path):
            raise StorageError(
                f"{path} is a symlink; ckptmgr writes only inside {self.url}. Remove the link."
            )
        os.makedirs(path, exist_ok=True)
        return path

    def _create(self, name: str, data: bytes) -> None:
        """Create a small file only if absent (``FileExistsError`` otherwise)."""
        path = self._path(name)
        if self.is_local:
            if "/" in name:
                self._own_local_dir(name.rsplit("/", 1)[0])
            atomic_create(path, data, self._local_tmp_dir())
        else:
            self.fs.pipe_file(path, data, mode="create")

    def write_manifest(self, step: int, data: bytes) -> None:
        """The commit point: create the manifest of ``step``, never replace one.

        Raises ``CheckpointExistsError`` if a manifest is there, even our own
        (a lost response after a retry): the caller reads it back to tell.
        """
        with self._translate(f"committing step {step}", step):
            self._create(layout.manifest_name(step), data)

    def write_pin(self, step: int, pinned: bool) -> None:
        path = self._path(layout.pin_name(step))
        with self._translate("updating a pin", step):
            if pinned:
                self.fs.pipe_file(path, b"pinned\n")
            else:
                self._rm_if_exists(path)

    # -- leases (see ckptmgr.io.lease) ---------------------------------------
    def lease_tokens(self) -> list[int]:
        if self.is_local and os.path.islink(self._path(layout.LEASE_DIR)):
            self._own_local_dir(layout.LEASE_DIR)  # raises: never read leases through a link
        entries = self._entries(layout.LEASE_DIR)
        tokens = (layout.parse_lease_name(e.name) for e in entries if e.regular)
        return sorted(t for t in tokens if t is not None)

    def create_lease(self, token: int, data: bytes) -> None:
        with self._translate(f"claiming lease {token}"):
            self._create(f"{layout.LEASE_DIR}/{layout.lease_name(token)}", data)

    def read_lease(self, token: int) -> bytes:
        return self._read_small(f"{layout.LEASE_DIR}/{layout.lease_name(token)}", f"reading lease {token}")

    def delete_lease(self, token: int) -> None:
        with self._translate(f"deleting lease {token}"):
            self._rm_if_exists(self._path(f"{layout.LEASE_DIR}/{layout.lease_name(token)}"))

    # -- superseded steps (see ckptmgr.history) -------------------------------
    def supersede(self, step: int, tag: str, record: bytes) -> None:
        """Move ``step`` aside: create its record in ``superseded/`` (create-only;
        an existing one means a crash or a peer got this far: fine), then
        uncommit the step (manifest, then pin). Archives stay where they are."""
        with self._translate("moving a checkpoint aside", step):
            try:
                self._create(layout.superseded_name(step, tag), record)
            except FileExistsError:
                pass
            self._rm_if_exists(self._path(layout.manifest_name(step)))
            self._rm_if_exists(self._path(layout.pin_name(step)))

    def superseded(self) -> list[tuple[int, str]]:
        """(step, tag) of every record in ``superseded/``, oldest step first."""
        if self.is_local and os.path.islink(self._path(layout.SUPERSEDED_DIR)):
            self._report(layout.SUPERSEDED_DIR, "a symlink; ckptmgr never follows it")
            return []
        parsed = (layout.parse_superseded_name(e.name) for e in self._entries(layout.SUPERSEDED_DIR) if e.regular)
        return sorted(p for p in parsed if p is not None)

    def read_superseded(self, step: int, tag: str) -> bytes:
        return self._read_small(layout.superseded_name(step, tag), "reading a superseded record", step)

    def delete_superseded(self, step: int, tag: str, archives: Collection[str]) -> None:
        """Record first, then ``archives`` (names in the root)."""
        with self._translate("deleting a superseded checkpoint", step):
            self._rm_if_exists(self._path(layout.superseded_name(step, tag)))
            for name in archives:
                self._rm_if_exists(self._path(name))

    # -- reading -------------------------------------------------------------
    def read_manifest_bytes(self, step: int) -> bytes:
        return self._read_small(layout.manifest_name(step), "reading the manifest", step)

    def _read_small(self, name: str, what: str, step: int | None = None) -> bytes:
        """At most ``MAX_MANIFEST_BYTES + 1`` bytes of a regular file."""
        path = self._path(name)
        with self._translate(what, step):
            if self.is_local:
                with open_regular(path, name) as f:
                    return f.read(MAX_MANIFEST_BYTES + 1)
            try:  # one request: objects are plain files; a "directory" is not found
                return self.fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
            except IsADirectoryError:
                raise CorruptCheckpointError(f"{name} is not a regular file.") from None

    def file_size(self, name: str) -> int:
        with self._translate(f"reading {name}"):
            if self.is_local:
                with open_regular(self._path(name), name) as f:
                    return os.fstat(f.fileno()).st_size
            info = self._fresh_info(self._path(name))
            if info.get("type") != "file":
                raise CorruptCheckpointError(f"{name} is not a regular file.")
            return int(info["size"])

    @contextmanager
    def open_archive(self, name: str) -> Iterator[BinaryIO]:
        """A seekable, readable file of the archive ``name`` in the root."""
        path = self._path(name)
        with self._translate(f"reading {name}"):
            if self.is_local:
                with open_regular(path, name) as f:
                    yield f
            else:
                self.fs.invalidate_cache(path)
                with self.fs.open(path, "rb", block_size=CHUNK_BYTES * 4) as f:
                    yield f

    def iter_archive_chunks(self, name: str) -> Iterator[memoryview]:
        """The archive in order, through one reused buffer: use each chunk
        before asking for the next."""
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        with self.open_archive(name) as f:
            while n := f.readinto(buffer):
                yield view[:n]

    def scratch_dir(self) -> str | None:
        """Where local temp files of a write go (swept like other leftovers);
        None for object stores (the system temp directory is used)."""
        return self._local_tmp_dir() if self.is_local else None

    # -- deleting ------------------------------------------------------------
    def delete(self, step: int, archives: list[layout.Entry] | None = None) -> None:
        """Uncommit then remove: manifest, the step's archives, pin, in that order.

        ``archives``: a listing from :meth:`archives` the caller already has
        (pruning several steps lists once); by default the root is listed.
        Already missing files are fine: a concurrent prune got there first.
        """
        with self._translate("deleting a checkpoint", step):
            self._rm_if_exists(self._path(layout.manifest_name(step)))
            faults.crash_point("delete_after_manifest")
            for archive in self.archives() if archives is None else archives:
                if archive.step == step:
                    self._rm_if_exists(self._path(layout.archive_name(step, archive.attempt)))
            self._rm_if_exists(self._path(layout.pin_name(step)))

    def delete_archive(self, name: str) -> None:
        """Remove one uncommitted archive (our own attempt that lost a race)."""
        with self._translate(f"deleting {name}"):
            self._rm_if_exists(self._path(name))

    def _rm_if_exists(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def orphans(self, older_than_s: float, claimed: Mapping[int, str] | None = None,
                kept: Callable[[], Collection[str]] = tuple) -> list[str]:
        """Leftovers of interrupted writes and deletes that may be swept.

        ``claimed`` maps steps whose manifests the caller read to the archive
        each names. Candidates: an archive of a step with no manifest, an
        archive of a claimed step that its manifest does not name (a writer
        that lost the race), a pin without a manifest, a file in ``.tmp``.
        An archive of a step committed but not in ``claimed`` (committed after
        the caller read, or unreadable) is always kept, and so is every name
        ``kept()`` returns (asked only when an archive is a candidate: the
        archives of superseded steps). Candidates go only
        when older than ``older_than_s`` *and* older than the newest manifest
        (so an attempt in flight survives; with no manifest nothing goes).
        """
        claimed = claimed or {}
        recognised = self._recognised()
        committed = {p.step for p, _ in recognised if p.kind == "manifest"}

        def unclaimed_archive(p: layout.Entry, name: str) -> bool:
            if p.step not in committed:
                return True
            return p.step in claimed and claimed[p.step] != name

        candidates = [
            e.name for p, e in recognised
            if (p.kind == "archive" and unclaimed_archive(p, e.name))
            or (p.kind == "pin" and p.step not in committed)
        ]
        if any(layout.parse_name(n) for n in candidates):
            keep = set(kept())
            candidates = [n for n in candidates if n not in keep]
        candidates += [f"{layout.TMP_DIR}/{n}" for n in self._tmp_leftovers()]
        if not candidates:
            return []
        newest = max(committed, default=None)
        if newest is None:  # nothing to date an attempt in flight against: keep all
            return []
        now = time.time()
        cutoff = max(older_than_s, self._age_s(layout.manifest_name(newest), now))
        return [n for n in candidates if self._age_s(n, now) > cutoff]

    def _tmp_leftovers(self) -> list[str]:
        if self.is_local and os.path.islink(self._path(layout.TMP_DIR)):
            self._report(layout.TMP_DIR, "a symlink; ckptmgr never follows it")
            return []
        names = []
        for entry in self._entries(layout.TMP_DIR):
            if entry.regular:
                names.append(entry.name)
            else:
                self._report(f"{layout.TMP_DIR}/{entry.name}", f"a {entry.what}, not a leftover of ckptmgr")
        return names

    def _age_s(self, name: str, now: float) -> float:
        try:
            modified = self.fs.modified(self._path(name))
        except (NotImplementedError, OSError):
            return 0.0  # unknown age: too young to sweep
        return now - modified.timestamp()

    def sweep(self, older_than_s: float = 3600.0, claimed: Mapping[int, str] | None = None,
              kept: Callable[[], Collection[str]] = tuple) -> list[str]:
        """Remove leftovers (see :meth:`orphans`); return their URLs.

        A leftover that cannot be removed is logged and skipped: sweeping is
        tidying and never fails a save.
        """
        removed = []
        for name in self.orphans(older_than_s, claimed, kept):
            try:
                with self._translate(f"sweeping {name}"):
                    self._rm_if_exists(self._path(name))
                removed.append(self.url_of(name))
            except StorageError as exc:
                log.warning("%s", exc)
        return removed


def _discard_upload(raw: Any) -> None:
    """Abandon an object-store upload so no partial object appears."""
    try:
        if hasattr(raw, "discard"):
            raw.discard()
        raw.closed = True  # fsspec buffered files: skip the final commit
    except Exception:  # noqa: BLE001 - best effort on an already failing path
        pass

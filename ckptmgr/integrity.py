"""Integrity: archives checked against their manifests, and restores that fall
back only on corruption.

Runs wherever a checkpoint is read (no TensorFlow needed to verify). The
rules: a checksum or layout mismatch is corruption (``CorruptCheckpointError``)
and the only reason to skip a checkpoint for an older one; a verified archive
that the model cannot load is the model's problem
(``IncompatibleCheckpointError``) and is raised, since an older checkpoint
would not fit either. Every fallback is logged with both step numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ckptmgr.errors import (
    CheckpointNotFoundError,
    CkptmgrError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnknownCustomObjectError,
    UnsafeCheckpointError,
)
from ckptmgr.io.archive import check_layout
from ckptmgr.io.layout import archive_name
from ckptmgr.io.checksums import StreamDigest, crc32c
from ckptmgr.io.manifest import FileEntry, Manifest
from ckptmgr.io.storage import Storage

log = logging.getLogger("ckptmgr")

Progress = Callable[[int, int], None]  # (bytes just read, total bytes)


@dataclass(frozen=True)
class VerifyResult:
    step: int
    ok: bool
    problem: str = ""  # one line naming the step and the file


class Verifier:
    """Checks the checkpoints of one directory.

    Args:
        storage: the directory.
        manifest: reads and validates the manifest of a step.
    """

    def __init__(self, storage: Storage, manifest: Callable[[int], Manifest]):
        self.storage = storage
        self._manifest = manifest

    def orphans(self, committed: set[int], superseded: Callable[[], set[str]] = set) -> list[VerifyResult]:
        """Archives whose step has no manifest (and that no superseded record
        keeps): reported, not restorable."""
        loose = [a for a in self.storage.archives() if a.step not in committed]
        if loose:
            kept = superseded()
            loose = [a for a in loose if archive_name(a.step, a.attempt) not in kept]
        return [
            VerifyResult(step, False, (
                f"step {step}: orphan archive without a manifest (an interrupted "
                "write or a deleted manifest); not restorable, swept after the grace time"))
            for step in sorted({a.step for a in loose})
        ]

    def verify_step(self, step: int, progress: Progress | None = None) -> VerifyResult:
        try:
            manifest = self._manifest(step)
            self._check_archive(manifest, sink=None, progress=progress)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            return VerifyResult(step, False, one_line(exc, step))
        return VerifyResult(step, True)

    def _check_archive(self, manifest: Manifest, sink, progress: Progress | None = None,
                       members: bool = True) -> None:
        """Stream the archive once, hashing it (and copying it into ``sink``);
        then, with ``members``, check its members (local files only: remote
        ones are checked after download, see :meth:`verified_archive`)."""
        step, name, entry = manifest.step, manifest.archive, manifest.archive_entry
        self.check_size(manifest)
        check = ArchiveCheck(entry)
        for chunk in self.storage.iter_archive_chunks(name):
            check.update(chunk)
            if sink is not None:
                sink.write(chunk)
            if progress is not None:
                progress(len(chunk), entry.bytes)
        problem = check.problem()
        if problem is not None:
            raise CorruptCheckpointError(f"step {step}: {name} is corrupt ({problem})")
        if members and self.storage.is_local:
            self._check_members(manifest)

    def _check_members(self, manifest: Manifest) -> None:
        """The archive holds only what a ``.keras`` file holds (see ``check_layout``)."""
        step, name = manifest.step, manifest.archive
        try:
            with self.storage.open_archive(name) as f:
                check_layout(f, self.storage.file_size(name))
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(f"step {step}: {name} is missing") from None
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"step {step}: {name}: {exc}") from None

    @contextmanager
    def verified_archive(self, manifest: Manifest, *, progress: Progress | None = None) -> Iterator[tuple[Manifest, str]]:
        """A local path to a verified archive (downloaded if remote)."""
        local = self.storage.local_path_of(manifest.archive)
        if local is not None:
            self._check_archive(manifest, sink=None, progress=progress)
            yield manifest, local
            return
        fd, tmp = tempfile.mkstemp(prefix=f"ckptmgr-{manifest.step}-", suffix=".keras")
        try:
            with os.fdopen(fd, "wb") as sink:
                if manifest.archive_entry.crc32c is not None:
                    self._download_chunks(manifest, sink, progress)
                else:  # sha256 only (schema 2): one stream
                    self._check_archive(manifest, sink=sink, progress=progress)
            _check_downloaded_members(tmp, manifest)
            yield manifest, tmp
        finally:
            os.remove(tmp)

    def _download_chunks(self, manifest: Manifest, sink, progress: Progress | None) -> None:
        """Fetch the archive a few chunks at a time with concurrent ranged reads,
        checking each chunk's CRC32C before it is written (and the sha256 too,
        if recorded)."""
        entry = manifest.archive_entry
        self.check_size(manifest)
        sha = hashlib.sha256() if entry.sha256 is not None else None  # chunks: checked as read
        for batch in _batches(range(len(entry.crc32c)), _CHUNKS_AT_ONCE):
            for data in self._read_chunks(manifest, batch):
                if sha is not None:
                    sha.update(data)
                sink.write(data)
                if progress is not None:
                    progress(len(data), entry.bytes)
        if sha is not None and sha.hexdigest() != entry.sha256:
            raise CorruptCheckpointError(
                f"step {manifest.step}: {manifest.archive} is corrupt (sha256 {sha.hexdigest()[:12]}..., "
                f"manifest says {entry.sha256[:12]}...)")

    def _read_chunks(self, manifest: Manifest, indices: list[int]) -> list[bytes]:
        """Chunks ``indices`` of the archive, each checked against its CRC32C."""
        entry = manifest.archive_entry
        datas = self.storage.read_ranges(manifest.archive, [entry.chunk_range(i) for i in indices])
        for index, data in zip(indices, datas):
            got = f"{crc32c(data):08x}"
            if got != entry.crc32c[index] or len(data) != _length(entry.chunk_range(index)):
                raise CorruptCheckpointError(
                    f"step {manifest.step}: {manifest.archive} is corrupt ({chunk_problem(entry, index, got)})")
        return datas

    def verify_share(self, manifest: Manifest, rank: int, world_size: int) -> None:
        """Check chunks ``rank, rank + world_size, ...`` only: N ranks verify
        an archive together, each reading 1/N of it. Archives without chunk
        checksums (schema 2) are checked whole."""
        if manifest.archive_entry.crc32c is None:
            self._check_archive(manifest, sink=None)
            return
        self.check_size(manifest)
        for batch in _batches(range(rank, len(manifest.archive_entry.crc32c), world_size), _CHUNKS_AT_ONCE):
            self._read_chunks(manifest, batch)
        if self.storage.is_local:
            self._check_members(manifest)

    def check_size(self, manifest: Manifest) -> None:
        step, name, entry = manifest.step, manifest.archive, manifest.archive_entry
        try:
            size = self.storage.file_size(name)
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(f"step {step}: {name} is missing") from None
        except CorruptCheckpointError as exc:  # not a regular file
            raise CorruptCheckpointError(f"step {step}: {exc}") from None
        if size != entry.bytes:
            raise CorruptCheckpointError(
                f"step {step}: {name} is truncated or altered ({size} bytes, manifest says {entry.bytes})")

    def first_good(self, candidates: list[int], use: Callable[[Manifest, str], Any], *,
                   explicit: bool, overlap: bool = False, verify: bool = True,
                   inline: Callable[[Manifest, str], Any] | None = None) -> tuple[Manifest, Any]:
        """``use(manifest, local_path)`` on the first of ``candidates`` that verifies.

        Explicit step (one candidate): that one or an error. Otherwise the newest that verifies;
        corrupt newer ones are skipped with a warning naming both steps. Only
        corruption falls back: if ``use`` fails on a verified archive (model
        code, another architecture) the error is raised, since an older
        checkpoint would not fit either. By default the checksum is checked
        before ``use`` runs, so a corrupt checkpoint never touches anything.
        With ``overlap`` (only for a ``use`` without side effects, like building
        a new model) the checksum runs in a thread while ``use`` reads the same
        local file, about one pass instead of two; the result is returned only
        once the checksum has matched. ``verify=False``: the caller already
        verified the (single, explicit) candidate, e.g. the ranks of a
        distributed restore, a share each: local archives are used as they
        are (their members still checked); remote ones are downloaded, which
        checks every chunk anyway. ``inline``: used instead of ``use`` on a
        local archive with chunk CRC32Cs (and no sha256) that is to be
        verified; it must check the chunks itself as it reads, before
        anything is applied, and raise ``CorruptCheckpointError`` otherwise
        (one read instead of two).
        """
        problems: list[tuple[int, str]] = []
        for candidate in candidates:
            try:
                result = self._use_verified(candidate, use, overlap, verify, inline)
            except CorruptCheckpointError as exc:
                if explicit:
                    raise
                problems.append((candidate, one_line(exc, candidate)))
                log.warning("%s", problems[-1][1])
                continue
            except CheckpointNotFoundError:
                if explicit:
                    raise
                continue  # pruned meanwhile
            if problems:
                log.warning(
                    "fell back from step %d to step %d, the newest checkpoint that verifies",
                    problems[0][0], candidate,
                )
            return result
        raise CorruptCheckpointError(
            f"No checkpoint under {self.storage.url} verifies: " + "; ".join(p for _, p in problems)
        )

    def _use_verified(self, step: int, use, overlap: bool, verify: bool = True,
                      inline=None) -> tuple[Manifest, Any]:
        manifest = self._manifest(step)
        local = self.storage.local_path_of(manifest.archive)
        entry = manifest.archive_entry
        if local is not None and verify and inline is not None and entry.crc32c is not None \
                and entry.sha256 is None:
            self.check_size(manifest)
            return manifest, _incompatible_if_raises(inline, manifest, local)
        if local is not None and not verify:
            self.check_size(manifest)
            self._check_members(manifest)
            return manifest, _incompatible_if_raises(use, manifest, local)
        if local is None or not overlap:  # remote: download while hashing, then use
            with self.verified_archive(manifest) as (_, path):
                return manifest, _incompatible_if_raises(use, manifest, path)
        self._check_members(manifest)  # before Keras extracts anything
        return manifest, self._use_while_hashing(manifest, local, use)

    def _use_while_hashing(self, manifest: Manifest, path: str, use):
        outcome: dict[str, BaseException] = {}

        def check():
            try:
                self._check_archive(manifest, sink=None, members=False)  # checked before use
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                outcome["error"] = exc

        checker = threading.Thread(target=check, name="ckptmgr-verify")
        checker.start()
        try:
            result = _incompatible_if_raises(use, manifest, path)
        except Exception:
            checker.join()
            if "error" in outcome:  # the data was bad: report that, not its symptom
                raise outcome["error"] from None
            raise
        checker.join()
        if "error" in outcome:
            raise outcome["error"]
        return result


class ArchiveCheck:
    """Recompute, as the archive streams past, every checksum its manifest
    entry records: the chunk CRC32Cs and, if there, the sha256."""

    def __init__(self, entry: FileEntry):
        self._entry = entry
        self._digest = StreamDigest("sha256" if entry.sha256 is not None else "crc32c", entry.chunk_bytes)

    def update(self, data) -> None:
        self._digest.update(data)

    def problem(self) -> str | None:
        """None if all match; else what differs, naming the first bad chunk."""
        entry = self._entry
        got, sha256 = self._digest.result()
        if entry.crc32c is not None:
            for index, (have, want) in enumerate(zip(got, entry.crc32c)):
                if have != want:
                    return chunk_problem(entry, index, have)
            if len(got) != len(entry.crc32c):
                return f"{len(got)} chunks, manifest says {len(entry.crc32c)}"
        if entry.sha256 is not None and sha256 != entry.sha256:
            return f"sha256 {sha256[:12]}..., manifest says {entry.sha256[:12]}..."
        return None


_CHUNKS_AT_ONCE = 4  # concurrent ranged reads (4 x 16 MiB in memory at most)


def _batches(items, size: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _length(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]


def chunk_problem(entry: FileEntry, index: int, got: str) -> str:
    start, end = entry.chunk_range(index)
    return (f"CRC32C of bytes {start}-{end} (chunk {index + 1} of {len(entry.crc32c)}) "
            f"is {got}, manifest says {entry.crc32c[index]}")


def one_line(exc: Exception, step: int) -> str:
    """The error's first line, naming ``step`` unless it already does."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if re.search(rf"\bstep {step}\b", text) else f"step {step}: {text}"


def _check_downloaded_members(path: str, manifest: Manifest) -> None:
    with open(path, "rb") as f:
        try:
            check_layout(f, os.fstat(f.fileno()).st_size)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"step {manifest.step}: {manifest.archive}: {exc}") from None


def _incompatible_if_raises(use: Callable[[Manifest, str], Any], manifest: Manifest, path: str) -> Any:
    """Run ``use`` on a verified archive; its failures are the model's, not the data's."""
    try:
        return use(manifest, path)
    except IncompatibleCheckpointError as exc:
        if str(exc).startswith("step "):
            raise
        raise IncompatibleCheckpointError(f"step {manifest.step}: {exc}") from None
    except CkptmgrError:
        raise
    except Exception as exc:
        raise _loading_error(exc, manifest.step) from exc


def _loading_error(exc: Exception, step: int) -> CkptmgrError:
    text = str(exc)
    if "Could not locate" in text or "custom_objects" in text and "not found" in text:
        found = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
        name = found.group(1) if found else "?"
        return UnknownCustomObjectError(
            f"step {step}: unknown custom object {name!r}. Pass custom_objects="
            f"{{{name!r}: ...}}, or decorate it with "
            "@keras.saving.register_keras_serializable() and import it first."
        )
    if "lambda" in text and "safe_mode" in text:
        return UnsafeCheckpointError(
            f"step {step}: the model contains a Python lambda, refused by safe_mode. "
            "Load with safe_mode=False (CLI: --unsafe) only if you trust its source."
        )
    # Keras wraps the model's own error in a multi-line summary: keep all of it, on one line.
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]
    return IncompatibleCheckpointError(
        f"step {step}: the checkpoint verifies, but the model's code cannot load it: "
        f"{type(exc).__name__}: {first}"
    )

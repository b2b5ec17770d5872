"""One run's history per directory: moving an abandoned future aside.

The rule. A directory lists one line of history. When training continues from
step S while newer steps are committed (a fallback past corrupt checkpoints, an
explicit older step, or a new run with ``new_run=True``), the steps after S
belong to an abandoned future: before the first save, the writer *supersedes*
them. Each one's manifest is copied, with the reason, into
``superseded/ckpt-<step>-<attempt>.json`` (create-only), then the step is
uncommitted (manifest, then pin). Nothing is overwritten or lost: the archive
stays in place and sweeping never removes it, ``ckptmgr list`` shows the
superseded steps, and only ``ckptmgr prune --superseded`` deletes them.
Training then writes those step numbers afresh.

Every step is idempotent, so a crash or two ranks doing it at once leave the
same result: a record without its manifest removed is finished next time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ckptmgr.errors import CheckpointNotFoundError, CkptmgrError, CorruptCheckpointError
from ckptmgr.io.layout import archive_name, parse_name
from ckptmgr.io.lease import WriterLease
from ckptmgr.io.manifest import now_utc
from ckptmgr.io.storage import Storage

log = logging.getLogger("ckptmgr")

RECORD_SCHEMA = 1


@dataclass(frozen=True)
class SupersededCheckpoint:
    """A step moved aside (see the module docstring)."""

    step: int
    tag: str
    superseded_at: str = "?"
    reason: str = "?"
    archive: str | None = None  # the archive its manifest named, if it parsed
    created: str | None = None  # when the step was first committed

    def describe(self) -> str:
        return f"step {self.step} ({self.reason}; moved aside {self.superseded_at})"


class History:
    """Supersede, list and delete abandoned steps of one directory."""

    def __init__(self, storage: Storage, lease: WriterLease):
        self._storage = storage
        self._lease = lease

    def supersede_after(self, step: int | None, reason: str) -> list[int]:
        """Move every committed step newer than ``step`` (every step, for None)
        aside; return them. Only the lease holder may (fenced writers raise)."""
        doomed = [s for s in self._storage.committed_steps() if step is None or s > step]
        for victim in reversed(doomed):  # newest first: a crash midway leaves a gapless history
            self._lease.check(f"moving step {victim} aside")
            raw = self._raw_manifest(victim)
            if raw is None:
                continue  # removed meanwhile (a peer rank did it)
            tag, record = _record(victim, raw, reason)
            self._storage.supersede(victim, tag, record)
        if doomed:
            log.warning(
                "%s: steps %s moved to %s/superseded/ (%s); training writes them afresh",
                self._storage.url, ", ".join(map(str, doomed)), self._storage.url, reason,
            )
        return doomed

    def _raw_manifest(self, step: int) -> bytes | None:
        try:
            return self._storage.read_manifest_bytes(step)
        except CheckpointNotFoundError:
            return None
        except CorruptCheckpointError:  # a symlink or FIFO: nothing to keep of it
            return b""

    def list(self) -> list[SupersededCheckpoint]:
        """Every superseded step, oldest first; unreadable records say so."""
        found = []
        for step, tag in self._storage.superseded():
            try:
                found.append(_parse_record(step, tag, self._storage.read_superseded(step, tag)))
            except CheckpointNotFoundError:
                continue
            except CkptmgrError as exc:
                found.append(SupersededCheckpoint(step, tag, reason=f"unreadable record: {exc}"))
        return found

    def kept_archives(self) -> set[str]:
        """Archive names the sweep must leave alone: those superseded records
        name, and, where a record names none, every archive of its step not
        claimed by that step's live manifest (cannot tell which one it was)."""
        entries = self.list()
        keep = {e.archive for e in entries if e.archive}
        unknown = {e.step for e in entries if not e.archive}
        if unknown:
            keep |= {archive_name(a.step, a.attempt) for a in self._storage.archives() if a.step in unknown}
        return keep

    def delete(self, live_archives: dict[int, str]) -> list[SupersededCheckpoint]:
        """Delete every superseded step: its record, then its archive (never an
        archive a live manifest names). Returns what was deleted."""
        entries = self.list()
        for entry in entries:
            self._lease.check(f"deleting superseded step {entry.step}")
            archives = [entry.archive] if entry.archive else []
            archives = [a for a in archives if live_archives.get(entry.step) != a]
            self._storage.delete_superseded(entry.step, entry.tag, archives)
        return entries


def _record(step: int, raw: bytes, reason: str) -> tuple[str, bytes]:
    """(tag, record bytes) for the manifest ``raw`` of ``step``."""
    body: dict[str, Any] = {
        "schema_version": RECORD_SCHEMA,
        "step": step,
        "superseded_at": now_utc().isoformat(),
        "reason": reason,
    }
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        body["manifest"] = manifest
    except (ValueError, RecursionError):
        body["manifest_base64"] = base64.b64encode(raw).decode()
        manifest = {}
    attempt = manifest.get("attempt")
    if not (isinstance(attempt, str) and len(attempt) == 12 and _is_hex(attempt)):
        # Unparseable: a tag from the bytes themselves, so a retry after a crash
        # finds the same record instead of adding a second one.
        attempt = hashlib.sha256(raw).hexdigest()[:12]
    tag = attempt
    return tag, json.dumps(body, indent=2).encode()


def _parse_record(step: int, tag: str, data: bytes) -> SupersededCheckpoint:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError("not JSON") from None
    if not isinstance(body, dict):
        raise CorruptCheckpointError("not a JSON object")
    manifest = body.get("manifest") if isinstance(body.get("manifest"), dict) else {}
    archive = manifest.get("archive")
    return SupersededCheckpoint(
        step=step,
        tag=tag,
        superseded_at=str(body.get("superseded_at", "?")),
        reason=str(body.get("reason", "?")),
        archive=archive if isinstance(archive, str) and _names_step(archive, step) else None,
        created=str(manifest["created"]) if "created" in manifest else None,
    )


def _names_step(archive: str, step: int) -> bool:
    parsed = parse_name(archive)
    return parsed is not None and parsed.kind == "archive" and parsed.step == step


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)

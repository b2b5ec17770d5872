"""Names inside a checkpoint directory: built and parsed here, nowhere else.

::

    ckpt-000000500-3f9a0c1d2b4e.keras   an archive; the suffix is the write attempt
    ckpt-000000500.keras                an archive written by schema-1 ckptmgr
    ckpt-000000500.json                 the manifest of step 500: the commit
    ckpt-000000500.pin                  never prune step 500
    .tmp/                               local in-flight writes, swept later
    .lease/lease-000000003.json         writer leases; the highest number writes
    superseded/ckpt-000000012-3f9a0c1d2b4e.json
                                        step 12 of an abandoned future, moved
                                        aside when training resumed from an
                                        older step (its archive stays in place)

Every archive carries its attempt id, so two writers of the same step (a
zombie after a preemption, a duplicate launch) never write the same object:
the manifest, created only if absent, names the one archive that counts.

Parsing is strict: a name is recognised only if building it again from its
parts gives the same string, so ``ckpt-0000000003.json`` (ten digits) is a
stray file, not step 3.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Literal

PREFIX = "ckpt-"
TMP_DIR = ".tmp"
LEASE_DIR = ".lease"
SUPERSEDED_DIR = "superseded"

Kind = Literal["archive", "manifest", "pin"]
_NAME_RE = re.compile(r"^ckpt-(\d{9,})(?:-([0-9a-f]{12}))?\.(keras|json|pin)$")
_LEASE_RE = re.compile(r"^lease-(\d{9,})\.json$")
_SUPERSEDED_RE = re.compile(r"^ckpt-(\d{9,})-([0-9a-f]{12})\.json$")
_EXTENSION = {"keras": "archive", "json": "manifest", "pin": "pin"}


def new_attempt_id() -> str:
    """A fresh id for one write attempt (48 random bits)."""
    return uuid.uuid4().hex[:12]


def archive_name(step: int, attempt: str | None = None) -> str:
    """The archive of ``step``; ``attempt=None`` gives the schema-1 name."""
    suffix = f"-{attempt}" if attempt else ""
    return f"{PREFIX}{step:09d}{suffix}.keras"


def manifest_name(step: int) -> str:
    return f"{PREFIX}{step:09d}.json"


def pin_name(step: int) -> str:
    return f"{PREFIX}{step:09d}.pin"


def lease_name(token: int) -> str:
    return f"lease-{token:09d}.json"


@dataclass(frozen=True)
class Entry:
    """A recognised name in the root."""

    kind: Kind
    step: int
    attempt: str | None = None


def parse_name(name: str) -> Entry | None:
    """The entry a root-level name stands for, or None for anything else."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    step, attempt, ext = int(match.group(1)), match.group(2), match.group(3)
    kind: Kind = _EXTENSION[ext]  # type: ignore[assignment]
    if attempt is not None and kind != "archive":
        return None
    canonical = {
        "archive": archive_name(step, attempt),
        "manifest": manifest_name(step),
        "pin": pin_name(step),
    }[kind]
    return Entry(kind, step, attempt) if canonical == name else None


def parse_lease_name(name: str) -> int | None:
    match = _LEASE_RE.match(name)
    if match is None or lease_name(int(match.group(1))) != name:
        return None
    return int(match.group(1))


def superseded_name(step: int, tag: str) -> str:
    """The record of ``step`` moved aside; ``tag`` (its attempt id) keeps
    records of the same step superseded twice apart."""
    return f"{SUPERSEDED_DIR}/{PREFIX}{step:09d}-{tag}.json"


def parse_superseded_name(name: str) -> tuple[int, str] | None:
    """(step, tag) of a name inside ``superseded/``, or None."""
    match = _SUPERSEDED_RE.match(name)
    if match is None:
        return None
    step, tag = int(match.group(1)), match.group(2)
    return (step, tag) if superseded_name(step, tag) == f"{SUPERSEDED_DIR}/{name}" else None


def range_part_name(archive: str, index: int) -> str:
    """Range ``index`` of ``archive`` written by one of several writers (object stores)."""
    return f"{TMP_DIR}/{archive}.part{index:05d}"


def assembling_name(archive: str) -> str:
    """The preallocated file several local writers fill before it becomes ``archive``."""
    return f"{TMP_DIR}/{archive}.assembling"


def is_archive_of(name: str, step: int, attempt: str | None) -> bool:
    """True if ``name`` is the archive a manifest of ``step``/``attempt`` may name."""
    return name == archive_name(step, attempt)

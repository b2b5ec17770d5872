"""The manifest: ckptmgr's own record of one checkpoint, written last.

Its presence is the commit. It carries a schema version and is validated on
every load, so a manifest from a newer ckptmgr or a damaged one is reported in
one line instead of being half-trusted.

Schema 2 (this version) adds:

- ``checksum``: sha256 of the manifest's own canonical content (sorted keys,
  no whitespace, without the checksum), so any edit or bit flip is caught;
- ``attempt``: the write attempt, also in the archive's name;
- ``writer``: the lease token and owner of the process that committed it;
- non-finite metrics stored losslessly as the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"``.

Schema 3 records a CRC32C per 16 MiB chunk of the archive (``files[..].crc32c``,
``chunk_bytes``) instead of a whole-archive sha256, which is kept only on
request (``checksum="sha256"``); see ``ckptmgr.io.checksums``.

Schema-1 and schema-2 manifests still read and verify (by sha256). Of schema-1
ones no checksum is required; their ``null`` metrics (how schema 1 wrote NaN)
read as NaN, naive timestamps as UTC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ckptmgr.errors import CorruptCheckpointError
from ckptmgr.io.layout import is_archive_of

log = logging.getLogger("ckptmgr")
_reported_naive: set[str] = set()

SCHEMA_VERSION = 3
MAX_MANIFEST_BYTES = 1024 * 1024  # ours are a few KB; never read more than this


class FileEntry(BaseModel):
    """Size and checksums of one stored file, as the writer streamed it.

    ``crc32c``: the CRC32C of each ``chunk_bytes`` piece of the file (schema
    3); ``sha256``: of the whole file (schemas 1-2, and schema 3 with
    ``checksum="sha256"``). At least one is there; every one there is checked.
    """

    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    crc32c: list[str] | None = None
    chunk_bytes: int | None = Field(default=None, ge=1)

    @field_validator("crc32c")
    @classmethod
    def _hex_crcs(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(_is_crc_hex(c) for c in value):
            raise ValueError("crc32c entries must be 8 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _has_a_checksum(self) -> "FileEntry":
        if self.crc32c is None and self.sha256 is None:
            raise ValueError("no checksum (crc32c or sha256)")
        if self.crc32c is not None:
            if self.chunk_bytes is None:
                raise ValueError("crc32c without chunk_bytes")
            if len(self.crc32c) != -(-self.bytes // self.chunk_bytes):
                raise ValueError(f"{len(self.crc32c)} crc32c chunks for {self.bytes} bytes")
        return self

    def chunk_range(self, index: int) -> tuple[int, int]:
        """[start, end) of chunk ``index`` in the file."""
        start = index * (self.chunk_bytes or 0)
        return start, min(start + (self.chunk_bytes or 0), self.bytes)


def _is_crc_hex(text: str) -> bool:
    return len(text) == 8 and all(c in "0123456789abcdef" for c in text)


class SaveCadence(BaseModel):
    """``save_freq="auto"``: the interval chosen at this save, why, and the
    saving rank's measurements (see :mod:`ckptmgr.cadence`)."""

    model_config = ConfigDict(extra="allow")
    interval_steps: int = Field(ge=1)
    reason: str = ""
    step_s: float = Field(0.0, ge=0)  # median wall time per step
    slowdown: float = Field(0.0, ge=0)  # steps overlapping a write: this much slower
    mtbf_s: float = Field(0.0, ge=0)  # the job's MTBF the rule used


class LoopState(BaseModel):
    """Where ``fit()`` was, and where it resumes.

    ``epoch``/``batch`` say where the save happened (0-based epoch, batches done
    in it); ``next_epoch``/``next_batch`` say where training continues.
    ``cadence``: with ``save_freq="auto"`` only (absent in older manifests).
    """

    model_config = ConfigDict(extra="forbid")
    epoch: int = 0
    batch: int = 0
    next_epoch: int = 0
    next_batch: int = 0
    training: dict[str, Any] = Field(default_factory=dict)  # RNG and metric state
    cadence: SaveCadence | None = None


class SaveStats(BaseModel):
    """How the save went; also logged and exported as metrics.

    ``replaced``/``skipped``: saves dropped since the writer's previous
    checkpoint because the writer was busy (``on_busy="newest"``/``"skip"``);
    0 in manifests written before these fields existed.
    """

    model_config = ConfigDict(extra="allow")
    bytes: int = 0
    blocked_s: float = 0.0
    write_s: float = 0.0
    mb_per_s: float = 0.0
    replaced: int = Field(0, ge=0)
    skipped: int = Field(0, ge=0)


class WriterInfo(BaseModel):
    """Which lease holder committed the checkpoint (see ``ckptmgr.io.lease``)."""

    model_config = ConfigDict(extra="forbid")
    token: int = Field(ge=0)
    owner: str = ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")
    schema_version: int = SCHEMA_VERSION
    step: int = Field(ge=0)
    created: datetime
    keras_version: str = ""
    archive: str
    attempt: str | None = None
    writer: WriterInfo | None = None
    files: dict[str, FileEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    loop: LoopState | None = None
    stats: SaveStats = Field(default_factory=SaveStats)
    world: dict[str, Any] = Field(default_factory=dict)
    checksum: str | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _null_is_nan(cls, value: Any) -> Any:
        # Schema 1 wrote NaN/inf as null; keep those manifests readable.
        if isinstance(value, dict):
            return {k: math.nan if v is None else v for k, v in value.items()}
        return value

    @field_validator("created")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.utcoffset() is not None else value.replace(tzinfo=timezone.utc)

    @model_validator(mode="after")
    def _archive_is_ours(self) -> "Manifest":
        if not is_archive_of(self.archive, self.step, self.attempt):
            raise ValueError(f"archive {self.archive!r} is not the archive of step {self.step}")
        if self.archive not in self.files:
            raise ValueError(f"archive {self.archive!r} has no entry in files")
        return self

    def sealed(self) -> "Manifest":
        """A copy whose ``checksum`` covers its content (what readers get back)."""
        return self.model_copy(update={"checksum": _canonical_sha256(self._body())})

    def to_bytes(self) -> bytes:
        """The stored form: JSON with ``checksum`` over the canonical rest."""
        body = self._body()
        body["checksum"] = _canonical_sha256(body)
        return json.dumps(body, indent=2, allow_nan=False).encode()

    def _body(self) -> dict[str, Any]:
        """The JSON content without the checksum, as a reader will parse it."""
        return json.loads(self.model_dump_json(exclude={"checksum"}))

    @property
    def archive_entry(self) -> FileEntry:
        return self.files[self.archive]

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> "Manifest":
        """Parse, check the checksum, validate; any problem is one line."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{where}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte bound."
            )
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not JSON ({type(exc).__name__}).") from None
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object.")
        _check_self_checksum(raw, where)
        _warn_if_naive(raw.get("created"), where)
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise CorruptCheckpointError(
                f"{where}: invalid manifest ({loc}: {first['msg']})."
            ) from None
        if manifest.schema_version > SCHEMA_VERSION:
            raise CorruptCheckpointError(
                f"{where}: manifest schema {manifest.schema_version} is newer than "
                f"this ckptmgr understands ({SCHEMA_VERSION}); upgrade ckptmgr."
            )
        return manifest


def _canonical_sha256(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _check_self_checksum(raw: dict[str, Any], where: str) -> None:
    """Schema >= 2 must carry a matching checksum; any manifest that has one is checked."""
    schema = raw.get("schema_version")
    if "checksum" not in raw:
        if schema == 1:
            return
        raise CorruptCheckpointError(f"{where}: manifest has no checksum (schema {schema!r}).")
    body = {k: v for k, v in raw.items() if k != "checksum"}
    try:
        expected = _canonical_sha256(body)
    except ValueError:  # a bare NaN/Infinity literal: we never write those
        expected = "<not canonical JSON>"
    if raw["checksum"] != expected:
        raise CorruptCheckpointError(
            f"{where}: manifest checksum mismatch (edited or bit rot); the checkpoint is not trusted."
        )


def _warn_if_naive(created: Any, where: str) -> None:
    try:
        naive = isinstance(created, str) and datetime.fromisoformat(created).tzinfo is None
    except ValueError:
        return  # validation reports it
    if naive and where not in _reported_naive:  # once per manifest and process
        _reported_naive.add(where)
        log.warning("%s: created %r has no time zone; read as UTC", where, created)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)

"""The manifest: ckptmgr's own record of one checkpoint, written last.

Its presence is the commit. It carries a schema version and is validated on
every load, so a manifest from a newer ckptmgr or a damaged one is reported in
one line instead of being half-trusted.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ckptmgr.errors import CorruptCheckpointError

SCHEMA_VERSION = 1


class FileEntry(BaseModel):
    """Size and sha256 of one stored file, as the writer streamed it."""

    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)


class LoopState(BaseModel):
    """Where ``fit()`` was, and where it resumes.

    ``epoch``/``batch`` say where the save happened (0-based epoch, batches done
    in it); ``next_epoch``/``next_batch`` say where training continues.
    """

    model_config = ConfigDict(extra="forbid")
    epoch: int = 0
    batch: int = 0
    next_epoch: int = 0
    next_batch: int = 0
    training: dict[str, Any] = Field(default_factory=dict)  # RNG and metric state


class SaveStats(BaseModel):
    """How the save went; also logged and exported as metrics."""

    model_config = ConfigDict(extra="allow")
    bytes: int = 0
    blocked_s: float = 0.0
    write_s: float = 0.0
    mb_per_s: float = 0.0


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    step: int = Field(ge=0)
    created: datetime
    keras_version: str = ""
    archive: str
    files: dict[str, FileEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    loop: LoopState | None = None
    stats: SaveStats = Field(default_factory=SaveStats)
    world: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _archive_is_listed(self) -> "Manifest":
        if self.archive not in self.files:
            raise ValueError(f"archive {self.archive!r} has no entry in files")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @property
    def archive_entry(self) -> FileEntry:
        return self.files[self.archive]

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> "Manifest":
        """Parse and validate; any problem is one ``CorruptCheckpointError`` line."""
        try:
            manifest = cls.model_validate_json(data)
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


def now_utc() -> datetime:
    return datetime.now(timezone.utc)

"""The error hierarchy of ckptmgr: one base class, a few meanings.

Every error subclasses :class:`CkptmgrError` and, where the meaning matches, a
built-in (``FileNotFoundError``, ``ValueError``...) so callers can catch either.
Errors cross Ray actor boundaries, so each one pickles with its message intact.
Messages say what was wrong, what was received, and what to do.
"""

from __future__ import annotations


class CkptmgrError(Exception):
    """Base class of every error ckptmgr raises on purpose."""

    def __reduce__(self):
        # Keep the one-line message when pickled across Ray actors.
        return (self.__class__, self.args)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(CkptmgrError, ValueError):
    """A config file, option or argument is invalid."""


class StorageError(CkptmgrError, OSError):
    """The storage backend failed (permissions, network, bad URL)."""


class CheckpointNotFoundError(CkptmgrError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CheckpointExistsError(CkptmgrError, FileExistsError):
    """A committed checkpoint already has this step; it is never overwritten."""


class CorruptCheckpointError(CkptmgrError):
    """A checkpoint's archive or manifest fails verification (checksum, size,
    layout). Only this error makes a restore fall back to an older checkpoint."""


class IncompatibleCheckpointError(CkptmgrError, ValueError):
    """A checkpoint that verifies does not fit the model or its code (another
    architecture, an unbuilt model, a layer whose own loading code fails).
    Never a reason to fall back: an older checkpoint would not fit either."""


class WriterFencedError(CkptmgrError, RuntimeError):
    """Another process claimed the checkpoint directory; this writer must stop."""


class UnsupportedModelError(CkptmgrError, ValueError):
    """The model has state ckptmgr cannot capture. Assets and bfloat16
    variables are captured; this is raised only when Keras's saving traversal
    is not the one ckptmgr knows (another Keras version)."""


class SaveInProgressError(CkptmgrError, RuntimeError):
    """A save was asked for while another is still writing (policy 'skip')."""


class DistributedSaveError(CkptmgrError, RuntimeError):
    """A distributed save failed: missing parts, digest mismatch, timeout."""


class UnknownCustomObjectError(CkptmgrError, TypeError):
    """The checkpoint names a custom class or function that is not registered."""


class UnsafeCheckpointError(CkptmgrError, ValueError):
    """Loading needs code execution (a Python lambda) that safe_mode refuses."""


class JobStoppedError(CkptmgrError, RuntimeError):
    """A worker died mid-run (node lost, preempted); resume to continue.
    The CLI exits with 75 (EX_TEMPFAIL) for it, never 0."""


# What a restart cannot mend: a run a rank stopped with one of these is not
# restarted and the CLI exits 1, not 75, so no supervisor starts it again (a
# fenced job restarted would fence the newer launch back: two jobs taking turns).
NOT_RESTARTABLE = (WriterFencedError, ConfigError, IncompatibleCheckpointError, UnknownCustomObjectError,
                   UnsafeCheckpointError, UnsupportedModelError)


def not_restartable(exc: BaseException) -> CkptmgrError | None:
    """The error a rank raised, through Ray's wrappers (``RayTaskError.cause``:
    a rank's error may wrap the coordinator's), as itself with its one-line
    message, when it is one a restart cannot mend; else None."""
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if not isinstance(exc, NOT_RESTARTABLE):
        return None
    text = str(exc).strip().splitlines()
    return type(exc)(text[0] if text else type(exc).__name__)

"""Backend failures in ckptmgr's terms: the one place library errors are translated.

gcsfs, s3fs, botocore and aiohttp raise their own classes after their retries
(``gcsfs.retry.HttpError``, ``botocore.exceptions.NoCredentialsError``,
``EndpointConnectionError``...), many of which are not ``OSError``. Everything
that reaches a user must be one ``CkptmgrError`` line, so :func:`translated`
maps them: not found stays "not found" (and only that: a 403 never reads as
absent), an existing object on a create-only write is
``CheckpointExistsError``, anything else from storage is ``StorageError``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from ckptmgr.errors import CheckpointExistsError, CheckpointNotFoundError, CkptmgrError, StorageError

# Modules whose exceptions are storage failures when they escape an fsspec call.
_BACKEND_MODULES = ("gcsfs", "s3fs", "botocore", "aiobotocore", "aiohttp", "google", "fsspec",
                    "requests", "urllib3", "yarl")
# Loggers that print tracebacks to stderr while retrying; quiet unless debugging.
NOISY_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore", "fsspec", "google", "urllib3", "aiohttp")


def is_backend_error(exc: BaseException) -> bool:
    """True for exceptions raised by a storage library (by their class's module)."""
    return any(
        (getattr(cls, "__module__", "") or "").split(".")[0] in _BACKEND_MODULES
        for cls in type(exc).__mro__
    )


def quiet_backend_logs(debug: bool = False) -> None:
    """Keep library retry tracebacks off stderr (``--debug`` shows them)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.CRITICAL)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


@contextmanager
def translated(url: str, what: str, step: int | None = None) -> Iterator[None]:
    """Run a storage call; re-raise its failure as one ``CkptmgrError`` line."""
    try:
        yield
    except CkptmgrError:
        raise
    except FileNotFoundError:
        at = f" step {step}" if step is not None else ""
        raise CheckpointNotFoundError(f"Checkpoint{at} not found: {what} is missing under {url}.") from None
    except FileExistsError:
        raise CheckpointExistsError(f"Not {what}: the object already exists under {url}.") from None
    except PermissionError as exc:
        raise StorageError(
            f"Permission denied while {what} under {url}: {_first_line(exc)}. "
            "Check credentials and storage options."
        ) from None
    except (OSError, TimeoutError) as exc:
        raise StorageError(f"Storage failed while {what} under {url}: {_first_line(exc)}") from None
    except Exception as exc:
        if not is_backend_error(exc):
            raise
        hint = _hint(exc)
        raise StorageError(f"Storage failed while {what} under {url}: {_first_line(exc)}{hint}") from None


def _hint(exc: BaseException) -> str:
    name = type(exc).__name__
    if "Credentials" in name:
        return ". Set credentials (environment, profile) or pass storage options key/secret."
    if "Connect" in name or "Endpoint" in name:
        return ". Check the endpoint URL and network."
    return ""

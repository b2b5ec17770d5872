"""What the CLI's commands share: the ``--debug`` state, output, the URL and
storage options, a manager on a checkpoint directory, progress bars, and one
line of an error. Runs on the user's machine; imports no TensorFlow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from ckptmgr.errors import CheckpointNotFoundError, CkptmgrError
from ckptmgr.io.storage import parse_storage_options
from ckptmgr.manager import CheckpointManager, Progress

STATE = {"debug": False}  # set by the root callback (--debug)

# click's exceptions, or the copy of click that newer typer releases vendor.
CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]


def usage_error(message: str) -> Exception:
    """A usage error (exit 2) for a command to raise."""
    return CLICK_ERRORS.UsageError(message)

URL_HELP = "Checkpoint directory: a local path or an fsspec URL (gs://, s3://, memory://...)."
OPTION_HELP = "Storage option key=value passed to fsspec (repeatable), e.g. endpoint_url=http://..."
STEP_HELP = "Checkpoint step (default: the newest)."

UrlArg = typer.Argument(..., help=URL_HELP, metavar="URL", show_default=False)
StorageOpt = typer.Option(None, "--storage-option", help=OPTION_HELP, metavar="KEY=VALUE")


def out(text: str = "") -> None:
    typer.echo(text)


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def open_manager(url: str, options: list[str] | None, **kwargs: Any) -> CheckpointManager:
    """A manager on ``url``; a local directory that does not exist is an error."""
    manager = CheckpointManager(url, storage_options=parse_storage_options(options), **kwargs)
    storage = manager.storage
    if storage.is_local and not os.path.isdir(storage.root):
        raise CheckpointNotFoundError(
            f"No checkpoint directory at {url}: it does not exist. Check the path."
        )
    return manager


def require_steps(manager: CheckpointManager) -> list[int]:
    steps = manager.steps()
    if not steps:
        raise CheckpointNotFoundError(f"No checkpoints under {manager.directory}.")
    return steps


@contextmanager
def progress_bar(description: str) -> Iterator[Progress | None]:
    """A byte progress bar on stderr when it is a terminal; else no callback."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress as RichProgress,
        TextColumn,
        TransferSpeedColumn,
    )

    bar = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    task = None

    def advance(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(description, total=total)
        bar.update(task, advance=done, total=total)

    with bar:
        yield advance


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, CkptmgrError):
        line = f"{type(exc).__name__}: {line}"
    return line

"""``ckptmgr``: list, inspect, verify, export, prune and pin checkpoints; run the example job.

A thin edge over :class:`~ckptmgr.manager.CheckpointManager` and
:mod:`ckptmgr.job`; runs on the user's machine (the coordinator side).

Errors: any :class:`~ckptmgr.errors.CkptmgrError` (and ``OSError``/``ValueError``
caused by user input) prints one ``error: ...`` line to stderr and exits 1;
usage errors are one ``error: ...`` line with the help hint, exit 2.
``--debug`` shows the traceback instead.

TensorFlow/Keras are imported only by the commands that build a model
(``export --format savedmodel``, ``verify --deep``, ``inspect`` with user code,
``run``, ``resume``), so ``list``, ``inspect``, ``verify``, ``prune`` and ``pin``
start in well under a second. ``run``/``resume`` live in :mod:`ckptmgr.cli_run`,
the user-code options in :mod:`ckptmgr.cli_user_code`, what ``list`` and
``inspect`` print in :mod:`ckptmgr.cli_show`.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from typing import Optional

import typer

from ckptmgr.cli_coordinators import app as coordinators_app
from ckptmgr.cli_common import (
    CLICK_ERRORS, STATE, STEP_HELP, StorageOpt, UrlArg, first_line, open_manager, out,
)
from ckptmgr.cli_export import export as export_command, verify as verify_command
from ckptmgr.cli_run import EXIT_PREEMPTED, resume as resume_command, run as run_command
from ckptmgr.cli_show import (
    built_model_summary, list_cells, manifest_row, model_summary, optimizer_summary,
    print_inspect, print_list, print_superseded, weight_counts,
)
from ckptmgr.cli_user_code import CustomObjectOpt, ImportOpt, load_model, user_code
from ckptmgr.errors import CkptmgrError, CorruptCheckpointError, JobStoppedError
from ckptmgr.io.backend_errors import is_backend_error, quiet_backend_logs
from ckptmgr.manager import CheckpointManager
from ckptmgr.tf_noise import quiet_environment

app = typer.Typer(
    name="ckptmgr",
    help="Rolling, verified, resumable .keras checkpoints on any fsspec storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

class Mode(str, Enum):
    min = "min"
    max = "max"
    auto = "auto"  # from the metric's name, as Keras's mode="auto"


def _print_version(value: bool) -> None:
    if value:
        from ckptmgr import __version__

        out(f"ckptmgr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Rolling, verified, resumable .keras checkpoints on any fsspec storage."""
    STATE["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if debug else "warning: %(message)s"))
    logger = logging.getLogger("ckptmgr")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    quiet_backend_logs(debug)


# -- listing and inspecting ------------------------------------------------------


@app.command("list")
def list_(
    url: str = UrlArg,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """List committed checkpoints: step, created, size, epoch, save times, metrics, pinned.

    Columns that do not fit the terminal are left out (save times first), and
    the metrics wrap; the step is always shown whole.
    """
    manager = open_manager(url, storage_option)
    manifests = manager.manifests()
    pinned = manager.storage.pinned_steps()
    rows = [manifest_row(manager, m, pinned) for m in manifests]
    if as_json:
        out(json.dumps(rows, indent=2))
        return
    superseded = manager.superseded()
    if not rows:
        typer.echo(f"no checkpoints under {manager.directory}", err=True)
        print_superseded(superseded)
        return
    print_list(manager.directory, [list_cells(m, row) for m, row in zip(manifests, rows)])
    print_superseded(superseded)


@app.command()
def inspect(
    url: str = UrlArg,
    step: Optional[int] = typer.Option(None, "--step", help=STEP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    storage_option: Optional[list[str]] = StorageOpt,
    custom_object: Optional[list[str]] = CustomObjectOpt,
    import_: Optional[list[str]] = ImportOpt,
) -> None:
    """Show one checkpoint: manifest, loop state, save stats, model, optimizer, files.

    Reads only the archive's config.json and weight shapes; does not build the
    model or verify checksums (use `ckptmgr verify`). With --custom-object or
    --import it builds the model (TensorFlow) and lists its layers as Keras does.
    """
    from ckptmgr.io.archive import check_layout, open_weights, read_json_member

    manager = open_manager(url, storage_option)
    m = manager.manifest(step)
    with manager.storage.open_archive(m.archive) as f:
        try:
            check_layout(f, manager.storage.file_size(m.archive))
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"step {m.step}: {m.archive}: {exc}") from None
        config = read_json_member(f, "config.json")
        with open_weights(f) as h5:
            counts = weight_counts(h5)
    code = user_code(custom_object, import_)
    if code:
        built = load_model(manager, m.step, code, compile=False)
        model = built_model_summary(built, counts)
    else:
        model = model_summary(config, counts)
    optimizer = optimizer_summary(config)
    pinned = m.step in manager.storage.pinned_steps()
    if as_json:
        info = manifest_row(manager, m, {m.step} if pinned else set())
        info.update(
            schema_version=m.schema_version,
            loop=m.loop.model_dump(exclude={"training"}) if m.loop else None,
            world=m.world,
            extra=m.extra,
            model=model,
            optimizer=optimizer,
            files={name: e.model_dump() for name, e in m.files.items()},
        )
        out(json.dumps(info, indent=2, default=str))
        return
    print_inspect(manager, m, pinned, model, optimizer)


# -- integrity and export (ckptmgr.cli_export) -----------------------------------

app.command("verify")(verify_command)
app.command("export")(export_command)


# -- retention -----------------------------------------------------------------


@app.command()
def prune(
    url: str = UrlArg,
    keep_last: Optional[int] = typer.Option(None, "--keep-last", min=1, help="Keep the N newest."),
    keep_every_n_steps: Optional[int] = typer.Option(None, "--keep-every-n-steps", min=1, help="Keep steps that are multiples of K."),
    keep_best: Optional[str] = typer.Option(None, "--keep-best", metavar="METRIC", help="Keep the best by this metric."),
    mode: Mode = typer.Option(Mode.min, "--mode", help="For --keep-best: min (loss), max (accuracy) or auto (from the metric's name, as Keras)."),
    keep_within: Optional[str] = typer.Option(None, "--keep-within", metavar="DURATION", help="Keep those younger than this, e.g. 7d, 12h."),
    superseded: bool = typer.Option(False, "--superseded", help="Also delete superseded steps (abandoned after a fallback or a new run; see `list`)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be deleted; delete nothing."),
    sweep_grace: float = typer.Option(3600.0, "--sweep-grace", metavar="SECONDS", help="Remove leftovers of interrupted writes older than this."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Delete checkpoints no rule keeps (rules combine as a union).

    The newest and pinned checkpoints are always kept.
    """
    from ckptmgr.retention import RetentionPolicy

    no_rule = keep_last is None and keep_every_n_steps is None and keep_best is None and keep_within is None
    if no_rule and not superseded:
        typer.echo(
            "error: no retention rule given; pass at least one of --keep-last, "
            "--keep-every-n-steps, --keep-best, --keep-within, --superseded.",
            err=True,
        )
        raise typer.Exit(2)
    if keep_best is None and mode is not Mode.min:
        typer.echo("error: --mode applies to --keep-best; pass --keep-best METRIC too.", err=True)
        raise typer.Exit(2)
    policy = RetentionPolicy.from_options(
        keep_last=keep_last,
        keep_every_n_steps=keep_every_n_steps,
        keep_best=keep_best,
        keep_best_mode=mode.value,
        keep_within=keep_within,
    )
    manager = open_manager(url, storage_option, sweep_grace_s=sweep_grace)
    if superseded:
        _prune_superseded(manager, dry_run)
        if no_rule:
            return
    report = manager.prune(dry_run=dry_run, retention=policy)
    for s, reasons in report.decision.keep.items():
        out(f"keep   step {s}: {', '.join(reasons)}")
    deleted = report.decision.delete if dry_run else report.deleted
    verb = "would delete" if dry_run else "delete"
    for s in deleted:
        out(f"{verb} step {s}")
    if dry_run:
        out(f"dry run: would keep {len(report.decision.keep)}, delete {len(deleted)}; nothing deleted")
    else:
        out(f"kept {len(report.decision.keep)}, deleted {len(deleted)}")


def _prune_superseded(manager: CheckpointManager, dry_run: bool) -> None:
    entries = manager.superseded() if dry_run else manager.delete_superseded()
    verb = "would delete" if dry_run else "delete"
    for entry in entries:
        out(f"{verb} superseded {entry.describe()}")
    if not entries:
        out("no superseded steps")


@app.command()
def pin(
    url: str = UrlArg,
    step: int = typer.Option(..., "--step", help="Step to pin.", show_default=False),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Protect a checkpoint from pruning."""
    open_manager(url, storage_option).pin(step, True)
    out(f"pinned step {step}")


@app.command()
def unpin(
    url: str = UrlArg,
    step: int = typer.Option(..., "--step", help="Step to unpin.", show_default=False),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Let a pinned checkpoint be pruned again."""
    open_manager(url, storage_option).pin(step, False)
    out(f"unpinned step {step}")


@app.command()
def lease(
    url: str = UrlArg,
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Show which writer holds the directory. The newest claim wins: a job that
    starts writing here takes over by itself and the previous writer is fenced."""
    holder = open_manager(url, storage_option).lease.current()
    out(holder.describe() if holder else f"no writer has claimed {url}")


# -- the example job (ckptmgr.cli_run) -------------------------------------------

app.command("run")(run_command)
app.command("resume")(resume_command)
app.add_typer(coordinators_app, name="coordinators")


# -- entry point -------------------------------------------------------------------


def _usage_error(exc, argv: list[str]) -> str:
    """A usage error as one line: the problem, then the help hint."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")
    if exc.ctx is not None:
        command = exc.ctx.command_path
    else:  # raised by a command itself
        names = [a for a in argv if a in app_command_names()]
        command = f"ckptmgr {names[0]}" if names else "ckptmgr"
    return f"error: {message}. Try '{command} --help'."


def app_command_names() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


_NO_ARGS = getattr(CLICK_ERRORS, "NoArgsIsHelpError", ())  # click >= 8.2; before, help exits 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    quiet_environment()  # before anything imports TensorFlow
    STATE["debug"] = False
    try:
        code = app(args=argv, prog_name="ckptmgr", standalone_mode=False)
    except _NO_ARGS as exc:
        text = exc.ctx.get_help()  # typer's rich help prints itself and returns ""
        if text:
            out(text)
        return exc.exit_code
    except CLICK_ERRORS.UsageError as exc:
        typer.echo(_usage_error(exc, sys.argv[1:] if argv is None else argv), err=True)
        return exc.exit_code
    except CLICK_ERRORS.ClickException as exc:
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        return 130
    except ModuleNotFoundError as exc:  # an extra that is not installed (TensorFlow, Ray...)
        from ckptmgr.extras import missing_extra

        if STATE["debug"] or missing_extra(exc) is None:
            raise
        typer.echo(f"error: {missing_extra(exc)}", err=True)
        return 1
    except JobStoppedError as exc:  # a node was lost: not a finished run, not a bad config
        if STATE["debug"]:
            raise
        typer.echo(f"error: {first_line(exc)}", err=True)
        return EXIT_PREEMPTED
    except (CkptmgrError, OSError, ValueError, ArithmeticError) as exc:
        if STATE["debug"]:
            raise
        typer.echo(f"error: {first_line(exc)}", err=True)
        return 1
    except Exception as exc:  # a storage library's own error that escaped translation
        if STATE["debug"] or not is_backend_error(exc):
            raise
        typer.echo(f"error: storage failed: {first_line(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``ckptmgr``: list, inspect, verify, export, prune and pin checkpoints; run the example job.

A thin edge over :class:`~ckptmgr.manager.CheckpointManager` and
:mod:`ckptmgr.job`; runs on the user's machine (the coordinator side).

Errors: any :class:`~ckptmgr.errors.CkptmgrError` (and ``OSError``/``ValueError``
caused by user input) prints one ``error: ...`` line to stderr and exits 1;
usage errors exit 2. ``--debug`` shows the traceback instead.

TensorFlow/Keras are imported only by the commands that need them (``export``,
``run``, ``resume``), so ``list``, ``inspect``, ``verify``, ``prune`` and ``pin``
start in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, Optional

import typer

from ckptmgr.errors import (
    CheckpointNotFoundError, CkptmgrError, ConfigError, CorruptCheckpointError, JobStoppedError,
)
from ckptmgr.manager import CheckpointManager, Progress
from ckptmgr.io.backend_errors import is_backend_error, quiet_backend_logs
from ckptmgr.io.storage import parse_storage_options
from ckptmgr.cli_show import (
    console, human, manifest_row, metrics_text, model_summary, optimizer_summary,
    out, print_inspect, print_superseded, weight_counts, when,
)

app = typer.Typer(
    name="ckptmgr",
    help="Rolling, verified, resumable .keras checkpoints on any fsspec storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}

URL_HELP = "Checkpoint directory: a local path or an fsspec URL (gs://, s3://, memory://...)."
OPTION_HELP = "Storage option key=value passed to fsspec (repeatable), e.g. endpoint_url=http://..."
STEP_HELP = "Checkpoint step (default: the newest)."

UrlArg = typer.Argument(..., help=URL_HELP, metavar="URL", show_default=False)
StorageOpt = typer.Option(None, "--storage-option", help=OPTION_HELP, metavar="KEY=VALUE")


class ExportFormat(str, Enum):
    weights = "weights"
    keras = "keras"
    savedmodel = "savedmodel"


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
    _state["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if debug else "warning: %(message)s"))
    logger = logging.getLogger("ckptmgr")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    quiet_backend_logs(debug)


# -- helpers ------------------------------------------------------------------


def _manager(url: str, options: list[str] | None, **kwargs: Any) -> CheckpointManager:
    """A manager on ``url``; a local directory that does not exist is an error."""
    manager = CheckpointManager(url, storage_options=parse_storage_options(options), **kwargs)
    storage = manager.storage
    if storage.is_local and not os.path.isdir(storage.root):
        raise CheckpointNotFoundError(
            f"No checkpoint directory at {url}: it does not exist. Check the path."
        )
    return manager


def _require_steps(manager: CheckpointManager) -> list[int]:
    steps = manager.steps()
    if not steps:
        raise CheckpointNotFoundError(f"No checkpoints under {manager.directory}.")
    return steps


@contextmanager
def _progress(description: str) -> Iterator[Progress | None]:
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


# -- listing and inspecting ------------------------------------------------------


@app.command("list")
def list_(
    url: str = UrlArg,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """List committed checkpoints: step, created, size, save times, metrics, pinned."""
    manager = _manager(url, storage_option)
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
    from rich.table import Table

    table = Table(title=manager.directory, title_justify="left")
    for name, justify in [("step", "right"), ("created", "left"), ("size", "right"),
                          ("epoch", "right"), ("blocked", "right"), ("write", "right"),
                          ("MB/s", "right"), ("metrics", "left"), ("pinned", "left")]:
        table.add_column(name, justify=justify, no_wrap=name != "metrics")
    for m, row in zip(manifests, rows):
        table.add_row(
            str(m.step),
            when(m.created),
            human(row["bytes"]),
            "" if row["epoch"] is None else str(row["epoch"]),
            f"{m.stats.blocked_s:.3f}s",
            f"{m.stats.write_s:.2f}s",
            f"{m.stats.mb_per_s:.0f}",
            metrics_text(m.metrics),
            "pinned" if row["pinned"] else "",
        )
    console().print(table)
    print_superseded(superseded)


@app.command()
def inspect(
    url: str = UrlArg,
    step: Optional[int] = typer.Option(None, "--step", help=STEP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Show one checkpoint: manifest, loop state, save stats, model, optimizer, files.

    Reads only the archive's config.json and weight shapes; does not build the
    model or verify checksums (use `ckptmgr verify`).
    """
    from ckptmgr.io.archive import check_layout, open_weights, read_json_member

    manager = _manager(url, storage_option)
    m = manager.manifest(step)
    with manager.storage.open_archive(m.archive) as f:
        try:
            check_layout(f, manager.storage.file_size(m.archive))
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"step {m.step}: {m.archive}: {exc}") from None
        config = read_json_member(f, "config.json")
        with open_weights(f) as h5:
            counts = weight_counts(h5)
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


# -- integrity and export ------------------------------------------------------


@app.command()
def verify(
    url: str = UrlArg,
    step: Optional[int] = typer.Option(None, "--step", help="Verify only this step (default: all)."),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Recompute checksums; exit 0 only if every checked checkpoint is intact."""
    manager = _manager(url, storage_option)
    steps = [step] if step is not None else _require_steps(manager)
    bad = 0
    for s in steps:
        with _progress(f"verify step {s}") as progress:
            results = manager.verify(s, progress=progress)
        for result in results:
            if result.ok:
                out(f"ok step {result.step}")
            else:
                bad += 1
                out(f"bad {result.problem}")
    if bad:
        raise typer.Exit(1)


@app.command()
def export(
    url: str = UrlArg,
    output: str = typer.Option(..., "--output", "-o", help="Destination path or URL.", show_default=False),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="weights (.weights.h5), keras (.keras) or savedmodel (directory)."),
    step: Optional[int] = typer.Option(None, "--step", help=STEP_HELP),
    unsafe: bool = typer.Option(False, "--unsafe", help="savedmodel: allow Python lambdas (only for checkpoints you trust)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at the destination."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="weights: leave the optimizer state out (model.save_weights keeps it)."),
    storage_option: Optional[list[str]] = StorageOpt,
    dest_option: Optional[list[str]] = typer.Option(
        None, "--dest-option", metavar="KEY=VALUE",
        help="Storage option for the destination (repeatable); default: the --storage-option values when both are on the same backend.",
    ),
) -> None:
    """Export a verified checkpoint as weights, a .keras file or a SavedModel."""
    manager = _manager(url, storage_option)
    dest_options = _dest_options(url, output, storage_option, dest_option)
    if fmt is ExportFormat.savedmodel:
        kwargs: dict[str, Any] = {"storage_options": dest_options, "overwrite": overwrite}
        if unsafe:
            import inspect as _inspect

            if "safe_mode" not in _inspect.signature(manager.export_saved_model).parameters:
                raise ConfigError(
                    "--unsafe is not supported by CheckpointManager.export_saved_model "
                    "in this version; export --format keras and load it with safe_mode=False."
                )
            kwargs["safe_mode"] = False
        done = manager.export_saved_model(output, step, **kwargs)
    elif fmt is ExportFormat.weights:
        with _progress("export") as progress:
            done = manager.export_weights(output, step, storage_options=dest_options, progress=progress,
                                          overwrite=overwrite, include_optimizer=not no_optimizer)
    else:
        if no_optimizer:
            raise ConfigError("--no-optimizer applies to --format weights only.")
        with _progress("export") as progress:
            done = manager.export_keras(output, step, storage_options=dest_options, progress=progress,
                                        overwrite=overwrite)
    out(f"exported {fmt.value} to {done}")


def _dest_options(url: str, output: str, source: list[str] | None, dest: list[str] | None) -> dict[str, Any]:
    if dest:
        return parse_storage_options(dest)
    from fsspec.core import split_protocol

    same = (split_protocol(url)[0] or "file") == (split_protocol(output)[0] or "file")
    return parse_storage_options(source) if same else {}


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
    manager = _manager(url, storage_option, sweep_grace_s=sweep_grace)
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
    _manager(url, storage_option).pin(step, True)
    out(f"pinned step {step}")


@app.command()
def unpin(
    url: str = UrlArg,
    step: int = typer.Option(..., "--step", help="Step to unpin.", show_default=False),
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Let a pinned checkpoint be pruned again."""
    _manager(url, storage_option).pin(step, False)
    out(f"unpinned step {step}")


@app.command()
def lease(
    url: str = UrlArg,
    storage_option: Optional[list[str]] = StorageOpt,
) -> None:
    """Show which writer holds the directory. The newest claim wins: a job that
    starts writing here takes over by itself and the previous writer is fenced."""
    holder = _manager(url, storage_option).lease.current()
    out(holder.describe() if holder else f"no writer has claimed {url}")


# -- the example job -------------------------------------------------------------

ConfigArg = typer.Argument(..., help="YAML job config, e.g. configs/local.yaml.", metavar="CONFIG", show_default=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config field (repeatable), e.g. training.epochs=5.")


AddressOpt = typer.Option(None, "--address", help="Ray cluster address (sets ray.address); default: start a local one.")
LocalOpt = typer.Option(False, "--no-ray", help="Train in this process instead of on Ray workers.")
JsonRunOpt = typer.Option(False, "--json", help="Print one JSON object at the end (resumed_from, final_step, ...) instead of the summary line.")


@app.command()
def run(
    config: str = ConfigArg,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
    no_ray: bool = LocalOpt,
    as_json: bool = JsonRunOpt,
) -> None:
    """Train the example job on Ray; continues from the newest checkpoint if there is one."""
    _run_job(config, set_, resume=False, address=address, on_ray=not no_ray, as_json=as_json)


@app.command()
def resume(
    config: str = ConfigArg,
    set_: Optional[list[str]] = SetOpt,
    address: Optional[str] = AddressOpt,
    no_ray: bool = LocalOpt,
    as_json: bool = JsonRunOpt,
) -> None:
    """Continue the example job from its newest good checkpoint (error if there is none)."""
    _run_job(config, set_, resume=True, address=address, on_ray=not no_ray, as_json=as_json)


def _run_job(config: str, overrides: list[str] | None, *, resume: bool, address: str | None, on_ray: bool,
             as_json: bool = False) -> None:
    from ckptmgr.config import apply_overrides, load_config, set_values

    cfg = apply_overrides(load_config(config), overrides)
    if address is not None:
        cfg = set_values(cfg, {"ray.address": address}, {"ray.address": "--address"})
    if on_ray:
        from ckptmgr.ray_job import run_on_ray

        result, _ = run_on_ray(cfg, resume=resume)
        where = f"on Ray with {cfg.ray.num_workers} workers"
    else:
        from ckptmgr import job

        # The callback passes SIGTERM on to this handler after its emergency
        # checkpoint, so the run ends here with its summary and status 75.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            result = job.run_local(cfg, resume=resume)
        finally:
            signal.signal(signal.SIGTERM, previous)
        where = "in this process"
    if as_json:
        _out_json_result(result)
        if result.preempted:
            raise typer.Exit(EXIT_PREEMPTED)
        return
    start = f"resumed from step {result.restored_step}" if result.restored_step is not None else "started fresh"
    if result.preempted:
        out(f"{cfg.name}: {start}; stopped by preemption {where} at step {result.final_step} "
            f"after an emergency checkpoint; `ckptmgr resume` continues; checkpoints in {result.directory}")
        raise typer.Exit(EXIT_PREEMPTED)
    loss = f"final loss {result.final_loss:.4g}" if result.final_loss is not None else "already complete"
    out(
        f"{cfg.name}: {start}; trained {where} to step {result.final_step} "
        f"({cfg.training.epochs} epoch{'s' if cfg.training.epochs != 1 else ''}), {loss}; "
        f"checkpoints in {result.directory}"
    )


def _out_json_result(result) -> None:
    """What a run did, for scripts and tests (``--json``)."""
    resumed = result.restored_step
    out(json.dumps({
        "resumed_from": None if resumed is None else {"step": resumed, "tier": "storage"},
        "final_step": result.final_step,
        "restarts": 0,
        "preempted": bool(result.preempted),
        "final_loss": result.final_loss,
        "directory": result.directory,
        "exit_status": EXIT_PREEMPTED if result.preempted else 0,
    }))


# -- entry point -------------------------------------------------------------------


# A run stopped by a preemption or a lost node exits with EX_TEMPFAIL (sysexits.h):
# "try again later". Never 0, so `resume || run` and KubeRay's backoffLimit restart it.
EXIT_PREEMPTED = 75


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, CkptmgrError):
        line = f"{type(exc).__name__}: {line}"
    return line


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _state["debug"] = False
    try:
        app(args=argv, prog_name="ckptmgr")
    except JobStoppedError as exc:  # a node was lost: not a finished run, not a bad config
        if _state["debug"]:
            raise
        typer.echo(f"error: {_first_line(exc)}", err=True)
        return EXIT_PREEMPTED
    except (CkptmgrError, OSError, ValueError, ArithmeticError) as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {_first_line(exc)}", err=True)
        return 1
    except Exception as exc:  # a storage library's own error that escaped translation
        if _state["debug"] or not is_backend_error(exc):
            raise
        typer.echo(f"error: storage failed: {_first_line(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``ckptmgr verify`` and ``ckptmgr export``: checksums, a deep check that
Keras loads the checkpoint, and exports as weights, ``.keras`` or SavedModel.

Only ``verify --deep`` and ``export --format savedmodel`` import TensorFlow
(with the user's code: :mod:`ckptmgr.cli_user_code`). Runs on the user's machine.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Optional

import typer

from ckptmgr.cli_common import (
    STATE, STEP_HELP, StorageOpt, UrlArg, first_line, open_manager, out, progress_bar, require_steps,
    usage_error,
)
from ckptmgr.cli_user_code import UNKNOWN_OBJECT_HINT, CustomObjectOpt, ImportOpt, load_user_code, user_code
from ckptmgr.errors import ConfigError, UnknownCustomObjectError
from ckptmgr.io.storage import parse_storage_options
from ckptmgr.manager import CheckpointManager


class ExportFormat(str, Enum):
    weights = "weights"
    keras = "keras"
    savedmodel = "savedmodel"


def verify(
    url: str = UrlArg,
    step: Optional[int] = typer.Option(None, "--step", help="Verify only this step (default: all)."),
    deep: bool = typer.Option(False, "--deep", help="Also load each intact checkpoint with Keras (TensorFlow): its classes, config and weights."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {step, ok, problem} instead of lines."),
    unsafe: bool = typer.Option(False, "--unsafe", help="--deep: allow Python lambdas (only for checkpoints you trust)."),
    storage_option: Optional[list[str]] = StorageOpt,
    custom_object: Optional[list[str]] = CustomObjectOpt,
    import_: Optional[list[str]] = ImportOpt,
) -> None:
    """Recompute checksums; exit 0 only if every checked checkpoint is intact."""
    code = user_code(custom_object, import_)
    if (code or unsafe) and not deep:
        raise usage_error("--custom-object, --import and --unsafe apply to --deep; add --deep.")
    manager = open_manager(url, storage_option)
    steps = [step] if step is not None else require_steps(manager)
    custom_objects = load_user_code(code) if deep else {}
    results = []
    for s in steps:
        with progress_bar(f"verify step {s}") as progress:
            results += manager.verify(s, progress=progress)
    rows = [{"step": r.step, "ok": r.ok, "problem": r.problem or None} for r in results]
    if deep:
        for row in rows:
            if row["ok"] and row["step"] in steps:
                problem = _deep_problem(manager, row["step"], custom_objects, unsafe)
                row.update(ok=problem is None, problem=problem)
            row["loaded"] = row["ok"]
    if as_json:
        out(json.dumps(rows, indent=2))
    else:
        for row in rows:
            out(f"ok step {row['step']}" + (" (loads)" if deep else "") if row["ok"] else f"bad {row['problem']}")
    if not all(row["ok"] for row in rows):
        raise typer.Exit(1)


def _deep_problem(manager: CheckpointManager, step: int, custom_objects: dict[str, Any], unsafe: bool) -> str | None:
    """Why ``step`` does not load with Keras, in one line; None if it loads."""
    try:
        manager.load(step, custom_objects, compile=True, safe_mode=not unsafe)
    except Exception as exc:  # noqa: BLE001 - anything Keras raises is the answer
        if STATE["debug"]:
            raise
        hint = UNKNOWN_OBJECT_HINT if isinstance(exc, UnknownCustomObjectError) else ""
        line = first_line(exc)
        return line + hint if line.startswith(f"step {step}") else f"step {step}: does not load: {line}{hint}"
    return None


def export(
    url: str = UrlArg,
    output: str = typer.Option(..., "--output", "-o", help="Destination path or URL.", show_default=False),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="weights (.weights.h5), keras (.keras) or savedmodel (directory)."),
    step: Optional[int] = typer.Option(None, "--step", help=STEP_HELP),
    unsafe: bool = typer.Option(False, "--unsafe", help="savedmodel: allow Python lambdas (only for checkpoints you trust)."),
    force: bool = typer.Option(False, "--force", "--overwrite", help="Replace what is at the destination (refused otherwise)."),
    no_optimizer: bool = typer.Option(False, "--no-optimizer", help="weights: leave the optimizer state out (model.save_weights keeps it)."),
    storage_option: Optional[list[str]] = StorageOpt,
    dest_option: Optional[list[str]] = typer.Option(
        None, "--dest-option", metavar="KEY=VALUE",
        help="Storage option for the destination (repeatable); default: the --storage-option values when both are on the same backend.",
    ),
    custom_object: Optional[list[str]] = CustomObjectOpt,
    import_: Optional[list[str]] = ImportOpt,
) -> None:
    """Export a verified checkpoint as weights, a .keras file or a SavedModel."""
    code = user_code(custom_object, import_)
    if code and fmt is not ExportFormat.savedmodel:
        raise usage_error("--custom-object and --import apply to --format savedmodel "
                               "(weights and keras exports copy the checkpoint without loading it).")
    if no_optimizer and fmt is not ExportFormat.weights:
        raise usage_error("--no-optimizer applies to --format weights only.")
    manager = open_manager(url, storage_option)
    dest_options = _dest_options(url, output, storage_option, dest_option)
    if not force:
        _refuse_existing(output, dest_options)
    if fmt is ExportFormat.savedmodel:
        custom_objects = load_user_code(code)
        try:
            done = manager.export_saved_model(output, step, custom_objects=custom_objects,
                                              storage_options=dest_options, overwrite=force,
                                              safe_mode=not unsafe)
        except UnknownCustomObjectError as exc:
            raise UnknownCustomObjectError(f"{exc}{UNKNOWN_OBJECT_HINT}") from None
    elif fmt is ExportFormat.weights:
        with progress_bar("export") as progress:
            done = manager.export_weights(output, step, storage_options=dest_options, progress=progress,
                                          overwrite=force, include_optimizer=not no_optimizer)
    else:
        with progress_bar("export") as progress:
            done = manager.export_keras(output, step, storage_options=dest_options, progress=progress,
                                        overwrite=force)
    out(f"exported {fmt.value} to {done}")


def _refuse_existing(output: str, options: dict[str, Any]) -> None:
    """Before any work: an existing destination is replaced only with --force."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(output, skip_instance_cache=True, **options)
        exists = fs.exists(path)
    except Exception:  # noqa: BLE001 - the export itself reports a bad destination
        return
    if exists:
        raise ConfigError(f"{output} exists: pass --force to replace it, or choose another path.")


def _dest_options(url: str, output: str, source: list[str] | None, dest: list[str] | None) -> dict[str, Any]:
    if dest:
        return parse_storage_options(dest)
    from fsspec.core import split_protocol

    same = (split_protocol(url)[0] or "file") == (split_protocol(output)[0] or "file")
    return parse_storage_options(source) if same else {}

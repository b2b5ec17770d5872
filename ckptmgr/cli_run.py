"""``ckptmgr run`` and ``ckptmgr resume``: the example job, on Ray or in this
process, and the line (or JSON object) that says what it did.

Before anything heavy starts, the directory is asked what is there:
``resume`` with no checkpoint, and a run whose newest checkpoint already
completes every epoch, answer without starting Ray or importing TensorFlow.
Runs on the user's machine (the driver).
"""

from __future__ import annotations

import json
import math
import signal
from typing import Optional

import typer

from ckptmgr.cli_common import out
from ckptmgr.cli_user_code import CustomObjectOpt, ImportOpt, load_user_code, user_code
from ckptmgr.errors import CheckpointNotFoundError, CkptmgrError
from ckptmgr.io.manifest import Manifest

# A run stopped by a preemption or a lost node exits with EX_TEMPFAIL (sysexits.h):
# "try again later". Never 0, so `resume || run` and KubeRay's backoffLimit restart it.
EXIT_PREEMPTED = 75

ConfigArg = typer.Argument(..., help="YAML job config, e.g. configs/local.yaml.", metavar="CONFIG", show_default=False)
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config field (repeatable), e.g. training.epochs=5.")
AddressOpt = typer.Option(None, "--address", help="Ray cluster address (sets ray.address); default: start a local one.")
LocalOpt = typer.Option(False, "--no-ray", help="Train in this process instead of on Ray workers.")
VerboseOpt = typer.Option(False, "--verbose", help="Stream the Ray workers' logs (training and save lines) here (sets ray.worker_logs).")
MaxRestartsOpt = typer.Option(None, "--max-restarts", min=0, help="Restart the workers after a preemption or a lost node, from the newest tier, up to N times (sets ray.max_restarts).")
JsonRunOpt = typer.Option(False, "--json", help="Print one JSON object at the end (resumed_from, final_step, ...) instead of the summary line.")


def _job_command(*, resume: bool, doc: str):
    """``run`` and ``resume``: the same options; ``resume`` requires a checkpoint."""

    def command(
        config: str = ConfigArg,
        set_: Optional[list[str]] = SetOpt,
        address: Optional[str] = AddressOpt,
        no_ray: bool = LocalOpt,
        as_json: bool = JsonRunOpt,
        custom_object: Optional[list[str]] = CustomObjectOpt,
        import_: Optional[list[str]] = ImportOpt,
        max_restarts: Optional[int] = MaxRestartsOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        run_job(config, set_, resume=resume, address=address, on_ray=not no_ray, as_json=as_json,
                custom_objects=custom_object, imports=import_, max_restarts=max_restarts, verbose=verbose)

    command.__name__ = command.__qualname__ = "resume" if resume else "run"
    command.__doc__ = doc
    return command


run = _job_command(resume=False, doc="Train the example job on Ray; continues from the newest checkpoint if there is one.")
resume = _job_command(resume=True, doc="Continue the example job from its newest good checkpoint (error if there is none).")


def run_job(config: str, overrides: list[str] | None, *, resume: bool, address: str | None, on_ray: bool,
            as_json: bool = False, custom_objects: list[str] | None = None,
            imports: list[str] | None = None, max_restarts: int | None = None,
            verbose: bool = False) -> None:
    from ckptmgr.config import apply_overrides, load_config, set_values
    from ckptmgr.manager import CheckpointManager

    cfg = apply_overrides(load_config(config), overrides)
    if address is not None:
        cfg = set_values(cfg, {"ray.address": address}, {"ray.address": "--address"})
    if max_restarts is not None:
        cfg = set_values(cfg, {"ray.max_restarts": max_restarts}, {"ray.max_restarts": "--max-restarts"})
    if verbose:
        cfg = set_values(cfg, {"ray.worker_logs": True}, {"ray.worker_logs": "--verbose"})
    if custom_objects or imports:
        code = user_code(custom_objects, imports)
        named = dict(spec.split("=", 1) for spec in code.custom_objects)
        cfg = set_values(cfg, {
            "user_code.imports": [*cfg.user_code.imports, *code.imports],
            "user_code.custom_objects": {**cfg.user_code.custom_objects, **named},
        }, {"user_code.imports": "--import", "user_code.custom_objects": "--custom-object"})

    ckpt = cfg.checkpoint
    manager = CheckpointManager(ckpt.directory, storage_options=ckpt.storage_options)
    newest = manager.latest_step()
    if resume and newest is None and not _memory_tier_may_hold(cfg, on_ray):
        raise CheckpointNotFoundError(
            f"Nothing to resume under {ckpt.directory}: it holds no checkpoints; "
            "use `ckptmgr run` to start."
        )
    complete = _complete_checkpoint(manager, newest, cfg)
    if complete is not None:
        _report_nothing_to_do(cfg, complete, as_json)
        return
    if cfg.user_code.imports or cfg.user_code.custom_objects:
        load_user_code(cfg.user_code.user_code())  # fails here, before Ray starts

    if on_ray:
        from ckptmgr.ray_job import run_on_ray

        result, _ = run_on_ray(cfg, resume=resume, watch=True)
        where = f"on Ray with {cfg.ray.num_workers} workers"
    else:
        from ckptmgr import job
        from ckptmgr.tf_noise import import_keras_quietly

        import_keras_quietly()
        # The callback passes SIGTERM on to this handler after its emergency
        # checkpoint, so the run ends here with its summary and status 75.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            result = job.run_local(cfg, resume=resume)
        finally:
            signal.signal(signal.SIGTERM, previous)
        where = "in this process"
    if as_json:
        out_json_result(result)
        if result.preempted:
            raise typer.Exit(EXIT_PREEMPTED)
        return
    start = f"resumed from step {result.restored_step}" if result.restored_step is not None else "started fresh"
    if result.preempted:
        out(f"{cfg.name}: {start}; stopped by preemption {where} at step {result.final_step} "
            f"after an emergency checkpoint; `ckptmgr resume` continues; checkpoints in {result.directory}")
        raise typer.Exit(EXIT_PREEMPTED)
    if result.final_loss is None:  # restored at the very end: no epoch ran (not caught above)
        out(f"{cfg.name}: nothing to do: the checkpoint at step {result.final_step} already "
            f"completes {_epochs(cfg.training.epochs)}; checkpoints in {result.directory}")
        return
    out(
        f"{cfg.name}: {start}; trained {where} to step {result.final_step} "
        f"({_epochs(cfg.training.epochs)}), final loss {result.final_loss:.4g}; "
        f"checkpoints in {result.directory}"
    )


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _memory_tier_may_hold(cfg, on_ray: bool) -> bool:
    """Whether a snapshot may live only in a Ray cluster's memory tier: never
    without Ray or on a new local cluster (``ray.address`` unset)."""
    memory = getattr(cfg.checkpoint, "memory_tier", None)
    return bool(on_ray and memory is not None and getattr(memory, "every_steps", None)
                and cfg.ray.address not in (None, "local"))


def _complete_checkpoint(manager, newest: int | None, cfg) -> Manifest | None:
    """The newest checkpoint if it already completes every epoch of the job and
    verifies; else None (then the run decides: it trains, or falls back)."""
    if newest is None:
        return None
    try:
        manifest = manager.manifest(newest)
    except CkptmgrError:
        return None
    loop = manifest.loop
    if loop is None:
        return None
    # Where the callback would continue (a save on an epoch's last batch: the next epoch).
    steps_per_epoch = math.ceil(cfg.training.samples / cfg.training.batch_size)
    next_epoch = loop.next_epoch + (loop.next_batch >= steps_per_epoch)
    if next_epoch < cfg.training.epochs:
        return None
    if not all(r.ok for r in manager.verify(newest)):
        return None
    return manifest


def _report_nothing_to_do(cfg, manifest: Manifest, as_json: bool) -> None:
    epochs = cfg.training.epochs
    if as_json:
        out(json.dumps({
            "resumed_from": None, "final_step": manifest.step, "restarts": 0, "preempted": False,
            "final_loss": None, "directory": cfg.checkpoint.directory, "exit_status": 0,
            "nothing_to_do": True,
        }))
        return
    out(f"{cfg.name}: nothing to do: the checkpoint at step {manifest.step} already completes "
        f"{_epochs(epochs)} (training.epochs={epochs}); raise it to train further, e.g. "
        f"--set training.epochs={epochs + 1}; checkpoints in {cfg.checkpoint.directory}")


def out_json_result(result) -> None:
    """What a run did, for scripts and tests (``--json``)."""
    resumed = result.restored_step
    tier = getattr(result, "restored_tier", None) or "storage"
    out(json.dumps({
        "resumed_from": None if resumed is None else {"step": resumed, "tier": tier},
        "final_step": result.final_step,
        "restarts": getattr(result, "restarts", 0),
        "preempted": bool(result.preempted),
        "final_loss": result.final_loss,
        "directory": result.directory,
        "exit_status": EXIT_PREEMPTED if result.preempted else 0,
        "nothing_to_do": result.final_loss is None and not result.preempted and resumed is not None,
    }))

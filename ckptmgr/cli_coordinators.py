"""``ckptmgr coordinators list|stop``: the run actors left on a Ray cluster.

A run's coordinator (and its memory-tier keepers) are detached actors, so a
restarted driver finds them; a finished run's driver stops its keepers, but
a coordinator may outlive its job (a killed driver, ``--keep``). These
commands show and stop them, on the cluster ``--address`` names (default:
the one this machine runs, as ``ray status`` finds it). Imports no TensorFlow.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from ckptmgr.cli_common import out
from ckptmgr.errors import CkptmgrError

app = typer.Typer(help="List or stop the run coordinators (and memory-tier keepers) on a Ray cluster.",
                  no_args_is_help=True)

AddressOpt = typer.Option(None, "--address", help="Ray cluster address (default: the running local one, 'auto').")


def _connect(address: str | None) -> Any:
    """Ray, connected to an existing cluster (never a new one)."""
    import ray

    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CkptmgrError(
            f"No Ray cluster at {address or 'auto'} ({type(exc).__name__}); pass --address "
            "of the cluster the run used, e.g. --address 10.0.0.2:6379.") from None
    return ray


def run_actors(ray) -> list[dict[str, Any]]:
    """Every run's coordinator and keepers: [{directory, coordinator, keepers}]."""
    from ckptmgr.coordinator import NAMESPACE, coordinator_name
    from ckptmgr.ray.keepers import KEEPER_PREFIX

    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE]
    runs: dict[str, dict[str, Any]] = {}
    for name in named:
        if name.startswith(KEEPER_PREFIX):
            directory = name[len(KEEPER_PREFIX):].rsplit("@", 1)[0]
            runs.setdefault(directory, {"directory": directory, "coordinator": None, "keepers": 0})["keepers"] += 1
        elif name.startswith(coordinator_name("")):
            directory = name[len(coordinator_name("")):]
            runs.setdefault(directory, {"directory": directory, "coordinator": None, "keepers": 0})
            runs[directory]["coordinator"] = _describe(ray, name)
    return [runs[d] for d in sorted(runs)]


def _describe(ray, name: str) -> dict[str, Any] | None:
    from ckptmgr.coordinator import NAMESPACE

    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
        options, latest, pid, node = ray.get([actor.options_.remote(), actor.latest_step.remote(),
                                              actor.pid.remote(), actor.node_id.remote()], timeout=30)
    except Exception as exc:  # noqa: BLE001 - a dead or busy actor: say so, list the rest
        return {"state": f"unreachable ({type(exc).__name__})"}
    return {"state": "alive", "pid": pid, "node": node, "world_size": options.world_size,
            "latest_step": latest, "memory_replicas": options.memory_replicas}


@app.command("list")
def list_(address: Optional[str] = AddressOpt,
          as_json: bool = typer.Option(False, "--json", help="One JSON object per run, one per line.")) -> None:
    """The runs with a coordinator or keepers on the cluster."""
    runs = run_actors(_connect(address))
    if as_json:
        for run in runs:
            out(json.dumps(run))
        return
    if not runs:
        out("no ckptmgr coordinators on this cluster")
        return
    for run in runs:
        coord = run["coordinator"]
        if coord is None:
            where = "no coordinator"
        elif coord["state"] != "alive":
            where = f"coordinator {coord['state']}"
        else:
            where = (f"coordinator pid {coord['pid']} on node {coord['node'][:12]}, world size "
                     f"{coord['world_size']}, newest stored step {coord['latest_step']}")
        out(f"{run['directory']}: {where}; {run['keepers']} memory-tier keeper(s)")


@app.command()
def stop(directory: Optional[str] = typer.Argument(None, metavar="URL", show_default=False,
                                                   help="The run's checkpoint directory (as the run named it)."),
         all_: bool = typer.Option(False, "--all", help="Stop every run's coordinator and keepers."),
         address: Optional[str] = AddressOpt) -> None:
    """Stop a run's coordinator (after its writes in flight) and its keepers."""
    if (directory is None) == (not all_):
        raise typer.BadParameter("name one run's URL, or pass --all")
    ray = _connect(address)
    targets = [r["directory"] for r in run_actors(ray)] if all_ else [directory.rstrip("/")]
    for target in targets:
        out(stop_run(target))


def stop_run(directory: str) -> str:
    """Stop one run's actors; what was stopped, in one line."""
    from ckptmgr.coordinator import find, shut_down
    from ckptmgr.ray.keepers import MemoryTier

    actor = find(directory)
    if actor is not None:
        shut_down(actor, timeout_s=300)  # a write in flight finishes first
    keepers = MemoryTier(directory).stop()
    if actor is None and not keepers:
        raise CkptmgrError(f"No coordinator or keepers for {directory} on this cluster; "
                           "see `ckptmgr coordinators list`.")
    return f"{directory}: stopped {'the coordinator and ' if actor is not None else ''}{keepers} keeper(s)"

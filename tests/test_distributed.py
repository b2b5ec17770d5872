"""Distributed checkpointing on a real multi-node Ray cluster on one machine.

A head and two worker nodes (``ray.cluster_utils.Cluster``); each training
rank is pinned to its own node through a custom resource. Marked slow, run in CI.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray_cluster import local_cluster  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.io.archive import ModelSnapshot, VarGroup  # noqa: E402
from ckptmgr.config import apply_overrides, load_config  # noqa: E402
from ckptmgr.coordinator import CoordinatorOptions, get_or_create, snapshot_digest  # noqa: E402
from ckptmgr.errors import DistributedSaveError  # noqa: E402
from ckptmgr.ray.watch import RunWatch, describe  # noqa: E402
from ckptmgr.ray_job import JobStoppedError, run_on_ray  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PLACEMENT = [{"rank0": 1}, {"rank1": 1}]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster({name: {name: 1} for name in ("rank0", "rank1")}) as made:
        yield made


def _cfg(directory: str, *extra: str, storage_options: dict | None = None):
    overrides = [
        f"checkpoint.directory={directory}", "checkpoint.save_freq=8", "checkpoint.keep_last=3",
        "training.samples=512", "training.batch_size=32", "training.epochs=2",
        "training.hidden=[32]", "training.features=8", "ray.num_workers=2", *extra,
    ]
    cfg = apply_overrides(load_config(REPO / "configs" / "local.yaml"), overrides)
    if storage_options:
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
            update={"storage_options": storage_options})})
    return cfg


def _start_job(cfg) -> tuple[threading.Thread, dict]:
    """Run the job in a thread; its result or error lands in the returned dict."""
    outcome: dict = {}

    def job():
        try:
            outcome["result"] = run_on_ray(cfg, resume=False, worker_resources=PLACEMENT)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    return thread, outcome


def _kill_coordinator(directory: str) -> None:
    from ckptmgr.coordinator import find

    actor = find(directory)
    if actor is not None:
        ray.kill(actor)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_workers_commit_through_the_coordinator(cluster, tmp_path, where, request):
    if where == "gcs":
        gcs = request.getfixturevalue("gcs_server")
        directory, options = gcs.new_url(), gcs.storage_options
    else:
        directory, options = str(tmp_path / "run"), {}
    cfg = _cfg(directory, "ray.keep_coordinator=true", storage_options=options)
    result, weights = run_on_ray(cfg, resume=False, worker_resources=PLACEMENT, return_weights=True)
    manager = CheckpointManager(directory, storage_options=options)
    assert manager.steps() == [16, 24, 32]  # 16 batches/epoch, every 8, keep_last=3
    manifest = manager.manifest()
    assert manifest.world["ranks"] == [0, 1] and manifest.world["world_size"] == 2
    assert manifest.stats.bytes > 0 and manifest.stats.write_s > 0
    assert all(r.ok for r in manager.verify())
    from ckptmgr.coordinator import find

    assert ray.get(find(directory).metrics_recorded.remote()) >= 4
    assert ray.get(find(directory).imports_tensorflow.remote()) is False
    loaded = manager.load()  # stock load_model on the verified archive
    for got, want in zip(loaded.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    _kill_coordinator(directory)


def test_node_removed_then_resume_matches_uninterrupted(cluster, tmp_path):
    c, nodes = cluster
    long = ("training.epochs=6",)
    reference, ref_weights = run_on_ray(_cfg(str(tmp_path / "ref"), *long), resume=False,
                                        worker_resources=PLACEMENT, return_weights=True)
    _kill_coordinator(str(tmp_path / "ref"))

    directory = str(tmp_path / "run")
    cfg = _cfg(directory, *long)
    thread, outcome = _start_job(cfg)
    manager = CheckpointManager(directory)
    deadline = time.monotonic() + 120
    while (manager.latest_step() or 0) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.remove_node(nodes["rank1"])
    thread.join(120)
    assert isinstance(outcome.get("error"), JobStoppedError), outcome
    assert "rank 1" in str(outcome["error"]) and "ckptmgr resume" in str(outcome["error"])
    stopped_at = manager.latest_step()
    assert 24 <= stopped_at < 96

    nodes["rank1"] = c.add_node(num_cpus=1, resources={"rank1": 1})
    c.wait_for_nodes()
    result, weights = run_on_ray(cfg, resume=True, worker_resources=PLACEMENT, return_weights=True)
    from ckptmgr.coordinator import find

    assert find(directory) is None  # a finished run stops its coordinator (ray.keep_coordinator: false)
    assert result.restored_step == stopped_at or result.restored_step >= 24
    assert result.final_step == reference.final_step == 96
    assert result.weights_sha256 == reference.weights_sha256
    for got, want in zip(weights, ref_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    _kill_coordinator(directory)


@pytest.mark.parametrize("on_busy", ["wait", "newest"])
def test_sigterm_on_a_worker_commits_an_emergency_checkpoint(cluster, tmp_path, on_busy):
    from ray.util.state import list_actors

    directory = str(tmp_path / "run")
    cfg = _cfg(directory, "training.epochs=40", "checkpoint.save_freq=40", f"checkpoint.on_busy={on_busy}")
    thread, outcome = _start_job(cfg)
    manager = CheckpointManager(directory)
    deadline = time.monotonic() + 120
    while (manager.latest_step() or 0) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)  # training is under way once a checkpoint exists
    # This cluster's address: "auto" is ambiguous when other Ray clusters run on the machine.
    actors = list_actors(address=cluster[0].address,
                         filters=[("class_name", "=", "TrainWorker"), ("state", "=", "ALIVE")])
    pid = sorted(actors, key=lambda a: a.pid)[-1].pid
    os.kill(pid, signal.SIGTERM)
    thread.join(120)
    assert "result" in outcome, outcome
    result, _ = outcome["result"]
    assert result.preempted
    manifest = manager.manifest()
    assert manifest.extra.get("emergency") is True
    assert manifest.world["ranks"] == [0, 1]
    assert manifest.step < 40 * 16  # stopped early, at the agreed step
    assert manager.verify(manifest.step)[0].ok
    _kill_coordinator(directory)


# -- coordinator protocol, driven directly ---------------------------------------------


def _snapshot(mb: float, fill: float = 1.0) -> ModelSnapshot:
    n = int(mb * 1e6 / 4)
    arrays = [("0", np.full((n,), fill, dtype="float32"))]
    return ModelSnapshot("{}", '{"keras_version": "test"}', [VarGroup("layers/dense/vars", {}, arrays)])


def test_digest_mismatch_refuses_the_step(cluster, tmp_path):
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=2))
    snap = _snapshot(0.1)
    ref = [ray.put(snap)]
    coord.submit_part.remote(5, 0, snapshot_digest(snap), ref, 0.01)
    coord.submit_part.remote(5, 1, snapshot_digest(_snapshot(0.1, fill=2.0)), [], 0.01)
    with pytest.raises(DistributedSaveError, match=r"step 5 refused: .*ranks \[1\] differs"):
        ray.get(coord.wait_step.remote(5, 30))
    assert CheckpointManager(directory).steps() == []
    # What the driver's watch shows, and the failure counter.
    failed = [e for e in ray.get(coord.watch.remote(0))["events"] if e["kind"] == "failed"]
    assert [e["step"] for e in failed] == [5] and "ranks [1] differs" in describe(failed[0])
    assert ray.get(coord.metric_counts.remote())["saves_failed"] == 1
    ray.kill(coord)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_watch_draws_a_progress_bar_on_a_terminal(cluster, tmp_path):
    coord = get_or_create(CoordinatorOptions(str(tmp_path / "run"), world_size=1))
    ray.get(coord.note.remote("epoch", {"step": 16, "epoch": 1, "epochs": 2}))  # before the watch
    stream = _Terminal()
    with RunWatch(coord, stream) as watch:
        ray.get(coord.note.remote("restored", {"step": 5, "tier": "memory"}))
        ray.get(coord.note_progress.remote({"step": 40, "epoch": 2, "epochs": 2, "total_steps": 64, "loss": 0.5}))
        watch.tick()
    text = stream.getvalue()
    assert "ckptmgr: restored step 5 from memory" in text
    assert "40/64" in text and "epoch 2/2" in text and "loss 0.5" in text
    assert "\x1b[" in text  # drawn for a terminal, not plain lines
    assert "epoch 1/2 done" not in text  # an earlier attempt's news is not shown again
    plain = io.StringIO()  # piped: no bar, only the events
    with RunWatch(coord, plain) as watch:
        ray.get(coord.note.remote("saved", {"step": 48, "bytes": 2_000_000, "write_s": 0.25}))
    assert plain.getvalue() == "ckptmgr: saved step 48 (2.0 MB in 0.25 s)\n"
    ray.kill(coord)


def test_the_driver_shows_every_save_restore_and_epoch(cluster, tmp_path, capsys):
    directory = str(tmp_path / "run")
    run_on_ray(_cfg(directory, "training.epochs=1"), resume=False, worker_resources=PLACEMENT, watch=True)
    first = capsys.readouterr().err
    assert [f"saved step {s} (" in first for s in (8, 16)] == [True, True]
    assert "ckptmgr: epoch 1/1 done: step 16/16, loss " in first
    run_on_ray(_cfg(directory), resume=True, worker_resources=PLACEMENT, watch=True)
    second = capsys.readouterr().err
    assert "ckptmgr: restored step 16 from storage" in second
    assert "ckptmgr: saved step 24 (" in second and "ckptmgr: epoch 2/2 done: step 32/32" in second
    assert "epoch 1/2 done" not in second  # continued at epoch 2


def test_missing_part_times_out_naming_the_rank(cluster, tmp_path):
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=3, save_timeout_s=1.0))
    snap = _snapshot(0.1)
    coord.submit_part.remote(7, 0, snapshot_digest(snap), [ray.put(snap)], 0.01)
    coord.submit_part.remote(7, 2, snapshot_digest(snap), [], 0.01)
    with pytest.raises(DistributedSaveError, match=r"step 7 timed out: no part from ranks \[1\] \(waited rank 1 for \d+\.\d s"):
        ray.get(coord.wait_step.remote(7, 30))
    assert CheckpointManager(directory).steps() == []
    ray.kill(coord)


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_coordinator_killed_mid_write_leaves_nothing_listed(cluster, tmp_path, how):
    directory = str(tmp_path / "run")
    options = CoordinatorOptions(directory, world_size=1)
    coord = get_or_create(options)
    small = _snapshot(0.1)
    coord.submit_part.remote(1, 0, snapshot_digest(small), [ray.put(small)], 0.0)
    ray.get(coord.wait_step.remote(1, 30))
    big = _snapshot(800)
    coord.submit_part.remote(2, 0, snapshot_digest(big), [ray.put(big)], 0.0)
    tmp_dir = Path(directory) / ".tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = list(tmp_dir.glob("*.part")) if tmp_dir.exists() else []
        if parts and parts[0].stat().st_size > 0:
            break
        time.sleep(0.005)
    assert parts, "the write of step 2 never started"
    if how == "ray.kill":
        ray.kill(coord)
    else:
        os.kill(ray.get(coord.pid.remote()), signal.SIGKILL)
    time.sleep(1)
    manager = CheckpointManager(directory)
    assert manager.steps() == [1]  # the half-written step 2 is not listed
    assert not list(Path(directory).glob("ckpt-000000002*"))
    # A new coordinator carries on: step 2 again commits.
    fresh = get_or_create(options)
    coord_pid = ray.get(fresh.pid.remote())
    assert coord_pid > 0
    fresh.submit_part.remote(2, 0, snapshot_digest(small), [ray.put(small)], 0.0)
    ray.get(fresh.wait_step.remote(2, 60))
    assert manager.steps() == [1, 2] and manager.verify(2)[0].ok
    ray.kill(fresh)


def test_ray_train_tensorflow_trainer_with_two_workers(cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from ckptmgr.ray_job import coordinator_options, ray_train_loop

    directory = str(tmp_path / "run")
    cfg = _cfg(directory)
    coord = get_or_create(coordinator_options(cfg))  # the driver creates the run's coordinator
    trainer = TensorflowTrainer(
        ray_train_loop,
        train_loop_config={"cfg": cfg.model_dump_json()},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="ckptmgr-test", storage_path=str(tmp_path / "ray_train")),
    )
    result = trainer.fit()
    assert result.error is None
    manager = CheckpointManager(directory)
    assert manager.steps() == [16, 24, 32]
    manifest = manager.manifest()
    # Both Ray Train ranks went through the coordinator and their digests agreed.
    assert manifest.world["ranks"] == [0, 1] and manifest.world["world_size"] == 2
    assert all(r.ok for r in manager.verify())
    ray.kill(coord)


class ShardOwner:
    """A plain Ray actor rank that owns some rows of a sharded dataset."""

    def save(self, directory: str, rank: int, sharded: str, step: int):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras

        from ckptmgr.coordinator import find, shard_rows
        from ckptmgr.distributed import CoordinatorClient

        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        model.fit(np.ones((8, 4), "float32"), np.ones((8, 1), "float32"), verbose=0)
        kernel = model.layers[0].kernel
        true_value = kernel.numpy().copy()
        garbled = true_value.copy()
        start, stop = shard_rows(garbled.shape[0], rank, 2)
        garbled[:start] = 100 + rank  # rows owned by others hold junk here
        garbled[stop:] = 100 + rank
        kernel.assign(garbled)
        options = ray.get(find(directory).options_.remote())
        client = CoordinatorClient(options, rank, sharded={sharded})
        client.save(step, model, blocking=True)
        return true_value


def test_sharded_rows_are_gathered_from_every_rank(cluster, tmp_path):
    import h5py
    import keras

    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=2))
    owner = ray.remote(num_cpus=0)(ShardOwner)
    ranks = [owner.options(resources=PLACEMENT[r]).remote() for r in range(2)]
    kernels = ray.get([a.save.remote(directory, r, "layers/dense/vars/0", 5) for r, a in enumerate(ranks)])
    np.testing.assert_array_equal(kernels[0], kernels[1])  # the true value, same on both
    manager = CheckpointManager(directory)
    assert manager.steps() == [5]  # digests agreed: sharded rows are left out of them
    path = manager.local_archive_path(5)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.layers[0].kernel.numpy(), kernels[0])
    with open(path, "rb") as f:
        from ckptmgr.io.archive import open_weights

        with open_weights(f) as h5:
            assert isinstance(h5["layers/dense/vars/0"], h5py.Dataset)
    for actor in ranks:
        ray.kill(actor)
    ray.kill(coord)


def test_a_new_job_config_replaces_a_stale_coordinator(cluster, tmp_path):
    from ckptmgr.coordinator import find
    from ckptmgr.ray_job import _coordinator_for, coordinator_options

    directory = str(tmp_path / "run")
    stale = get_or_create(CoordinatorOptions(directory, world_size=3))
    wanted = coordinator_options(_cfg(directory))
    fresh = _coordinator_for(wanted)
    assert ray.get(fresh.options_.remote()) == wanted
    assert ray.get(find(directory).options_.remote()).world_size == 2
    del stale
    same = _coordinator_for(wanted)  # unchanged options: the same actor is kept
    assert ray.get(same.pid.remote()) == ray.get(fresh.pid.remote())
    ray.kill(fresh)


@ray.remote(num_cpus=0)
def _callback_on_a_rank(directory: str, rank: int, **kwargs) -> str:
    from ckptmgr.keras import CheckpointCallback

    try:
        return type(CheckpointCallback(directory, rank=rank, world_size=2, **kwargs).manager).__name__
    except Exception as exc:  # noqa: BLE001 - the test reads the one line
        return f"{type(exc).__name__}: {exc}"


def test_ranks_without_a_coordinator_create_one_never_per_rank_writers(cluster, tmp_path):
    """Issue 9: ranks of a 2-worker run used to fall back to per-rank managers
    on one directory. Now they share one coordinator, created on first use."""
    from ckptmgr.coordinator import find

    directory = str(tmp_path / "run")
    kinds = ray.get([_callback_on_a_rank.remote(directory, r, keep_last=2) for r in (0, 1)])
    assert kinds == ["CoordinatorClient", "CoordinatorClient"]
    coordinator = find(directory)
    assert coordinator is not None
    assert ray.get(coordinator.options_.remote()).retention == {"keep_last": 2}
    # Other retention in a worker than the coordinator's: refused in one line.
    refused = ray.get(_callback_on_a_rank.remote(directory, 0, keep_last=5))
    assert refused.startswith("ConfigError: Retention options of a distributed run belong to its coordinator")
    assert "\n" not in refused
    # A relative local directory means another place on every node: refused.
    relative = ray.get(_callback_on_a_rank.remote("relative/run", 0))
    assert relative.startswith("ConfigError: Invalid checkpoint directory for a distributed run")
    ray.kill(coordinator)


def test_fallback_on_ray_moves_the_abandoned_step_aside(cluster, tmp_path):
    """Issue 9: after a fallback from a corrupt newest checkpoint, the resumed
    run reaches that step again: rank 0 has the coordinator move it aside, the
    step is written afresh, and the run ends as the first one did."""
    directory = str(tmp_path / "run")
    cfg = _cfg(directory)
    first, _ = run_on_ray(cfg, resume=False, worker_resources=PLACEMENT)
    manager = CheckpointManager(directory)
    newest = manager.latest_step()
    assert newest == first.final_step == 32
    with open(manager.local_archive_path(newest), "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 8)
    result, _ = run_on_ray(cfg, resume=True, worker_resources=PLACEMENT)
    assert result.restored_step == 24
    assert result.final_step == 32 and result.weights_sha256 == first.weights_sha256
    assert [s.step for s in manager.superseded()] == [32]
    assert manager.latest_step() == 32 and all(r.ok for r in manager.verify())
    _kill_coordinator(directory)


# -- on_busy="newest": the coordinator decides, every rank agrees -----------------------


def _gated_coordinator(options: CoordinatorOptions, gate: Path):
    """The run's coordinator, whose archive writes wait until ``gate`` exists
    (the real write follows), so "step N is still writing" is deterministic."""
    from contextlib import contextmanager

    from ckptmgr.coordinator import NAMESPACE, Coordinator, coordinator_name

    class GatedCoordinator(Coordinator):
        def __init__(self, options, gate):
            super().__init__(options)
            self._started: list[int] = []
            storage = self.manager.storage
            real = storage.open_archive_writer

            @contextmanager
            def gated(name, *args, **kwargs):
                self._started.append(int(name[len("ckpt-"):].split("-")[0]))
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
                with real(name, *args, **kwargs) as writer:
                    yield writer

            storage.open_archive_writer = gated

        def started(self) -> list[int]:
            return list(self._started)

    return ray.remote(num_cpus=0, max_concurrency=32)(GatedCoordinator).options(
        name=coordinator_name(options.directory), namespace=NAMESPACE, lifetime="detached",
    ).remote(options, str(gate))


def _commit_order(directory: str) -> list[int]:
    """Committed steps in the order their manifests were written."""
    return [m.step for m in sorted(CheckpointManager(directory).manifests(), key=lambda m: m.created)]


def _wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_newest_complete_step_wins_and_every_rank_gets_the_same_outcome(cluster, tmp_path):
    directory = str(tmp_path / "run")
    options = CoordinatorOptions(directory, world_size=2)
    assert options.on_busy == "newest"  # the default
    gate = tmp_path / "gate"
    coord = _gated_coordinator(options, gate)
    try:
        def complete(step: int, fill: float, **extra) -> None:
            snap = _snapshot(0.01, fill)
            digest = snapshot_digest(snap)
            ray.get([coord.submit_part.remote(step, 0, digest, [ray.put(snap)], 0.01, {}, extra),
                     coord.submit_part.remote(step, 1, digest, [], 0.01, {}, extra)])

        complete(1, 1.0)
        _wait_until(lambda: ray.get(coord.started.remote()) == [1])
        for step in (2, 3, 4):  # complete while step 1 writes: each replaces the pending one
            complete(step, float(step))
        complete(5, 5.0, emergency=True)  # replaces 4; never replaced itself
        complete(6, 6.0)  # queued behind the emergency step
        outcomes = {s: ray.get([coord.wait_step.remote(s, 60) for _ in range(2)]) for s in (2, 3, 4)}
        gate.touch()
        outcomes.update({s: ray.get([coord.wait_step.remote(s, 60) for _ in range(2)]) for s in (1, 5, 6)})
    finally:
        gate.touch()
    for step, (rank0, rank1) in outcomes.items():
        assert rank0 == rank1, step  # one decision, in one place
    assert [outcomes[s][0] for s in (2, 3, 4)] == [
        {"replaced": True, "step": 2, "by": 3}, {"replaced": True, "step": 3, "by": 4},
        {"replaced": True, "step": 4, "by": 5}]
    assert all(outcomes[s][0]["manifest"]["step"] == s for s in (1, 5, 6))
    assert ray.get(coord.started.remote()) == [1, 5, 6]
    assert _commit_order(directory) == [1, 5, 6]  # never an older step after a newer one
    manager = CheckpointManager(directory)
    assert [manager.manifest(s).stats.replaced for s in (1, 5, 6)] == [0, 3, 0]
    assert manager.manifest(5).extra == {"emergency": True}
    assert ray.get(coord.dropped_saves.remote()) == {"replaced": 3, "skipped": 0}
    dropped = [describe(e) for e in ray.get(coord.watch.remote(0))["events"] if e["kind"] == "dropped"]
    assert [line.split(" before")[0] for line in dropped] == [  # what the driver shows
        "step 2 replaced by step 3", "step 3 replaced by step 4", "step 4 replaced by step 5"]
    assert all("step 1 still writing" in line for line in dropped), dropped
    assert all(r.ok for r in manager.verify())
    ray.kill(coord)


def test_workers_never_wait_for_a_commit_and_agree_on_replaced_steps(cluster, tmp_path):
    """Two ranks' clients (in this process) save while the coordinator's write
    of step 1 is held: their saves return after the copy and hand-over only."""
    import keras

    from ckptmgr.distributed import CoordinatorClient

    directory = str(tmp_path / "run")
    options = CoordinatorOptions(directory, world_size=2)
    gate = tmp_path / "gate"
    coord = _gated_coordinator(options, gate)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    clients = [CoordinatorClient(options, rank) for rank in (0, 1)]
    futures: dict[int, list] = {}
    try:
        for client in clients:
            client.prepare(model)
        for step in (1, 2, 3, 4):
            model.layers[0].kernel.assign(np.full((8, 16), float(step), "float32"))
            futures[step] = [client.save(step, model) for client in clients]  # gate closed
            if step == 1:
                _wait_until(lambda: ray.get(coord.started.remote()) == [1])
        # Steps 2 and 3 are settled (replaced) while step 1 is still held.
        replaced = {s: [f.result(timeout=30) for f in futures[s]] for s in (2, 3)}
        assert not futures[1][0].done() and not futures[4][0].done()
        gate.touch()
        finals = [client.wait_until_finished(timeout_s=60) for client in clients]
    finally:
        gate.touch()
    assert replaced == {2: [{"replaced": True, "step": 2, "by": 3}] * 2,
                        3: [{"replaced": True, "step": 3, "by": 4}] * 2}
    assert [f["manifest"]["step"] for f in finals] == [4, 4]
    assert [f.result()["manifest"]["step"] for f in futures[1]] == [1, 1]
    assert _commit_order(directory) == [1, 4]
    manager = CheckpointManager(directory)
    stored = keras.saving.load_model(manager.local_archive_path(4), compile=False)
    np.testing.assert_array_equal(stored.layers[0].kernel.numpy(), np.full((8, 16), 4.0, "float32"))
    assert manager.manifest(4).stats.replaced == 2
    for client in clients:
        client.close()
    ray.kill(coord)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_ranks_write_byte_ranges_of_one_archive(cluster, tmp_path, where, request):
    """Issue 10, item 5: with parallel_write each rank writes its own byte range
    of every archive straight to storage (positioned writes into one file on
    local disk, parts composed server-side on GCS); the coordinator holds only
    the tail. The archive is an ordinary .keras file with the final weights."""
    if where == "gcs":
        gcs = request.getfixturevalue("gcs_server")
        directory, options = gcs.new_url(), gcs.storage_options
    else:
        directory, options = str(tmp_path / "run"), {}
    # ~1.5 M parameters with Adam: a 19 MB archive, two 16 MiB chunks, two ranges.
    cfg = _cfg(directory, "training.hidden=[1200,1200]", "training.epochs=1", "ray.parallel_write=true",
               storage_options=options)
    result, weights = run_on_ray(cfg, resume=False, worker_resources=PLACEMENT, return_weights=True)
    manager = CheckpointManager(directory, storage_options=options)
    assert manager.steps() == [8, 16]
    for manifest in manager.manifests():
        assert manifest.world["ranged"] is True and manifest.world["ranges"] == 2
        assert manifest.archive_entry.bytes > 16 * 1024 * 1024
    assert all(r.ok for r in manager.verify())
    loaded = manager.load()
    for got, want in zip(loaded.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    fs, root = fsspec.core.url_to_fs(directory, **options)
    assert not [p for p in fs.find(root) if ".part" in p or ".assembling" in p]
    _kill_coordinator(directory)


def test_gpus_the_cluster_lacks_fail_in_one_line_instead_of_waiting(cluster, tmp_path, monkeypatch):
    """Issue 12: a config asking for GPUs on a CPU-only cluster hung silently."""
    from ckptmgr.errors import ConfigError
    from ckptmgr.ray import placement

    monkeypatch.setattr(placement, "RESOURCE_WAIT_S", 1.0)  # what an autoscaler gets to add nodes
    cfg = _cfg(str(tmp_path / "run"), "ray.use_gpu=true")
    with pytest.raises(ConfigError, match=r"workers need 2 GPU \(the cluster has 0\); add nodes") as error:
        run_on_ray(cfg, resume=False, worker_resources=PLACEMENT)
    assert "\n" not in str(error.value)
    _kill_coordinator(str(tmp_path / "run"))

"""The memory tier and Ray's preemption notices, on a real multi-node Ray cluster.

A head and three worker nodes on one machine (``ray.cluster_utils.Cluster``):
two training ranks pinned by custom resources, one spare node. Keepers hold
snapshots in their nodes' object stores; a node is drained with Ray's own
``ray drain-node`` (reason PREEMPTION, with a deadline) as an autoscaler or
KubeRay would. Marked slow, run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray_cluster import local_cluster  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.coordinator import CoordinatorOptions, find, get_or_create  # noqa: E402
from ckptmgr.io.manifest import LoopState  # noqa: E402
from ckptmgr.io.snapshot import ModelSnapshot, VarGroup  # noqa: E402
from ckptmgr.ray.drain import draining_nodes  # noqa: E402
from ckptmgr.ray.keepers import MemoryTier  # noqa: E402
from ckptmgr.ray.memory_restore import fetch_and_check, named_copy, nearest_copy  # noqa: E402
from ckptmgr.replicas import snapshot_digest  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PLACEMENT = [{"rank0": 1}, {"rank1": 1}]


@pytest.fixture(scope="module")
def cluster():
    # "trainer": where Ray Train may place its ranks (never the head).
    with local_cluster({name: {name: 1, "trainer": 1} for name in ("rank0", "rank1", "spare")}) as made:
        yield made


def _snapshot(fill: float, n: int = 50_000) -> ModelSnapshot:
    arrays = [("0", np.full((n,), fill, dtype="float32")), ("1", np.arange(8, dtype="float32") * fill)]
    return ModelSnapshot("{}", '{"keras_version": "test"}', [VarGroup("layers/dense/vars", {}, arrays)])


def _keep(coord, step: int, snap: ModelSnapshot, node: str | None = None, **extra) -> dict:
    """Submit ``snap`` as the memory step ``step`` of a one-rank run; its outcome."""
    loop = {"epoch": 0, "batch": step, "next_epoch": 0, "next_batch": step}
    coord.submit_part.remote(step, 0, snapshot_digest(snap), [ray.put(snap)], 0.01, {"loss": 1.0},
                             {"tier": "memory", "node": node, **extra}, loop)
    return ray.get(coord.wait_step.remote(step, 60, "memory"))


def _node_id(node) -> str:
    return node.node_id


def _kill_run(directory: str) -> None:
    coord = find(directory)
    if coord is not None:
        ray.kill(coord)
    MemoryTier(directory).stop()


def test_draining_nodes_is_readable_on_this_ray(cluster):
    """ckptmgr reads Ray's draining table through a private accessor: fail
    loudly, naming the Ray version, when Ray changes it."""
    try:
        table = draining_nodes()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"ray._private.state.state.get_draining_nodes() broke on Ray {ray.__version__}: {exc!r}")
    assert isinstance(table, dict), f"Ray {ray.__version__}: draining table is {type(table)}"


def test_the_coordinator_sits_on_its_creators_node(cluster, tmp_path):
    """The driver's node (the head), not a spot worker whose loss would take
    the coordinator with it: a soft affinity put most on other nodes."""
    here = ray.get_runtime_context().get_node_id()
    for i in range(4):
        coord = get_or_create(CoordinatorOptions(str(tmp_path / f"run{i}"), world_size=1))
        assert ray.get(coord.node_id.remote()) == here, f"coordinator {i} placed elsewhere"
        _kill_run(str(tmp_path / f"run{i}"))


def test_copies_live_on_two_nodes_other_than_the_producer(cluster, tmp_path):
    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=2))
    producer = _node_id(nodes["rank0"])
    outcome = _keep(coord, 10, _snapshot(1.0), node=producer)
    assert outcome["memory"] is True and len(set(outcome["nodes"])) == 2
    assert producer not in outcome["nodes"]
    copies = ray.get(coord.memory_copies.remote())
    assert {c["node"] for c in copies} == set(outcome["nodes"]) and {c["step"] for c in copies} == {10}
    assert CheckpointManager(directory).steps() == []  # memory only: nothing in storage
    # Each keeper keeps the newest two.
    for step in (20, 30):
        _keep(coord, step, _snapshot(step), node=producer)
    assert sorted({c["step"] for c in ray.get(coord.memory_copies.remote())}) == [20, 30]
    _kill_run(directory)


def test_a_keeper_makes_room_before_it_puts_its_copy(cluster, monkeypatch):
    """While a keeper puts its copy of a new step its node also holds the
    pulled one: it held retain + 2 copies at that moment (the object store
    spilled to disk); now the oldest is dropped first (retain + 1)."""
    from ckptmgr.ray.keepers import Keeper

    keeper = Keeper("memory://room", retain=2)
    held_at_put: list[list[int]] = []
    real_put = ray.put

    def recording_put(value, *args, **kwargs):
        held_at_put.append(sorted(keeper._held))
        return real_put(value, *args, **kwargs)

    monkeypatch.setattr(ray, "put", recording_put)
    for step in (1, 2, 3, 4):
        snap = _snapshot(float(step))
        keeper.keep(step, [real_put(snap)], {"digest": snapshot_digest(snap)})
    assert held_at_put == [[], [1], [2], [3]]
    assert [m["step"] for m in keeper.held()] == [3, 4]


def test_lost_coordinator_node_and_replica_other_copy_serves(cluster, tmp_path):
    c, nodes = cluster
    directory = str(tmp_path / "run")
    options = CoordinatorOptions(directory, world_size=1, memory_replicas=2)
    spare = _node_id(nodes["spare"])
    coord = get_or_create(options, node_id=spare)
    assert ray.get(coord.node_id.remote()) == spare
    snap = _snapshot(3.0)
    outcome = _keep(coord, 40, snap, node=_node_id(nodes["rank1"]))
    assert spare in outcome["nodes"], outcome  # one replica beside the coordinator
    c.remove_node(nodes["spare"])
    nodes["spare"] = c.add_node(num_cpus=1, resources={"spare": 1, "trainer": 1})
    c.wait_for_nodes()
    fresh = get_or_create(options)  # what a resuming driver does
    plan = ray.get(fresh.restore_plan.remote())
    assert plan["tier"] == "memory" and plan["step"] == 40 and named_copy(plan)["node"] != spare
    got, problem = fetch_and_check(plan, 30)
    assert problem is None
    for (_, a), (_, b) in zip(got.groups[0].arrays, snap.groups[0].arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    _kill_run(directory)


def test_an_emergency_step_evicted_from_memory_before_its_write_is_still_persisted(cluster, tmp_path):
    """The coordinator persists an emergency step from a keeper's copy once
    the writer is free. Under Ray Train training goes on after the emergency
    snapshot, and newer memory steps made the keepers drop that copy first
    (they keep the newest 2): the write found nothing and the step was lost."""
    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=1, memory_retain=2))
    busy = _snapshot(1.0, n=150_000_000)  # 600 MB: the writer is on it while the steps below are kept
    coord.submit_part.remote(10, 0, snapshot_digest(busy), [ray.put(busy)], 0.01)
    producer = _node_id(nodes["rank0"])
    assert _keep(coord, 20, _snapshot(2.0), node=producer, emergency=True)["nodes"]
    for step in (24, 28):
        _keep(coord, step, _snapshot(step / 10), node=producer)
    assert sorted(copy["step"] for copy in ray.get(coord.memory_copies.remote())) == [24, 28]
    assert ray.get(coord.flush_writes.remote(120))
    manager = CheckpointManager(directory)
    assert 20 in manager.steps(), manager.steps()
    assert manager.manifest(20).world.get("from") == "memory"
    _kill_run(directory)


def test_a_step_persisted_from_memory_and_saved_again_by_the_ranks_is_written_once(cluster, tmp_path):
    """An emergency step reached memory after the ranks had given up waiting
    (abandoned), so the coordinator persisted it from memory and the
    train-end save sent the same step again: the second write of the step
    failed (steps are never overwritten) and fit() raised. The same state is
    now answered with the committed manifest; another state still fails."""
    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=1))
    state = _snapshot(3.0)
    _keep(coord, 30, state, node=_node_id(nodes["rank0"]), emergency=True)
    assert ray.get(coord.flush_writes.remote(60))
    assert CheckpointManager(directory).steps() == [30]
    coord.submit_part.remote(30, 0, snapshot_digest(state), [ray.put(state)], 0.01)
    outcome = ray.get(coord.wait_step.remote(30, 60))
    assert outcome["manifest"]["step"] == 30 and outcome["manifest"]["world"]["from"] == "memory"
    assert ray.get(coord.metric_counts.remote()).get("saves_failed", 0) == 0
    ray.get(coord.forget_after.remote(29))  # a later attempt saves step 30 again, from another state
    other = _snapshot(4.0)
    coord.submit_part.remote(30, 0, snapshot_digest(other), [ray.put(other)], 0.01)
    with pytest.raises(Exception, match="already exists"):
        ray.get(coord.wait_step.remote(30, 60))
    _kill_run(directory)


def test_damaged_copy_is_skipped_then_storage_when_keepers_are_gone(cluster, tmp_path):
    c, nodes = cluster
    directory = str(tmp_path / "run")
    options = CoordinatorOptions(directory, world_size=1, memory_replicas=2)
    coord = get_or_create(options)
    stored = _snapshot(5.0)
    coord.submit_part.remote(50, 0, snapshot_digest(stored), [ray.put(stored)], 0.01)
    ray.get(coord.wait_step.remote(50, 60))  # a persistent checkpoint of step 50
    _keep(coord, 60, _snapshot(6.0), node=_node_id(nodes["rank0"]))
    assert ray.get(coord.damage_memory.remote(60)) == 2  # a bit flip in both copies
    for _ in range(2):  # each damaged copy is found, voted down, never offered again
        plan = ray.get(coord.restore_plan.remote())
        assert plan["tier"] == "memory" and plan["step"] == 60
        _, problem = fetch_and_check(plan, 30)
        assert problem is not None and "damaged" in problem
        assert ray.get(coord.memory_vote.remote(60, named_copy(plan)["keeper"], 0, problem, 30)) is not None
    assert ray.get(coord.restore_plan.remote()) == {"tier": "storage", "step": 50}
    # A newer, good copy is preferred again; killing every keeper falls back to storage.
    _keep(coord, 70, _snapshot(7.0), node=_node_id(nodes["rank0"]))
    assert ray.get(coord.restore_plan.remote())["tier"] == "memory"
    assert MemoryTier(directory).stop() == 2
    assert ray.get(coord.restore_plan.remote()) == {"tier": "storage", "step": 50}
    _kill_run(directory)


def _read_nearest_on(node_id: str, plan: dict) -> tuple[dict, str | None]:
    """What a rank on ``node_id`` reads of ``plan``: (the copy, its problem)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def read(plan):
        copy = nearest_copy(plan)
        return copy, fetch_and_check(plan, 30, copy)[1]

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.get(read.options(scheduling_strategy=strategy).remote(plan), timeout=60)


def test_a_rank_reads_the_copy_on_its_own_node_and_a_damaged_one_is_passed_over(cluster, tmp_path):
    """A rank on a node holding a copy reads that one (from its own object
    store, no transfer); a rank elsewhere reads the named copy. A damaged
    local copy is voted out alone: the same step is then read from the other."""
    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=2))
    producer = _node_id(nodes["spare"])
    holders = _keep(coord, 80, _snapshot(8.0), node=producer)["nodes"]
    plan = ray.get(coord.restore_plan.remote())
    assert plan["step"] == 80 and sorted(c["node"] for c in plan["copies"]) == sorted(holders)
    for node in holders:
        copy, problem = _read_nearest_on(node, plan)
        assert copy["node"] == node and problem is None
    copy, problem = _read_nearest_on(producer, plan)  # holds no copy
    named = named_copy(plan)
    assert copy == named and problem is None

    other = next(c for c in plan["copies"] if c != named)
    ray.get(MemoryTier(directory).keepers()[other["keeper"]].damage.remote(80))
    copy, problem = _read_nearest_on(other["node"], plan)
    assert copy == other and "damaged" in problem
    assert ray.get(coord.memory_vote.remote(80, named["keeper"], 0, problem, 30, other["keeper"])) is not None
    again = ray.get(coord.restore_plan.remote())
    assert again["step"] == 80 and again["copies"] == [named]
    copy, problem = _read_nearest_on(other["node"], again)
    assert copy == named and problem is None
    assert ray.get(coord.memory_vote.remote(80, named["keeper"], 0, None, 30, named["keeper"])) is None
    _kill_run(directory)


def _drain(cluster_address: str, node_id: str, deadline_s: int) -> None:
    """``ray drain-node`` as an autoscaler or operator would send it."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "drain-node", "--address", cluster_address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True)


def _small_data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def test_a_rank_on_another_node_streams_the_copy_and_reads_it_through_ray_when_refused(cluster, tmp_path):
    """A rank on a node without a copy gets it over a direct stream from the
    keeper (ckptmgr.ray.stream); when the stream is refused, through Ray's
    own transfer, with one warning. Either way bit for bit."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=1))
    reader = _node_id(nodes["spare"])
    sent = _snapshot(9.0, n=400_000)
    _keep(coord, 90, sent, node=reader)
    plan = ray.get(coord.restore_plan.remote())
    assert [c["node"] for c in plan["copies"]] != [reader]

    @ray.remote(num_cpus=0)
    def read(plan):
        import logging

        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("ckptmgr").addHandler(handler)
        snapshot, problem = fetch_and_check(plan, 30, nearest_copy(plan))
        return snapshot.groups[0].arrays[0][1], problem, records

    strategy = NodeAffinitySchedulingStrategy(reader, soft=False)
    for refused in (False, True):
        if refused:
            ray.get(MemoryTier(directory).keepers()[named_copy(plan)["keeper"]].break_streams.remote())
        array, problem, records = ray.get(read.options(scheduling_strategy=strategy).remote(plan), timeout=60)
        assert problem is None
        np.testing.assert_array_equal(array, sent.groups[0].arrays[0][1])
        fell_back = [r for r in records if "through Ray's object store instead" in r]
        assert len(fell_back) == int(refused), records
    _kill_run(directory)


def _small_model():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


EPOCH_1_DONE = LoopState(epoch=0, batch=8, next_epoch=1, next_batch=0)  # of _trained_8_steps


def _trained_8_steps(directory: str):
    """(a rank-0 client of a 1-rank run with a memory tier, a small model
    trained 8 steps (one epoch) and prepared, its data)."""
    from ckptmgr.distributed import CoordinatorClient

    options = CoordinatorOptions(directory, world_size=1, memory_replicas=2)
    get_or_create(options)
    data = _small_data()
    trained = _small_model()
    trained.fit(*data, batch_size=8, epochs=1, verbose=0)
    client = CoordinatorClient(options, rank=0)
    client.prepare(trained)
    return client, trained, data


def test_a_run_lost_before_its_first_persistent_save_resumes_from_memory(cluster, tmp_path):
    """Only the memory tier holds the run (its node was lost before any save
    reached storage): the callback continues from memory, not from scratch."""
    from ckptmgr.keras import CheckpointCallback

    directory = str(tmp_path / "run")
    client, trained, (x, y) = _trained_8_steps(directory)
    assert client.save(8, trained, loop=EPOCH_1_DONE, tier="memory").result()["memory"]
    assert CheckpointManager(directory).latest_step() is None  # storage holds nothing

    fresh = _small_model()
    callback = CheckpointCallback(directory, rank=0, world_size=1, save_freq=100, memory_every=4)
    fresh.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert (callback.restored_step, callback.restored_tier) == (8, "memory")
    assert int(fresh.optimizer.iterations.numpy()) == 16  # epoch 2 only: 8 restored + 8 trained
    _kill_run(directory)


@pytest.mark.parametrize(("save_freq", "persisted"), [("epoch", [8, 16, 24]), (5, [15, 20, 24])])
def test_a_step_kept_in_memory_is_still_persisted_when_storage_is_due(cluster, tmp_path, save_freq, persisted):
    """A step can be due in both tiers: a memory snapshot every 4 steps, and a
    persistent save at each epoch's end (save_freq="epoch") or at the end of
    training (step 24). The coordinator knew a step's outcome by its number
    alone, so it answered the persistent save with the memory snapshot's
    outcome and never wrote it: storage had none of these steps."""
    from ckptmgr.keras import CheckpointCallback

    directory = str(tmp_path / "run")
    get_or_create(CoordinatorOptions(directory, world_size=1, retention={"keep_last": 3}, on_busy="wait",
                                     memory_replicas=2))
    x, y = _small_data()
    model = _small_model()
    callback = CheckpointCallback(directory, rank=0, world_size=1, save_freq=save_freq, keep_last=3,
                                  on_busy="wait", memory_every=4)  # every save written, none replaced
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[callback])
    assert CheckpointManager(directory).steps() == persisted
    newest = ray.get(find(directory).memory_copies.remote())
    assert max(copy["step"] for copy in newest) == 24  # and the memory tier has it too
    _kill_run(directory)


def test_a_finished_run_restored_from_memory_persists_its_last_step(cluster, tmp_path):
    """The last step reached memory, not storage, before the attempt was lost;
    the restart restores it and has nothing left to train. A restored step
    counted as saved, so the train-end save was skipped: the run finished,
    its keepers were stopped, and storage never had its final state."""
    from ckptmgr.keras import CheckpointCallback

    directory = str(tmp_path / "run")
    client, trained, (x, y) = _trained_8_steps(directory)
    assert client.save(8, trained, loop=EPOCH_1_DONE, tier="memory").result()["memory"]
    fresh = _small_model()
    callback = CheckpointCallback(directory, rank=0, world_size=1, save_freq=100, memory_every=4)
    fresh.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])  # epoch 1 of 1: done
    assert (callback.restored_step, callback.restored_tier) == (8, "memory")
    manager = CheckpointManager(directory)
    assert manager.steps() == [8]
    assert (manager.manifest().loop.next_epoch, manager.manifest().loop.next_batch) == (1, 0)
    _kill_run(directory)


def test_train_begin_asks_the_coordinator_where_to_continue_once(cluster, tmp_path, monkeypatch):
    """Each rank asked three times at train begin (where to continue, then
    restore's memory plan, then its storage step): each a listing and a
    manifest read on the coordinator, times every rank."""
    from ckptmgr.distributed import CoordinatorClient
    from ckptmgr.keras import CheckpointCallback

    directory = str(tmp_path / "run")
    saver, trained, (x, y) = _trained_8_steps(directory)
    saver.save(8, trained, loop=EPOCH_1_DONE).result()
    saver.wait_until_finished()
    assert CheckpointManager(directory).steps() == [8]

    asked: list[str] = []
    real_call = CoordinatorClient._call

    def counting(self, method, *args, **kwargs):
        asked.append(method)
        return real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(CoordinatorClient, "_call", counting)
    fresh = _small_model()
    callback = CheckpointCallback(directory, rank=0, world_size=1, save_freq=100)
    fresh.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert (callback.restored_step, callback.restored_tier) == (8, "storage")
    where = [m for m in asked if m in ("restore_plan", "restore_step")]
    assert where == ["restore_plan"], asked
    _kill_run(directory)


def test_asking_where_to_continue_does_not_pin_a_later_restore_to_that_answer(cluster, tmp_path):
    """restorable_step() kept its plan for restore() for 10 s: a step saved in
    between was ignored and the older one restored, silently. Now a plan is
    used only where it is passed."""
    directory = str(tmp_path / "run")
    client, trained, _ = _trained_8_steps(directory)
    client.save(8, trained, loop=EPOCH_1_DONE).result()
    assert client.restore_plan()["step"] == 8
    client.save(9, trained, loop=EPOCH_1_DONE).result()
    client.wait_until_finished()
    assert client.restore(_small_model()).step == 9
    _kill_run(directory)


def build_user_model():
    """The user's own compiled model (``fit_on_ray``'s ``build_model``)."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def make_user_data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(3).normal(size=(512, 8)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _fit_on_ray(directory: str, gate: Path | None = None):
    """10 epochs of 16 steps on ranks pinned to the rank0/rank1 nodes: a persistent
    checkpoint every 64 steps, a memory snapshot every 4, one automatic restart."""
    from ckptmgr.ray import fit_on_ray

    callbacks = [_HoldUntil(str(gate), batches=70, pace_s=0.05)] if gate is not None else []
    return fit_on_ray(
        build_user_model, make_user_data, checkpoint=directory, num_workers=2, seed=7,
        checkpoint_options=dict(save_freq=64, keep_last=3, on_busy="newest", memory_every=4, memory_replicas=2),
        fit_kwargs=dict(batch_size=32, epochs=10, shuffle=False, callbacks=callbacks),
        resources_per_worker=PLACEMENT, max_restarts=1, return_weights=True, keep_coordinator=True,
    )


def test_drained_node_emergency_to_memory_then_automatic_restart_is_exact(cluster, tmp_path):
    c, nodes = cluster
    reference = _fit_on_ray(str(tmp_path / "ref"))
    _kill_run(str(tmp_path / "ref"))

    directory = str(tmp_path / "run")
    gate = tmp_path / "drained"  # the ranks hold at batch 70 until the notice is out
    outcome: dict = {}

    def job():
        try:
            outcome["result"] = _fit_on_ray(directory, gate)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    manager = CheckpointManager(directory)
    deadline = time.monotonic() + 180
    while (manager.latest_step() or 0) < 64 and time.monotonic() < deadline:
        time.sleep(0.05)  # training is under way: one persistent checkpoint
    persisted_before = manager.latest_step()
    assert persisted_before is not None, outcome
    drained = nodes["rank1"]
    _drain(c.address, _node_id(drained), deadline_s=30)
    coord = find(directory)
    while ray.get(coord.notice.remote())["drain"] is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the coordinator saw Ray's drain: let the ranks go on
    gate.write_text("drained")
    emergency = None
    while emergency is None and time.monotonic() < deadline:
        copies = ray.get(coord.memory_copies.remote())
        emergency = next((x for x in copies if x.get("emergency")), None)
        time.sleep(0.05)
    assert emergency is not None, f"no emergency snapshot reached memory: {outcome}"
    assert emergency["node"] != _node_id(drained)
    # The node goes; a replacement arrives; the run restarts by itself.
    c.remove_node(drained)
    nodes["rank1"] = c.add_node(num_cpus=1, resources={"rank1": 1, "trainer": 1})
    c.wait_for_nodes()
    thread.join(300)
    assert "result" in outcome, outcome
    result = outcome["result"]
    assert result.restarts == 1 and not result.preempted
    assert result.restored_tier == "memory" and result.restored_step == emergency["step"]
    assert result.restored_step > persisted_before
    # The newest persisted step: the last periodic one, or the emergency step if later
    # (the coordinator persists it from memory, in the background).
    assert result.final_step in (reference.final_step, max(reference.final_step, emergency["step"]))
    assert result.weights_sha256 == reference.weights_sha256
    for got, want in zip(result.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    _kill_run(directory)


def test_the_prestop_hook_drains_its_node_with_a_deadline(cluster):
    """deploy/forward-sigterm.sh first asks Ray to drain the node (what the
    coordinator watches), then forwards SIGTERM."""
    c, nodes = cluster
    node = _node_id(nodes["spare"])

    @ray.remote(num_cpus=0, resources={"spare": 1})
    class Busy:  # an idle node drained is let go at once; a working one gets its deadline
        def ready(self) -> bool:
            return True

    busy = Busy.remote()
    assert ray.get(busy.ready.remote())
    env = dict(os.environ, CKPTMGR_NODE_ID=node, RAY_ADDRESS=c.address,
               CKPTMGR_WORKER_PATTERN=f"ray::NoSuchActor{time.time_ns()}",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    before_ms = time.time() * 1000
    proc = subprocess.run(["sh", str(REPO / "deploy" / "forward-sigterm.sh"), "30"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"asked Ray to drain node {node}" in proc.stdout, proc.stdout
    deadline_ms = draining_nodes().get(node)
    assert deadline_ms is not None and before_ms + 25_000 < deadline_ms < before_ms + 40_000
    ray.kill(busy)
    c.remove_node(nodes["spare"])
    nodes["spare"] = c.add_node(num_cpus=1, resources={"spare": 1, "trainer": 1})
    c.wait_for_nodes()


class _HoldUntil(keras.callbacks.Callback):
    """Pauses every rank after `batches` batches until the driver creates `gate`,
    then paces each later batch to at least `pace_s`.

    Without the hold a 2-core CI machine may finish all its steps before the
    drain it is meant to survive is issued. The emergency step is set about a
    second of training ahead (``EMERGENCY_LEAD_S``): at this toy model's few
    milliseconds a step that is ~100 steps, past the end of a short run; real
    steps are slower, and so is a paced one. Neither changes any number, and a
    restarted attempt passes straight through (the gate exists by then).
    """

    def __init__(self, gate: str, batches: int, pace_s: float = 0.0):
        super().__init__()
        self.gate, self.batches, self.pace_s, self.seen = Path(gate), batches, pace_s, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        deadline = time.monotonic() + 180
        while self.seen == self.batches and not self.gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.seen > self.batches:
            time.sleep(self.pace_s)


def user_train_loop(config: dict) -> None:
    """A Ray Train loop with the user's own model (not the example job)."""
    import hashlib

    import keras
    import ray.train
    import tensorflow as tf

    from ckptmgr.keras import CheckpointCallback
    from ckptmgr.keras_compat import apply_multiworker_fit_patch

    keras.utils.set_random_seed(7)
    apply_multiworker_fit_patch()
    with tf.distribute.MultiWorkerMirroredStrategy().scope():
        model = build_user_model()
    x, y = make_user_data()
    callback = CheckpointCallback(config["directory"], save_freq=64, memory_every=4, memory_replicas=2)
    callbacks = [callback]
    if config.get("gate"):
        callbacks.append(_HoldUntil(config["gate"], batches=70))
    model.fit(x, y, batch_size=32, epochs=config["epochs"], shuffle=False, verbose=0, callbacks=callbacks)
    digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
    if ray.train.get_context().get_world_rank() == 0:  # what the driver checks (same machine)
        Path(config["report"]).write_text(json.dumps({
            "weights_sha256": digest, "restored_step": callback.restored_step,
            "restored_tier": callback.restored_tier}))


def _ray_train(directory: str, storage: Path, epochs: int, gate: str | None = None):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    return TensorflowTrainer(
        user_train_loop,
        train_loop_config={"directory": directory, "epochs": epochs, "report": str(storage / "report.json"),
                           "gate": gate},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1, "trainer": 1}),
        run_config=RunConfig(name="ckptmgr-preempt", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=2)),
    )


def test_ray_train_preemption_info_snapshots_to_memory_and_the_restart_is_exact(cluster, tmp_path):
    c, nodes = cluster
    epochs = 12  # 16 steps an epoch
    reference = _ray_train(str(tmp_path / "ref"), tmp_path / "ray_ref", epochs).fit()
    assert reference.error is None
    want = json.loads((tmp_path / "ray_ref" / "report.json").read_text())
    _kill_run(str(tmp_path / "ref"))

    directory = str(tmp_path / "run")
    outcome: dict = {}
    gate = tmp_path / "drained"  # the ranks hold at batch 70 until the drain is issued
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "result", _ray_train(directory, tmp_path / "ray_run", epochs, str(gate)).fit()))
    thread.start()
    manager = CheckpointManager(directory)
    deadline = time.monotonic() + 240
    while (manager.latest_step() or 0) < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    persisted_before = manager.latest_step()
    assert persisted_before is not None, outcome
    coord = find(directory)
    rank_nodes = ray.get(coord.rank_nodes.remote())
    victim = rank_nodes[1]
    by_id = {_node_id(n): name for name, n in nodes.items()}
    assert victim in by_id, rank_nodes  # a worker node, not the head
    _drain(c.address, victim, deadline_s=60)
    gate.write_text("drained")
    emergency = None
    while emergency is None and time.monotonic() < deadline:
        emergency = next((x for x in ray.get(coord.memory_copies.remote()) if x.get("emergency")), None)
        time.sleep(0.05)
    assert emergency is not None, f"no emergency snapshot reached memory: {outcome}"
    assert emergency["node"] != victim
    name = by_id[victim]
    c.remove_node(nodes[name])  # the node goes; Ray Train restarts the workers elsewhere
    nodes[name] = c.add_node(num_cpus=1, resources={name: 1, "trainer": 1})
    thread.join(400)
    result = outcome.get("result")
    assert result is not None and result.error is None, outcome
    got = json.loads((tmp_path / "ray_run" / "report.json").read_text())
    assert got["restored_tier"] == "memory"
    assert got["restored_step"] >= emergency["step"] > persisted_before
    assert got["weights_sha256"] == want["weights_sha256"]
    _kill_run(directory)


def test_cli_lists_and_stops_a_runs_coordinator_and_keepers(cluster, tmp_path, capsys):
    from ckptmgr import cli

    c, nodes = cluster
    directory = str(tmp_path / "run")
    coord = get_or_create(CoordinatorOptions(directory, world_size=1, memory_replicas=2))
    _keep(coord, 5, _snapshot(1.0), node=_node_id(nodes["rank0"]))
    capsys.readouterr()
    assert cli.main(["coordinators", "list", "--json"]) == 0
    runs = {r["directory"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert runs[directory]["keepers"] == 2
    assert runs[directory]["coordinator"]["state"] == "alive"
    assert runs[directory]["coordinator"]["world_size"] == 1
    assert cli.main(["coordinators", "stop", directory]) == 0
    assert "stopped the coordinator and 2 keeper(s)" in capsys.readouterr().out
    assert find(directory) is None and MemoryTier(directory).keepers() == {}
    assert cli.main(["coordinators", "stop", directory]) == 1  # nothing left: one line, exit 1
    assert "No coordinator or keepers for" in capsys.readouterr().err
    assert cli.main(["coordinators", "stop"]) == 2  # neither a URL nor --all

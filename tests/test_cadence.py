"""``save_freq="auto"`` (issue 10, item 4): the Young/Daly interval from measured costs.

The pure rule against hand-computed values; the writer floor; seconds to steps;
re-estimation as measurements arrive; then a real tiny ``fit()`` whose save
costs are injected (a manager wrapper rewrites each save's stats) and whose
step time comes from a fake clock, so the chosen intervals are known exactly.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest

from ckptmgr.cadence import (
    DEFAULT_MTBF,
    AutoSaveFreq,
    CadenceEstimator,
    SaveCost,
    StepTimer,
    choose_interval,
    committed_manifest,
    daly_interval,
    job_mtbf_s,
    parse_mtbf,
    waste,
    young_interval,
)
from ckptmgr.config import JobConfig, apply_overrides, load_config
from ckptmgr.errors import ConfigError
from ckptmgr.io.manifest import LoopState, Manifest, SaveCadence, SaveStats

# -- the rule -----------------------------------------------------------------------


def test_young_and_daly_match_hand_computed_values():
    # C = 2 s, M = 1 h: Young sqrt(2*2*3600) = 120 s. Daly: 120 * (1 + (1/60)/3
    # + (1/3600)/9) - 2 = 120 + 2/3 + 120/32400 - 2 = 118.6703704 s.
    assert young_interval(2.0, 3600.0) == 120.0
    assert daly_interval(2.0, 3600.0) == pytest.approx(118.6703704, abs=1e-7)
    # C = 0.5 s, M = 6 h: sqrt(21600) = 146.9693846; + C/3 - C + (C/9) sqrt(C/2M).
    assert daly_interval(0.5, 21600.0) == pytest.approx(146.9693846 - 1 / 3 + 0.5 / 9 * math.sqrt(0.5 / 43200))
    # C >= 2M: checkpointing costs more than it saves; Daly says T = M.
    assert daly_interval(100.0, 50.0) == 50.0
    assert daly_interval(99.0, 50.0) != 50.0


def test_seconds_become_steps_with_the_measured_step_time():
    interval = choose_interval(cost_s=2.0, write_s=1.0, step_s=0.5, mtbf_s=3600.0)
    assert interval.steps == 237  # 118.67 s / 0.5 s
    assert interval.rule == "young-daly" and "Young/Daly" in interval.reason and "1h" in interval.reason
    assert choose_interval(cost_s=2.0, write_s=1.0, step_s=2.0, mtbf_s=3600.0).steps == 59  # 59.3


def test_never_faster_than_the_writer_sustains():
    # Young/Daly alone: sqrt(2 * 0.01 * 3600) = 8.48 s = 85 steps of 0.1 s;
    # the writer needs 10 s a save, so 1.5 x 10 s = 150 steps.
    interval = choose_interval(cost_s=0.01, write_s=10.0, step_s=0.1, mtbf_s=3600.0)
    assert interval.steps == 150 and interval.rule == "writer"
    assert "1.5 x write 10 s" in interval.reason
    assert choose_interval(cost_s=0.01, write_s=5.0, step_s=0.1, mtbf_s=3600.0).steps == 85


def test_at_least_one_step():
    assert choose_interval(cost_s=0.0, write_s=0.0, step_s=1.0, mtbf_s=3600.0).steps == 1
    assert choose_interval(cost_s=1e-6, write_s=1e-6, step_s=60.0, mtbf_s=60.0).steps == 1


def test_cost_to_training_counts_the_measured_slowdown_of_overlapping_steps():
    # Steps overlapping the 4 s write were 25 % slower: 4 * 0.25 / 1.25 = 0.8 s lost.
    cost = SaveCost(blocked_s=0.1, write_s=4.0, step_s=0.5, slowdown=0.25)
    assert cost.cost_s() == pytest.approx(0.9)
    assert cost.cost_s(async_save=False) == pytest.approx(4.1)  # a blocking save pays it all
    assert SaveCost(0.1, 4.0, 0.5).cost_s() == pytest.approx(0.1)


def test_waste_is_lost_work_plus_overhead():
    w = waste(100.0, cost_s=1.0, mtbf_s=3600.0, restart_s=20.0)
    assert w.lost_per_failure_s == 70.0 and w.overhead == 0.01
    assert w.expected == pytest.approx(0.01 + 70.0 / 3600.0)
    # The Young/Daly interval wastes less than shorter or longer ones.
    best = daly_interval(1.0, 3600.0)
    at = lambda t: waste(t, cost_s=1.0, mtbf_s=3600.0).expected  # noqa: E731
    assert at(best) < at(best / 3) and at(best) < at(best * 3)


# -- re-estimation ---------------------------------------------------------------------


def test_estimator_re_estimates_from_the_median_of_recent_saves():
    est = CadenceEstimator(3600.0, window=5, first_steps=10)
    first = est.interval()
    assert (first.steps, first.rule) == (10, "first") and not est.measured
    est.add(SaveCost(2.0, 0.0, 0.5))
    assert est.interval().steps == 237
    est.add(SaveCost(8.0, 0.0, 0.5))
    est.add(SaveCost(8.0, 0.0, 0.5))
    # median cost 8 s: sqrt(57600) - 16/3 + 8/9 sqrt(8/7200) = 234.696 s = 469 steps
    assert est.interval().steps == 469
    est.add(SaveCost(50.0, 0.0, 0.5))  # one outlier moves nothing
    assert est.interval().steps == 469
    for _ in range(5):  # the window forgets old saves
        est.add(SaveCost(2.0, 0.0, 1.0))
    assert est.interval().steps == 119  # 118.67 s / 1 s


def test_step_timer_splits_steps_by_whether_a_write_ran():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    timer.restart()
    for busy, dt in [(False, 1.0)] * 3 + [(True, 1.5)] * 3:
        now[0] += dt
        timer.tick(busy)
    assert timer.slowdown() == pytest.approx(0.5) and timer.step_s() == pytest.approx(1.25)
    now[0] += 30.0  # a save
    timer.restart()
    now[0] += 4.0
    timer.tick(False, steps=4)  # steps_per_execution: 4 steps per batch end
    assert max(timer.all) == 1.5 and timer.all[-1] == 1.0


def _manifest(blocked_s: float, write_s: float, step_s: float, interval: int = 10) -> Manifest:
    """Only what the schedule reads (stats, loop.cadence); the rest is not validated."""
    return Manifest.model_construct(
        stats=SaveStats(blocked_s=blocked_s, write_s=write_s),
        loop=LoopState(cadence=SaveCadence(interval_steps=interval, step_s=step_s)),
    )


def test_every_rank_chooses_the_same_steps_from_the_same_manifests():
    """Ranks time their own steps differently; the schedule uses the manifests'
    figures (the saving rank's), so every rank saves at the same steps."""
    fast, slow = [0.0], [0.0]
    ranks = [AutoSaveFreq(3600.0, clock=lambda: fast[0]), AutoSaveFreq(3600.0, clock=lambda: slow[0])]
    for auto in ranks:
        auto.start(0)
    committed = [_manifest(0.02, 3.0, 0.5), _manifest(0.08, 3.0, 0.5), _manifest(0.3, 9.0, 0.6)]
    schedules = [[], []]
    for manifest in committed:
        for i, auto in enumerate(ranks):
            for _ in range(7):
                fast[0] += 0.4 if i == 0 else 0
                slow[0] += 0.9 if i == 1 else 0
                auto.timer.tick(busy=False)
            auto.learn(manifest)
            auto.schedule(auto.next_step)
            schedules[i].append(auto.next_step)
    assert schedules[0] == schedules[1]
    assert ranks[0].record().step_s != ranks[1].record().step_s  # their own timings differ


def test_a_restored_manifest_seeds_the_estimate():
    auto = AutoSaveFreq(3600.0)
    auto.start(500, _manifest(2.0, 1.0, 0.5))
    assert auto.next_step == 500 + 237 and auto.interval.rule == "young-daly"
    auto.start(500, None)  # an older manifest without measurements: measure first
    assert auto.next_step == 510 and auto.interval.rule == "first"
    no_cadence = Manifest.model_construct(stats=SaveStats(), loop=LoopState())
    assert SaveCost.of(no_cadence) is None


def test_old_loop_states_parse_without_a_cadence():
    loop = LoopState.model_validate({"epoch": 1, "batch": 2, "next_epoch": 1, "next_batch": 3, "training": {}})
    assert loop.cadence is None
    assert committed_manifest({"skipped": True, "step": 3}) is None and committed_manifest(None) is None


# -- mtbf ----------------------------------------------------------------------------------


def test_mtbf_is_a_duration_or_seconds_and_the_job_divides_it_by_its_nodes():
    assert parse_mtbf("6h") == 21600 and parse_mtbf(90) == 90.0 and parse_mtbf(1.5) == 1.5
    assert DEFAULT_MTBF == "24h"
    assert job_mtbf_s(None) == 86400 and job_mtbf_s("24h", 4) == 21600 and job_mtbf_s(600, 0) == 600


@pytest.mark.parametrize("bad", [0, -5, "soon", "6 hours", True, float("nan"), float("inf"), [1], None])
def test_bad_mtbf_is_one_line(bad):
    with pytest.raises(ConfigError) as info:
        parse_mtbf(bad)
    message = str(info.value)
    assert message.startswith(f"Invalid mtbf: Received: mtbf={bad!r}.") and "'24h'" in message
    assert "\n" not in message


# -- config --------------------------------------------------------------------------------


def _load(tmp_path, body: str) -> JobConfig:
    path = tmp_path / "job.yaml"
    path.write_text("checkpoint:\n  directory: x\n" + body)
    return load_config(path)


def test_config_accepts_auto_and_mtbf(tmp_path):
    cfg = _load(tmp_path, "  save_freq: auto\n  mtbf: 6h\n")
    assert cfg.checkpoint.save_freq == "auto" and cfg.checkpoint.mtbf == "6h"
    assert _load(tmp_path, "  save_freq: auto\n").checkpoint.mtbf is None
    assert _load(tmp_path, "  save_freq: auto\n  mtbf: 3600\n").checkpoint.mtbf == 3600
    cfg = apply_overrides(_load(tmp_path, ""), ["checkpoint.save_freq=auto", "checkpoint.mtbf=12h"])
    assert (cfg.checkpoint.save_freq, cfg.checkpoint.mtbf) == ("auto", "12h")


@pytest.mark.parametrize("body, expected", [
    ("  save_freq: auto\n  mtbf: soon\n", "'checkpoint.mtbf': Invalid mtbf: Received: mtbf='soon'."),
    ("  save_freq: auto\n  mtbf: 0\n", "'checkpoint.mtbf': Invalid mtbf: Received: mtbf=0."),
    ("  save_freq: auto\n  mtbf: true\n", "Invalid mtbf: Received: mtbf=True."),
    ("  save_freq: 100\n  mtbf: 6h\n", "Invalid mtbf: Received: mtbf='6h' with save_freq=100."),
    ("  mtbf: 6h\n", "Invalid mtbf: Received: mtbf='6h' with save_freq='epoch'."),
    ("  save_freq: automatic\n", "Received: save_freq='automatic'"),
])
def test_config_refuses_bad_values_in_one_line(tmp_path, body, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, body)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if "save_freq='automatic'" in expected:
        assert "'auto'" in message


# -- the callback in a real fit() ---------------------------------------------------------

keras = pytest.importorskip("keras")

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.keras import CheckpointCallback  # noqa: E402

STEP_S = 0.5  # the fake clock's step time
BATCHES = 50  # per epoch; 2 epochs


class FakeClock(keras.callbacks.Callback):
    """Every batch takes exactly STEP_S seconds on this clock."""

    def __init__(self):
        super().__init__()
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def on_train_batch_begin(self, batch, logs=None):
        self.t += STEP_S


class InjectedCosts:
    """A CheckpointManager whose saves report the given (blocked_s, write_s), in turn."""

    def __init__(self, manager: CheckpointManager, costs: list[tuple[float, float]]):
        self.manager, self.costs, self.saved = manager, list(costs), []

    def __getattr__(self, name):
        return getattr(self.manager, name)

    def save(self, step, model, **kwargs):
        real = self.manager.save(step, model, **kwargs)
        self.saved.append(step)
        blocked, write = self.costs.pop(0) if len(self.costs) > 1 else self.costs[0]
        out: Future = Future()

        def rewrite(done: Future) -> None:
            stats = SaveStats(bytes=1, blocked_s=blocked, write_s=write)
            out.set_result(done.result().model_copy(update={"stats": stats}))

        real.add_done_callback(rewrite)
        return out


class Stop(Exception):
    pass


class StopAt(keras.callbacks.Callback):
    def __init__(self, step: int):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise Stop()


def _model():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _fit(callback: CheckpointCallback, *extra):
    clock = FakeClock()
    callback.auto.timer.clock = clock.now
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES * 8, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    try:
        _model().fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                     callbacks=[callback, clock, *extra])
    except Stop:
        callback.manager.wait_until_finished()


def _daly_steps(cost_s: float, mtbf_s: float, step_s: float = STEP_S) -> int:
    """Daly's interval in steps, written out independently of ckptmgr.cadence."""
    t = math.sqrt(2 * cost_s * mtbf_s) - 2 * cost_s / 3 + cost_s / 9 * math.sqrt(cost_s / (2 * mtbf_s))
    return round(t / step_s)


def test_auto_in_fit_picks_the_young_daly_interval_from_injected_measurements(tmp_path, caplog):
    directory = str(tmp_path / "run")
    costs = [(0.02, 3.0), (0.08, 3.0)]  # (blocked_s, write_s) of save 1, then of every later one
    manager = InjectedCosts(CheckpointManager(directory), costs)
    callback = CheckpointCallback(manager, save_freq="auto", mtbf="1h")
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        _fit(callback)
    # 24 = Daly(C=0.02 s, M=1 h) = 11.99 s of 0.5 s steps; the writer floor is
    # 1.5 x 3 s = 9 steps. Then the median cost of [0.02, 0.08] = 0.05 -> 38,
    # and of [0.02, 0.08, 0.08] = 0.08 -> 48.
    assert [_daly_steps(0.02, 3600), _daly_steps(0.05, 3600), _daly_steps(0.08, 3600)] == [24, 38, 48]
    assert manager.saved == [10, 34, 58, 96, 100]  # first after 10 steps; 100: train end
    kept = {m.step: m.loop.cadence for m in CheckpointManager(directory).manifests()}
    assert [kept[s].interval_steps for s in manager.saved] == [10, 24, 38, 48, 48]
    assert kept[10].reason.startswith("first save after 10 steps")
    assert kept[34].reason.startswith("Young/Daly: cost 0.02 s per save, MTBF 1h")
    assert all(c.step_s == STEP_S and c.slowdown == 0 and c.mtbf_s == 3600 for c in kept.values())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("save_freq='auto'")]
    assert [line.split(" steps")[0].rsplit(" ", 1)[1] for line in lines] == ["10", "24", "38", "48"]
    assert callback.auto.interval.steps == 48


def test_auto_resumes_from_the_restored_manifests_measurements(tmp_path):
    directory = str(tmp_path / "run")
    first = CheckpointCallback(InjectedCosts(CheckpointManager(directory), [(0.02, 3.0)]),
                               save_freq="auto", mtbf="1h")
    _fit(first, StopAt(40))
    assert first.manager.saved == [10, 34]
    restored = CheckpointManager(directory).manifest(34)  # real (tiny) costs on disk
    expected = max(_daly_steps(restored.stats.blocked_s, 3600.0),
                   math.ceil(1.5 * restored.stats.write_s / STEP_S - 1e-9), 1)
    second = CheckpointCallback(InjectedCosts(CheckpointManager(directory), [(0.02, 3.0)]),
                                save_freq="auto", mtbf="1h")
    _fit(second)
    assert second.restored_step == 34
    # No measuring save 10 steps in: the first save is one interval after step 34.
    assert second.manager.saved[0] == 34 + expected
    assert CheckpointManager(directory).manifest(34 + expected).loop.cadence.interval_steps == expected


def test_a_blocking_auto_save_counts_its_whole_write(tmp_path):
    costs = [(0.02, 3.0)]
    callback = CheckpointCallback(InjectedCosts(CheckpointManager(str(tmp_path / "r")), costs),
                                  save_freq="auto", mtbf="1h", async_save=False)
    callback.manager.save = _blocking(callback.manager)
    _fit(callback)
    assert callback.auto.interval.steps == _daly_steps(3.02, 3600.0)  # C = 0.02 + 3.0


def _blocking(wrapper: InjectedCosts):
    """The wrapper for blocking saves: the manifest itself, not a Future."""
    def save(step, model, **kwargs):
        wrapper.saved.append(step)
        manifest = wrapper.manager.save(step, model, **kwargs)
        blocked, write = wrapper.costs[0]
        return manifest.model_copy(update={"stats": SaveStats(bytes=1, blocked_s=blocked, write_s=write)})
    return save


def test_distributed_world_size_divides_the_mtbf(tmp_path):
    manager = CheckpointManager(str(tmp_path / "r"))
    manager.options = SimpleNamespace(world_size=4)  # what the Ray client carries
    assert CheckpointCallback(manager, save_freq="auto", mtbf="24h").auto.mtbf_s == 6 * 3600
    assert CheckpointCallback(manager, save_freq="auto").auto.mtbf_s == 6 * 3600  # default 24h
    assert CheckpointCallback(str(tmp_path / "s"), save_freq="auto").auto.mtbf_s == 86400
    assert CheckpointCallback(str(tmp_path / "s"), save_freq=5).auto is None


@pytest.mark.parametrize("options, expected", [
    (dict(save_freq="weekly"), "Invalid save_freq: Received: save_freq='weekly'. Use 'epoch', 'auto'"),
    (dict(save_freq=0), "Invalid save_freq: Received: save_freq=0."),
    (dict(save_freq=True), "Invalid save_freq: Received: save_freq=True."),
    (dict(save_freq=10, mtbf="6h"), "Invalid mtbf: Received: mtbf='6h' with save_freq=10."),
    (dict(save_freq="auto", mtbf="soon"), "Invalid mtbf: Received: mtbf='soon'."),
    (dict(save_freq="auto", mtbf=-1), "Invalid mtbf: Received: mtbf=-1."),
])
def test_callback_refuses_bad_values_in_one_line(tmp_path, options, expected):
    with pytest.raises(ConfigError) as info:
        CheckpointCallback(str(tmp_path / "r"), **options)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_the_local_job_passes_save_freq_auto_and_mtbf_from_its_config(tmp_path):
    from ckptmgr.job import run_local

    cfg = apply_overrides(JobConfig.model_validate({"checkpoint": {"directory": str(tmp_path / "run")}}), [
        "checkpoint.save_freq=auto", "checkpoint.mtbf=2h", "training.samples=256",
        "training.batch_size=16", "training.epochs=1", "training.hidden=[8]", "training.features=4",
    ])
    run_local(cfg, resume=False)
    manifests = CheckpointManager(str(tmp_path / "run")).manifests()
    assert manifests[0].step == 10 and manifests[0].loop.cadence.mtbf_s == 7200


# -- the benchmark's paper computation (S8) -------------------------------------------------


def test_bench_s8_compares_auto_with_fixed_intervals_from_measured_costs(tmp_path):
    from bench.cadence import lost_work
    from bench.context import Context, Settings
    from bench.report import Report

    settings = Settings.make(quick=True, params=None, out=str(tmp_path), skip_ray=True,
                             skip_gcs=True, every=None)
    ctx = Context(settings, Report(), str(tmp_path))
    ctx.step_s = 0.33
    ctx.results.update(ckpt_capture_s=0.077, ckpt_write_s=4.5, ckpt_lost_s=0.9, restore_s=3.0)
    lost_work(ctx)
    rows = [r for r in ctx.report.rows if r.section == "S8"]
    assert len(rows) == 8  # (auto + 3 fixed) x (1 node, 8 nodes)
    # 1 node, M = 24 h, C = 0.9 s (S2's loss, above the capture): Daly 393.76 s = 1193 steps.
    assert "every 1193 steps" in rows[0].name
    assert rows[0].value == pytest.approx(1193 * 0.33 / 2 + 3.0)
    fixed = [r for r in rows if r.ref_name]
    assert len(fixed) == 6 and all(r.ratio > 1.0 for r in fixed)  # auto wastes least
    assert "faster than the writer" in fixed[0].note  # every 10 steps = 3.3 s < 4.5 s write
    assert "S8" in ctx.report.markdown()


# -- two ranks on Ray: the same steps on every rank ---------------------------------------------


from test_distributed import PLACEMENT, _cfg, cluster  # noqa: E402, F401 - the Ray cluster fixture


@pytest.mark.slow
def test_two_ray_workers_agree_on_every_auto_save(cluster, tmp_path):  # noqa: F811
    """Ranks time their steps differently; if they chose different save steps the
    coordinator would wait for the missing part and time the step out."""
    from ckptmgr.ray_job import run_on_ray

    directory = str(tmp_path / "run")
    cfg = _cfg(directory, "checkpoint.save_freq=auto", "checkpoint.mtbf=0.2", "checkpoint.keep_last=null",
               "training.epochs=6", "ray.save_timeout_s=30")
    run_on_ray(cfg, resume=False, worker_resources=PLACEMENT)
    manifests = CheckpointManager(directory).manifests()
    steps = [m.step for m in manifests]
    assert steps[0] == 10 and steps[-1] == 96 and len(steps) >= 3
    assert all(m.world["ranks"] == [0, 1] for m in manifests)
    cadences = [m.loop.cadence for m in manifests]
    assert all(c.mtbf_s == 0.1 for c in cadences)  # 0.2 s per node / 2 ranks
    assert all(c.interval_steps >= 1 and c.step_s > 0 for c in cadences)

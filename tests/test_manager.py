"""``CheckpointManager`` API behaviour on local disk with real (tiny) Keras models.

Listing, manifests, never-overwrite, non-blocking saves (true snapshots, the
``on_busy`` policies, error propagation), retention, pins, dry-run pruning,
restoring into never-trained models, argument validation and not-found errors.

Scheduling tests hold the writer thread on a ``threading.Event`` by wrapping
``mgr.storage.open_archive_writer`` (the real writer runs once released), so
"the previous save is still writing" is deterministic, not a race.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


from google_crc32c import value as crc32c  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import CheckpointManager, RetentionPolicy  # noqa: E402
from ckptmgr.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
)
from ckptmgr.io.layout import archive_name  # noqa: E402
from ckptmgr.io.manifest import LoopState, Manifest  # noqa: E402


def make_model(width=4):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, name="dense"), keras.layers.Dense(1, name="head")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def set_marker(model, value: float) -> None:
    for v in model.weights:
        v.assign(np.full(v.shape, value, "float32"))


def archive_weights(path) -> list[np.ndarray]:
    """Model weights stored in a .keras archive, read by stock Keras."""
    return keras.saving.load_model(path, compile=False).get_weights()


def marker_of(path) -> float:
    weights = archive_weights(path)
    values = {float(w.flat[0]) for w in weights}
    assert len(values) == 1 and all(np.all(w == w.flat[0]) for w in weights)
    return values.pop()


def files(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def committed_names(root) -> list[str]:
    """File names in the root, archives without their attempt id."""
    return sorted(re.sub(r"-[0-9a-f]{12}\.keras$", ".keras", p.name) for p in Path(root).iterdir() if p.is_file())


def archive_file(root, step: int) -> Path:
    """The archive of ``step`` in ``root`` (a fresh attempt name if there is none)."""
    found = sorted(Path(root).glob(f"ckpt-{step:09d}-*.keras"))
    return found[0] if found else Path(root) / archive_name(step, "0" * 12)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def directory(tmp_path):
    return tmp_path / "ckpt"


@pytest.fixture
def mgr(directory):
    manager = CheckpointManager(directory)
    yield manager
    manager.close()


class Gate:
    """Holds every archive write until :meth:`open` (or a timeout) lets it go."""

    def __init__(self, manager, monkeypatch):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.writes: list[int] = []
        original = manager.storage.open_archive_writer

        @contextmanager
        def gated(name, *args):
            self.writes.append(int(name[len("ckpt-"):].split("-")[0]))
            self.entered.set()
            assert self.release.wait(30), "gate never opened"
            with original(name, *args) as writer:
                yield writer

        monkeypatch.setattr(manager.storage, "open_archive_writer", gated)

    def open(self, after_s: float = 0.0) -> None:
        if after_s:
            threading.Timer(after_s, self.release.set).start()
        else:
            self.release.set()


# --------------------------------------------------------------------------
# Listing and manifests
# --------------------------------------------------------------------------


def test_empty_manager(mgr, directory):
    assert mgr.steps() == []
    assert mgr.latest_step() is None
    assert mgr.manifests() == []
    assert mgr.verify() == []
    assert not directory.exists()  # listing creates nothing
    assert mgr.directory == str(directory)


def test_steps_are_ascending_whatever_the_save_order(mgr, model, directory):
    for step in (10, 2, 7, 0):
        mgr.save(step, model)
    assert mgr.steps() == [0, 2, 7, 10]
    assert mgr.latest_step() == 10
    assert [m.step for m in mgr.manifests()] == [0, 2, 7, 10]
    # Archives without a manifest (uncommitted) and stray files never count.
    (archive_file(directory, 11)).write_bytes((archive_file(directory, 10)).read_bytes())
    (directory / "notes.txt").write_text("hello")
    (directory / "ckpt-12.json").write_text("{}")  # not the naming scheme
    assert mgr.steps() == [0, 2, 7, 10]
    assert mgr.latest_step() == 10


def test_manifest_fields(mgr, model, directory):
    loop = LoopState(epoch=1, batch=5, next_epoch=1, next_batch=6)
    before = datetime.now(timezone.utc)
    saved = mgr.save(
        7, model, metrics={"loss": 0.25, "val_acc": np.float32(0.5)}, extra={"run": "abc", "n": [1, 2]}, loop=loop
    )
    manifest = mgr.manifest(7)
    assert isinstance(manifest, Manifest)
    assert manifest == saved
    assert mgr.manifest() == saved  # latest by default

    path = archive_file(directory, 7)
    data = path.read_bytes()
    assert manifest.step == 7
    assert manifest.archive == archive_name(7, manifest.attempt) == path.name
    assert set(manifest.files) == {path.name}
    entry = manifest.files[path.name]
    assert entry.sha256 is None  # by default: chunk CRC32Cs only
    assert entry.chunk_bytes == 16 * 1024 * 1024 and entry.crc32c == [f"{crc32c(data):08x}"]
    assert entry.bytes == len(data) == path.stat().st_size
    assert manifest.metrics == {"loss": 0.25, "val_acc": 0.5}
    assert all(type(v) is float for v in manifest.metrics.values())
    assert manifest.extra == {"run": "abc", "n": [1, 2]}
    assert manifest.loop == loop
    assert manifest.stats.bytes == len(data) > 0
    assert manifest.stats.write_s >= 0 and manifest.stats.blocked_s >= 0
    assert manifest.keras_version == keras.__version__
    assert manifest.created.tzinfo is not None
    assert before - timedelta(seconds=1) <= manifest.created <= datetime.now(timezone.utc)
    # The manifest on disk is what the manager reads back.
    on_disk = Manifest.from_bytes((directory / "ckpt-000000007.json").read_bytes(), where="test")
    assert on_disk == manifest


def test_numpy_integer_steps_are_accepted(mgr, model):
    assert mgr.save(np.int64(3), model).step == 3
    assert mgr.steps() == [3]


# --------------------------------------------------------------------------
# Never overwrite
# --------------------------------------------------------------------------


def test_saving_same_step_twice_raises_and_keeps_the_original(mgr, directory):
    model = make_model()
    set_marker(model, 1.0)
    mgr.save(1, model, metrics={"loss": 1.0})
    before = files(directory)
    set_marker(model, 2.0)
    with pytest.raises(CheckpointExistsError, match="step 1"):
        mgr.save(1, model, metrics={"loss": 2.0})
    assert files(directory) == before  # byte-identical, no leftovers in .tmp
    assert mgr.steps() == [1]
    assert mgr.manifest(1).metrics == {"loss": 1.0}
    assert marker_of(archive_file(directory, 1)) == 1.0


def test_non_blocking_save_of_existing_step_fails_in_its_future(mgr, directory):
    model = make_model()
    mgr.save(1, model)
    before = files(directory)
    future = mgr.save(1, model, blocking=False)
    with pytest.raises(CheckpointExistsError):
        future.result(timeout=30)
    with pytest.raises(CheckpointExistsError):
        mgr.wait_until_finished()
    assert mgr.wait_until_finished() is None  # reported once
    assert files(directory) == before
    assert mgr.save(2, model).step == 2


def test_failed_non_blocking_save_surfaces_at_the_next_save(mgr):
    model = make_model()
    mgr.save(1, model)
    future = mgr.save(1, model, blocking=False)
    assert isinstance(future.exception(timeout=30), CheckpointExistsError)
    with pytest.raises(CheckpointExistsError):
        mgr.save(2, model)  # the earlier failure is not lost
    assert mgr.save(2, model).step == 2
    assert mgr.steps() == [1, 2]


# --------------------------------------------------------------------------
# Non-blocking saves
# --------------------------------------------------------------------------


def test_non_blocking_save_returns_future_of_manifest(mgr, directory):
    model = make_model()
    future = mgr.save(4, model, metrics={"loss": 0.5}, blocking=False)
    assert isinstance(future, Future)
    manifest = future.result(timeout=30)
    assert isinstance(manifest, Manifest)
    assert manifest.step == 4 and manifest.metrics == {"loss": 0.5}
    assert mgr.wait_until_finished() == manifest
    assert mgr.wait_until_finished() is None  # nothing in flight any more
    assert mgr.steps() == [4]
    assert mgr.manifest(4) == manifest
    assert mgr.verify() == [mgr.verify(4)[0]] and mgr.verify(4)[0].ok


def test_wait_until_finished_blocks_until_commit(mgr, monkeypatch):
    model = make_model()
    gate = Gate(mgr, monkeypatch)
    future = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    assert not future.done() and mgr.steps() == []  # not committed yet
    gate.open(after_s=0.2)
    manifest = mgr.wait_until_finished()
    assert manifest.step == 1 and future.done()
    assert mgr.steps() == [1]


def test_non_blocking_save_is_a_true_snapshot(mgr, directory, monkeypatch):
    """The archive holds the values at save() time, not those assigned after."""
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256, name="big"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    expected = [w.copy() for w in model.get_weights()]

    gate = Gate(mgr, monkeypatch)
    future = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30) and not future.done()
    # Training goes on while the writer is held: clobber every variable.
    for v in model.weights:
        v.assign(np.zeros(v.shape, "float32"))
    gate.open()
    assert future.result(timeout=60).step == 1

    stored = archive_weights(archive_file(directory, 1))
    for got, want in zip(stored, expected):
        np.testing.assert_array_equal(got, want)
    assert not any(np.all(w == 0) for w in stored)


def test_true_snapshot_without_holding_the_writer(mgr, directory):
    """A few MB written for real while the live weights change underneath."""
    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(1024), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    set_marker(model, 3.0)
    future = mgr.save(1, model, blocking=False)
    set_marker(model, 0.0)  # most likely while the ~4 MB archive is being written
    future.result(timeout=60)
    assert marker_of(archive_file(directory, 1)) == 3.0


def test_reused_host_buffers_never_leak_into_an_earlier_snapshot(directory, monkeypatch):
    """Save 2 (on_busy='wait') waits for save 1 before capturing again
    (on_busy='newest' is tested in test_newest_wins.py)."""
    mgr = CheckpointManager(directory, on_busy="wait")
    model = make_model()
    gate = Gate(mgr, monkeypatch)
    set_marker(model, 1.0)
    first = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    set_marker(model, 2.0)
    gate.open(after_s=0.3)
    started = time.perf_counter()
    second = mgr.save(2, model, blocking=False)  # waits for the first write
    assert time.perf_counter() - started >= 0.2
    assert first.done()
    set_marker(model, 3.0)
    assert second.result(timeout=30).step == 2
    assert marker_of(archive_file(directory, 1)) == 1.0
    assert marker_of(archive_file(directory, 2)) == 2.0


def test_on_busy_wait_waits_then_saves(directory, monkeypatch, caplog):
    mgr = CheckpointManager(directory, on_busy="wait")
    model = make_model()
    gate = Gate(mgr, monkeypatch)
    first = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    gate.open(after_s=0.3)
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        second = mgr.save(2, model)  # blocking
    assert first.done() and second.step == 2
    assert mgr.steps() == [1, 2]
    assert gate.writes == [1, 2]
    mgr.close()


def test_on_busy_skip_returns_none_while_previous_save_writes(directory, monkeypatch, caplog):
    mgr = CheckpointManager(directory, on_busy="skip")
    model = make_model()
    gate = Gate(mgr, monkeypatch)
    first = mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.save(2, model, blocking=False) is None
        assert mgr.save(3, model, blocking=False) is None
    assert any("skipping" in r.getMessage() for r in caplog.records)
    assert gate.writes == [1]  # the skipped saves never reached storage
    gate.open()
    assert first.result(timeout=30).step == 1
    assert mgr.wait_until_finished().step == 1
    # Once the writer is idle, saves go through again.
    later = mgr.save(4, model, blocking=False)
    assert later.result(timeout=30).step == 4
    assert mgr.steps() == [1, 4]
    mgr.close()


def test_on_busy_skip_never_drops_a_blocking_save(directory, monkeypatch):
    mgr = CheckpointManager(directory, on_busy="skip")
    model = make_model()
    gate = Gate(mgr, monkeypatch)
    mgr.save(1, model, blocking=False)
    assert gate.entered.wait(30)
    gate.open(after_s=0.2)
    try:
        result = mgr.save(2, model)  # e.g. the final save at the end of training
        assert result is not None and result.step == 2
    finally:
        gate.open()
        mgr.close()


# --------------------------------------------------------------------------
# Retention, pins, pruning
# --------------------------------------------------------------------------


def test_keep_last_two(directory, model):
    mgr = CheckpointManager(directory, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, model)
        assert mgr.steps() == [1, 2, 3, 4][max(0, step - 2) : step]
    assert mgr.steps() == [3, 4]
    assert committed_names(directory) == [
        "ckpt-000000003.json", "ckpt-000000003.keras", "ckpt-000000004.json", "ckpt-000000004.keras",
    ]


def test_keep_last_applies_after_non_blocking_saves(directory, model):
    mgr = CheckpointManager(directory, keep_last=2, on_busy="wait")  # every save is written
    for step in (1, 2, 3):
        mgr.save(step, model, blocking=False)
    mgr.wait_until_finished()
    assert mgr.steps() == [2, 3]
    mgr.close()


def test_keep_best_max_never_deletes_the_newest(directory, model):
    mgr = CheckpointManager(directory, keep_best="val_acc", keep_best_mode="max")
    history = []
    for step, acc in [(1, 0.9), (2, 0.5), (3, 0.4), (4, 0.95), (5, 0.1)]:
        mgr.save(step, model, metrics={"val_acc": acc})
        history.append(mgr.steps())
        assert step in mgr.steps()  # the newest survives even when it is the worst
    assert history == [[1], [1, 2], [1, 3], [4], [4, 5]]


def test_keep_best_newest_without_the_metric_survives(directory, model):
    mgr = CheckpointManager(directory, keep_best="val_loss")
    mgr.save(1, model, metrics={"val_loss": 0.3})
    mgr.save(2, model, metrics={"val_loss": 0.5})
    mgr.save(3, model, metrics={"loss": 0.1})  # no val_loss at all
    assert mgr.steps() == [1, 3]


def test_pin_protects_from_pruning(directory, model):
    mgr = CheckpointManager(directory, keep_last=1)
    mgr.save(1, model, pin=True)
    mgr.save(2, model)
    assert mgr.steps() == [1, 2]
    mgr.save(3, model)
    assert mgr.steps() == [1, 3]
    mgr.pin(3)
    mgr.save(4, model)
    assert mgr.steps() == [1, 3, 4]
    assert (directory / "ckpt-000000001.pin").exists()
    # Unpinned, they go at the next prune; their pin markers go with them.
    mgr.pin(1, False)
    mgr.pin(3, pinned=False)
    assert mgr.prune().deleted == (1, 3)
    assert mgr.steps() == [4]
    assert not list(directory.glob("*.pin"))


def test_pin_of_unknown_step_is_not_found(mgr, model):
    mgr.save(1, model)
    with pytest.raises(CheckpointNotFoundError, match="Available: 1"):
        mgr.pin(2)


def test_prune_dry_run_deletes_nothing(mgr, model, directory):
    for step in (1, 2, 3, 4):
        mgr.save(step, model)
    policy = RetentionPolicy.from_options(keep_last=1)
    before = files(directory)
    report = mgr.prune(dry_run=True, retention=policy)
    assert report.dry_run is True
    assert report.deleted == ()
    assert report.decision.delete == (1, 2, 3)
    assert set(report.decision.keep) == {4}
    assert files(directory) == before
    assert mgr.steps() == [1, 2, 3, 4]
    assert mgr.plan_prune(policy).delete == (1, 2, 3)
    # The manager's own (empty) policy keeps everything.
    assert mgr.prune().deleted == ()
    assert mgr.steps() == [1, 2, 3, 4]
    # For real this time.
    report = mgr.prune(retention=policy)
    assert report.dry_run is False and report.deleted == (1, 2, 3)
    assert mgr.steps() == [4]
    assert committed_names(directory) == ["ckpt-000000004.json", "ckpt-000000004.keras"]


# --------------------------------------------------------------------------
# Restore
# --------------------------------------------------------------------------


def test_restore_into_fresh_model_with_unbuilt_optimizer(mgr):
    keras.utils.set_random_seed(0)
    trained = make_model()
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    trained.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert int(trained.optimizer.iterations) == 2
    mgr.save(2, trained, loop=LoopState(epoch=0, batch=2, next_epoch=1))

    keras.utils.set_random_seed(1)
    fresh = make_model()  # compiled, never trained
    assert not fresh.optimizer.built
    manifest = mgr.restore(fresh)
    assert manifest.step == 2 and manifest.loop.next_epoch == 1
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(trained(x)))
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(fresh.optimizer.iterations) == 2
    assert len(fresh.optimizer.variables) == len(trained.optimizer.variables)
    for a, b in zip(trained.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Both continue identically.
    trained.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    fresh.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(trained.weights, fresh.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The checkpoints hold an unbuilt optimizer (never trained); restore builds the
# target's, so Keras skips optimizer state with a warning. Weights are the point.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_restore_picks_latest_or_the_requested_step(mgr, directory):
    model = make_model()
    for step in (1, 2, 3):
        set_marker(model, float(step))
        mgr.save(step, model)
    target = make_model()
    assert mgr.restore(target).step == 3
    assert float(np.asarray(target.weights[0]).flat[0]) == 3.0
    assert mgr.restore(target, step=1).step == 1
    assert float(np.asarray(target.weights[0]).flat[0]) == 1.0


# --------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize("step", [-1, -100, 1.5, "3", None, True])
def test_invalid_step_is_config_error(mgr, model, step, directory):
    with pytest.raises(ConfigError, match="Invalid step") as info:
        mgr.save(step, model)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert mgr.steps() == [] and not directory.exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"on_busy": "never"},
        {"on_busy": None},
        {"keep_within": "soon"},
        {"keep_within": "7"},
        {"keep_within": timedelta(0)},
        {"keep_within": timedelta(seconds=-5)},
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_last": 2.5},
        {"keep_every_n_steps": 0},
        {"keep_best": "acc", "keep_best_mode": "up"},
        {"keep_best_mode": "max"},  # without keep_best
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_invalid_options_are_config_errors(directory, kwargs):
    with pytest.raises(ConfigError, match="Received") as info:
        CheckpointManager(directory, **kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert not directory.exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"extra": {"array": np.zeros(2)}}, {"extra": {"obj": object()}}, {"metrics": {"acc": "high"}}],
    ids=["extra-ndarray", "extra-object", "metrics-str"],
)
def test_invalid_metrics_or_extra_are_config_errors_before_writing(mgr, model, directory, kwargs):
    try:
        with pytest.raises(ConfigError):
            mgr.save(1, model, **kwargs)
    finally:
        leftovers = sorted(p.name for p in directory.glob("ckpt-*"))
    assert leftovers == []
    assert mgr.steps() == []


def test_valid_keep_within_strings(directory):
    assert CheckpointManager(directory, keep_within="1d12h").retention.rules[0].window == timedelta(hours=36)
    assert CheckpointManager(directory, keep_within=timedelta(days=7)).retention.rules[0].window == timedelta(days=7)


def test_empty_directory_is_config_error():
    with pytest.raises(ConfigError):
        CheckpointManager("")


def test_export_weights_needs_weights_suffix(mgr, model, tmp_path):
    mgr.save(1, model)
    with pytest.raises(ConfigError, match=r"\.weights\.h5"):
        mgr.export_weights(str(tmp_path / "model.h5"))
    assert not (tmp_path / "model.h5").exists()


# --------------------------------------------------------------------------
# Not found
# --------------------------------------------------------------------------


def test_nothing_saved_yet_is_not_found(mgr, model, tmp_path):
    target = make_model()
    calls = [
        lambda: mgr.restore(target),
        lambda: mgr.load(),
        lambda: mgr.manifest(),
        lambda: mgr.export_keras(str(tmp_path / "m.keras")),
        lambda: mgr.export_weights(str(tmp_path / "m.weights.h5")),
        lambda: mgr.export_saved_model(str(tmp_path / "sm")),
    ]
    for call in calls:
        with pytest.raises(CheckpointNotFoundError, match="No checkpoints") as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_step_lists_available_steps(mgr, model, tmp_path):
    for step in (1, 2):
        mgr.save(step, model)
    target = make_model()
    out = tmp_path / "out"
    calls = {
        "restore": lambda: mgr.restore(target, step=5),
        "load": lambda: mgr.load(step=5),
        "manifest": lambda: mgr.manifest(5),
        "verify": lambda: mgr.verify(step=5),
        "export_keras": lambda: mgr.export_keras(str(out / "m.keras"), step=5),
        "export_weights": lambda: mgr.export_weights(str(out / "m.weights.h5"), step=5),
        "export_saved_model": lambda: mgr.export_saved_model(str(out / "sm"), step=5),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointNotFoundError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message, name
        assert "step 5" in message, (name, message)
        assert "Available: 1, 2" in message, (name, message)
    assert not out.exists()


def test_archive_is_a_plain_zip_even_when_written_non_blocking(mgr, model, directory):
    mgr.save(1, model, blocking=False).result(timeout=30)
    with zipfile.ZipFile(archive_file(directory, 1)) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == ["metadata.json", "config.json", "model.weights.h5"]


def test_recompile_with_a_same_size_optimizer_saves_the_new_one(tmp_path):
    """The cached capture plan must follow the objects, not their count
    (issue 9): after compile() with a new Adam, the new one's state is saved."""
    import h5py

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 3), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 2 iterations
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, model)
    model.compile(optimizer=keras.optimizers.Adam(0.0001), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 1 iteration of the new one
    mgr.save(2, model)
    with zipfile.ZipFile(mgr.local_archive_path(2)) as zf:
        config = json.loads(zf.read("config.json"))
        zf.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as h5:
        assert int(h5["optimizer/vars/0"][()]) == 1  # iterations of the new optimizer
        assert float(h5["optimizer/vars/1"][()]) == pytest.approx(0.0001)  # its learning rate
    assert config["compile_config"]["optimizer"]["config"]["learning_rate"] == pytest.approx(0.0001)


def test_a_save_older_than_the_directory_newest_is_not_pruned_at_once(directory, model, caplog):
    """Issue 9: ``mgr.save(5)`` after step 40 with keep_last=3 was pruned right
    after it was written, without a word."""
    mgr = CheckpointManager(directory, keep_last=3)
    for step in (38, 39, 40):
        mgr.save(step, model)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        mgr.save(5, model)
    assert 5 in mgr.steps() and mgr.verify(5)[0].ok
    assert any("already holds step 40" in r.getMessage() for r in caplog.records)
    mgr.save(41, model)  # later saves apply the rule as usual
    assert mgr.steps() == [39, 40, 41]

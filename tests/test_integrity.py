"""Corrupt, truncated and missing checkpoints: found by ``verify``, skipped by ``restore``.

Every test saves steps 1, 2 and 3 of a tiny model whose kernel is filled with
the step number, so which checkpoint a ``restore`` picked can be read off the
restored weights. Damage is done to the stored bytes directly. Nothing in
ckptmgr may delete or repair anything while verifying or restoring.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import hashlib  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ckptmgr import CheckpointManager, VerifyResult  # noqa: E402
from ckptmgr.errors import CheckpointNotFoundError, CorruptCheckpointError  # noqa: E402
from ckptmgr.io.layout import manifest_name  # noqa: E402

STEPS = (1, 2, 3)


def make_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def set_marker(model, value: float) -> None:
    dense = model.get_layer("dense")
    dense.kernel.assign(np.full((4, 3), value, "float32"))
    dense.bias.assign(np.full((3,), value, "float32"))


def marker(model) -> float:
    kernel = np.asarray(model.get_layer("dense").kernel)
    assert np.all(kernel == kernel.flat[0])
    return float(kernel.flat[0])


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def target():
    """A model to restore into, with a marker no checkpoint has."""
    m = make_model()
    set_marker(m, -1.0)
    return m


def save_steps(mgr, model, steps=STEPS):
    for step in steps:
        set_marker(model, float(step))
        mgr.save(step, model)


@pytest.fixture
def mgr(tmp_path, model):
    manager = CheckpointManager(tmp_path / "ckpt")
    save_steps(manager, model)
    yield manager
    manager.close()


def archive(mgr, step) -> Path:
    return Path(mgr.local_archive_path(step))


def snapshot_files(root) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file under ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def flip_middle(data: bytes) -> bytes:
    damaged = bytearray(data)
    middle = len(damaged) // 2
    for i in range(middle, middle + 8):
        damaged[i] ^= 0xFF
    assert len(damaged) == len(data) and damaged != data
    return bytes(damaged)


def flip_file(path: Path) -> None:
    path.write_bytes(flip_middle(path.read_bytes()))


def by_step(results: list[VerifyResult]) -> dict[int, VerifyResult]:
    assert all(isinstance(r, VerifyResult) for r in results)
    assert [r.step for r in results] == sorted(r.step for r in results)
    return {r.step: r for r in results}


def assert_one_line(text: str, *needles: str) -> None:
    assert text and "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def test_intact_checkpoints_all_verify(mgr):
    results = by_step(mgr.verify())
    assert list(results) == list(STEPS)
    assert all(r.ok and r.problem == "" for r in results.values())
    assert mgr.verify(step=2) == [VerifyResult(2, True)]


def test_verify_reports_progress_over_the_whole_archive(mgr):
    seen = []
    mgr.verify(step=3, progress=lambda n, total: seen.append((n, total)))
    size = archive(mgr, 3).stat().st_size
    assert sum(n for n, _ in seen) == size
    assert {total for _, total in seen} == {size}


def test_flipped_bytes_are_reported_for_that_step_only(mgr):
    flip_file(archive(mgr, 3))
    results = by_step(mgr.verify())
    assert results[1].ok and results[2].ok
    assert not results[3].ok
    assert_one_line(results[3].problem, "step 3", "ckpt-000000003-", "corrupt")
    assert mgr.verify(step=3)[0] == results[3]


def test_flipped_bytes_in_an_older_step(mgr):
    flip_file(archive(mgr, 2))
    results = by_step(mgr.verify())
    assert [s for s, r in results.items() if not r.ok] == [2]
    assert_one_line(results[2].problem, "step 2", "ckpt-000000002-")


def test_truncated_archive_is_reported_as_truncated(mgr):
    path = archive(mgr, 3)
    full = path.stat().st_size
    os.truncate(path, full // 2)
    results = by_step(mgr.verify())
    assert results[1].ok and results[2].ok and not results[3].ok
    assert_one_line(results[3].problem, "step 3", "ckpt-000000003-", "truncated")
    assert str(full // 2) in results[3].problem and str(full) in results[3].problem


def test_appended_bytes_are_reported(mgr):
    path = archive(mgr, 1)
    with open(path, "ab") as f:
        f.write(b"junk")
    results = by_step(mgr.verify())
    assert not results[1].ok and results[2].ok and results[3].ok
    assert_one_line(results[1].problem, "step 1", "ckpt-000000001-")


def test_deleted_archive_with_manifest_is_reported_missing(mgr):
    archive(mgr, 2).unlink()
    assert mgr.steps() == [1, 2, 3]  # the manifest still lists it
    results = by_step(mgr.verify())
    assert results[1].ok and results[3].ok and not results[2].ok
    assert_one_line(results[2].problem, "step 2", "ckpt-000000002-", "missing")


@pytest.mark.parametrize(
    "garbage",
    [b'{"step": 3, "files": ', b"\x00\xff not json", b'{"step": 3}', b"[]"],
    ids=["truncated-json", "binary", "missing-fields", "wrong-type"],
)
def test_corrupt_manifest_is_reported_and_skipped(mgr, garbage, caplog):
    path = Path(mgr.storage.root) / manifest_name(3)
    path.write_bytes(garbage)
    results = by_step(mgr.verify())
    assert results[1].ok and results[2].ok and not results[3].ok
    assert_one_line(results[3].problem, "step 3", "ckpt-000000003.json")
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        manifests = mgr.manifests()
    assert [m.step for m in manifests] == [1, 2]
    assert any("ckpt-000000003.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(CorruptCheckpointError, match="ckpt-000000003.json"):
        mgr.manifest(3)


def test_manifest_of_another_step_is_not_trusted(mgr, target):
    root = Path(mgr.storage.root)
    flip_file(archive(mgr, 3))  # step 3's own archive is broken
    (root / manifest_name(3)).write_bytes((root / manifest_name(2)).read_bytes())
    results = by_step(mgr.verify())
    assert not results[3].ok
    assert_one_line(results[3].problem, "step 3", "ckpt-000000003")


def test_manifest_without_its_archive_entry_is_reported(mgr):
    import json

    path = Path(mgr.storage.root) / manifest_name(1)
    data = json.loads(path.read_text())
    data["archive"] = "something-else.keras"
    path.write_text(json.dumps(data))
    results = by_step(mgr.verify())
    assert not results[1].ok and results[2].ok and results[3].ok
    assert_one_line(results[1].problem, "step 1")


def test_verify_of_unknown_step_is_not_found(mgr):
    with pytest.raises(CheckpointNotFoundError, match="Available: 1, 2, 3"):
        mgr.verify(step=9)


# --------------------------------------------------------------------------
# restore / load
# --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_restore_falls_back_to_newest_that_verifies(mgr, target, damage, caplog):
    path = archive(mgr, 3)
    if damage == "flip":
        flip_file(path)
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size - 100)
    elif damage == "delete":
        path.unlink()
    else:
        (Path(mgr.storage.root) / manifest_name(3)).write_bytes(b"{oops")
    before = snapshot_files(mgr.storage.root)

    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        manifest = mgr.restore(target)
    assert manifest.step == 2
    assert marker(target) == 2.0

    warnings = [r for r in caplog.records if r.name == "ckptmgr" and r.levelno == logging.WARNING]
    assert warnings, "falling back must be logged"
    text = " | ".join(r.getMessage() for r in warnings)
    assert "step 3" in text
    assert ("ckpt-000000003.json" if damage == "manifest" else "ckpt-000000003-") in text
    assert "to step 2" in text
    assert snapshot_files(mgr.storage.root) == before  # nothing deleted or repaired


def test_restore_skips_several_corrupt_newest(mgr, target, caplog):
    flip_file(archive(mgr, 3))
    archive(mgr, 2).unlink()
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.restore(target).step == 1
    assert marker(target) == 1.0
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "step 3" in text and "step 2" in text and "to step 1" in text


def test_restore_explicit_corrupt_step_raises(mgr, target):
    flip_file(archive(mgr, 2))
    before = snapshot_files(mgr.storage.root)
    with pytest.raises(CorruptCheckpointError) as info:
        mgr.restore(target, step=2)
    assert_one_line(str(info.value), "step 2", "ckpt-000000002-")
    assert marker(target) == -1.0  # untouched
    # Intact explicit steps still restore, newer or older.
    assert mgr.restore(target, step=3).step == 3 and marker(target) == 3.0
    assert mgr.restore(target, step=1).step == 1 and marker(target) == 1.0
    assert snapshot_files(mgr.storage.root) == before


def test_load_falls_back_and_explicit_corrupt_load_raises(mgr):
    flip_file(archive(mgr, 3))
    loaded = mgr.load()
    assert marker(loaded) == 2.0
    with pytest.raises(CorruptCheckpointError, match="ckpt-000000003-"):
        mgr.load(step=3)


def test_all_corrupt_raises_listing_every_step(mgr, target, caplog):
    flip_file(archive(mgr, 1))
    os.truncate(archive(mgr, 2), 10)
    archive(mgr, 3).unlink()
    before = snapshot_files(mgr.storage.root)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(target)
    message = str(info.value)
    assert_one_line(
        message,
        "ckpt-000000001-", "ckpt-000000002-", "ckpt-000000003-",
        "step 1", "step 2", "step 3",
    )
    assert "missing" in message and "truncated" in message and "corrupt" in message
    assert marker(target) == -1.0
    with pytest.raises(CorruptCheckpointError):
        mgr.load()
    results = by_step(mgr.verify())
    assert not any(r.ok for r in results.values())
    assert snapshot_files(mgr.storage.root) == before
    assert mgr.steps() == [1, 2, 3]


def test_export_of_corrupt_step_raises_and_writes_nothing(mgr, tmp_path):
    flip_file(archive(mgr, 3))
    out = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError):
        mgr.export_keras(str(out / "m.keras"), step=3)
    with pytest.raises(CorruptCheckpointError):
        mgr.export_weights(str(out / "m.weights.h5"), step=3)
    # Exports never fall back silently: "latest" means step 3 here.
    with pytest.raises(CorruptCheckpointError, match="step 3"):
        mgr.export_keras(str(out / "m.keras"))
    assert not out.exists() or not any(out.iterdir())
    assert Path(mgr.export_keras(str(out / "m.keras"), step=2)).name == "m.keras"


# --------------------------------------------------------------------------
# Object storage (fsspec memory://): same detection, download path for restore
# --------------------------------------------------------------------------


@pytest.fixture
def memory_mgr(model, tmp_path, monkeypatch):
    # Restores from remote storage download into temp files: keep them in view.
    local_tmp = tmp_path / "tmp"
    local_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local_tmp))
    manager = CheckpointManager(f"memory://ckptmgr-test-integrity-{uuid.uuid4().hex}")
    save_steps(manager, model, (1, 2))
    yield manager, local_tmp
    manager.close()
    fs = manager.storage.fs
    if fs.exists(manager.storage.root):
        fs.rm(manager.storage.root, recursive=True)


def memory_files(mgr) -> dict[str, tuple[int, str]]:
    fs = mgr.storage.fs
    return {
        path: (fs.info(path)["size"], hashlib.sha256(fs.cat_file(path)).hexdigest())
        for path in sorted(fs.find(mgr.storage.root))
    }


def test_memory_storage_corruption_is_detected_and_skipped(memory_mgr, target, caplog):
    mgr, local_tmp = memory_mgr
    assert mgr.local_archive_path(2) is None  # really remote-style
    name = mgr.manifest(2).archive
    fs, path = mgr.storage.fs, f"{mgr.storage.root}/{name}"
    fs.pipe_file(path, flip_middle(fs.cat_file(path)))
    before = memory_files(mgr)

    results = by_step(mgr.verify())
    assert results[1].ok and not results[2].ok
    assert_one_line(results[2].problem, "step 2", name)

    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert mgr.restore(target).step == 1
    assert marker(target) == 1.0
    assert any(name in r.getMessage() for r in caplog.records)

    with pytest.raises(CorruptCheckpointError, match=name):
        mgr.restore(target, step=2)
    assert memory_files(mgr) == before  # nothing deleted remotely
    assert list(local_tmp.iterdir()) == []  # downloads cleaned up, bad ones too


def test_memory_storage_missing_archive(memory_mgr):
    mgr, _ = memory_mgr
    name = mgr.manifest(2).archive
    mgr.storage.fs.rm_file(f"{mgr.storage.root}/{name}")
    results = by_step(mgr.verify())
    assert results[1].ok and not results[2].ok
    assert_one_line(results[2].problem, "step 2", name, "missing")

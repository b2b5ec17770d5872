"""Issue 10, item 2: cheap integrity. Chunk CRC32Cs catch a flipped byte in
any chunk and name it; sha256 on request; old sha256 manifests still verify;
the zip's CRC32 is combined from pieces; the zip layout is what zipfile and
stock Keras read, ZIP64 records included."""

from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np
import pytest

import ckptmgr.io.checksums as checksums_mod
import ckptmgr.io.ziplayout as ziplayout_mod
from ckptmgr import CheckpointManager
from ckptmgr.errors import ConfigError
from ckptmgr.io.archive import ModelSnapshot, VarGroup
from ckptmgr.io.checksums import PiecewiseCrc32

CHUNK = 64 * 1024


def _snapshot(rows: int = 1024) -> ModelSnapshot:
    kernel = np.random.default_rng(rows).normal(size=(rows, 256)).astype("float32")
    return ModelSnapshot(
        config_json='{"class_name": "Sequential", "config": {"name": "c"}}',
        metadata_json='{"keras_version": "3.15.1"}',
        groups=[VarGroup("layers/dense/vars", {"name": "dense"}, [("0", kernel)])],
    )


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_in_any_chunk_is_caught_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", CHUNK)
    manager = CheckpointManager(tmp_path / "ck")
    entry = manager.write_snapshot(1, _snapshot()).archive_entry
    assert entry.chunk_bytes == CHUNK and entry.sha256 is None
    chunks = len(entry.crc32c)
    assert chunks == -(-entry.bytes // CHUNK) >= 16
    path = manager.local_archive_path(1)
    for index in range(chunks):
        start, end = entry.chunk_range(index)
        offset = (start + end) // 2
        _flip(path, offset)
        result = manager.verify(1)[0]
        _flip(path, offset)  # put it back
        assert not result.ok
        assert f"CRC32C of bytes {start}-{end} (chunk {index + 1} of {chunks})" in result.problem
    assert manager.verify(1)[0].ok


def test_sha256_on_request_is_recorded_and_checked(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", checksum="sha256")
    manifest = manager.write_snapshot(1, _snapshot(64))
    entry = manifest.archive_entry
    assert entry.sha256 is not None and entry.crc32c
    # A manifest whose sha256 differs while every CRC32C still matches: the
    # sha256 is checked too (an attacker who can fix CRCs cannot fix it).
    body = json.loads(manifest.to_bytes())
    body["files"][manifest.archive]["sha256"] = "0" * 64
    _reseal(tmp_path / "ck" / "ckpt-000000001.json", body)
    problem = manager.verify(1)[0].problem
    assert "sha256" in problem and "manifest says 000000000000" in problem


def test_unknown_checksum_is_refused():
    with pytest.raises(ConfigError, match=r"Invalid checksum: Received: checksum='md5'"):
        CheckpointManager("memory://x", checksum="md5")


def _reseal(path, body: dict) -> None:
    """Write ``body`` with a valid self-checksum (what an old writer wrote)."""
    import hashlib

    body.pop("checksum", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(body))


def test_schema_2_sha256_manifests_still_verify_and_load(tmp_path):
    """Manifests written before chunk CRC32Cs carry only a sha256: they verify,
    and a flipped byte is still caught."""
    import hashlib

    manager = CheckpointManager(tmp_path / "ck")
    manifest = manager.write_snapshot(1, _snapshot(64))
    path = manager.local_archive_path(1)
    body = json.loads(manifest.to_bytes())
    body["schema_version"] = 2
    with open(path, "rb") as f:
        body["files"][manifest.archive] = {"bytes": os.path.getsize(path),
                                           "sha256": hashlib.sha256(f.read()).hexdigest()}
    _reseal(tmp_path / "ck" / "ckpt-000000001.json", body)
    old = manager.manifest(1)
    assert old.schema_version == 2 and old.archive_entry.crc32c is None
    assert manager.verify(1)[0].ok
    _flip(path, os.path.getsize(path) // 2)
    problem = manager.verify(1)[0].problem
    assert "is corrupt (sha256" in problem


@pytest.mark.parametrize("sizes", [[0], [1], [5, 0, 7], [65536] * 5, [3, 1 << 20, 17]])
def test_piecewise_crc32_is_the_crc32_of_the_whole(sizes):
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]
    crc = PiecewiseCrc32()
    for piece in pieces:
        crc.add(memoryview(piece))
    assert crc.value() == zlib.crc32(b"".join(pieces))


def test_archive_layout_is_what_zipfile_and_keras_read(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(300), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 8)), np.ones((4, 1)), verbose=0)
    manager = CheckpointManager(tmp_path / "ck")
    manager.save(1, model)
    path = manager.local_archive_path(1)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member's CRC32 checks out
        assert [i.filename for i in zf.infolist()] == ["metadata.json", "config.json", "model.weights.h5"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    loaded = keras.saving.load_model(path)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_zip64_records_read_back(tmp_path, monkeypatch):
    """Past 2 GiB the weights member needs ZIP64 records: forced here with a
    tiny limit, so zipfile must parse our ZIP64 extra fields and end records."""
    keras = pytest.importorskip("keras")
    monkeypatch.setattr(ziplayout_mod, "_ZIP64_LIMIT", 1000)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64)])
    manager = CheckpointManager(tmp_path / "ck")
    manager.save(1, model)
    path = manager.local_archive_path(1)
    with open(path, "rb") as f:
        data = f.read()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # ZIP64 end record and locator
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        weights = zf.getinfo("model.weights.h5")
        assert weights.file_size > 1000 and weights.flag_bits & 0x08
    assert manager.verify(1)[0].ok
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.get_weights()[0], loaded.get_weights()[0])


def test_first_save_in_fit_uses_the_plan_made_at_train_begin(tmp_path, monkeypatch):
    """Issue 10, item 1: a model compiled and passed straight to fit() has an
    unbuilt optimizer at train begin; the plan made there must already cover
    Adam's slots, so the first save does not re-plan (and allocate) while
    training waits."""
    keras = pytest.importorskip("keras")
    import ckptmgr.state as state_mod
    from ckptmgr.keras import CheckpointCallback

    plans = []
    real_init = state_mod.StatePlan.__init__

    def counting_init(self, model):
        real_init(self, model)
        plans.append(sum(len(g.values) for g in self.groups))

    monkeypatch.setattr(state_mod.StatePlan, "__init__", counting_init)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    assert not model.optimizer.built
    x, y = np.ones((64, 8), "float32"), np.ones((64, 1), "float32")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[CheckpointCallback(tmp_path / "ck", save_freq=3, on_busy="wait")])
    assert len(plans) == 1, plans  # planned once, at train begin
    assert plans[0] == len(model.weights) + len(model.optimizer.variables)  # slots included
    assert CheckpointManager(tmp_path / "ck").steps() == [3, 6, 9, 12, 15, 16]


def test_ranks_verify_disjoint_shares_that_cover_every_chunk(tmp_path, monkeypatch):
    """Issue 10, item 6: N ranks verify an archive together, each reading only
    its share of the chunks; a flipped byte is reported by the one rank whose
    share holds it."""
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", CHUNK)
    manager = CheckpointManager(tmp_path / "ck")
    entry = manager.write_snapshot(1, _snapshot()).archive_entry
    chunks = len(entry.crc32c)
    path = manager.local_archive_path(1)
    world = 3
    assert all(manager.verify_share(1, rank, world) is None for rank in range(world))
    for index in (0, 7, chunks - 1):
        start, end = entry.chunk_range(index)
        _flip(path, start)
        problems = {rank: manager.verify_share(1, rank, world) for rank in range(world)}
        _flip(path, start)
        assert [r for r, p in problems.items() if p] == [index % world]
        assert f"(chunk {index + 1} of {chunks})" in problems[index % world]
    assert manager.quick_check(1) is None
    with open(path, "ab") as f:
        f.write(b"x")
    assert "truncated or altered" in manager.quick_check(1)


@pytest.mark.parametrize("backend", ["gcs", "s3"], indirect=True)
def test_remote_restore_downloads_chunks_in_parallel_and_checks_each(backend, monkeypatch):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", CHUNK)
    manager = CheckpointManager(backend.url, storage_options=backend.storage_options)
    manifest = manager.write_snapshot(1, _snapshot())
    with manager.verified_archive(1) as (_, local):
        with open(local, "rb") as f:
            downloaded = f.read()
    with manager.storage.open_archive(manifest.archive) as f:
        assert downloaded == f.read()
    fs, _ = backend.fs()
    remote = manager.storage.url_of(manifest.archive)
    data = bytearray(downloaded)
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(fs._strip_protocol(remote), bytes(data))  # bit rot in place
    with pytest.raises(Exception, match=r"is corrupt \(CRC32C of bytes .* \(chunk \d+ of \d+\)"):
        with manager.verified_archive(1):
            pass

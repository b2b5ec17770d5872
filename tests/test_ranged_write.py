"""Issue 10, item 5: replica-parallel persistence on real backends. Ranks
write disjoint byte ranges of one archive straight to storage; the coordinator
writes the tail and assembles it server-side (GCS compose on fake-gcs-server,
S3 multipart part-copies on moto, positioned writes on local disk). The
result is byte-identical to a single writer's archive and verifies; a rank
that fails mid-range leaves nothing listed."""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import ckptmgr.io.checksums as checksums_mod
from ckptmgr import CheckpointManager
from ckptmgr.errors import DistributedSaveError
from ckptmgr.io.archive_plan import write_keras_archive
from ckptmgr.io.snapshot import ModelSnapshot, VarGroup
from ckptmgr.io.storage import Storage
from ckptmgr.ranged_write import write_assigned_range

MiB = 1024 * 1024


def _snapshot() -> ModelSnapshot:
    rng = np.random.default_rng(3)
    big = rng.normal(size=(1000, 1000)).astype("float32")  # 4 MB
    return ModelSnapshot(
        config_json='{"class_name": "Sequential", "config": {"name": "r"}}',
        metadata_json='{"keras_version": "3.15.1", "date_saved": "2026-12-01@10:11:12"}',
        groups=[
            VarGroup("layers/dense/vars", {"name": "dense"}, [("0", big), ("1", big[0].copy())]),
            VarGroup("optimizer/vars", {}, [("0", np.array(7, "int64")), ("1", big + 1), ("2", big + 2)]),
        ],
    )


def _single_writer_bytes(snapshot) -> bytes:
    out = io.BytesIO()
    write_keras_archive(out, snapshot)
    return out.getvalue()


def _ranks(backend, snapshot, fail_rank: int | None = None):
    """A dispatch that runs every assignment in its own thread, as a rank with
    its own Storage (processes in production)."""
    def dispatch(assignments):
        def run(assignment):
            if assignment.index == fail_rank:
                raise DistributedSaveError(f"rank {fail_rank} died mid-range")
            storage = Storage(backend.url, backend.storage_options)
            return write_assigned_range(storage, snapshot, assignment)

        with ThreadPoolExecutor(len(assignments)) as pool:
            return list(pool.map(run, assignments))
    return dispatch


@pytest.mark.parametrize("writers", [2, 3])
@pytest.mark.parametrize("backend", ["local", "gcs", "s3"], indirect=True)
def test_ranges_from_several_writers_make_the_single_writer_archive(backend, monkeypatch, writers):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", MiB)  # ranges of a 12 MB archive
    snapshot = _snapshot()
    manager = CheckpointManager(backend.url, storage_options=backend.storage_options)
    manifest, ours = manager._committer.write_ranges(5, snapshot.spec(), writers, _ranks(backend, snapshot))
    assert ours
    entry = manifest.archive_entry
    assert entry.chunk_bytes == MiB and len(entry.crc32c) == -(-entry.bytes // MiB)
    with manager.storage.open_archive(manifest.archive) as f:
        data = f.read()
    assert data == _single_writer_bytes(snapshot)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
    assert manager.verify(5)[0].ok
    fs, root = backend.fs()
    assert not [p for p in fs.find(root) if "/.tmp/" in p and ".part" in p]  # parts removed


@pytest.mark.parametrize("backend", ["local", "gcs", "s3"], indirect=True)
def test_a_rank_failing_mid_range_leaves_nothing_listed(backend, monkeypatch):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", MiB)
    snapshot = _snapshot()
    manager = CheckpointManager(backend.url, storage_options=backend.storage_options)
    with pytest.raises(DistributedSaveError, match="rank 1 died"):
        manager._committer.write_ranges(5, snapshot.spec(), 2, _ranks(backend, snapshot, fail_rank=1))
    assert manager.steps() == [] and manager.storage.archives() == []
    manager.write_snapshot(6, snapshot)  # the directory works on
    assert manager.steps() == [6] and manager.verify(6)[0].ok


def test_a_rank_planning_another_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", MiB)
    snapshot = _snapshot()
    other = _snapshot()
    other.groups[0].attrs["name"] = "another"  # not the replicated state the plan says
    manager = CheckpointManager(tmp_path / "ck")

    def dispatch(assignments):
        return [write_assigned_range(Storage(str(tmp_path / "ck")), other, a) for a in assignments]

    with pytest.raises(DistributedSaveError, match="plans another archive"):
        manager._committer.write_ranges(5, snapshot.spec(), 2, dispatch)
    assert manager.steps() == []

"""Issue 10, item 5 (the format side): the archive's layout is fixed before
any byte is written, so disjoint byte ranges written separately, then the
tail, give exactly the single-writer archive, which stock Keras opens."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from ckptmgr.io.archive_plan import planned_archive, split_ranges, write_keras_archive, write_range
from ckptmgr.io.snapshot import ArraySpec, ModelSnapshot, VarGroup

MiB = 1024 * 1024


def _snapshot(seed: int = 0) -> ModelSnapshot:
    rng = np.random.default_rng(seed)
    big = rng.normal(size=(700, 1000)).astype("float32")  # 2.8 MB
    return ModelSnapshot(
        config_json='{"class_name": "Sequential", "config": {"name": "p"}}',
        metadata_json='{"keras_version": "3.15.1", "date_saved": "2026-12-01@10:11:12"}',
        groups=[
            VarGroup("layers/dense/vars", {"name": "dense"}, [("0", big), ("1", rng.normal(size=1000).astype("float32"))]),
            VarGroup("optimizer/vars", {}, [("0", np.array(7, "int64")), ("1", big * 2), ("2", big * 3)]),
        ],
        assets={"layers/string_lookup/vocabulary.txt": b"a\nb\nc\n"},
    )


def _single(snapshot: ModelSnapshot) -> bytes:
    out = io.BytesIO()
    write_keras_archive(out, snapshot)
    return out.getvalue()


@pytest.mark.parametrize("writers", [1, 2, 3, 5])
def test_ranges_then_tail_equal_the_single_writer_archive(writers):
    snapshot = _snapshot()
    expected = _single(snapshot)
    with planned_archive(snapshot.spec()) as plan:  # the coordinator's plan: no array data
        ranges = split_ranges(plan, writers, align=MiB, min_bytes=MiB)
        assert len(ranges) == min(writers, len(ranges)) and ranges[0][0] == 0
        assert ranges[-1][1] == plan.prefix_end
        assert all(a % MiB == 0 for a, _ in ranges) and all(b > a for a, b in ranges)
        assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
        fingerprint = plan.fingerprint()
        buffer = bytearray(plan.total)
        crcs = []
        for a, b in reversed(ranges):  # any order: each rank writes its own range
            with planned_archive(snapshot) as own:  # each rank plans from its own arrays
                assert own.fingerprint() == fingerprint
                piece = io.BytesIO()
                crcs.append((write_range(piece, own, snapshot, a, b), max(b, own.weights_start) - max(a, own.weights_start)))
                buffer[a:b] = piece.getvalue()
        from ckptmgr.io.checksums import crc32_combine

        crc = 0
        for value, length in reversed(crcs):
            crc = crc32_combine(crc, value, length)
        buffer[plan.prefix_end:] = plan.tail(crc)
    assert bytes(buffer) == expected
    with zipfile.ZipFile(io.BytesIO(expected)) as zf:
        assert zf.testzip() is None
        assert zf.read("assets/layers/string_lookup/vocabulary.txt") == b"a\nb\nc\n"


def test_a_spec_cannot_write_array_bytes():
    snapshot = _snapshot()
    with planned_archive(snapshot.spec()) as plan:
        with pytest.raises(ValueError, match="only a rank holding it can write"):
            write_range(io.BytesIO(), plan, snapshot.spec(), 0, plan.prefix_end)


def test_spec_keeps_small_arrays_and_describes_large_ones():
    spec = _snapshot().spec()
    arrays = dict(spec.groups[1].arrays)
    assert isinstance(arrays["1"], ArraySpec) and arrays["1"].nbytes == 700 * 1000 * 4
    assert isinstance(arrays["0"], np.ndarray) and int(arrays["0"]) == 7


def test_split_ranges_respects_the_minimum_part():
    with planned_archive(_snapshot().spec()) as plan:
        size = plan.prefix_end
        assert 8 * MiB < size < 9 * MiB
        # 64 writers, 5 MiB parts: [0, 5), [5, 8.03) is too short, so one writer.
        assert split_ranges(plan, 64, align=MiB, min_bytes=5 * MiB) == [(0, size)]
        # 3 MiB parts: [0, 3), [3, 6), [6, 8.03) would end short: merged.
        assert split_ranges(plan, 64, align=MiB, min_bytes=3 * MiB) == [(0, 3 * MiB), (3 * MiB, size)]
        assert split_ranges(plan, 3, align=MiB, min_bytes=MiB) == [(0, 3 * MiB), (3 * MiB, 6 * MiB), (6 * MiB, size)]
        assert split_ranges(plan, 1, align=MiB, min_bytes=MiB) == [(0, size)]


def test_large_big_endian_arrays_keep_their_values(tmp_path):
    """Review finding: a large '>f4' array was declared big-endian in the HDF5
    file while its native (little-endian) bytes were written: it verified and
    loaded byte-swapped."""
    import h5py

    from ckptmgr import CheckpointManager

    values = np.arange(40_000, dtype="float32").reshape(200, 200)
    snapshot = ModelSnapshot("{}", '{"keras_version": "3.15.1"}',
                             [VarGroup("layers/dense/vars", {}, [("0", values.astype(">f4"))])])
    manager = CheckpointManager(tmp_path / "ck")
    manager.write_snapshot(1, snapshot)
    assert manager.verify(1)[0].ok
    with zipfile.ZipFile(manager.local_archive_path(1)) as zf:
        zf.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as f:
        np.testing.assert_array_equal(f["layers/dense/vars/0"][...], values)

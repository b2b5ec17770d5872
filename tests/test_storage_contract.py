"""One storage contract, run against every backend: local disk, ``memory://``,
gcsfs on fake-gcs-server, s3fs on moto (real servers on 127.0.0.1).

What any ``ckptmgr.storage.Storage`` must guarantee, whatever the backend:
only manifested steps are listed; a step is never overwritten; a failed or
interrupted write or delete leaves at most unlisted orphans, which ``sweep``
removes after a grace time; a backend failure never reads as "no checkpoints".

"""

from __future__ import annotations

import hashlib
import os
import pickle

import fsspec
import pytest

import ckptmgr.storage as storage_mod
from ckptmgr.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
)
from ckptmgr.storage import Storage
from servers import S3Server

OBJECT_STORES = ("gcs", "s3")


def _commit(s: Storage, step: int, data: bytes = b"archive", manifest: bytes | None = None):
    with s.open_archive_writer(step) as w:
        w.write(data)
    s.write_manifest(step, manifest if manifest is not None else b'{"step": %d}' % step)
    return w


def _exists(backend, path: str) -> bool:
    """Ask the backend itself, through a fresh filesystem with no cache."""
    fs, _ = backend.fs()
    return fs.exists(path)


def _cat(backend, path: str) -> bytes:
    fs, _ = backend.fs()
    return fs.cat_file(path)


@pytest.fixture
def s(backend) -> Storage:
    return backend.storage()


# -- listing -------------------------------------------------------------------


def test_empty_directory_lists_nothing(s):
    assert s.committed_steps() == []
    assert s.pinned_steps() == set()
    assert s.is_committed(1) is False
    assert s.orphans(0) == []
    assert s.sweep(0) == []


def test_commit_then_read_back(backend, s):
    data = os.urandom(100_000)
    _commit(s, 5, data, b'{"step": 5}')

    assert s.committed_steps() == [5]
    assert s.is_committed(5) and not s.is_committed(6)
    assert s.read_manifest_bytes(5) == b'{"step": 5}'
    assert s.archive_size(5) == len(data)
    assert b"".join(s.iter_archive_chunks(5)) == data
    with s.open_archive(5) as f:
        assert f.seekable()
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read(4) == data[:4]
    assert _cat(backend, s.archive_path(5)) == data
    assert s.orphans(0) == []
    if backend.name == "local":
        assert s.local_archive_path(5) == s.archive_path(5)
        with open(s.local_archive_path(5), "rb") as f:
            assert f.read() == data
    else:
        assert s.local_archive_path(5) is None


def test_steps_listed_in_numeric_order(s):
    for step in (10, 2, 1_000_000_000, 0):
        _commit(s, step)
    assert s.committed_steps() == [0, 2, 10, 1_000_000_000]


def test_foreign_files_are_ignored(backend, s):
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/README.txt", b"hello")
    fs.pipe_file(f"{root}/ckpt-12.json", b"{}")  # too few digits: not ours
    fs.pipe_file(f"{root}/ckpt-000000003.json.bak", b"{}")
    assert s.committed_steps() == []
    assert s.pinned_steps() == set()
    assert s.orphans(0) == []


def test_trailing_slash_is_the_same_directory(backend, s):
    _commit(s, 1)
    assert Storage(backend.url + "/", backend.storage_options).committed_steps() == [1]


# -- orphans and sweep ----------------------------------------------------------


def test_archive_without_manifest_is_an_orphan(backend, s):
    _commit(s, 1, b"kept")
    # A write that crashed before its manifest: the archive alone.
    with s.open_archive_writer(3) as w:
        w.write(b"half a checkpoint")
    orphan = s.archive_path(3)

    assert s.committed_steps() == [1]
    assert not s.is_committed(3)
    assert s.orphans(0) == [orphan]
    assert s.orphans(3600) == []

    assert s.sweep(3600) == []  # within the grace time: maybe a write in flight
    assert _exists(backend, orphan)

    assert s.sweep(0) == [s.archive_url(3)]
    assert not _exists(backend, orphan)
    assert s.orphans(0) == []
    assert s.committed_steps() == [1]
    assert b"".join(s.iter_archive_chunks(1)) == b"kept"


def test_leftovers_in_tmp_dir_are_swept(backend, s):
    _commit(s, 1)
    fs, root = backend.fs()
    leftover = f"{root}/.tmp/ckpt-000000002.keras.0123abcd.part"
    fs.pipe_file(leftover, b"partial")

    assert s.committed_steps() == [1]
    assert [p.rstrip("/").rsplit("/", 1)[-1] for p in s.orphans(0)] == [
        "ckpt-000000002.keras.0123abcd.part"
    ]
    assert s.sweep(3600) == []
    assert len(s.sweep(0)) == 1
    assert not _exists(backend, leftover)
    assert s.committed_steps() == [1]


def test_pin_of_uncommitted_step_is_an_orphan(backend, s):
    _commit(s, 1)
    s.write_pin(1, True)
    s.write_pin(4, True)  # e.g. left by a delete that crashed
    assert s.pinned_steps() == {1, 4}
    assert s.orphans(0) == [s.archive_path(4).replace(".keras", ".pin")]
    s.sweep(0)
    assert s.pinned_steps() == {1}


# -- never overwrite --------------------------------------------------------------


def test_committed_step_cannot_be_overwritten(backend, s):
    _commit(s, 7, b"original", b'{"v": 1}')

    with pytest.raises(CheckpointExistsError):
        with s.open_archive_writer(7) as w:
            w.write(b"replacement")
    with pytest.raises(CheckpointExistsError):
        s.write_manifest(7, b'{"v": 2}')

    assert s.read_manifest_bytes(7) == b'{"v": 1}'
    assert _cat(backend, s.archive_path(7)) == b"original"
    assert isinstance(CheckpointExistsError("x"), FileExistsError)


def test_manifest_write_is_create_only(request, backend, s):
    """A concurrent commit between the existence check and the put must not be
    overwritten: the put itself has to be create-if-absent."""
    _commit(s, 7, b"original", b'{"v": 1}')
    # Simulate the race: the check ran before the other writer's commit landed.
    s._exists = lambda path: False  # type: ignore[method-assign]
    with pytest.raises(CheckpointExistsError):
        s.write_manifest(7, b'{"v": 2}')
    assert _cat(backend, f"{backend.fs()[1]}/ckpt-000000007.json") == b'{"v": 1}'


# -- failed writes ------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_exception_in_writer_leaves_nothing(request, backend, s):
    with pytest.raises(Boom):  # the caller's exception, not translated
        with s.open_archive_writer(2) as w:
            w.write(b"x" * 1000)
            raise Boom("serialisation failed")

    assert s.committed_steps() == []
    assert not s.is_committed(2)
    assert not _exists(backend, s.archive_path(2))
    assert s.orphans(0) == []
    # The step is still free.
    _commit(s, 2, b"second try")
    assert b"".join(s.iter_archive_chunks(2)) == b"second try"


def test_writer_reports_sha256_and_size_of_stored_bytes(backend, s):
    pieces = [b"PK\x03\x04", bytearray(os.urandom(70_001)), memoryview(os.urandom(3)), b""]
    with s.open_archive_writer(1) as w:
        for piece in pieces:
            assert w.write(piece) == len(piece)
        assert w.tell() == sum(len(p) for p in pieces)
    stored = _cat(backend, s.archive_path(1))
    assert w.bytes_written == len(stored) == sum(len(p) for p in pieces)
    assert w.hexdigest() == hashlib.sha256(stored).hexdigest()
    assert not w.seekable() and w.writable()


def test_large_archive_in_many_writes(monkeypatch, backend, s):
    """~40 MB in unaligned writes; with small blocks this is a multipart (S3)
    or resumable chunked (GCS) upload of several parts."""
    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 2 * 1024 * 1024)  # blocks of 8 MiB
    piece = os.urandom(4_000_037)
    sha = hashlib.sha256()
    with s.open_archive_writer(40) as w:
        for i in range(10):
            chunk = piece[i:] + piece[:i]
            w.write(chunk)
            sha.update(chunk)
    size = 10 * len(piece)
    assert w.bytes_written == size
    assert w.hexdigest() == sha.hexdigest()
    s.write_manifest(40, b"{}")

    assert s.committed_steps() == [40]
    assert s.archive_size(40) == size
    read = hashlib.sha256()
    n = 0
    for chunk in s.iter_archive_chunks(40):
        assert len(chunk) <= storage_mod.CHUNK_BYTES
        read.update(chunk)
        n += len(chunk)
    assert (n, read.hexdigest()) == (size, sha.hexdigest())
    if backend.name == "s3":  # it really was a multipart upload
        fs, _ = backend.fs()
        etag = fs.info(s.archive_path(40))["ETag"].strip('"')
        assert int(etag.rsplit("-", 1)[1]) >= 3, etag  # "<md5>-<number of parts>"


def test_failed_large_upload_leaves_nothing(request, monkeypatch, backend, s):
    """Abort after several parts went up: no object, no pending upload."""
    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 2 * 1024 * 1024)
    piece = os.urandom(4 * 1024 * 1024)
    with pytest.raises(Boom):
        with s.open_archive_writer(41) as w:
            for _ in range(5):  # 20 MiB: two 8 MiB parts already uploaded
                w.write(piece)
            raise Boom("worker died")
    assert not _exists(backend, s.archive_path(41))
    assert s.committed_steps() == []
    assert s.orphans(0) == []
    if backend.name == "s3":
        fs, _ = backend.fs()
        bucket, key, _ = fs.split_path(s.archive_path(41))
        pending = fs.list_multipart_uploads(bucket)
        assert [u for u in pending if u.get("Key") == key] == []


# -- delete and pins ------------------------------------------------------------------


def test_delete_removes_manifest_first(backend, s):
    _commit(s, 1)
    _commit(s, 2)
    s.write_pin(2, True)
    removed = []
    real_rm = s.fs.rm_file

    def spy(path, *a, **k):
        removed.append(path.rstrip("/").rsplit("/", 1)[-1])
        return real_rm(path, *a, **k)

    s.fs.rm_file = spy
    s.delete(2)
    assert removed[0] == "ckpt-000000002.json"
    assert set(removed) == {"ckpt-000000002.json", "ckpt-000000002.keras", "ckpt-000000002.pin"}

    assert s.committed_steps() == [1]
    assert s.pinned_steps() == set()
    assert not _exists(backend, s.archive_path(2))
    assert s.orphans(0) == []
    s.delete(2)  # deleting again (or a step that never existed) is a no-op
    s.delete(99)


def test_interrupted_delete_leaves_only_an_unlisted_orphan(monkeypatch, backend, s):
    _commit(s, 3, b"data")

    def crash(name):
        if name == "delete_after_manifest":
            raise Boom(name)

    monkeypatch.setattr(storage_mod.faults, "crash_point", crash)
    with pytest.raises(Boom):
        s.delete(3)
    assert s.committed_steps() == []
    assert s.orphans(0) == [s.archive_path(3)]
    assert s.sweep(0) == [s.archive_url(3)]
    assert not _exists(backend, s.archive_path(3))


def test_pins_set_and_unset(s):
    _commit(s, 1)
    _commit(s, 2)
    assert s.pinned_steps() == set()
    s.write_pin(1, True)
    s.write_pin(1, True)  # idempotent
    assert s.pinned_steps() == {1}
    assert s.committed_steps() == [1, 2]  # a pin is not a commit
    s.write_pin(1, False)
    s.write_pin(1, False)  # idempotent
    s.write_pin(2, False)  # never pinned
    assert s.pinned_steps() == set()
    assert s.committed_steps() == [1, 2]


# -- reading errors ----------------------------------------------------------------


def test_missing_step_raises_not_found(s):
    _commit(s, 1)
    with pytest.raises(CheckpointNotFoundError):
        s.read_manifest_bytes(9)
    with pytest.raises(CheckpointNotFoundError):
        s.archive_size(9)
    with pytest.raises(CheckpointNotFoundError):
        with s.open_archive(9):
            pass
    with pytest.raises(CheckpointNotFoundError):
        list(s.iter_archive_chunks(9))
    with pytest.raises(FileNotFoundError):  # also a built-in
        s.read_manifest_bytes(9)


def test_missing_step_in_missing_directory_raises_not_found(backend):
    s = backend.storage(backend.new_url())
    with pytest.raises(CheckpointNotFoundError):
        s.read_manifest_bytes(1)
    with pytest.raises(CheckpointNotFoundError):
        s.archive_size(1)


# -- urls, pickling, several instances -------------------------------------------------


def test_archive_url_round_trips_through_fsspec(backend, s):
    data = os.urandom(5000)
    _commit(s, 12, data)
    url = s.archive_url(12)
    assert url.endswith("/ckpt-000000012.keras")
    if backend.name != "local":
        assert url.startswith(backend.url.split("://")[0] + "://")
    with fsspec.open(url, "rb", **backend.storage_options) as f:
        assert f.read() == data


def test_storage_pickles_as_url_and_options(backend, s):
    _commit(s, 1)
    s.write_pin(1, True)
    clone = pickle.loads(pickle.dumps(s))
    assert clone is not s and clone.fs is not None
    assert (clone.url, clone.storage_options) == (s.url, s.storage_options)
    assert clone.committed_steps() == [1]
    assert clone.pinned_steps() == {1}
    _commit(clone, 2)
    assert s.committed_steps() == [1, 2]


def test_second_instance_sees_writes_of_the_first(request, backend):
    """Two processes on one directory (e.g. trainer and ``ckptmgr list``):
    what one commits, the other sees, even after it has listed once."""
    reader, writer = backend.storage(), backend.storage()
    _commit(writer, 0)
    assert reader.committed_steps() == [0]  # fills the reader's listing cache
    assert not reader.is_committed(1)
    _commit(writer, 1, b"abc")
    assert reader.is_committed(1)
    assert reader.archive_size(1) == 3
    assert b"".join(reader.iter_archive_chunks(1)) == b"abc"
    with pytest.raises(CheckpointExistsError):
        reader.write_manifest(1, b"{}")


# -- configuration and backend errors ---------------------------------------------------


@pytest.mark.parametrize("url", ["nosuch://x", "", "   "])
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError) as info:
        Storage(url)
    assert isinstance(info.value, ValueError)
    assert "Received" in str(info.value)


@pytest.mark.parametrize("store", OBJECT_STORES)
def test_missing_bucket_is_an_error_not_an_empty_run(request, store):
    """A typo in the bucket must not read as "no checkpoints yet" (resume would
    silently start from scratch) nor create the bucket on the first save.
    (Buckets exist only on object stores.)"""
    server = request.getfixturevalue(f"{store}_server")
    scheme = "gs" if store == "gcs" else "s3"
    bucket = "no-such-bucket-0f3c9a"
    s = Storage(f"{scheme}://{bucket}/run-1", server.storage_options)
    with pytest.raises(StorageError):
        s.committed_steps()
    with pytest.raises(StorageError):
        with s.open_archive_writer(1) as w:
            w.write(b"x")
    assert not server.fs().exists(bucket)


@pytest.fixture(scope="module")
def s3_server_denying():
    """A moto server that rejects every access key (auth on from the start)."""
    with S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}, create_bucket=False) as srv:
        yield srv


def test_s3_wrong_credentials_are_storage_errors(s3_server_denying):
    srv = s3_server_denying
    s = Storage(srv.new_url(), srv.storage_options)
    calls = {
        "committed_steps": s.committed_steps,
        "pinned_steps": s.pinned_steps,
        "is_committed": lambda: s.is_committed(1),
        "read_manifest_bytes": lambda: s.read_manifest_bytes(1),
        "archive_size": lambda: s.archive_size(1),
        "orphans": lambda: s.orphans(0),
        "write_manifest": lambda: s.write_manifest(1, b"{}"),
        "write_pin": lambda: s.write_pin(1, True),
        "delete": lambda: s.delete(1),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, CheckpointNotFoundError), name
        assert "Permission denied" in str(info.value), name
    with pytest.raises(StorageError):
        with s.open_archive_writer(1) as w:
            w.write(b"x")

"""One storage contract, run against every backend: local disk, ``memory://``,
gcsfs on fake-gcs-server, s3fs on moto (real servers on 127.0.0.1).

What any ``ckptmgr.io.storage.Storage`` must guarantee, whatever the backend:
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

import google_crc32c

import ckptmgr.io.checksums as checksums_mod
import ckptmgr.io.storage as storage_mod
from ckptmgr.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    StorageError,
)
from ckptmgr.io.layout import archive_name
from ckptmgr.io.storage import Storage
from servers import S3Server

OBJECT_STORES = ("gcs", "s3")
ATTEMPT = "0123456789ab"


def A(step: int) -> str:
    """The archive name these tests write for ``step``."""
    return archive_name(step, ATTEMPT)


def _path(s: Storage, name: str) -> str:
    return f"{s.root}/{name}"


def _commit(s: Storage, step: int, data: bytes = b"archive", manifest: bytes | None = None):
    with s.open_archive_writer(A(step)) as w:
        w.write(data)
    s.write_manifest(step, manifest if manifest is not None else b'{"step": %d}' % step)
    return w


def _later(backend) -> None:
    """Let modification times move on (S3 keeps whole seconds)."""
    import time

    time.sleep(1.1 if backend.name == "s3" else 0.02)


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
    assert s.file_size(A(5)) == len(data)
    assert b"".join(s.iter_archive_chunks(A(5))) == data
    with s.open_archive(A(5)) as f:
        assert f.seekable()
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
        f.seek(0)
        assert f.read(4) == data[:4]
    assert _cat(backend, _path(s, A(5))) == data
    assert s.orphans(0, {5: A(5)}) == []
    if backend.name == "local":
        assert s.local_path_of(A(5)) == _path(s, A(5))
        with open(s.local_path_of(A(5)), "rb") as f:
            assert f.read() == data
    else:
        assert s.local_path_of(A(5)) is None


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
    with s.open_archive_writer(A(3)) as w:
        w.write(b"half a checkpoint")
    orphan = A(3)
    keep = {1: A(1)}

    assert s.committed_steps() == [1]
    assert not s.is_committed(3)
    # Younger than the newest manifest: maybe another writer's attempt in flight.
    assert s.orphans(0, keep) == []
    _later(backend)
    _commit(s, 4)
    keep[4] = A(4)
    assert s.orphans(0, keep) == [orphan]
    assert s.orphans(3600, keep) == []

    assert s.sweep(3600, keep) == []  # within the grace time: maybe a write in flight
    assert _exists(backend, _path(s, orphan))

    assert s.sweep(0, keep) == [s.url_of(orphan)]
    assert not _exists(backend, _path(s, orphan))
    assert s.orphans(0, keep) == []
    assert s.committed_steps() == [1, 4]
    assert b"".join(s.iter_archive_chunks(A(1))) == b"kept"


def test_leftovers_in_tmp_dir_are_swept(backend, s):
    _commit(s, 1)
    fs, root = backend.fs()
    leftover = f"{root}/.tmp/ckpt-000000002.keras.0123abcd.part"
    fs.pipe_file(leftover, b"partial")
    _later(backend)
    _commit(s, 3)

    assert s.committed_steps() == [1, 3]
    assert s.orphans(0, {1: A(1), 3: A(3)}) == [".tmp/ckpt-000000002.keras.0123abcd.part"]
    assert s.sweep(3600, {1: A(1), 3: A(3)}) == []
    assert len(s.sweep(0, {1: A(1), 3: A(3)})) == 1
    assert not _exists(backend, leftover)
    assert s.committed_steps() == [1, 3]


def test_pin_of_uncommitted_step_is_an_orphan(backend, s):
    _commit(s, 1)
    s.write_pin(1, True)
    s.write_pin(4, True)  # e.g. left by a delete that crashed
    _later(backend)
    _commit(s, 5)
    assert s.pinned_steps() == {1, 4}
    assert s.orphans(0, {1: A(1), 5: A(5)}) == ["ckpt-000000004.pin"]
    s.sweep(0, {1: A(1), 5: A(5)})
    assert s.pinned_steps() == {1}


# -- never overwrite --------------------------------------------------------------


def test_committed_step_cannot_be_overwritten(backend, s):
    _commit(s, 7, b"original", b'{"v": 1}')

    # Another writer's attempt of the same step goes to its own name...
    other = archive_name(7, "ffffffffffff")
    with s.open_archive_writer(other) as w:
        w.write(b"replacement")
    # ...and cannot commit: the manifest is created only if absent.
    with pytest.raises(CheckpointExistsError):
        s.write_manifest(7, b'{"v": 2}')

    assert s.read_manifest_bytes(7) == b'{"v": 1}'
    assert _cat(backend, _path(s, A(7))) == b"original"
    assert _cat(backend, _path(s, other)) == b"replacement"
    assert isinstance(CheckpointExistsError("x"), FileExistsError)
    if backend.name == "local":  # local archives are linked into place, create-only too
        with pytest.raises(CheckpointExistsError):
            with s.open_archive_writer(A(7)) as w:
                w.write(b"same name")
        assert _cat(backend, _path(s, A(7))) == b"original"


# -- failed writes ------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_exception_in_writer_leaves_nothing(request, backend, s):
    with pytest.raises(Boom):  # the caller's exception, not translated
        with s.open_archive_writer(A(2)) as w:
            w.write(b"x" * 1000)
            raise Boom("serialisation failed")

    assert s.committed_steps() == []
    assert not s.is_committed(2)
    assert not _exists(backend, _path(s, A(2)))
    assert s.orphans(0) == []
    # The step is still free.
    _commit(s, 2, b"second try")
    assert b"".join(s.iter_archive_chunks(A(2))) == b"second try"


@pytest.mark.parametrize("algorithm", ["crc32c", "sha256"])
def test_writer_reports_checksums_and_size_of_stored_bytes(monkeypatch, backend, s, algorithm):
    monkeypatch.setattr(checksums_mod, "CHUNK_BYTES", 32 * 1024)  # several chunks, a short last one
    pieces = [b"PK\x03\x04", bytearray(os.urandom(70_001)), memoryview(os.urandom(3)), b""]
    with s.open_archive_writer(A(1), algorithm) as w:
        for piece in pieces:
            assert w.write(piece) == len(piece)
        assert w.tell() == sum(len(p) for p in pieces)
    stored = _cat(backend, _path(s, A(1)))
    assert w.bytes_written == len(stored) == sum(len(p) for p in pieces)
    crcs, sha256 = w.result()
    step = w.chunk_bytes
    assert step == 32 * 1024
    assert crcs == [f"{google_crc32c.value(stored[i:i + step]):08x}" for i in range(0, len(stored), step)]
    assert len(crcs) == 3
    assert sha256 == (hashlib.sha256(stored).hexdigest() if algorithm == "sha256" else None)
    assert not w.seekable() and w.writable()


def test_large_archive_in_many_writes(monkeypatch, backend, s):
    """~40 MB in unaligned writes; with small blocks this is a multipart (S3)
    or resumable chunked (GCS) upload of several parts."""
    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 2 * 1024 * 1024)  # blocks of 8 MiB
    piece = os.urandom(4_000_037)
    sha = hashlib.sha256()
    with s.open_archive_writer(A(40)) as w:
        for i in range(10):
            chunk = piece[i:] + piece[:i]
            w.write(chunk)
            sha.update(chunk)
    size = 10 * len(piece)
    assert w.bytes_written == size
    assert len(w.result()[0]) == -(-size // w.chunk_bytes)
    s.write_manifest(40, b"{}")

    assert s.committed_steps() == [40]
    assert s.file_size(A(40)) == size
    read = hashlib.sha256()
    n = 0
    for chunk in s.iter_archive_chunks(A(40)):
        assert len(chunk) <= storage_mod.CHUNK_BYTES
        read.update(chunk)
        n += len(chunk)
    assert (n, read.hexdigest()) == (size, sha.hexdigest())
    if backend.name == "s3":  # it really was a multipart upload
        fs, _ = backend.fs()
        etag = fs.info(_path(s, A(40)))["ETag"].strip('"')
        assert int(etag.rsplit("-", 1)[1]) >= 3, etag  # "<md5>-<number of parts>"


def test_failed_large_upload_leaves_nothing(request, monkeypatch, backend, s):
    """Abort after several parts went up: no object, no pending upload."""
    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 2 * 1024 * 1024)
    piece = os.urandom(4 * 1024 * 1024)
    with pytest.raises(Boom):
        with s.open_archive_writer(A(41)) as w:
            for _ in range(5):  # 20 MiB: two 8 MiB parts already uploaded
                w.write(piece)
            raise Boom("worker died")
    assert not _exists(backend, _path(s, A(41)))
    assert s.committed_steps() == []
    assert s.orphans(0) == []
    if backend.name == "s3":
        fs, _ = backend.fs()
        bucket, key, _ = fs.split_path(_path(s, A(41)))
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
    assert set(removed) == {"ckpt-000000002.json", A(2), "ckpt-000000002.pin"}

    assert s.committed_steps() == [1]
    assert s.pinned_steps() == set()
    assert not _exists(backend, _path(s, A(2)))
    assert s.orphans(0, {1: A(1)}) == []
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
    # With no manifest left, nothing dates an attempt in flight: all is kept...
    assert s.orphans(0) == []
    _later(backend)
    _commit(s, 4)
    # ...until a newer commit shows the leftover is older than it.
    assert s.orphans(0, {4: A(4)}) == [A(3)]
    assert s.sweep(0, {4: A(4)}) == [s.url_of(A(3))]
    assert not _exists(backend, _path(s, A(3)))


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
        s.file_size(A(9))
    with pytest.raises(CheckpointNotFoundError):
        with s.open_archive(A(9)):
            pass
    with pytest.raises(CheckpointNotFoundError):
        list(s.iter_archive_chunks(A(9)))
    with pytest.raises(FileNotFoundError):  # also a built-in
        s.read_manifest_bytes(9)


def test_missing_step_in_missing_directory_raises_not_found(backend):
    s = backend.storage(backend.new_url())
    with pytest.raises(CheckpointNotFoundError):
        s.read_manifest_bytes(1)
    with pytest.raises(CheckpointNotFoundError):
        s.file_size(A(1))


# -- urls, pickling, several instances -------------------------------------------------


def test_archive_url_round_trips_through_fsspec(backend, s):
    data = os.urandom(5000)
    _commit(s, 12, data)
    url = s.url_of(A(12))
    assert url.endswith(f"/{A(12)}")
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
    assert reader.file_size(A(1)) == 3
    assert b"".join(reader.iter_archive_chunks(A(1))) == b"abc"
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
        with s.open_archive_writer(A(1)) as w:
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
        "file_size": lambda: s.file_size(A(1)),
        "lease_tokens": s.lease_tokens,
        "create_lease": lambda: s.create_lease(1, b"{}"),
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
        with s.open_archive_writer(A(1)) as w:
            w.write(b"x")


# -- odd entries in the root (issue 8) ------------------------------------------------


def test_stray_and_odd_names_are_ignored_not_fatal(backend, s):
    """Ten-digit names, directories under checkpoint names, a directory in
    ``.tmp``: listing, orphans and sweep ignore them and keep working."""
    _commit(s, 2)
    fs, root = backend.fs()
    fs.pipe_file(f"{root}/ckpt-0000000003.json", b"{}")  # ten digits for step 3: stray
    fs.pipe_file(f"{root}/ckpt-000000004-XYZ.keras", b"x")  # not an attempt id
    fs.pipe_file(f"{root}/ckpt-000000005.json/inside", b"x")  # a "directory" named like a manifest
    fs.pipe_file(f"{root}/.tmp/subdir/file", b"x")  # a directory in .tmp
    _later(backend)
    _commit(s, 6)

    assert s.committed_steps() == [2, 6]
    assert s.archives() and {a.step for a in s.archives()} == {2, 6}
    assert s.orphans(0, {2: A(2), 6: A(6)}) == []
    assert s.sweep(0, {2: A(2), 6: A(6)}) == []
    assert _exists(backend, f"{root}/ckpt-0000000003.json")  # not ours: never deleted
    assert _exists(backend, f"{root}/.tmp/subdir/file")


def test_oversize_manifest_is_read_only_up_to_the_bound(backend, s):
    from ckptmgr.io.manifest import MAX_MANIFEST_BYTES

    _commit(s, 1, b"a", b"x" * (MAX_MANIFEST_BYTES + 5000))
    assert len(s.read_manifest_bytes(1)) == MAX_MANIFEST_BYTES + 1


def test_leases_are_create_only_and_listed_in_order(backend, s):
    assert s.lease_tokens() == []
    s.create_lease(1, b'{"token": 1}')
    s.create_lease(2, b'{"token": 2}')
    with pytest.raises(CheckpointExistsError):
        s.create_lease(2, b'{"token": 2, "other": true}')
    assert s.lease_tokens() == [1, 2]
    assert s.read_lease(2) == b'{"token": 2}'
    s.delete_lease(1)
    assert s.lease_tokens() == [2]
    assert s.committed_steps() == []  # leases are not checkpoints


@pytest.mark.parametrize(
    "url", ["gs:/bucket/run", "s3:bucket/run", "memory:/x"],
)
def test_url_with_one_slash_is_refused_with_a_hint(url):
    """``gs:/bucket`` would otherwise be a local directory named ``gs:``."""
    with pytest.raises(ConfigError) as info:
        Storage(url)
    assert "://" in str(info.value) and url in str(info.value)


def test_local_symlinks_and_fifos_are_never_read_or_followed(tmp_path):
    root = tmp_path / "run"
    s = Storage(str(root))
    _commit(s, 1, b"data", b"{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.part").write_bytes(b"precious")
    os.symlink("/dev/zero", root / "ckpt-000000002.json")
    os.mkfifo(root / "ckpt-000000003.json")
    os.symlink(root / A(1), root / archive_name(4, ATTEMPT))
    (root / "ckpt-000000004.json").write_bytes(b"{}")
    os.rename(root / ".tmp", tmp_path / "old-tmp")
    os.symlink(outside, root / ".tmp")

    from ckptmgr.errors import CorruptCheckpointError

    assert s.committed_steps() == [1, 4]  # the symlink and the FIFO are not listed
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        s.read_manifest_bytes(2)  # and never read, even when asked by step
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        s.read_manifest_bytes(3)  # a FIFO: no hang
    with pytest.raises(CorruptCheckpointError):
        s.file_size(archive_name(4, ATTEMPT))  # symlink: refused, not followed
    with pytest.raises(CorruptCheckpointError):
        with s.open_archive(archive_name(4, ATTEMPT)):
            pass
    assert s.orphans(0, {1: A(1)}) == []
    s.sweep(0, {1: A(1)})
    assert (outside / "victim.part").read_bytes() == b"precious"


def test_sweep_never_takes_the_archive_of_a_step_committed_meanwhile(backend, s):
    """The sweeper read manifests {1}; step 2 commits before it lists: step 2's
    archive is named by a manifest the sweeper never saw, and must stay."""
    _commit(s, 1)
    claimed = {1: A(1)}  # what the sweeper read
    _later(backend)
    _commit(s, 2)  # lands between the sweeper's read and its listing
    _later(backend)
    assert s.sweep(0, claimed) == []
    assert _exists(backend, _path(s, A(2)))
    assert b"".join(s.iter_archive_chunks(A(2))) == b"archive"

"""The fault-injecting proxy (``tests/fault_proxy.py``) against the real
fake-gcs-server and moto servers, driven by gcsfs and s3fs directly.

Also pins down how the two clients react to faults (retries, exception
types); the facts are summed up at the top of ``fault_proxy.py``.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import threading
import time
import uuid

import fsspec
import pytest

from fault_proxy import FaultProxy, Rule, describe_request, object_endswith

OBJECT_STORES = ("gcs", "s3")


class Through:
    """A proxy in front of one server, a filesystem through it, one direct."""

    def __init__(self, name, server, proxy, s3_retries=None):
        self.name = name
        self.server = server
        self.proxy = proxy
        self.bucket = server.bucket
        options = proxy.storage_options_for(server.storage_options)
        if name == "s3" and s3_retries is not None:
            # botocore rewrites this dict in place: build a fresh one each time.
            options["config_kwargs"] = {"retries": {"max_attempts": s3_retries}}
        self.fs = fsspec.filesystem(server.protocol, skip_instance_cache=True, **options)
        self.direct = server.fs()

    def path(self, name: str) -> str:
        return f"{self.bucket}/{uuid.uuid4().hex[:8]}-{name}"


@pytest.fixture(params=OBJECT_STORES)
def through(request):
    name = request.param
    server = request.getfixturevalue("gcs_server" if name == "gcs" else "s3_server")
    if name == "gcs":
        request.getfixturevalue("fast_gcsfs_retries")
    with FaultProxy.for_server(server, seed=0) as proxy:
        # botocore "max_attempts" counts retries: 1 here = 2 attempts in all
        # (backoff random() * 2**n s, so < 1 s); default is 5 attempts.
        yield Through(name, server, proxy, s3_retries=1)


# -- pass-through ----------------------------------------------------------------


def test_pass_through_big_and_small_objects(through):
    fs, proxy = through.fs, through.proxy
    big, small = os.urandom(5 * 2**20), b'{"step": 1}'
    pbig, psmall = through.path("big.bin"), through.path("small.json")

    fs.pipe_file(pbig, big)
    fs.pipe_file(psmall, small)
    assert fs.cat_file(pbig) == big
    assert fs.cat_file(psmall) == small
    assert through.direct.cat_file(pbig) == big  # really upstream
    names = fs.ls(through.bucket, detail=False)
    assert pbig in names and psmall in names
    assert fs.info(pbig)["size"] == len(big)

    fs.rm(pbig)
    fs.rm_file(psmall)
    assert not through.direct.exists(pbig)
    assert not through.direct.exists(psmall)

    stats = proxy.stats
    assert stats["requests"] >= 6  # 2 uploads, 2 reads, a listing, deletes
    assert stats["forwarded"] == stats["requests"]
    assert proxy.injected() == 0 and stats["upstream_errors"] == 0
    logged = {(e.method, e.object_name) for e in proxy.log}
    assert any(m in ("POST", "PUT") and n and n.endswith("small.json") for m, n in logged)


def test_pass_through_streamed_multi_request_upload(through):
    """A GCS resumable upload (chunks go to the ``Location`` the server gave,
    rewritten onto the proxy) / an S3 multipart upload."""
    fs, proxy = through.fs, through.proxy
    data = os.urandom(11 * 2**20)
    path = through.path("stream.bin")
    with fs.open(path, "wb", block_size=5 * 2**20) as f:
        for i in range(0, len(data), 2**20):
            f.write(data[i : i + 2**20])
    assert through.direct.cat_file(path) == data
    uploads = [e for e in proxy.log if e.object_name and e.object_name.endswith("stream.bin")]
    if through.name == "gcs":
        assert any("upload_id=" in e.path for e in uploads), proxy.log
    else:
        assert any("uploadId=" in e.path for e in uploads), proxy.log
    through.direct.rm_file(path)


# -- lost responses ----------------------------------------------------------------


def test_lost_response_object_exists_upstream(through):
    fs, proxy = through.fs, through.proxy
    path = through.path("x.json")
    proxy.set_rules([Rule(kind="lose_response", times=1, match=object_endswith("x.json"))])
    try:
        fs.pipe_file(path, b'{"a": 1}')  # both clients re-send, and it succeeds
    except Exception:  # noqa: BLE001 - either outcome is allowed; the object must exist
        pass
    assert proxy.injected("lose_response") == 1
    assert through.direct.cat_file(path) == b'{"a": 1}'
    actions = [e.action for e in proxy.log if e.object_name == path.split("/", 1)[1]]
    assert actions[0] == "lose_response" and "forward" in actions


def test_lost_response_in_create_mode_reads_as_file_exists(through):
    """The pitfall for a commit point written with ``mode="create"``: the
    client's own retry of a write that landed gets 412 -> FileExistsError."""
    fs, proxy = through.fs, through.proxy
    path = through.path("manifest.json")
    proxy.set_rules([Rule(kind="lose_response", times=1, match=object_endswith(".json"))])
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"{}", mode="create")
    assert through.direct.cat_file(path) == b"{}"


def test_reset_once_is_retried(through):
    fs, proxy = through.fs, through.proxy
    path = through.path("r.json")
    proxy.set_rules([Rule(kind="reset", times=1, match=object_endswith("r.json"))])
    fs.pipe_file(path, b"r")
    assert proxy.injected("reset") == 1
    assert through.direct.cat_file(path) == b"r"


# -- persistent errors ------------------------------------------------------------


def test_persistent_500_makes_the_call_raise(through, request):
    fs, proxy = through.fs, through.proxy
    path = through.path("p.json")
    proxy.set_rules([Rule(kind="persistent_status", status=500)])
    t0 = time.monotonic()
    if through.name == "gcs":
        import gcsfs.retry

        with pytest.raises(gcsfs.retry.HttpError) as info:
            fs.pipe_file(path, b"x")
        assert info.value.code == 500
        assert not isinstance(info.value, OSError)  # `except OSError` misses it
        assert proxy.stats["requests"] == 6  # GCSFileSystem.retries, fixed
        sleeps = request.getfixturevalue("fast_gcsfs_retries")
        assert len(sleeps) == 5 and 31 <= sum(sleeps) <= 36  # what it would wait
    else:
        from botocore.exceptions import ClientError

        with pytest.raises(OSError) as info:
            fs.pipe_file(path, b"x")
        assert info.value.errno == errno.EREMOTEIO  # s3fs: InternalError
        assert isinstance(info.value.__cause__, ClientError)
        assert proxy.stats["requests"] == 2  # botocore: 1 + max_attempts (1)
        assert proxy.injected("persistent_status") == 2
    assert time.monotonic() - t0 < 15
    proxy.clear_rules()
    assert not through.direct.exists(path)


def test_persistent_503_on_reads_raises(through):
    fs, proxy = through.fs, through.proxy
    path = through.path("read.bin")
    through.direct.pipe_file(path, b"data")
    proxy.set_rules([Rule(kind="persistent_status", status=503)])
    if through.name == "gcs":
        import gcsfs.retry

        with pytest.raises(gcsfs.retry.HttpError) as info:
            fs.cat_file(path)
        assert info.value.code == 503
    else:
        with pytest.raises(OSError) as info:
            fs.cat_file(path)
        assert info.value.errno == errno.EBUSY  # s3fs: ServiceUnavailable/SlowDown
    proxy.clear_rules()
    assert fs.cat_file(path) == b"data"


# -- random errors ------------------------------------------------------------------


def test_random_503_on_writes_is_absorbed_by_client_retries(through):
    # 6 attempts on both clients: a write fails only after 6 straight 503s
    # (0.3**6 = 0.07 %); with seed 0 the sequence is fixed anyway.
    if through.name == "s3":
        through = Through("s3", through.server, through.proxy, s3_retries=5)
    fs, proxy = through.fs, through.proxy
    proxy.set_rules([Rule(kind="status", status=503, probability=0.3, match=lambda r: r.is_write)])
    paths = [through.path(f"w{i}.json") for i in range(12)]
    for i, path in enumerate(paths):
        fs.pipe_file(path, b"%d" % i)
    proxy.clear_rules()
    assert proxy.injected("status") > 0
    for i, path in enumerate(paths):
        assert through.direct.cat_file(path) == b"%d" % i


# -- the proxy itself --------------------------------------------------------------


def _raw_request(proxy, method, target, body=None, headers=None, chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_chunked_and_expect_100_request_bodies_are_forwarded(s3_server):
    with FaultProxy.for_server(s3_server) as proxy:
        key = f"{s3_server.bucket}/{uuid.uuid4().hex}"
        payload = os.urandom(300_000)
        chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
        status, _, _ = _raw_request(
            proxy, "PUT", f"/{key}", body=chunks,
            headers={"Transfer-Encoding": "chunked"}, chunked=True,
        )  # fmt: skip
        assert status == 200
        assert s3_server.fs().cat_file(key) == payload

        # Expect: 100-continue, answered by the proxy before the body is sent.
        # (A new key: moto refuses an unsigned PUT that overwrites, 403.)
        key = f"{s3_server.bucket}/{uuid.uuid4().hex}"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            body = b"after-continue"
            s.sendall(
                f"PUT /{key} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                "Expect: 100-continue\r\n\r\n".encode()
            )
            assert s.recv(100).startswith(b"HTTP/1.1 100")
            s.sendall(body)
            reply = b""
            while b"\r\n\r\n" not in reply:
                reply += s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200")
        assert s3_server.fs().cat_file(key) == b"after-continue"


def test_keep_alive_serves_several_requests_on_one_connection(gcs_server):
    with FaultProxy.for_server(gcs_server) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            for _ in range(3):
                conn.request("GET", f"/storage/v1/b/{gcs_server.bucket}/o")
                resp = conn.getresponse()
                assert resp.status == 200
                resp.read()
        finally:
            conn.close()
        assert proxy.stats["requests"] == 3


def test_injected_error_bodies_by_flavor(gcs_server, s3_server):
    rule = Rule(kind="status", status=503, times=1)
    with FaultProxy.for_server(gcs_server, rules=[rule]) as proxy:
        status, headers, body = _raw_request(proxy, "GET", "/storage/v1/b")
        assert status == 503 and b'"code": 503' in body and "json" in headers["Content-Type"]
        assert _raw_request(proxy, "GET", "/storage/v1/b")[0] == 200  # times=1
        assert rule.fired == 1 and rule.exhausted
    with FaultProxy.for_server(s3_server, rules=[Rule(kind="status", status=500)]) as proxy:
        status, _, body = _raw_request(proxy, "GET", f"/{s3_server.bucket}")
        assert status == 500 and b"<Code>InternalError</Code>" in body
        assert _raw_request(proxy, "HEAD", f"/{s3_server.bucket}")[2] == b""


def test_probability_is_seeded():
    def fired(seed):
        proxy = FaultProxy("http://127.0.0.1:1", seed=seed, rules=[Rule(probability=0.3)])
        req = describe_request("GET", "/b/k", {}, b"", "s3")
        return [proxy._decide(req) is not None for _ in range(50)]

    assert fired(0) == fired(0)
    assert 5 <= sum(fired(0)) <= 25


def test_object_names():
    gcs_multipart = (
        b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
        b'{"name": "dir/ckpt-000000001.json"}\n--==0==\n'
        b"Content-Type: application/octet-stream\n\n{}\n--==0==--"
    )
    req = describe_request(
        "POST", "/upload/storage/v1/b/bkt/o?uploadType=multipart",
        {"Content-Type": 'multipart/related; boundary="==0=="'}, gcs_multipart, "gcs",
    )  # fmt: skip
    assert (req.bucket, req.object_name, req.is_write) == ("bkt", "dir/ckpt-000000001.json", True)
    req = describe_request(
        "POST", "/upload/storage/v1/b/bkt/o?name=a%2Fb.keras&uploadType=resumable", {}, b"", "gcs"
    )
    assert req.object_name == "a/b.keras" and req.is_write
    req = describe_request("GET", "/download/storage/v1/b/bkt/o/a%2Fb.json?alt=media", {}, b"", "gcs")
    assert req.object_name == "a/b.json" and not req.is_write
    req = describe_request("GET", "/storage/v1/b/bkt/o?prefix=a/", {}, b"", "gcs")
    assert (req.bucket, req.object_name) == ("bkt", None)
    req = describe_request("PUT", "/bkt/dir/x%20y.json?partNumber=1", {}, b"", "s3")
    assert (req.bucket, req.object_name, req.is_write) == ("bkt", "dir/x y.json", True)
    assert object_endswith(".json")(req)
    assert not object_endswith(".json")(describe_request("GET", "/bkt/x.json", {}, b"", "s3"))


def test_close_leaves_no_threads_and_frees_the_port(gcs_server):
    before = set(threading.enumerate())
    proxy = FaultProxy.for_server(gcs_server).start()
    port = proxy.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/storage/v1/b")  # leaves an idle keep-alive connection
    conn.getresponse().read()
    proxy.close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (set(threading.enumerate()) - before)
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

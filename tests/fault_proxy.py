"""A fault-injecting HTTP reverse proxy for the object-store test servers.

Stdlib only. It sits on 127.0.0.1 in front of a real fake-gcs-server or moto
S3 server (``tests/servers.py``) and forwards every request, unless a
:class:`Rule` tells it to answer an error status, reset the connection, or
forward the request and then lose the response.

Usage::

    with FaultProxy(upstream=gcs_server.endpoint, flavor="gcs", seed=0) as proxy:
        fs = fsspec.filesystem("gs", skip_instance_cache=True,
                               **proxy.storage_options_for(gcs_server.storage_options))
        proxy.set_rules([Rule(kind="lose_response", times=1,
                              match=object_endswith(".json"))])
        fs.pipe_file(f"{bucket}/x.json", b"{}")   # created upstream, reply lost
        print(proxy.stats, proxy.log)

Facts measured with this proxy (gcsfs 2026.10.0, s3fs 2026.9.0, aiobotocore
3.1.0 / botocore 1.43.117, aiohttp 3.14.5, fake-gcs-server, moto 5 server;
see ``tests/test_fault_proxy.py`` and the installed sources):

gcsfs
  * Every HTTP call goes through ``GCSFileSystem._request``, wrapped in
    ``gcsfs.retry.retry_request(retries=6)``: 6 attempts in all. The count is
    fixed when the class is defined (class attribute ``retries = 6`` read by
    the decorator): no constructor argument, and ``fs.retries = N`` does
    nothing.
  * Retried: HTTP 408, 429, 500-504 (``HttpError``; a 502 becomes
    ``requests.exceptions.ProxyError``) and any ``aiohttp.ClientError``
    (reset, disconnect). Not retried: 404 -> ``FileNotFoundError``, 403 ->
    ``OSError("Forbidden...")``, 412 -> ``FileExistsError``, 400 with
    "invalid" -> ``ValueError``.
  * Sleep before attempt n (n >= 1): ``min(random() + 2 ** (n - 1), 32)`` s,
    i.e. about 1.5, 2.5, 4.5, 8.5 and 16.5 s. A persistent fault makes one call
    fail only after all of these: measured 32.5-35.6 s for 500, 503 and reset,
    on ``pipe_file`` and ``cat_file`` alike (6 requests seen by the proxy).
  * After the last attempt the last error is re-raised as it is, not
    wrapped. For 5xx that is ``gcsfs.retry.HttpError`` (``.code`` 500/503,
    message "injected, 500"); it is NOT an ``OSError``, so ``except OSError``
    misses it. For a reset connection it is
    ``aiohttp.client_exceptions.ClientOSError`` ("[Errno 104] Connection reset
    by peer"), which is an ``OSError``. Also from the source, not measured:
    ``ServerDisconnectedError``, raised on a plain close (FIN), is not an
    ``OSError``. gcsfs logs the final failure with ``logger.exception``.
  * Knobs: no retry count. To make the retries fast, patch the sleep by
    replacing the module reference (NOT the global ``asyncio.sleep``):
    ``monkeypatch.setattr(gcsfs.retry, "asyncio",
    types.SimpleNamespace(sleep=fast_sleep))``. ``gcsfs.retry`` uses asyncio
    only for that sleep. See ``fast_gcsfs_retries`` in the test. With it, 6
    attempts take well under 1 s. ``requests_timeout=`` only sets the
    per-request aiohttp timeout.
  * Lost response on ``pipe_file`` (multipart POST, which aiohttp never
    re-sends by itself): gcsfs re-sends after ~1 s. In the default
    ``mode="overwrite"`` the retry succeeds (the object is written twice). In
    ``mode="create"`` (``ifGenerationMatch=0``, which
    ``Storage.write_manifest`` uses), the retry gets 412 and ``pipe_file``
    raises ``FileExistsError``, although it was the caller's own write that
    landed.

s3fs / aiobotocore
  * Three retry layers:
    1. aiohttp re-sends an idempotent request (GET, HEAD, PUT, DELETE, ...)
       once by itself when a reused keep-alive connection is reset. So each
       botocore attempt can reach the proxy twice.
    2. botocore, default "legacy" mode: 5 attempts in all. It retries
       500/502/503/504, throttling codes and connection errors, sleeping
       ``random() * 2 ** (n - 1)`` s (at most 1, 2, 4, 8 s).
    3. s3fs ``_error_wrapper`` (``fs.retries``, default 5; a class attribute
       you can set per instance, not a constructor argument). It retries only
       ``S3_RETRYABLE_ERRORS`` and ClientErrors whose text says "SlowDown" /
       "reduce your request rate". A plain 500 / 503 ServiceUnavailable
       ClientError is retried by botocore only. A 503 with code ``SlowDown``
       is retried by both layers: 5 x 5 = 25 requests, 27.6 s by default.
  * Knob: ``config_kwargs={"retries": {"max_attempts": N}}``. N counts
    RETRIES, so N + 1 attempts in all. botocore rewrites that dict in place
    (into ``total_max_attempts: N + 1``), so never share one dict between
    filesystems. Alternative: ``{"mode": "standard", "total_max_attempts":
    N}``. Persistent 500 on ``pipe_file``: default 5 requests, 11.2 s;
    max_attempts 1: 2 requests, 0.3 s; max_attempts 2: 3 requests, 2.0 s.
  * Exceptions: s3fs ``translate_boto_error`` turns a 5xx ClientError into
    an ``OSError`` whose ``__cause__`` is ``botocore.exceptions.ClientError``.
    Code ``InternalError`` (500) gives errno 121 ``EREMOTEIO``;
    ``ServiceUnavailable`` or ``SlowDown`` (503) give errno 16 ``EBUSY``; a
    HEAD without a body maps the same way by its status. A persistent reset
    ends as ``botocore.exceptions.EndpointConnectionError``, which is a
    ``BotoCoreError``, NOT an ``OSError``, and is not translated. Default:
    10 requests (5 attempts x aiohttp's re-send), 5-8 s; with
    ``max_attempts`` 1: 4 requests, 0.3 s. ``fs.retries`` changes nothing
    here.
  * Lost response on ``pipe_file`` (PUT): aiohttp re-sends the PUT at once,
    so the call succeeds and botocore never sees the fault. With
    ``mode="create"`` (``If-None-Match: *``) the re-sent PUT gets 412 and
    ``pipe_file`` raises ``FileExistsError`` (cause ``ClientError``
    PreconditionFailed), as on gcsfs.
  * botocore sends ``Expect: 100-continue`` on large PUTs (seen for 6 MiB).
    ``BaseHTTPRequestHandler`` answers "100 Continue" itself, and the proxy
    drops ``Expect`` on the way upstream.

Proxy caveats: ``Host`` is rewritten to the upstream's, which breaks SigV4
(host is signed) against a server that checks signatures. moto does not check
by default. moto answers 403 to an *unsigned* PUT that overwrites a key
(seen with raw requests). ``Location`` response headers pointing at the
upstream are rewritten onto the proxy, so GCS resumable-upload chunks also go
through it. Response bodies are buffered whole and re-sent with
``Content-Length``.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

__all__ = [
    "FaultProxy",
    "LogEntry",
    "ProxyRequest",
    "Rule",
    "KINDS",
    "object_endswith",
]

HOST = "127.0.0.1"
KINDS = ("status", "persistent_status", "reset", "lose_response", "delay")

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy recomputes.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}

_S3_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    409: "OperationAborted",
    412: "PreconditionFailed",
    429: "SlowDown",
    500: "InternalError",
    501: "NotImplemented",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


# -- requests ------------------------------------------------------------------


@dataclass
class ProxyRequest:
    """What a rule's ``match`` predicate sees about one client request.

    ``path`` is the raw (still percent-encoded) path; ``query`` the raw query
    string; ``params`` the parsed query (``{name: [values]}``); ``headers`` an
    ``email.message.Message`` (case-insensitive ``.get``); ``body`` the full
    request body (chunked bodies are already decoded).
    """

    method: str
    path: str
    query: str
    headers: Any
    body: bytes
    flavor: str
    params: dict[str, list[str]] = field(default_factory=dict)
    bucket: str | None = None
    object_name: str | None = None

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")

    @property
    def is_write(self) -> bool:
        """An upload, an upload chunk, a copy/compose target, ... (not DELETE)."""
        if self.flavor == "gcs":
            if self.method in ("POST", "PUT") and self.path.startswith("/upload/"):
                return True
            return self.method == "POST" and bool(
                re.search(r"/(rewriteTo|copyTo)/|/compose$", self.path)
            )
        return self.method in ("PUT", "POST") and self.object_name is not None


def _param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _gcs_multipart_name(headers: Any, body: bytes) -> str | None:
    """The ``"name"`` in the JSON metadata part of a multipart upload body."""
    head = body[:65536]
    ctype = headers.get("Content-Type", "") or ""
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if m:
        boundary = b"--" + m.group(1).encode("latin-1")
        parts = head.split(boundary)
        if len(parts) >= 2:
            part = parts[1]
            sep = re.search(rb"\r?\n\r?\n", part)
            if sep:
                try:
                    meta = json.loads(part[sep.end():].strip().decode("utf-8"))
                    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                        return meta["name"]
                except (ValueError, UnicodeDecodeError):
                    pass
    m2 = re.search(rb'"name"\s*:\s*("(?:[^"\\]|\\.)*")', head)
    if m2:
        try:
            return json.loads(m2.group(1).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _gcs_bucket_object(path: str) -> tuple[str | None, str | None]:
    """Bucket and object named by a GCS JSON-API path (object still quoted)."""
    m = re.match(
        r"^(?:/download|/upload)?/storage/v1/b/([^/]+)(?:/o(?:/(.*))?)?$", path
    )
    if not m:
        return None, None
    bucket, rest = m.group(1), m.group(2)
    if not rest:
        return urllib.parse.unquote(bucket), None
    # copy / rewrite: .../o/SRC/rewriteTo/b/DB/o/DST -> the destination
    m2 = re.match(r"^.*/(?:rewriteTo|copyTo)/b/([^/]+)/o/(.+)$", rest)
    if m2:
        return urllib.parse.unquote(m2.group(1)), urllib.parse.unquote(m2.group(2))
    if rest.endswith("/compose"):
        rest = rest[: -len("/compose")]
    return urllib.parse.unquote(bucket), urllib.parse.unquote(rest)


def describe_request(
    method: str, target: str, headers: Any, body: bytes, flavor: str
) -> ProxyRequest:
    """Build the :class:`ProxyRequest` (with ``bucket``/``object_name``)."""
    split = urllib.parse.urlsplit(target)
    path, query = split.path, split.query
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    req = ProxyRequest(method, path, query, headers, body, flavor, params)
    if flavor == "gcs":
        bucket, name = _gcs_bucket_object(path)
        if name is None:
            name = _param(params, "name")
        if (
            name is None
            and path.startswith("/upload/")
            and _param(params, "uploadType") == "multipart"
        ):
            name = _gcs_multipart_name(headers, body)
        req.bucket, req.object_name = bucket, name
    else:  # s3, path-style: /bucket/key
        parts = path.lstrip("/").split("/", 1)
        if parts and parts[0]:
            req.bucket = urllib.parse.unquote(parts[0])
            if len(parts) == 2 and parts[1]:
                req.object_name = urllib.parse.unquote(parts[1])
    return req


def object_endswith(
    suffix: str, *, writes_only: bool = True, methods: Iterable[str] | None = None
) -> Callable[[ProxyRequest], bool]:
    """A ``match`` predicate: requests on objects whose name ends with ``suffix``.

    ``writes_only`` (default) keeps only uploads (see ``ProxyRequest.is_write``);
    ``methods`` restricts to those HTTP methods.
    """
    wanted = {m.upper() for m in methods} if methods else None

    def match(req: ProxyRequest) -> bool:
        if wanted is not None and req.method not in wanted:
            return False
        if writes_only and not req.is_write:
            return False
        return req.object_name is not None and req.object_name.endswith(suffix)

    return match


# -- rules ---------------------------------------------------------------------


@dataclass
class Rule:
    """One fault. The first rule that matches and fires decides a request.

    kind:
      ``"status"``: answer ``status`` without forwarding (GCS JSON or S3 XML
      error body, by the proxy's flavor; ``error_code`` overrides the S3
      ``<Code>``; ``body`` overrides the whole body; ``headers`` are added).
      ``"persistent_status"``: ``"status"`` that always fires (probability and
      times are ignored).
      ``"reset"``: close the client connection with a TCP RST, no response,
      request not forwarded.
      ``"lose_response"``: forward (the upstream applies it), then reset the
      client connection without sending the response.
      ``"delay"``: sleep ``delay_s`` then forward normally.
    match: predicate on :class:`ProxyRequest` (None: every request).
    probability: chance to fire when matched (proxy's seeded ``random.Random``).
    times: fire at most this many times (None: unlimited). ``fired`` counts.
    """

    kind: str = "status"
    status: int = 503
    probability: float = 1.0
    match: Callable[[ProxyRequest], bool] | None = None
    times: int | None = None
    delay_s: float = 0.0
    error_code: str | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Rule kind must be one of {KINDS}, not {self.kind!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")

    @property
    def exhausted(self) -> bool:
        return (
            self.kind != "persistent_status"
            and self.times is not None
            and self.fired >= self.times
        )


class LogEntry(NamedTuple):
    method: str
    path: str  # path and query as the client sent them
    object_name: str | None
    action: str  # "forward", "status:503", "reset", "lose_response", "delay", "upstream_error"


# -- the proxy -----------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, proxy: "FaultProxy"):
        self.proxy = proxy
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:  # noqa: D102
        # Broken client connections are expected here (that's the point).
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 120  # idle keep-alive connections end eventually

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    # BaseHTTPRequestHandler answers "Expect: 100-continue" with a
    # "100 Continue" by itself (HTTP/1.1), before do_* is called.
    def do_GET(self) -> None:
        self.server.proxy._handle(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- helpers used by FaultProxy ------------------------------------------
    def read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed during chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self._read_exactly(size))
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if length:
            return self._read_exactly(int(length))
        return b""

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self.rfile.read(n - len(buf))
            if not piece:
                raise ConnectionError("client closed during body")
            buf += piece
        return bytes(buf)

    def reset_connection(self) -> None:
        """Drop the client connection with an RST (SO_LINGER 0), no response."""
        self.close_connection = True
        try:
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass
        # The socket closes for real only once rfile (a makefile) lets go too.
        try:
            self.connection.close()
        except OSError:
            pass
        try:
            self.rfile.close()
        except OSError:
            pass

    def send_reply(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


class FaultProxy:
    """Fault-injecting reverse proxy on 127.0.0.1 in front of ``upstream``.

    ``FaultProxy(upstream="http://127.0.0.1:PORT", flavor="gcs"|"s3", seed=0)``;
    use as a context manager (or ``start()``/``close()``). ``endpoint`` is the
    proxy's ``http://127.0.0.1:PORT``. Rules may be changed at any time from
    any thread. ``rewrite_location`` maps upstream URLs in ``Location``
    response headers (GCS resumable upload sessions) onto the proxy, so that
    upload chunks go through it too.
    """

    def __init__(
        self,
        upstream: str,
        seed: int | None = 0,
        flavor: str = "gcs",
        rules: Iterable[Rule] = (),
        upstream_timeout: float = 60.0,
        rewrite_location: bool = True,
        max_log: int = 10000,
    ):
        if flavor not in ("gcs", "s3"):
            raise ValueError("flavor must be 'gcs' or 's3'")
        split = urllib.parse.urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = f"http://{split.netloc}"
        self._up_host = split.hostname
        self._up_port = split.port or 80
        self._up_netloc = split.netloc
        self.flavor = flavor
        self.upstream_timeout = upstream_timeout
        self.rewrite_location = rewrite_location
        self.max_log = max_log
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._rules: list[Rule] = list(rules)
        self._stats = self._zero_stats()
        self._log: list[LogEntry] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_server(cls, server: Any, seed: int | None = 0, **kwargs: Any) -> "FaultProxy":
        """A proxy in front of a ``GCSServer``/``S3Server`` (flavor from it)."""
        flavor = "gcs" if getattr(server, "protocol", "") in ("gs", "gcs") else "s3"
        return cls(upstream=server.endpoint, seed=seed, flavor=flavor, **kwargs)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "FaultProxy":
        if self._server is not None:
            return self
        self._server = _Server((HOST, 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FaultProxy:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            conns = list(server.connections)
        for conn in conns:  # wake handler threads blocked on keep-alive reads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FaultProxy is not running")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def storage_options_for(self, storage_options: dict[str, Any]) -> dict[str, Any]:
        """A copy of a server's fsspec options with the endpoint set to the proxy."""
        opts = copy.deepcopy(storage_options)
        if "endpoint_url" in opts or self.flavor == "gcs":
            opts["endpoint_url"] = self.endpoint
        if self.flavor == "s3":
            opts.setdefault("client_kwargs", {})["endpoint_url"] = self.endpoint
        return opts

    # -- rules ---------------------------------------------------------------
    def set_rules(self, rules: Iterable[Rule]) -> None:
        with self._lock:
            self._rules = list(rules)

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        self.set_rules([])

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @contextlib.contextmanager
    def injecting(self, *rules: Rule) -> Iterator["FaultProxy"]:
        """``with proxy.injecting(Rule(...)):`` sets rules, clears them after."""
        self.set_rules(rules)
        try:
            yield self
        finally:
            self.clear_rules()

    # -- observation ---------------------------------------------------------
    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {
            "requests": 0,
            "forwarded": 0,
            "upstream_errors": 0,
            "injected": {k: 0 for k in KINDS},
        }

    @property
    def stats(self) -> dict[str, Any]:
        """A copy: ``{"requests", "forwarded", "upstream_errors", "injected": {kind: n}}``.

        ``persistent_status`` hits count under ``injected["status"]`` too.
        """
        with self._lock:
            return copy.deepcopy(self._stats)

    @property
    def log(self) -> list[LogEntry]:
        """A copy of ``(method, path, object_name, action)`` per request."""
        with self._lock:
            return list(self._log)

    def injected(self, kind: str | None = None) -> int:
        """How many faults were injected (of ``kind``, or all)."""
        with self._lock:
            counts = self._stats["injected"]
            if kind is None:
                return sum(v for k, v in counts.items() if k != "persistent_status")
            return counts[kind]

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._zero_stats()
            self._log = []

    def _record(self, req: ProxyRequest, action: str) -> None:
        with self._lock:
            if len(self._log) < self.max_log:
                self._log.append(
                    LogEntry(req.method, req.target, req.object_name, action)
                )

    # -- the work ------------------------------------------------------------
    def _decide(self, req: ProxyRequest) -> Rule | None:
        with self._lock:
            self._stats["requests"] += 1
            for rule in self._rules:
                if rule.exhausted:
                    continue
                if rule.match is not None:
                    try:
                        if not rule.match(req):
                            continue
                    except Exception:  # noqa: BLE001 - a bad predicate never fires
                        continue
                if rule.kind != "persistent_status" and rule.probability < 1.0:
                    if self._random.random() >= rule.probability:
                        continue
                rule.fired += 1
                injected = self._stats["injected"]
                injected[rule.kind] += 1
                if rule.kind == "persistent_status":
                    injected["status"] += 1
                return rule
            return None

    def _handle(self, h: _Handler) -> None:
        try:
            body = h.read_body()
        except (ConnectionError, OSError, ValueError):
            h.close_connection = True
            return
        req = describe_request(h.command, h.path, h.headers, body, self.flavor)
        rule = self._decide(req)
        kind = rule.kind if rule is not None else None

        if kind in ("status", "persistent_status"):
            assert rule is not None
            self._record(req, f"status:{rule.status}")
            self._send_error(h, rule)
            return
        if kind == "reset":
            self._record(req, "reset")
            h.reset_connection()
            return
        if kind == "delay":
            assert rule is not None
            time.sleep(rule.delay_s)

        try:
            status, reason, headers, resp_body = self._forward(h, req)
        except (OSError, http.client.HTTPException) as exc:
            with self._lock:
                self._stats["upstream_errors"] += 1
            self._record(req, "upstream_error")
            h.close_connection = True
            msg = f"fault proxy: upstream error: {exc}".encode()
            h.send_reply(
                502, "Bad Gateway",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(msg)))],
                msg,
            )  # fmt: skip
            return
        with self._lock:
            self._stats["forwarded"] += 1
        if kind == "lose_response":
            self._record(req, "lose_response")
            h.reset_connection()
            return
        self._record(req, kind or "forward")
        h.send_reply(status, reason, headers, resp_body)

    def _forward(
        self, h: _Handler, req: ProxyRequest
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(
            self._up_host, self._up_port, timeout=self.upstream_timeout
        )
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            had_length = False
            for name, value in h.headers.items():
                low = name.lower()
                if low in _HOP_BY_HOP:
                    continue
                if low == "host":
                    value = self._up_netloc
                elif low == "content-length":
                    had_length = True
                    continue
                conn.putheader(name, value)
            if "host" not in {k.lower() for k in h.headers.keys()}:
                conn.putheader("Host", self._up_netloc)
            if req.body or had_length or h.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(req.body)))
            conn.endheaders(req.body if req.body else None)
            resp = conn.getresponse()
            resp_body = resp.read()
            headers: list[tuple[str, str]] = []
            for name, value in resp.getheaders():
                low = name.lower()
                if low in _HOP_BY_HOP or low == "content-length":
                    continue
                if low == "location" and self.rewrite_location:
                    value = self._rewrite_url(value)
                headers.append((name, value))
            if h.command == "HEAD" or resp.status in (204, 304) or resp.status < 200:
                upstream_len = resp.getheader("Content-Length")
                if upstream_len is not None and resp.status not in (204, 304):
                    headers.append(("Content-Length", upstream_len))
            else:
                headers.append(("Content-Length", str(len(resp_body))))
            return resp.status, resp.reason, headers, resp_body
        finally:
            conn.close()

    def _rewrite_url(self, url: str) -> str:
        split = urllib.parse.urlsplit(url)
        if split.scheme == "http" and split.netloc == self._up_netloc:
            return urllib.parse.urlunsplit(
                split._replace(netloc=f"{HOST}:{self.port}")
            )
        return url

    def _send_error(self, h: _Handler, rule: Rule) -> None:
        status = rule.status
        reason = http.client.responses.get(status, "Injected")
        if rule.body is not None:
            body, ctype = rule.body, "application/octet-stream"
        elif self.flavor == "gcs":
            body = json.dumps(
                {"error": {"code": status, "message": "injected",
                           "errors": [{"message": "injected", "reason": "backendError"}]}}
            ).encode()  # fmt: skip
            ctype = "application/json; charset=UTF-8"
        else:
            code = rule.error_code or _S3_CODES.get(status, "InternalError")
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected</Message>"
                "<RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            ctype = "application/xml"
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        headers += list((rule.headers or {}).items())
        h.send_reply(status, reason, headers, body)

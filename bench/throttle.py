"""A TCP proxy on 127.0.0.1 that caps every connection's rate, each on its own.

Real object stores cap one stream (one TCP connection, one upload) well below
what a node's network carries: parallel writers go faster only because each
has its own cap. This proxy reproduces that in front of the local emulators
(fake-gcs-server, moto): every accepted connection gets its own token bucket
of ``rate`` bytes/s in each direction, independent of the others; nothing
else is changed (it forwards bytes, not HTTP requests, so it neither buffers
request bodies nor rewrites headers).

Why not ``tests/fault_proxy.py``: that proxy reads each HTTP request body whole
before forwarding it (store and forward), which would add a full copy delay
per 64 MiB upload chunk and measure the proxy, not the cap. GCS resumable
uploads continue at the URL in the server's ``Location`` header: start
fake-gcs-server with ``-external-url`` set to this proxy
(``bench/parallel_write.py`` does), so that upload chunks come through it too.
"""

from __future__ import annotations

import socket
import threading
import time

HOST = "127.0.0.1"
_BUF = 64 * 1024
_BURST_S = 0.05  # an idle connection saves at most this much credit


class ThrottledProxy:
    """``ThrottledProxy(rate=50e6)``; ``start()`` binds (``port`` is then
    known), ``upstream = (host, port)`` may be set before the first client
    connects; ``rate=None`` forwards uncapped (the machine's own limit)."""

    def __init__(self, rate: float | None, upstream: tuple[str, int] | None = None):
        self.rate = rate
        self.upstream = upstream
        self.connections = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._closing = False

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("proxy not started")
        return self._listener.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "ThrottledProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(128)
        listener.settimeout(0.2)  # accept() wakes up to notice close()
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, daemon=True, name="bench-throttle")
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        with self._lock:
            sockets = list(self._open)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "ThrottledProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the work --------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.upstream is None:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=30)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            pair = _Pair(self, client, server)
            threading.Thread(target=pair.pump, args=(client, server, True), daemon=True,
                             name="bench-throttle-up").start()
            threading.Thread(target=pair.pump, args=(server, client, False), daemon=True,
                             name="bench-throttle-down").start()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            for s in sockets:
                self._open.discard(s)


class _Pair:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: ThrottledProxy, client: socket.socket, server: socket.socket):
        self.proxy, self.client, self.server = proxy, client, server
        self._done = 0
        self._lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        rate = self.proxy.rate
        buf = bytearray(_BUF)
        view = memoryview(buf)
        started, sent = time.perf_counter(), 0
        try:
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(view[:n])
                self.proxy._count(up, n)
                if rate:
                    now = time.perf_counter()
                    due = started + (sent + n) / rate
                    if now > due + _BURST_S:  # idle: restart the bucket, no saved credit
                        started, sent = now, 0
                    else:
                        sent += n
                        if due > now:
                            time.sleep(due - now)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with self._lock:
                self._done += 1
                last = self._done == 2
            if last:
                for s in (self.client, self.server):
                    try:
                        s.close()
                    except OSError:
                        pass
                self.proxy._forget(self.client, self.server)

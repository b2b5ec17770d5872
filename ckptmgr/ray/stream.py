"""Memory-tier reads over one TCP stream from the keeper that holds the copy.

Why not Ray's own transfer: the object manager moves an object between nodes
in 5 MiB gRPC chunks, copying each chunk several times on both sides. On this
machine that reads a 1.2 GB snapshot at ~0.7 GB/s, CPU-bound, and on a real
cluster it caps a replacement rank's recovery well below the network. Here a
keeper sends the arrays' bytes straight from its object-store copy (views,
no copy in user space) over one socket, into arrays the reader allocated:
one kernel copy a side.

What travels where:

- through Ray: the offer (address, a one-time token, and the snapshot's
  :meth:`~ckptmgr.io.snapshot.ModelSnapshot.spec`: names, shapes, dtypes,
  config and the small arrays; a few KB);
- over the socket: the reader's token, then the large arrays' raw bytes in
  the spec's order, nothing else.

A stream serves one reader and ends; its listener closes after ``timeout_s``
whatever happens. The reader checks the bytes it got against the snapshot's
digest as before (:func:`ckptmgr.ray.memory_restore.fetch_and_check`), and
falls back to Ray's transfer when the stream cannot be used.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptmgr.io.snapshot import ArraySpec, ModelSnapshot, VarGroup

log = logging.getLogger("ckptmgr")

TOKEN_BYTES = 16
SEND_BYTES = 8 << 20  # one sendall/recv_into at most: bounded kernel calls, prompt timeouts
# A firewall that drops packets to the keeper's port makes connect() hang, not fail:
# give up soon and read through Ray instead of waiting the whole read timeout.
CONNECT_TIMEOUT_S = 5.0


def offer_stream(snapshot: ModelSnapshot, timeout_s: float) -> dict[str, Any]:
    """Listen for one reader of ``snapshot`` (keeper side); the offer to give it.

    A thread accepts within ``timeout_s``, checks the token, sends the large
    arrays and closes; a connection with a wrong token is dropped and the
    listener goes on waiting until its time is up.
    """
    import ray

    host = ray.util.get_node_ip_address()
    listener = socket.create_server((host, 0))
    token, spec = secrets.token_bytes(TOKEN_BYTES), snapshot.spec()
    threading.Thread(target=_serve, args=(listener, token, _large_arrays(snapshot, spec), timeout_s),
                     name="ckptmgr-stream", daemon=True).start()
    return {"host": host, "port": listener.getsockname()[1], "token": token, "spec": spec}


def _large_arrays(snapshot: ModelSnapshot, spec: ModelSnapshot) -> list[np.ndarray]:
    """The arrays ``spec`` (the snapshot's :meth:`~ModelSnapshot.spec`) leaves out, in its order."""
    return [array for group, spec_group in zip(snapshot.groups, spec.groups, strict=True)
            for (_, array), (_, kept) in zip(group.arrays, spec_group.arrays, strict=True)
            if isinstance(kept, ArraySpec)]


def _serve(listener: socket.socket, token: bytes, arrays: list[np.ndarray], timeout_s: float) -> None:
    conn = _accept_reader(listener, token, timeout_s)
    if conn is None:
        return
    with conn:
        try:
            for array in arrays:
                data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                for start in range(0, len(data), SEND_BYTES):
                    conn.sendall(data[start:start + SEND_BYTES])
        except OSError as exc:
            log.debug("memory stream: reader went away (%s)", exc)


def _accept_reader(listener: socket.socket, token: bytes, timeout_s: float) -> socket.socket | None:
    """The first connection that sends ``token`` within ``timeout_s`` (the
    listener is closed then: one reader an offer), or None when none did;
    connections with a wrong token do not extend the wait."""
    deadline = time.monotonic() + timeout_s
    with listener:
        while (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except OSError:  # timed out: nobody came, the offer lapses
                return None
            try:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                if hmac.compare_digest(_read_exactly(conn, TOKEN_BYTES), token):
                    conn.settimeout(timeout_s)
                    return conn
            except OSError:
                pass
            conn.close()
    return None


def receive_stream(offer: dict[str, Any], timeout_s: float,
                   take: Callable[[int], np.ndarray] | None = None) -> ModelSnapshot:
    """The snapshot an :func:`offer_stream` offer describes, its large arrays
    read from the stream into buffers from ``take(nbytes)`` (uint8, e.g. a
    :class:`~ckptmgr.io.direct_read.BufferPool`'s; fresh arrays by default).
    Raises ``OSError`` (a ``ConnectionError`` for a stream that ends early)
    when it cannot."""
    take = take or (lambda nbytes: np.empty(nbytes, np.uint8))
    spec: ModelSnapshot = offer["spec"]
    connect_s = min(CONNECT_TIMEOUT_S, timeout_s)
    with socket.create_connection((offer["host"], offer["port"]), timeout=connect_s) as conn:
        conn.settimeout(timeout_s)
        conn.sendall(offer["token"])
        groups = [VarGroup(g.path, dict(g.attrs), [(key, _receive(conn, a, take) if isinstance(a, ArraySpec) else a)
                                                   for key, a in g.arrays])
                  for g in spec.groups]
    return ModelSnapshot(spec.config_json, spec.metadata_json, groups, dict(spec.assets))


def _receive(conn: socket.socket, spec: ArraySpec, take: Callable[[int], np.ndarray]) -> np.ndarray:
    buffer = take(spec.nbytes)
    _read_into(conn, memoryview(buffer))
    return buffer.view(spec.dtype).reshape(spec.shape)


def _read_exactly(conn: socket.socket, nbytes: int) -> bytes:
    buffer = bytearray(nbytes)
    _read_into(conn, memoryview(buffer))
    return bytes(buffer)


def _read_into(conn: socket.socket, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = conn.recv_into(view[done:], min(SEND_BYTES, len(view) - done))
        if got == 0:
            raise ConnectionError(f"memory stream ended after {done} of {len(view)} bytes of an array")
        done += got

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
- over the socket: the reader's token; the keeper's one-byte acknowledgment
  (a refused reader gets none: it knows before it reads anything); then the
  large arrays' raw bytes in the spec's order, nothing else.

A stream serves one reader and ends; its listener closes after ``timeout_s``
whatever happens. The reader (:class:`StreamReader`) takes the arrays one at a
time, as Keras's loaders ask for them, into a few reused buffers: a restore
needs memory for its largest arrays, not a second copy of the state. It
checks what it read against the snapshot's digest
(:mod:`ckptmgr.ray.memory_restore`), and reads through Ray's transfer when
the stream cannot be opened.
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
ACK = b"\x01"  # the keeper accepted the token: the arrays follow
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
            conn.sendall(ACK)
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


class StreamReader:
    """The large arrays of an :func:`offer_stream` offer, read from its stream
    in the spec's order, each into a buffer from ``take(nbytes)`` (uint8,
    e.g. a :class:`~ckptmgr.io.direct_read.BufferPool`'s; fresh arrays by
    default). An array asked for out of order has those before it read ahead
    and kept until they are asked for.

    Opening raises ``OSError`` when the keeper does not accept this reader
    within ``CONNECT_TIMEOUT_S`` (no stream, a wrong token, an offer that
    lapsed); reading raises a ``ConnectionError`` when the stream ends early,
    ``TimeoutError`` when it stalls for ``timeout_s``."""

    def __init__(self, offer: dict[str, Any], timeout_s: float,
                 take: Callable[[int], np.ndarray] | None = None):
        self.spec: ModelSnapshot = offer["spec"]
        self._take = take or (lambda nbytes: np.empty(nbytes, np.uint8))
        self._order = [(f"{g.path}/{key}", a) for g in self.spec.groups for key, a in g.arrays
                       if isinstance(a, ArraySpec)]
        self._next = 0
        self._ahead: dict[str, np.ndarray] = {}
        self._conn = socket.create_connection((offer["host"], offer["port"]),
                                              timeout=min(CONNECT_TIMEOUT_S, timeout_s))
        try:
            self._conn.settimeout(min(CONNECT_TIMEOUT_S, timeout_s))
            self._conn.sendall(offer["token"])
            if _read_exactly(self._conn, len(ACK)) != ACK:
                raise ConnectionError("the keeper did not accept this reader")
            self._conn.settimeout(timeout_s)
        except OSError as exc:
            self._conn.close()
            raise ConnectionError(f"memory stream refused: {exc}") from exc

    def array(self, name: str) -> np.ndarray:
        """The array at ``name`` (``group path/key``), read once."""
        if name in self._ahead:
            return self._ahead.pop(name)
        while self._next < len(self._order):
            key, spec = self._order[self._next]
            self._next += 1
            array = _receive(self._conn, spec, self._take)
            if key == name:
                return array
            self._ahead[key] = array
        raise KeyError(f"{name} is not in the memory stream, or was read already")

    def close(self) -> None:
        self._conn.close()
        self._ahead.clear()

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def receive_stream(offer: dict[str, Any], timeout_s: float,
                   take: Callable[[int], np.ndarray] | None = None) -> ModelSnapshot:
    """The whole snapshot an offer describes, every large array read (see
    :class:`StreamReader`)."""
    with StreamReader(offer, timeout_s, take) as reader:
        groups = [VarGroup(g.path, dict(g.attrs),
                           [(key, reader.array(f"{g.path}/{key}") if isinstance(a, ArraySpec) else a)
                            for key, a in g.arrays])
                  for g in reader.spec.groups]
    return ModelSnapshot(reader.spec.config_json, reader.spec.metadata_json, groups, dict(reader.spec.assets))


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

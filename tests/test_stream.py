"""The memory tier's direct stream (ckptmgr.ray.stream) between two sockets of
this process: exact bytes, a one-time token, a listener that lapses, a stream
cut short. The same path between Ray nodes is in test_memory_tier.py."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import numpy as np
import pytest

from ckptmgr.io.snapshot import INLINE_BYTES, ModelSnapshot, VarGroup
from ckptmgr.ray import stream
from ckptmgr.replicas import snapshot_digest


def _snapshot() -> ModelSnapshot:
    rng = np.random.default_rng(0)
    big = rng.normal(size=(300, 500)).astype("float32")  # > INLINE_BYTES: streamed
    small = np.arange(10, dtype="int64")  # inline in the spec
    odd = rng.integers(0, 2**15, size=(INLINE_BYTES,), dtype="int16").astype(">i2")  # big-endian, streamed as is
    wide = rng.normal(size=(400, 50))  # float64
    groups = [VarGroup("layers/dense/vars", {"name": "dense"}, [("0", big), ("1", small)]),
              VarGroup("optimizer/vars", {}, [("0", odd), ("1", wide)])]
    return ModelSnapshot('{"config": 1}', '{"keras_version": "test"}', groups, {"vocab.txt": b"a\nb\n"})


def _arrays(snapshot: ModelSnapshot) -> list[np.ndarray]:
    return [a for g in snapshot.groups for _, a in g.arrays]


def test_a_stream_delivers_the_snapshot_bit_for_bit():
    sent = _snapshot()
    offer = stream.offer_stream(sent, timeout_s=30)
    assert len(offer["token"]) == stream.TOKEN_BYTES
    assert len(pickle.dumps(offer)) < sent.nbytes / 50  # through Ray: names, shapes, small arrays
    got = stream.receive_stream(offer, timeout_s=30)
    assert snapshot_digest(got) == snapshot_digest(sent)
    for a, b in zip(_arrays(got), _arrays(sent), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert got.assets == sent.assets and got.config_json == sent.config_json


def test_a_wrong_token_gets_nothing_and_the_reader_with_the_right_one_still_does():
    sent = _snapshot()
    offer = stream.offer_stream(sent, timeout_s=30)
    with pytest.raises(ConnectionError, match="memory stream refused"):  # at once, before any array
        stream.StreamReader(dict(offer, token=bytes(stream.TOKEN_BYTES)), timeout_s=30)
    assert snapshot_digest(stream.receive_stream(offer, timeout_s=30)) == snapshot_digest(sent)


def test_an_offer_serves_one_reader_and_lapses_when_nobody_comes():
    offer = stream.offer_stream(_snapshot(), timeout_s=30)
    stream.receive_stream(offer, timeout_s=30)
    with pytest.raises(ConnectionRefusedError):  # served once: the listener is closed
        stream.receive_stream(offer, timeout_s=5)
    lapsing = stream.offer_stream(_snapshot(), timeout_s=1.0)
    for _ in range(3):  # wrong tokens do not keep it open past its time
        with pytest.raises(ConnectionError):
            stream.receive_stream(dict(lapsing, token=bytes(stream.TOKEN_BYTES)), timeout_s=5)
        time.sleep(0.4)
    time.sleep(0.5)
    with pytest.raises(ConnectionError):  # refused (or reset, if its thread was slow to close it)
        stream.receive_stream(lapsing, timeout_s=5)


def test_a_stream_cut_short_is_an_error_naming_how_far_it_got():
    offer = stream.offer_stream(_snapshot(), timeout_s=30)
    with socket.create_server(("127.0.0.1", 0)) as fake:  # sends 100 bytes of the first array, then closes
        def cut():
            conn, _ = fake.accept()
            with conn:
                conn.recv(stream.TOKEN_BYTES)
                conn.sendall(stream.ACK + b"\0" * 100)

        threading.Thread(target=cut, daemon=True).start()
        fake_offer = dict(offer, host="127.0.0.1", port=fake.getsockname()[1])
        with pytest.raises(ConnectionError, match="ended after 100 of 600000 bytes"):
            stream.receive_stream(fake_offer, timeout_s=30)


def test_arrays_asked_for_out_of_order_are_read_ahead_and_each_is_read_once():
    sent = _snapshot()
    with stream.StreamReader(stream.offer_stream(sent, timeout_s=30), timeout_s=30) as reader:
        wide = reader.array("optimizer/vars/1")  # the last one in the stream: the others are read ahead
        big = reader.array("layers/dense/vars/0")
        with pytest.raises(KeyError, match="read already"):
            reader.array("layers/dense/vars/0")
        odd = reader.array("optimizer/vars/0")
    np.testing.assert_array_equal(wide, sent.groups[1].arrays[1][1])
    np.testing.assert_array_equal(big, sent.groups[0].arrays[0][1])
    np.testing.assert_array_equal(odd, sent.groups[1].arrays[0][1])

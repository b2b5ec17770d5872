"""fake-gcs-server (memory or filesystem backend) and moto S3 on 127.0.0.1, for the object-store benchmarks.

The same server helper the tests use (``tests/servers.py``, which does not need
pytest), so there is one way to start the emulator in this repo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bench  # noqa: F401  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT before gcsfs)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import GCSServer, S3Server  # noqa: E402

__all__ = ["GCSServer", "S3Server"]

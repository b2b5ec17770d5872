"""ckptmgr benchmarks: ``python -m bench`` (full) or ``python -m bench --quick``.

Every figure is measured side by side with its reference in the same run
(disk and CPU speed vary a lot between runs on shared machines), and written
as a markdown table plus a PNG plot (see ``bench/README.md``).

Importing this package sets the environment that must be in place before
TensorFlow or gcsfs are imported.
"""

from __future__ import annotations

import os

# gcsfs stalls 60 s per call against fake-gcs-server without this; must be set
# before gcsfs is imported (also passed to Ray workers).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SECTIONS: dict[str, str] = {
    "S1": "Blocked time per checkpoint inside fit()",
    "S2": "Training slowdown",
    "S3": "Local disk throughput",
    "S4": "gs:// throughput (fake-gcs-server, filesystem backend)",
    "S5": "Peak RSS of the writer",
    "S6": "Scaling with Ray workers (replicated state)",
    "S7": "Profile: where ckptmgr spends its time",
    "S8": "Save cadence on paper: lost work per failure, save_freq='auto' vs fixed intervals",
    "S9": "Replica-parallel writes: N ranks write one archive (local disk; object stores through a capped proxy)",
    "S10": "Recovery by tier: restore from memory / local disk / gs://, emergency snapshot into memory",
}

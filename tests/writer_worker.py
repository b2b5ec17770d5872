"""Subprocess body for the two-writer tests: one process saving steps.

Usage: python writer_worker.py URL OPTIONS_JSON STEPS_JSON [PAUSE_S] [KEEP_LAST]

Writes numpy-only snapshots (no TensorFlow, so it starts fast) of the given
steps through ``CheckpointManager.write_snapshot``, pausing between saves, and
prints one JSON line per save: ``{"step", "attempt", "crc32c", "mine"}``
(``mine`` is false when another writer had committed the step). Exits 3 with
``FENCED <message>`` on stdout when fenced, 1 on any other error.
"""

import json
import sys
import time

import numpy as np

from ckptmgr import CheckpointManager
from ckptmgr.errors import WriterFencedError
from ckptmgr.io.archive import ModelSnapshot, VarGroup


def snapshot(step: int) -> ModelSnapshot:
    kernel = np.full((128, 128), step, "float32")
    return ModelSnapshot(
        config_json='{"class_name": "Sequential", "config": {"name": "w"}}',
        metadata_json='{"keras_version": "3.15.1"}',
        groups=[VarGroup("layers/dense/vars", {"name": "dense"}, [("0", kernel)])],
    )


def main() -> int:
    url, options, steps = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    keep_last = int(sys.argv[5]) if len(sys.argv) > 5 and int(sys.argv[5]) else None
    manager = CheckpointManager(url, storage_options=options, keep_last=keep_last)
    for step in steps:
        try:
            m = manager.write_snapshot(step, snapshot(step))
        except WriterFencedError as exc:
            print(f"FENCED {exc}", flush=True)
            return 3
        except Exception as exc:  # noqa: BLE001 - reported to the test
            print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
            return 1
        mine = m.writer is not None and m.writer.token == manager.lease.held.token
        print(json.dumps({"step": step, "attempt": m.attempt, "crc32c": m.archive_entry.crc32c,
                          "mine": mine}), flush=True)
        time.sleep(pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())

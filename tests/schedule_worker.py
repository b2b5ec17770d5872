"""Subprocess body for the crash-consistency test: one writer, a few operations.

Usage: python schedule_worker.py SPEC_JSON

``SPEC_JSON`` holds ``url``, ``options`` (storage options), ``keep_last``
(int or null), ``sweep_grace_s``, ``ops`` (a list of ``["save", step, pin]``,
``["prune"]``, ``["sweep"]``, ``["list"]``) and ``crash_at`` (null, or
``{"name": crash point, "before_op": i}``: ``CKPTMGR_CRASH_AT`` is set right
before operation ``i``). ``CKPTMGR_CRASH_AFTER`` may come in the environment
(see ``ckptmgr.faults``); the test may also SIGKILL this process from outside.

Needs no TensorFlow (numpy-only snapshots through ``write_snapshot``), so it
starts fast. Prints one JSON line per event, flushed, so a killed worker's
journal is complete up to its death:

- ``{"ev": "ready"}`` once imported and the manager is built;
- ``{"ev": "before", "i", "op", "steps"}`` before each operation, with the
  committed steps listed just then;
- ``{"ev": "saved", "step", "attempt", "mine"}`` after a save returned
  (``mine`` false when an earlier writer had committed the step);
- ``{"ev": "pruned", "deleted"}``, ``{"ev": "swept", "removed"}``,
  ``{"ev": "listed", "steps"}``;
- ``{"ev": "done"}`` at the end. Any error: ``{"ev": "error", ...}``, exit 1.

Every event also carries ``t``, ``time.monotonic()`` when it was printed.
"""

import json
import os
import sys
import time
import traceback

import numpy as np

from ckptmgr import CheckpointManager
from ckptmgr.faults import ENV_VAR
from ckptmgr.io.archive import ModelSnapshot, VarGroup


def snapshot(step: int) -> ModelSnapshot:
    # Two arrays above the inline size: archive_mid_stream then fires after
    # the first one is streamed, so the archive really is half written.
    return ModelSnapshot(
        config_json='{"class_name": "Sequential", "config": {}}',
        metadata_json='{"keras_version": "3.15.1"}',
        groups=[VarGroup("vars", {}, [
            ("0", np.full((256, 256), step, "float32")),
            ("1", np.full((256, 256), -step, "float32")),
        ])],
    )


def emit(**event) -> None:
    event["t"] = round(time.monotonic(), 4)
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main() -> int:
    spec = json.loads(sys.argv[1])
    manager = CheckpointManager(
        spec["url"],
        storage_options=spec["options"],
        keep_last=spec["keep_last"],
        sweep_grace_s=spec["sweep_grace_s"],
    )
    crash_at = spec.get("crash_at")
    emit(ev="ready")
    for i, op in enumerate(spec["ops"]):
        if crash_at and crash_at["before_op"] == i:
            os.environ[ENV_VAR] = crash_at["name"]
        try:
            emit(ev="before", i=i, op=op, steps=manager.steps())
            if op[0] == "save":
                step, pin = op[1], op[2]
                m = manager.write_snapshot(step, snapshot(step), pin=pin)
                mine = m.writer is not None and m.writer.token == manager.lease.held.token
                emit(ev="saved", step=step, attempt=m.attempt, mine=mine)
            elif op[0] == "prune":
                emit(ev="pruned", deleted=list(manager.prune().deleted))
            elif op[0] == "sweep":
                emit(ev="swept", removed=manager.sweep())
            elif op[0] == "list":
                emit(ev="listed", steps=manager.steps())
            else:
                raise ValueError(f"unknown operation {op!r}")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            emit(ev="error", i=i, op=op, error=f"{type(exc).__name__}: {exc}",
                 trace=traceback.format_exc()[-3000:])
            return 1
    emit(ev="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

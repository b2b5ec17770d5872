"""Subprocess body for the interruption tests: save, save, then die mid-save.

Usage: python crash_worker.py URL OPTIONS_JSON KEEP_LAST CRASH_POINT
Saves steps 1 and 2 normally, then sets CKPTMGR_CRASH_AT=CRASH_POINT and saves
step 3, during which the process SIGKILLs itself at that point.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ckptmgr import CheckpointManager  # noqa: E402
from ckptmgr.faults import ENV_VAR  # noqa: E402


def main() -> None:
    url, options, keep_last, crash_point = sys.argv[1:5]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(512), keras.layers.Dense(256), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, 64), "float32")
    manager = CheckpointManager(
        url, storage_options=json.loads(options), keep_last=int(keep_last) or None
    )
    for step in (1, 2, 3):
        model.fit(x, x[:, :1], verbose=0)
        if step == 3:
            os.environ[ENV_VAR] = crash_point
        manager.save(step, model, metrics={"loss": float(step)})
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()

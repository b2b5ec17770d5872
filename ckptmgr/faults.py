"""Named crash points for fault-injection tests (a no-op in normal runs).

Tests set ``CKPTMGR_CRASH_AT=<name>`` in a subprocess; when execution reaches
that point the process SIGKILLs itself, as a preempted node would die: no
``finally`` blocks, no flushes. This is how the interruption tests prove that
a crash at any instant leaves only complete checkpoints visible.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "CKPTMGR_CRASH_AT"


def crash_point(name: str) -> None:
    """Die at once if the environment asks to crash at ``name``."""
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)

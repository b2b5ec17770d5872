"""Named crash points for fault-injection tests (a no-op in normal runs).

Tests set ``CKPTMGR_CRASH_AT=<name>`` in a subprocess; when execution reaches
that point the process SIGKILLs itself, as a preempted node would die: no
``finally`` blocks, no flushes. This is how the interruption tests prove that
a crash at any instant leaves only complete checkpoints visible.

Counter mode, for schedules that should die "somewhere" rather than at one
named place: ``CKPTMGR_CRASH_AFTER=<N>`` (N >= 1) makes the process SIGKILL
itself at the N-th crash point it reaches, whatever its name. Every call of
:func:`crash_point` counts, from process start, whether or not a variable was
set yet; set once N points have already passed, it fires at the next one.
Just before dying it writes one line to stderr (unbuffered, fd 2),
``ckptmgr crash point <name> #<N>``, so the test knows where it died. Both
variables are read at each crash point, so a process may set them right
before the operation it wants to interrupt. With neither set, a crash point
costs two environment lookups.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "CKPTMGR_CRASH_AT"
COUNT_ENV_VAR = "CKPTMGR_CRASH_AFTER"

_reached = 0  # crash points reached so far in this process (counter mode)


def crash_point(name: str) -> None:
    """Die at once if the environment asks to crash at ``name`` (or at the
    N-th crash point, see ``CKPTMGR_CRASH_AFTER``)."""
    global _reached
    _reached += 1
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    after = os.environ.get(COUNT_ENV_VAR)
    if after and after.isdigit() and _reached >= int(after) > 0:
        try:
            os.write(2, f"ckptmgr crash point {name} #{_reached}\n".encode())
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

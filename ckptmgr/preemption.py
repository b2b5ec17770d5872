"""SIGTERM as a preemption notice, without swallowing anyone else's handler.

While ``fit()`` runs, the callback's handler turns SIGTERM into a request for
an emergency checkpoint (taken at the next batch end) and remembers that the
signal came. At train end the previous handler is put back and, if SIGTERM
came, the signal is passed on once the emergency checkpoint is committed:

- a Python handler (a supervisor's, the user's, Ray's worker handler) is
  called with the signal;
- the default action is re-raised, so the process ends as SIGTERM would have
  ended it (status 143) instead of looking like a finished run;
- an ignored signal stays ignored.

Handlers can only be installed from the main thread (Ray Train runs the loop
elsewhere): off it, nothing is installed and nothing is chained.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("ckptmgr")

_requested = threading.Event()  # an emergency checkpoint is wanted (cleared once taken)
_received = threading.Event()  # SIGTERM came during this fit (cleared when passed on)


def _on_sigterm(signum, frame) -> None:
    log.warning("SIGTERM received; taking an emergency checkpoint")
    _requested.set()
    _received.set()


_on_sigterm._ckptmgr = True  # type: ignore[attr-defined]
_active: "SigtermGuard | None" = None  # the guard whose handler is installed


class SigtermGuard:
    """Install the handler at train begin; :meth:`release` at train end."""

    def __init__(self):
        self._previous: Any = None
        self._installed = False

    def install(self) -> bool:
        """False off the main thread (nothing installed)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        global _active
        current = signal.getsignal(signal.SIGTERM)
        if getattr(current, "_ckptmgr", False) and _active is not None:
            # Left by a fit() that raised (Keras skips on_train_end then): take over its
            # record of what to restore.
            current, _active._installed = _active._previous, False
        self._previous, self._installed = current, True
        _active = self
        _received.clear()
        signal.signal(signal.SIGTERM, _on_sigterm)
        return True

    def release(self) -> None:
        """Put the previous handler back and pass a SIGTERM that came on to it."""
        global _active
        if not self._installed:
            return
        self._installed = False
        _active = None
        previous = self._previous
        # None: installed outside Python (not restorable); the default action is
        # the nearest thing, and it never swallows the signal.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if not _received.is_set():
            return
        _received.clear()
        if callable(previous):
            log.info("passing SIGTERM on to the handler installed before fit()")
            previous(signal.SIGTERM, None)
        elif previous in (signal.SIG_DFL, None):
            log.info("SIGTERM: emergency checkpoint done; ending the process as SIGTERM does")
            signal.raise_signal(signal.SIGTERM)


def preemption_requested() -> bool:
    return _requested.is_set()


def clear_preemption() -> None:
    _requested.clear()


def request_preemption() -> None:
    """What SIGTERM does, without a signal (tests, other notice sources)."""
    _requested.set()

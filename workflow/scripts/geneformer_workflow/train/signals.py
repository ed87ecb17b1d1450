"""SIGTERM / SIGUSR1 → stop after the current step, save a checkpoint and exit 0.

SLURM sends SIGTERM before killing a job at its time limit (and ``scancel --signal=USR1``
sends SIGUSR1); ``torchrun`` forwards SIGTERM to its workers. The handler only sets a flag; the
trainer reduces the flag across ranks at the start of every step, so all ranks stop together.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers (main thread only) and restores the previous ones on :meth:`restore`."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        """Put the previous handlers back (matters when ``main`` runs inside a test process)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

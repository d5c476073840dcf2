"""SIGINT (Ctrl+C) and SIGTERM (what a cluster scheduler sends) stop a search cleanly.

The first signal stops the running trials through Tune's own stopper; finished trials are already in
the journal, the unfinished ones are written as ``interrupted``, and the CLI exits 130 so
``automl resume`` can finish the run. A second signal stops at once.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

from ray.tune import Stopper

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt(Stopper):
    """Set by the signal handler; Tune asks ``stop_all`` at every step of its loop."""

    def __init__(self):
        self.signal: Optional[str] = None

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"automl: {self.signal} received: stopping the running trials (they are kept as 'interrupted'; "
              "send it again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals():
    """An Interrupt for the block, with SIGINT and SIGTERM routed to it (main thread only: elsewhere
    Python cannot set handlers, and the caller's own handling stays)."""
    stopper = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield stopper
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's would end the loop without telling us
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, stopper._handle)
    try:
        yield stopper
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

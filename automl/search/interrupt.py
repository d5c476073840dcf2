"""SIGINT (Ctrl+C) and SIGTERM (what a cluster scheduler sends) stop a search cleanly.

While trials run, the first signal stops them through Tune's own stopper; finished trials are already
in the journal, the unfinished ones are written as ``interrupted``, and the CLI exits 130 so
``automl resume`` can finish the run. A second signal, or one outside the trials (baseline, outputs),
stops at once with KeyboardInterrupt: the journal and the run directory's last complete output set stay.
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
    """Set by the signal handler while ``graceful``; Tune asks ``stop_all`` at every step of its loop."""

    def __init__(self):
        self.signal: Optional[str] = None
        self.graceful = False

    def install(self):
        """Route SIGINT and SIGTERM here (again after ray.init, which sets its own SIGTERM handler)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None or not self.graceful:
            raise KeyboardInterrupt(signal.Signals(signum).name)
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
    stopper.install()
    try:
        yield stopper
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

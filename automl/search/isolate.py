"""A trial's work runs in a forked child of the Ray worker, so a process that dies (os._exit, a
signal, the out-of-memory killer) is reported with its exit code or signal and peak memory, not as
Ray's "The actor died unexpectedly".

The child sends its per-epoch and final metrics through a pipe and the worker reports them to Tune;
when Tune stops the trial (ASHA) the worker kills the child. The child dies with the worker too
(PR_SET_PDEATHSIG), so no training outlives a killed search. Set AUTOML_TRIAL_PROCESS=inline to run
trials in the worker itself (e.g. under a debugger).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from automl.errors import AutoMLError


WATCH_PERIOD_S = 2.0
DRIVER_GONE = 75


class TrialProcessDied(AutoMLError):
    exit_code = 1


class ChildTraceback(Exception):
    """The child's own traceback, chained under the exception re-raised in the worker."""


def run_in_child(body: Callable[[Callable], None], report: Callable[[dict], None], driver=None) -> None:
    """``body(send)`` in a forked child; ``report(metrics)`` here for each ``send(metrics)`` there.
    The child's exception is raised here; a child that dies raises TrialProcessDied. ``driver``
    (host, pid) is the search's driver: on its host, the child stops when the driver is gone."""
    if not hasattr(os, "fork") or os.environ.get("AUTOML_TRIAL_PROCESS") == "inline":
        body(report)
        return
    reader, writer = multiprocessing.Pipe(duplex=False)
    oom_before = _oom_kills()
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(body, reader, writer, driver)
    writer.close()
    try:
        error = _relay(reader, report)
    except BaseException:  # Tune stopped the trial (SystemExit in report) or the worker is going down
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        reader.close()
    _, status, usage = os.wait4(pid, 0)
    if error is not None:
        raise error
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise TrialProcessDied(describe_death(code, usage.ru_maxrss * 1024, _oom_kills() - oom_before))


def _child(body, reader, writer, driver):
    code = 0
    try:
        reader.close()
        _die_with_parent()
        if driver is not None and driver[0] == socket.gethostname():
            threading.Thread(target=_watch, args=(driver[1],), daemon=True).start()
        body(lambda metrics: writer.send(("metrics", metrics)))
    except BaseException as exc:
        code = 1
        text = traceback.format_exc()
        try:
            writer.send(("error", exc, text))
        except Exception:  # an exception that does not pickle: its text is enough
            writer.send(("error", None, text))
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _relay(reader, report) -> Optional[BaseException]:
    while True:
        try:
            message = reader.recv()
        except EOFError:  # the child is gone: wait4 says how
            return None
        if message[0] == "metrics":
            report(message[1])
            continue
        _, exc, text = message
        if exc is None:
            lines = [line for line in text.splitlines() if line.strip()]
            exc = RuntimeError(lines[-1] if lines else "the trial failed")
        exc.__cause__ = ChildTraceback(text)
        return exc


def _watch(pid: int):
    """A killed driver leaves Ray's workers running for about a minute: its trials stop now, so they
    do not compete with a resumed search."""
    while True:
        time.sleep(WATCH_PERIOD_S)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(DRIVER_GONE)
        except PermissionError:  # alive, another user's: not ours to judge
            pass


def _die_with_parent():
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Tune's stop still kills the child (run_in_child)
        pass


def describe_death(code: int, peak_bytes: int, oom_kills: int) -> str:
    what = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    limit = memory_limit()
    text = f"the trial's process {what} before it reported a result (peak memory {peak_bytes / 2**30:.2f} GiB"
    text += f" of {limit / 2**30:.1f} GiB allowed)" if limit else ")"
    if code == -signal.SIGKILL and (oom_kills > 0 or (limit and peak_bytes >= 0.9 * limit)):
        return (text + ": this looks like the out-of-memory killer. Fix: lower budget.concurrency or the model or "
                "batch size, or give the machine more memory")
    return text + (". Fix: a native crash (SIGSEGV) or os._exit in the task or model code ends a trial this way; "
                   "'automl apply' on the trial's recipe runs it in the foreground")


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _oom_kills() -> int:
    """The cgroup's count of out-of-memory kills (v2, else v1), 0 where there is none."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        text = _read(path)
        for line in (text or "").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def memory_limit() -> Optional[int]:
    """Bytes this process may use: the cgroup's limit, else the machine's memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = (_read(path) or "").strip()
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None

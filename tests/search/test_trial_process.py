"""A trial's work runs in a child process: its metrics reach Tune, its errors keep their type and
traceback, and a child that dies is reported with its exit code or signal and peak memory."""
import os
import signal
import time

import pytest

from automl.errors import ConfigError
from automl.search import isolate
from automl.search.isolate import ChildTraceback, TrialProcessDied, describe_death, run_in_child


def test_metrics_are_relayed_in_order():
    seen = []
    run_in_child(lambda send: [send({"epoch": e}) for e in range(3)], seen.append)
    assert seen == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]


def test_an_error_keeps_its_type_message_and_child_traceback():
    def body(send):
        send({"epoch": 1})
        raise ConfigError("bad layer", key="layers", value="x", fix="use y")

    with pytest.raises(ConfigError, match="bad layer") as info:
        run_in_child(body, lambda m: None)
    assert isinstance(info.value.__cause__, ChildTraceback) and "in body" in str(info.value.__cause__)


def test_an_error_that_does_not_pickle_keeps_its_text():
    class Odd(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def body(send):
        raise Odd("strange failure")

    with pytest.raises(RuntimeError, match="strange failure"):
        run_in_child(body, lambda m: None)


@pytest.mark.parametrize("how, expected", [("exit", "exited with code 3"), ("kill", "was killed by SIGKILL"),
                                           ("segv", "was killed by SIGSEGV")])
def test_a_child_that_dies_says_how(how, expected):
    def body(send):
        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSEGV)

    with pytest.raises(TrialProcessDied, match=expected) as info:
        run_in_child(body, lambda m: None)
    assert "peak memory" in str(info.value) and "Fix:" in str(info.value)


def test_out_of_memory_kill_is_named(monkeypatch):
    kills = iter([4, 5])
    monkeypatch.setattr(isolate, "_oom_kills", lambda: next(kills))
    with pytest.raises(TrialProcessDied, match="out-of-memory killer"):
        run_in_child(lambda send: os.kill(os.getpid(), signal.SIGKILL), lambda m: None)
    limit = isolate.memory_limit()
    assert limit and "out-of-memory" in describe_death(-signal.SIGKILL, limit, 0)
    assert "out-of-memory" not in describe_death(-signal.SIGKILL, limit // 10, 0)


def test_a_stopped_trial_kills_its_child(tmp_path):
    """Tune stops a trial by raising SystemExit in report: the child must not train on."""
    marker = tmp_path / "pid"

    def body(send):
        marker.write_text(str(os.getpid()))
        send({"epoch": 1})
        time.sleep(60)

    def report(metrics):
        raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_in_child(body, report)
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)


def test_a_child_stops_when_the_driver_on_its_host_is_gone(monkeypatch):
    import socket
    import subprocess
    import sys

    monkeypatch.setattr(isolate, "WATCH_PERIOD_S", 0.1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    started = time.time()
    with pytest.raises(TrialProcessDied, match=f"exited with code {isolate.DRIVER_GONE}"):
        run_in_child(lambda send: time.sleep(30), lambda m: None, driver=(socket.gethostname(), gone.pid))
    assert time.time() - started < 10
    run_in_child(lambda send: send({"ok": 1}), lambda m: None, driver=(socket.gethostname(), os.getpid()))

"""Starting (or reaching) Ray for a search -- in a background thread, so Ray's processes start while
the driver measures the baseline and prepares the search (``RayStart``)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Optional

import optuna
import ray

from automl.errors import AutoMLError, ConfigError
from automl.search.shipping import user_code_paths


class RayStart:
    """``_init_ray`` on a thread; ``wait()`` returns its seconds or raises what it raised and hands Ray
    to the search. ``stop()`` (the search failed before that) waits for the start and shuts down the Ray
    it began; once the search holds Ray it does nothing (as when Ray was started in the main thread).

    The thread that started Ray stays alive (idle) while Ray runs: Ray's processes are set to die with
    the thread that spawned them (Linux's parent-death signal is per thread)."""

    def __init__(self, address: Optional[str], cpus: int, modules=()):
        self.seconds, self.error, self.ready, self.claimed, self.ours = 0.0, None, threading.Event(), False, False
        self.thread = threading.Thread(target=self._run, args=(address, cpus, modules), daemon=True,
                                       name="automl-ray-start")
        self.thread.start()

    def _run(self, *args):
        started = time.time()
        self.ours = ours = not ray.is_initialized()
        quiet = logging.getLogger("ray._private.worker")  # "SIGTERM handler is not set ..." off the main thread:
        level = quiet.level                                 # the search installs its own handler after
        quiet.setLevel(logging.ERROR)
        try:
            _init_ray(*args)
        except BaseException as exc:  # handed to wait(), in the main thread
            self.error = exc
        finally:
            quiet.setLevel(level)
            self.seconds = time.time() - started
            self.ready.set()
        while ours and self.error is None and ray.is_initialized():
            time.sleep(0.2)

    def wait(self) -> float:
        self.ready.wait()
        if self.error is not None:
            raise self.error
        self.claimed = True
        return self.seconds

    def stop(self):
        if self.claimed:
            return
        self.ready.wait()
        if self.ours and self.error is None and ray.is_initialized():
            ray.shutdown()


def _init_ray(address: Optional[str], cpus: int, modules=()):
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # user paths stay valid inside trials
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our TrialLog callback prints one line per trial
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # ... failures included, not 50 traceback lines
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Per-epoch reports carry accuracy only (for ASHA); deployed metrics come with the final report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # as Ray's own tools do
    if address:
        check_reachable(address)
    if not address:  # local workers import a user's model builder from where the driver runs
        paths = [os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                  configure_logging=True)
    shipped = user_code_paths(modules)
    try:
        if address:
            ray.init(address=address, **kwargs, **({"runtime_env": {"py_modules": shipped}} if shipped else {}))
        else:
            ray.init(num_cpus=max(cpus, 1), **kwargs)
    except Exception as exc:  # connection, auth (RAY_AUTH_MODE) ...
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise AutoMLError(f"could not start or reach {where}: {exc}. If the cluster uses token "
                          "authentication, set both RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>; "
                          "check --address.") from None


CONNECT_TIMEOUT_S = 30.0


def check_reachable(address: str):
    """Fail within AUTOML_CONNECT_TIMEOUT_S (default 30 s) when nothing listens at a host:port address;
    Ray itself retries for many minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 address: [::1]:6379
    if not host or not port.isdigit():  # 'auto', 'local': Ray resolves these itself
        return
    try:
        timeout = float(os.environ.get("AUTOML_CONNECT_TIMEOUT_S", CONNECT_TIMEOUT_S))
    except ValueError:
        raise ConfigError("must be a number of seconds", key="AUTOML_CONNECT_TIMEOUT_S",
                          value=os.environ["AUTOML_CONNECT_TIMEOUT_S"],
                          fix="e.g. AUTOML_CONNECT_TIMEOUT_S=30") from None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise AutoMLError(f"no Ray cluster answers at {address} (waited up to {timeout:g} s: {exc}). Fix: start the "
                          "cluster ('ray start --head') or correct --address / RAY_ADDRESS; "
                          "AUTOML_CONNECT_TIMEOUT_S sets the wait") from None

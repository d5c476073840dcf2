"""A search's run directory: what may become one, its exclusive lock, and emptying it for --force.

Nothing here deletes before the search is validated: ``check_run_dir`` only reads, and
``prepare_run_dir`` is called once the space, task and profile are known to be good and the lock
is held. The lock (``.lock``: flock, with the holder's pid and host written in it) keeps a second
search or a resume out of a run in progress. The outputs (trials.csv, front.csv, report.*, pareto.png,
recipes/) are written as one set: into a staging directory, marked complete, then moved into place;
a kill in between is finished (or dropped, when the set was incomplete) by the next resume.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path

from automl.errors import RunDirError

TUNE_DIR = "tune"
LOCK = ".lock"
STAGING = ".outputs-staging"
COMPLETE = ".complete"


def _entries(out: Path):
    return [p for p in out.iterdir() if p.name != LOCK]


def _never_started(out: Path) -> bool:
    """A run directory whose search stopped before its first trial (e.g. Ray failed to start): it
    holds only what is written before the trials, and a new search may take it over."""
    return (out / "space.yaml").is_file() and not (out / TUNE_DIR).exists() and not (out / "trials.csv").exists()


def check_run_dir(out: Path, force: bool) -> Path:
    """Refuse an --out that cannot become a new run directory; deletes nothing."""
    out = Path(out).resolve()
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RunDirError(f"--out {out}: {blocker} is a file, not a directory. Fix: choose another --out")
    if blocker is not None and not os.access(blocker, os.W_OK):
        raise RunDirError(f"--out {out}: cannot write in {blocker}. Fix: choose a directory you can write to")
    if out.is_dir() and _entries(out) and not force and not _never_started(out):
        raise RunDirError(f"run directory {out} already exists and is not empty. Fix: choose another "
                          f"--out, continue it with 'automl resume {out}', or pass --force to replace it")
    return out


def prepare_run_dir(out: Path, force: bool) -> Path:
    """The empty run directory (under the lock, once everything else is validated: --force deletes)."""
    out = check_run_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    for entry in _entries(out):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return out


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold ``out``'s exclusive lock for the block; a run directory in use is a RunDirError."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirError(f"run directory {out} is in use by {holder}. Fix: wait for that search to end, "
                              "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        handle.flush()
        yield out
    finally:
        handle.close()


def write_output_set(out: Path, write) -> object:
    """``write(staging_dir)`` writes every output; then they replace the old ones together (recipes/
    as a whole, so recipes of trials no longer on the front go). Returns what ``write`` returned."""
    staging = Path(out) / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "recipes").mkdir(parents=True)
    result = write(staging)
    (staging / COMPLETE).touch()
    _move_into_place(Path(out), staging)
    return result


def _move_into_place(out: Path, staging: Path):
    for entry in sorted(staging.iterdir()):
        if entry.name == COMPLETE:
            continue
        target = out / entry.name
        if entry.is_dir():
            old = out / f".{entry.name}-old"
            if target.exists():
                os.rename(target, old)
            os.rename(entry, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)
    shutil.rmtree(staging)


def recover_outputs(out: Path):
    """After a kill while the outputs were written: finish a complete set, drop an incomplete one,
    and remove temporary files left behind."""
    out = Path(out)
    staging = out / STAGING
    if (staging / COMPLETE).is_file():
        _move_into_place(out, staging)
    elif staging.exists():
        shutil.rmtree(staging)
    for old in out.glob(".*-old"):
        shutil.rmtree(old, ignore_errors=True)
    for tmp in [*out.glob(".*.tmp"), *out.glob("recipes/.*.tmp")]:
        tmp.unlink()

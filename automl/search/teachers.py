"""Distillation teachers shared by every node of a search, not only by trials that share a disk.

A small Ray actor on the driver's node owns the run directory's ``cache/``. Before a trial starts, its
worker fetches the teachers the trial's recipe needs into the trial's own directory; after it ends,
the worker publishes the teachers the trial trained. A teacher trained on one node is thus reused on
every other, and stays in the run directory for a resume. The trial's child process only ever sees
a local directory (it cannot use the worker's Ray connection).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from automl.io import atomic_write_bytes


class TeacherStore:
    """The actor's side: entries are directories of a few files (state_dict, structure)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = Path(cache_dir)

    def get(self, name: str) -> Optional[Dict[str, bytes]]:
        entry = self.cache_dir / name
        if not entry.is_dir():
            return None
        return {p.name: p.read_bytes() for p in entry.iterdir() if p.is_file()}

    def put(self, name: str, files: Dict[str, bytes]) -> bool:
        entry = self.cache_dir / name
        if entry.is_dir():  # another trial published it first
            return False
        write_entry(entry, files)
        return True


def write_entry(entry: Path, files: Dict[str, bytes]):
    """The entry directory, complete or not at all (written beside it, then renamed)."""
    staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, data in files.items():
            atomic_write_bytes(staging / Path(name).name, data)
        os.replace(staging, entry)
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def start_store(cache_dir: Path):
    """The store actor, pinned to this (the driver's) node, using no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(TeacherStore)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(cache_dir))


def fetch(store, names: Sequence[str], local: Path) -> int:
    """Copy the store's entries among ``names`` into ``local``; returns how many it had."""
    import ray

    found = 0
    for name, files in zip(names, ray.get([store.get.remote(n) for n in names])):
        if files:
            write_entry(local / name, files)
            found += 1
    return found


def publish(store, names: Sequence[str], local: Path) -> None:
    """Send the entries among ``names`` that exist in ``local`` to the store."""
    import ray

    sent = [store.put.remote(n, {p.name: p.read_bytes() for p in (local / n).iterdir() if p.is_file()})
            for n in names if (local / n).is_dir()]
    ray.get(sent)


def space_has_teachers(space) -> bool:
    """Whether any method the space can choose takes a teacher."""
    import dataclasses

    from automl.compress.base import METHODS

    for p in space.params:
        if not p.name.endswith(".method"):
            continue
        values = getattr(p.domain, "values", None) or [getattr(p.domain, "value", None)]
        for value in values:
            info = dict(METHODS.items()).get(value)
            if info and any(f.name == "teacher" for f in dataclasses.fields(info.config_cls)):
                return True
    return False

"""The run directory's journal: one fsynced JSON line per finished trial, written by the driver.

A trial is durable the moment it finishes (Tune saves its own experiment state only every ~10 s), and
``automl resume`` reads the journal back instead of unpickling Tune's state: the finished trials keep
their rows, the sampler learns from them, and only the remaining budget runs. The journal is plain
JSON, so a received run directory cannot run code through it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

import optuna

from automl.errors import RunDirError
from automl.spaces import SearchSpace, define_by_run

JOURNAL = "journal.jsonl"
STATUSES = ("completed", "early_stopped", "error")
# Tune's bookkeeping, not the trial's metrics
_NOT_METRICS = {"trial_id", "final", "feasible", "date", "hostname", "node_ip", "pid", "timestamp", "experiment_tag",
                "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
                "checkpoint_dir_name", "done", "training_iteration"}


def make_row(trial_id: str, metrics: Optional[Dict], config: Optional[Dict], space: SearchSpace, *,
             error: Optional[str] = None, traceback: Optional[str] = None) -> Dict:
    """A trial's row for trials.csv and the journal, from its last result and config."""
    metrics = dict(metrics or {})
    if error is not None:
        status = "error"
    elif metrics.get("final"):
        status = "completed"
    else:
        status = "early_stopped"
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            and k not in _NOT_METRICS}
    return {"trial_id": trial_id, "status": status, "feasible": bool(metrics.get("feasible")), "error": error,
            "traceback": traceback, "metrics": keep,
            "config": {k: v for k, v in (config or {}).items() if k in space.names()}}


class Journal:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / JOURNAL

    def append(self, row: Dict) -> None:
        line = json.dumps(row, sort_keys=True, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> List[Dict]:
        """The finished trials, first record per trial id. A last line cut short by a kill is dropped
        (that trial was never reported finished); a damaged line elsewhere is a RunDirError."""
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        rows: Dict[str, Dict] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = _checked(json.loads(line.decode("utf-8")))
            except (ValueError, UnicodeDecodeError) as exc:
                if number == len(lines):  # no newline yet: the write was cut short
                    continue
                raise RunDirError(f"{self.path}: line {number} is not a trial record ({exc}). Fix: delete that line "
                                  "(its trial runs again on resume) or start a new search") from None
            rows.setdefault(row["trial_id"], row)
        return list(rows.values())


def _checked(row) -> Dict:
    if not isinstance(row, dict) or not isinstance(row.get("trial_id"), str) or row.get("status") not in STATUSES:
        raise ValueError("needs trial_id and a status of " + ", ".join(STATUSES))
    for key in ("metrics", "config"):
        if not isinstance(row.get(key), dict):
            raise ValueError(f"'{key}' must be a mapping")
    return row


def teach_study(study: optuna.Study, rows: List[Dict], space: SearchSpace) -> int:
    """Add the journaled trials to a fresh Optuna study, as OptunaSearch would have told them.
    Returns how many were added (a config the space no longer produces is skipped)."""
    suggest = define_by_run(space)
    added = 0
    for row in rows:
        fixed = optuna.trial.FixedTrial(row["config"])
        try:
            suggest(fixed)
        except ValueError:  # a parameter the config lacks
            continue
        values, state = None, optuna.trial.TrialState.FAIL
        if row["status"] == "early_stopped":
            state = optuna.trial.TrialState.PRUNED
        elif row["status"] == "completed":
            values = [row["metrics"].get(m) for m in space.objectives]
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                state = optuna.trial.TrialState.COMPLETE
            else:
                values = None
        try:
            study.add_trial(optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions,
                                                      values=values, state=state))
        except ValueError:  # a value outside the space's domain
            continue
        added += 1
    return added

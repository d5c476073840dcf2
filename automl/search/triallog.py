"""The driver's record of each trial as it finishes: journal line, traceback file, one console line."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List, Optional

from ray.tune import Callback

from automl.io import atomic_write_text
from automl.search.journal import Journal, make_row
from automl.spaces import SearchSpace

TRACEBACKS = "tracebacks"
# the line that starts the exception in a traceback: "ValueError: ..." or "automl.errors.ConfigError: ..."
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(: |$)")


class TrialLog(Callback):
    """Journals every finished trial (durable before anything is printed), keeps a failed trial's
    traceback in the run directory, prints one line, and remembers the trials that started, so those
    still running at a stop are reported ``interrupted``."""

    def __init__(self, journal: Journal, space: SearchSpace, run_dir: Path, done: int, interrupt=None):
        self.journal, self.space, self.run_dir = journal, space, Path(run_dir)
        self.total, self.done = space.budget.trials, done
        self.interrupt = interrupt
        self.started: Dict[str, object] = {}
        self.finished: set = set()
        self.first_start: Optional[float] = None  # wall clock of the first trial start and last trial end
        self.last_end: Optional[float] = None

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = trial
        self.first_start = self.first_start or time.time()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, make_row(trial.trial_id, trial.last_result, trial.config, self.space))

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.interrupt is not None and self.interrupt.signal is not None:
            return  # a worker hit by the same signal: the trial is unfinished, not failed
        text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
        traceback = None
        if text:
            traceback = f"{TRACEBACKS}/{trial.trial_id}.txt"
            atomic_write_text(self.run_dir / traceback, text)
        row = make_row(trial.trial_id, trial.last_result, trial.config, self.space,
                       error=error_from_traceback(text) or "unknown error", traceback=traceback)
        self._finish(trial, row)

    def _finish(self, trial, row: Dict):
        self.last_end = time.time()
        self.journal.append(row)
        self.finished.add(trial.trial_id)
        self.done += 1
        print(f"[{self.done}/{self.total}] {trial.trial_id}: {self._line(row)}", flush=True)

    def _line(self, row: Dict) -> str:
        m = row["metrics"]
        if row["status"] == "error":
            log = f" (traceback: {self.run_dir / row['traceback']})" if row.get("traceback") else ""
            return f"failed: {row['error'][:200]}{log}"
        if row["status"] == "early_stopped":
            return f"stopped early at epoch {m.get('epoch', '?')} (acc={m.get('accuracy', float('nan')):.4f})"
        energy = f" energy={m['energy_mj']:.4g}mJ" if "energy_mj" in m else ""
        return (f"acc={m.get('accuracy', float('nan')):.4f} lat={m.get('latency_ms', float('nan')):.4f}ms "
                f"size={m.get('size_kb', float('nan')):.1f}kB{energy} {m.get('precision', '')}")

    def unfinished(self) -> List[Dict]:
        return [{**make_row(tid, t.last_result, t.config, self.space), "status": "interrupted"}
                for tid, t in self.started.items() if tid not in self.finished]


def error_from_traceback(text: str, limit: int = 600) -> Optional[str]:
    """One line for trials.csv from the traceback Tune wrote: the last exception's message (our own
    errors without their type, which their text already explains), else the last line."""
    lines = text.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else 0
    while start < len(lines) and (lines[start][:1].isspace() or not lines[start].strip()):
        start += 1  # the last frame's source lines
    match = _EXCEPTION_LINE.match(lines[start]) if start < len(lines) else None
    if not match:
        last = [line.strip() for line in lines if line.strip()]
        return last[-1][:limit] if last else None
    kind = match.group("type")
    message = " ".join(line.strip() for line in [lines[start][len(kind) + 1:], *lines[start + 1:]] if line.strip())
    if kind.startswith("automl.errors."):
        return message[:limit]
    return f"{kind.rsplit('.', 1)[-1]}: {message}"[:limit]

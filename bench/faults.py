"""Kill searches at random moments, resume them, and count trials lost, re-run and duplicated.

Each run starts ``automl search`` on a small digits space (``--trials`` trials, concurrency 2), then
up to ``--kills`` times sends a random signal (SIGKILL, SIGTERM or SIGINT) at a random moment of the
attempt and starts ``automl resume``; the last resume runs to the end. From every attempt's console
it records the trials reported finished, and at the end reads trials.csv:

- lost: a trial reported finished that is missing from the final trials.csv, or whose accuracy there
  differs from the one reported;
- re-run: a trial reported finished by more than one attempt;
- duplicated: a trial id on more than one row of trials.csv; also counted: rows beyond the budget.

    python bench/faults.py                       # 6 runs x 2 kills (about 12 minutes on 2 cores)
    python bench/faults.py --runs 1 --kills 1    # smoke run
Writes bench/results/faults.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPACE = """
version: 1
task: digits
arch:
  family: cnn
  width: {choice: [8, 16]}
  depth: {int: [2, 3]}
train:
  epochs: 3
  lr: {float: [3e-3, 1e-2], log: true}
compression:
  pruning:
    method: {choice: [none, magnitude]}
    ratio: {float: [0.3, 0.6], when: {pruning.method: magnitude}}
    finetune_epochs: 1
objectives: {accuracy: max, latency_ms: min, size_kb: min}
budget: {trials: TRIALS, concurrency: 2, grace_epochs: 1, seed: SEED}
"""
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT")


def attempt(args, kill_after, sig):
    """One search or resume; killed with ``sig`` after ``kill_after`` seconds (None: runs to the end).
    Returns (finished trial id -> reported accuracy or None, exit code, seconds)."""
    proc = subprocess.Popen([sys.executable, "-m", "automl.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = None
    if kill_after is not None:
        timer = threading.Timer(kill_after, lambda: proc.poll() is None and proc.send_signal(getattr(signal, sig)))
        timer.start()
    started, finished = time.time(), {}
    for line in proc.stdout:
        if line.startswith("[") and "/" in line.split()[0]:
            trial_id = line.split()[1].rstrip(":")
            accuracy = line.split("acc=")[1].split()[0].rstrip(")") if "acc=" in line else None
            finished[trial_id] = None if accuracy is None else float(accuracy)
    code = proc.wait()
    if timer:
        timer.cancel()
    return finished, code, time.time() - started


def one_run(run: int, args, work: Path):
    rng = random.Random(1000 + run)
    (work / "space.yaml").write_text(SPACE.replace("TRIALS", str(args.trials)).replace("SEED", str(run)))
    out = work / "run"
    command = ["search", "--space", str(work / "space.yaml"), "--out", str(out), "--no-profile"]
    attempts, reported = [], []
    for k in range(args.kills + 1):
        last = k == args.kills
        kill_after = None if last else rng.uniform(args.min_kill_s, args.max_kill_s)
        sig = rng.choice(SIGNALS)
        finished, code, seconds = attempt(command, kill_after, sig)
        attempts.append({"signal": None if last else sig, "kill_after_s": kill_after, "exit_code": code,
                         "seconds": round(seconds, 1), "finished": len(finished)})
        reported.append(finished)
        command = ["resume", str(out)]
        if code == 0:
            break  # the search ended before the kill
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    final = {}
    duplicated = max(0, len(rows) - args.trials)
    for row in rows:
        duplicated += row["trial_id"] in final
        final[row["trial_id"]] = row
    seen, rerun, lost = set(), 0, 0
    for finished in reported:
        rerun += len(seen & set(finished))
        seen |= set(finished)
        for trial_id, accuracy in finished.items():
            row = final.get(trial_id)
            if row is None or (accuracy is not None and abs(float(row["accuracy"] or "nan") - accuracy) > 1e-4):
                lost += 1
    statuses = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return {"run": run, "attempts": attempts, "rows": len(rows), "statuses": statuses,
            "lost": lost, "rerun": rerun, "duplicated": duplicated}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--kills", type=int, default=2, help="kills per run before the last, uninterrupted resume")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--min-kill-s", type=float, default=3.0)
    parser.add_argument("--max-kill-s", type=float, default=25.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "faults.json"))
    args = parser.parse_args()
    from automl.hardware.profile import cpu_model

    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="automl-faults-") as work:
            result = one_run(run, args, Path(work))
        results.append(result)
        print(json.dumps(result), flush=True)
    totals = {k: sum(r[k] for r in results) for k in ("lost", "rerun", "duplicated")}
    complete = sum(r["rows"] == args.trials and set(r["statuses"]) <= {"completed", "early_stopped", "error"}
                   for r in results)
    kills = sum(a["exit_code"] != 0 for r in results for a in r["attempts"])
    summary = {"cpu": cpu_model(), "runs": args.runs, "kills": kills,
               "trials_per_run": args.trials, **totals, "runs_with_full_budget": complete,
               "command": "python bench/faults.py " + " ".join(sys.argv[1:]), "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['kills']} kills over {args.runs} runs: lost {totals['lost']}, re-run {totals['rerun']}, "
          f"duplicated {totals['duplicated']}; {complete}/{args.runs} runs ended with exactly {args.trials} "
          f"finished trials -> {args.out}")


if __name__ == "__main__":
    main()

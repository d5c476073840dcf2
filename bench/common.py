"""What the benchmark scripts share (run them as `python bench/<name>.py`; this directory is on sys.path)."""
from __future__ import annotations

import statistics

import torch

from automl.runtime import measure_latency
from automl.tasks.base import TensorClassificationTask


class GeneratedTask(TensorClassificationTask):
    """Random 3x32x32 inputs with random labels: for latency only (accuracy is meaningless)."""

    name = "generated32"

    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        super().__init__(x, y, x[:64], y[:64], x[:64], y[:64])


def latencies(runners, task, rounds):
    """{name: {b1, b32}}: median over interleaved rounds of each runner's median latency."""
    out = {name: {"b1": [], "b32": []} for name in runners}
    x1, x32 = task.example_input(1).numpy(), task.example_input(32).numpy()
    for _ in range(rounds):
        for name, runner in runners.items():
            out[name]["b1"].append(measure_latency(runner, x1, warmup=20, repeats=100)["median_ms"])
            out[name]["b32"].append(measure_latency(runner, x32, warmup=5, repeats=30)["median_ms"])
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in out.items()}, out

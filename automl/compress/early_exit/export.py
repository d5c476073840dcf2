"""Deployed early exit: one ONNX graph per segment, chained by a small onnxruntime runner.

Data-dependent exits do not export as one graph, so segment i becomes its own graph: it takes the
previous segment's feature map (the image for segment 0) and returns the next feature map, the
exit's logits and the exit's confidence (computed in-graph, so the runner only compares one
number). The last graph returns logits only. ``manifest.json`` records the files, the criterion
and the thresholds, so ``EarlyExitRunner.load(dir)`` makes the same decisions as
``EarlyExitModel.infer``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.compress.early_exit.model import CRITERIA, EarlyExitModel, check_thresholds, confidence
from automl.errors import ConfigError
from automl.io import write_json
from automl.runtime import onnx_export

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class _SegmentGraph(nn.Module):
    """What one exported graph computes: blocks -> (features, logits, confidence) or logits."""

    def __init__(self, segment: nn.Module, head: nn.Module, criterion: str, last: bool):
        super().__init__()
        self.segment, self.head, self.criterion, self.last = segment, head, criterion, last

    def forward(self, h):
        h = self.segment(h)
        logits = self.head(h)
        if self.last:
            return logits
        return h, logits, confidence(logits, self.criterion)


def export_early_exit(model: EarlyExitModel, example: torch.Tensor, out_dir, thresholds,
                      criterion: str = "max_softmax") -> Path:
    """Write ``segment_<i>.onnx`` per segment plus the manifest; returns the manifest path."""
    thresholds = check_thresholds(thresholds, model.num_exits - 1)
    if criterion not in CRITERIA:
        raise ConfigError("unknown exit criterion", key="early_exit.criterion", value=criterion,
                          fix=f"use one of {', '.join(CRITERIA)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # A batch of two keeps the exporter from specialising the batch dimension to 1.
    h = example[:1].repeat(2, *([1] * (example.dim() - 1))) if example.shape[0] < 2 else example
    files = []
    for i, (segment, head) in enumerate(zip(model.segments, model.exit_heads)):
        last = i == model.num_exits - 1
        graph = _SegmentGraph(segment, head, criterion, last).eval()
        name = f"segment_{i}.onnx"
        onnx_export(graph, h, out_dir / name, ["logits"] if last else ["features", "logits", "confidence"])
        files.append(name)
        if not last:
            with torch.no_grad():
                h = segment(h)
    manifest = {"version": FORMAT_VERSION, "criterion": criterion, "thresholds": thresholds,
                "segments": files, "exit_after": list(model.exit_after)}
    return write_json(out_dir / MANIFEST, manifest)


class EarlyExitRunner:
    """Chains the segment graphs in onnxruntime, stopping a sample at its first confident exit."""

    def __init__(self, paths, thresholds, *, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                         for p in paths]
        self.thresholds = check_thresholds(thresholds, len(self.sessions) - 1)
        self.segments_executed = 0  # summed over samples, like EarlyExitModel.blocks_executed

    @classmethod
    def load(cls, directory, *, threads: int = 1, thresholds=None) -> "EarlyExitRunner":
        """From an export directory; ``thresholds`` overrides the exported ones."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the early-exit manifest: {exc}", key="early_exit.export",
                              value=str(directory), fix="point at a directory written by export_early_exit") from None
        if manifest.get("version") != FORMAT_VERSION:
            raise ConfigError("unsupported early-exit export version", key="early_exit.export.version",
                              value=manifest.get("version"), fix="re-export with this automl version")
        paths = [directory / f for f in manifest["segments"]]
        return cls(paths, manifest["thresholds"] if thresholds is None else thresholds, threads=threads)

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def __call__(self, x) -> Tuple[np.ndarray, np.ndarray]:
        """(logits, exit index) per sample, in input order."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._one(x) if x.shape[0] == 1 else self._batch(x)

    def predict(self, x) -> np.ndarray:
        """Logits only: a drop-in ``predict`` for ``Task.evaluate``."""
        return self(x)[0]

    def _one(self, x):
        h, last = x, self.num_exits - 1
        for i, session in enumerate(self.sessions):
            self.segments_executed += 1
            if i == last:
                return session.run(None, {"input": h})[0], np.array([i])
            h, logits, conf = session.run(None, {"input": h})
            if conf[0] > self.thresholds[i]:
                return logits, np.array([i])

    def _batch(self, x):
        n, last = x.shape[0], self.num_exits - 1
        out, taken = None, np.empty(n, dtype=np.int64)
        active, h = np.arange(n), x
        for i, session in enumerate(self.sessions):
            self.segments_executed += len(active)
            if i == last:
                logits = session.run(None, {"input": h})[0]
                done = np.ones(len(active), dtype=bool)
            else:
                h, logits, conf = session.run(None, {"input": h})
                done = conf > self.thresholds[i]
            if out is None:
                out = np.empty((n, logits.shape[1]), dtype=logits.dtype)
            out[active[done]] = logits[done]
            taken[active[done]] = i
            if done.all():
                break
            active, h = active[~done], np.ascontiguousarray(h[~done])
        return out, taken


def mean_latency(fn, samples, *, batch: int = 1, rounds: int = 5, warmup: int = 1) -> dict:
    """Mean latency (ms) of ``fn`` per call over ``samples`` cut into batches of ``batch``: an early-exit
    model's cost depends on which exit each input takes, so one fixed example (as in
    ``runtime.measure_latency``) would not represent it. Each batch is timed ``rounds`` times;
    ``mean_ms`` is the median over rounds of the round's mean, ``p10_ms``/``p90_ms`` spread over
    rounds, ``mean_of_min_ms`` the mean of each batch's fastest run (robust to a busy machine)."""
    samples = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    chunks = [samples[i:i + batch] for i in range(0, len(samples) - batch + 1, batch)] or [samples]
    times = np.empty((rounds, len(chunks)))
    for r in range(-warmup, rounds):
        for i, x in enumerate(chunks):
            t0 = time.perf_counter_ns()
            fn(x)
            if r >= 0:
                times[r, i] = (time.perf_counter_ns() - t0) / 1e6
    per_round = times.mean(axis=1)
    p10, p90 = np.percentile(per_round, [10, 90])
    return {"mean_ms": float(np.median(per_round)), "median_ms": float(np.median(per_round)),
            "p10_ms": float(p10), "p90_ms": float(p90), "mean_of_min_ms": float(times.min(axis=0).mean()),
            "round_means_ms": [float(v) for v in per_round], "calls": len(chunks), "batch": batch}


__all__ = ["EarlyExitRunner", "export_early_exit", "mean_latency"]

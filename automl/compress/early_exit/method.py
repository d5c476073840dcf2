"""The ``exits`` early-exit method: exit heads trained jointly, thresholds calibrated, deployed as segments.

prepare: the model is cut into blocks (a family's own, ``early_exit.segments_of``; any other model's
by torch.fx, ``early_exit.split``) and exit heads are attached after the chosen blocks; from then on
the training loss adds ``w_i * task_loss(exit_i)`` for every early exit to the final exit's loss.
finalize: thresholds are calibrated on the validation split to ``max_accuracy_drop``. deploy: one
ONNX graph per segment plus a manifest; the artifact is run by ``EarlyExitRunner``, so measured
latency is the mean over test samples of the exits really taken. The stats compare it with the same
model without exits, check the expected-cost formula against the measurement, and count agreement
with the PyTorch early-exit model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from automl.compress.base import KEEPS_PRECISION, Method, register_method
from automl.compress.early_exit.calibrate import calibrate_thresholds
from automl.compress.early_exit.model import (EarlyExitConfig, EarlyExitModel, ExitHead, early_exit_from_config,
                                              expected_cost, segment_macs)
from automl.errors import ConfigError
from automl.runtime import Artifact, OrtModel

RUNTIME = "onnxruntime_early_exit"


def _grid_of(size) -> Tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def deployed_pools(ee: EarlyExitModel, example) -> None:
    """Exit heads pool to their grid with AdaptiveAvgPool2d; on a map the grid divides that is the
    AvgPool2d the ONNX export writes, so the priced model holds that (a layer profiles measure)."""
    h = example
    with torch.no_grad():
        for i, (segment, head) in enumerate(zip(ee.segments, ee.exit_heads)):
            h = segment(h)
            pool = head.net[0] if isinstance(head, ExitHead) else None
            if not isinstance(pool, nn.AdaptiveAvgPool2d) or h.dim() != 4 or _grid_of(pool.output_size) == (1, 1):
                continue
            (gh, gw), (rows, cols) = _grid_of(pool.output_size), tuple(h.shape[2:])
            if rows % gh or cols % gw or rows // gh != cols // gw:
                raise ConfigError(f"exit head {i} pools a {rows}x{cols} map to a {gh}x{gw} grid: windows of unequal "
                                  "size, which no profile entry describes", key="early_exit.head_pool", value=gh,
                                  fix="choose a head_pool that divides the feature maps at the exits, or 1")
            head.net[0] = nn.AvgPool2d(rows // gh)


def exits_shape(model: nn.Module, example, config: EarlyExitConfig, notes: Dict) -> EarlyExitModel:
    """The early-exit model the method builds from ``config`` (untrained heads), as profiles price it."""
    ee = early_exit_from_config(config, model, example)
    ee.joint_output = False      # model(x) is the backbone alone, as the method's evaluation sees it
    deployed_pools(ee.eval(), example)
    notes["exit_after"] = list(ee.exit_after)
    return ee


@register_method("exits", "early_exit", EarlyExitConfig)
class Exits(Method):
    """Exit heads after chosen blocks; a sample leaves at the first confident exit."""

    profile_precision = KEEPS_PRECISION
    CANNOT_SHARE = {"quantization": "early exit deploys float per-segment graphs; quantized segments are not "
                                    "supported"}

    deployed_shape = classmethod(lambda cls, model, example, config, notes: exits_shape(model, example, config, notes))

    def _prepare(self, model, ctx):
        self.task = ctx.task
        ee = early_exit_from_config(self.config, model, ctx.task.example_input(2))
        ee.joint_output = False  # the training loop sees the final logits; the exits' go through the loss
        self.weights = self._weights(ee)
        self.model = ee
        return ee

    def _weights(self, ee: EarlyExitModel) -> List[float]:
        at = {str(e) for e in ee.exit_after}
        for key in self.config.exit_weights:
            if key not in at:
                raise ConfigError("exit_weights names a block without an exit", key=f"exit_weights.{key}",
                                  value=self.config.exit_weights[key],
                                  fix=f"use the exit positions of this model: {', '.join(sorted(at)) or '(none)'}")
        return [self.config.exit_weights.get(str(e), self.config.exit_weight) for e in ee.exit_after]

    def _adjust_loss(self, model, x, y, output, loss):
        outputs, self.model.exit_logits = self.model.exit_logits, []
        extra = [w * self.task.loss(logits, y) for w, logits in zip(self.weights, outputs[:-1]) if w]
        return loss + sum(extra) if extra else loss

    def _finalize(self, model, ctx):
        if isinstance(model, EarlyExitModel):
            self.model = model  # an earlier stage may have replaced it (structured thinning returns a copy)
        elif model is not self.model:
            raise ConfigError("a stage replaced the early-exit model with a plain one", key="early_exit",
                              value=type(model).__name__, fix="put the exits stage after that stage's changes")
        cal = calibrate_thresholds(self.model, ctx.task.val_loader(), self.config.max_accuracy_drop,
                                   criterion=self.config.criterion)
        self.calibration = cal
        example = ctx.task.example_input(1)
        macs = segment_macs(self.model, example)
        self.stats = {
            "exit_after": ",".join(str(e) for e in self.model.exit_after),
            "exit_thresholds": ",".join(f"{t:.4f}" for t in cal.thresholds),
            "exit_fractions_val": ",".join(f"{f:.3f}" for f in cal.exit_fractions),
            "exit_val_accuracy": cal.accuracy,
            "final_exit_val_accuracy": cal.final_accuracy,
            "expected_macs": expected_cost(macs, cal.exit_fractions),
        }
        return model

    def _deploy(self, artifact, ctx):
        from automl.compress.early_exit.export import export_early_exit

        if artifact.runtime != "onnxruntime" or artifact.precision != "fp32":
            raise ConfigError("early exit deploys float segment graphs and cannot follow a stage that changed "
                              "the deployed model", key="early_exit", value=artifact.precision,
                              fix="drop the other deploy-time stage, or the early_exit stage")
        example = ctx.task.example_input(1)
        manifest = export_early_exit(self.model, example, Path(ctx.work_dir) / "early_exit",
                                     list(self.calibration.thresholds), self.config.criterion)
        self.stats.update(exit_report(self.model, manifest, artifact.path, ctx, self.calibration.thresholds,
                                      self.config.criterion))
        files = sorted(manifest.parent.glob("segment_*.onnx"))
        return Artifact(path=manifest, runtime=RUNTIME, precision=artifact.precision, quant=artifact.quant,
                        notes={**artifact.notes, "early_exit": "per-segment ONNX graphs chained by EarlyExitRunner",
                               "no_exit_model": artifact.path.name},
                        shipped=None, files=tuple(files),
                        exit_shares=tuple(self.calibration.exit_fractions[:-1]))


def exit_report(model: EarlyExitModel, manifest: Path, full_model: Path, ctx, thresholds, criterion) -> dict:
    """Test-split exit distribution, agreement with PyTorch, and measured vs expected latency."""
    from automl.compress.early_exit.export import EarlyExitRunner, mean_latency

    x = torch.cat([xb for xb, _ in ctx.task.test_loader()])
    runner = EarlyExitRunner.load(manifest.parent, threads=ctx.threads)
    logits, taken = runner(x)
    ref_logits, ref_taken = model.infer(x, thresholds, criterion)
    same = (logits.argmax(axis=1) == ref_logits.argmax(dim=1).numpy()) & (taken == ref_taken.numpy())
    counts = np.bincount(taken, minlength=runner.num_exits)
    fractions = counts / counts.sum()
    # Cost of leaving at exit k, measured through the runner forced to stop there (earlier exits
    # closed, exit k open): expected = sum_k P(exit k) * path_k, checked against the real mean.
    path_ms, n = [], runner.num_exits
    for k in range(n):
        runner.thresholds = [1.0] * k + [0.0] * (n - 1 - k)
        path_ms.append(mean_latency(runner, x[:120], rounds=3)["mean_ms"])
    runner.thresholds = list(thresholds)
    full = OrtModel(full_model, threads=ctx.threads)
    no_exit = mean_latency(full, x, rounds=3)
    with_exit = mean_latency(runner, x, rounds=3)
    return {
        "exit_fractions_test": ",".join(f"{f:.3f}" for f in fractions),
        "exit_parity": float(same.mean()),
        "exit_expected_ms": float(np.dot(path_ms, fractions)),
        "exit_mean_ms": with_exit["mean_ms"],
        "no_exit_mean_ms": no_exit["mean_ms"],
        "exit_speedup": no_exit["mean_ms"] / with_exit["mean_ms"],
        "exit_path_ms": ",".join(f"{v:.4f}" for v in path_ms),
    }

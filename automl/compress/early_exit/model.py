"""Early exit: exit heads after chosen blocks, joint training, and inference that really skips work.

A backbone is an ordered list of blocks plus a final head. ``EarlyExitModel`` cuts it into
segments; segment i runs blocks up to exit i, then exit head i. ``infer`` stops running blocks
for a sample as soon as an exit is confident enough, and counts the blocks it ran
(``blocks_executed``, summed over samples) so the skipped work is visible.

Confidence: both criteria map logits to [0, 1] -- max softmax, or 1 - entropy / log(classes).
A sample leaves at exit i when confidence > threshold i (strictly), so threshold 1.0 never exits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from automl.configs import option
from automl.errors import ConfigError

CRITERIA = ("max_softmax", "entropy")


@dataclass(frozen=True)
class EarlyExitConfig:
    exits: int = option(1, low=0, high=8, doc="number of early exits (the final head is always an exit)")
    positions: Tuple[str, ...] = option((), doc="block indices, e.g. ['0', '2'], or for your own model "
                                        "module names, e.g. ['layer2']; empty: evenly spaced")
    head_size: int = option(0, low=0, high=4096, doc="hidden width of each exit head (0: pool -> Linear)")
    head_pool: int = option(1, low=1, high=16, doc="exit heads average-pool to this grid (1: global pool)")
    criterion: str = option("max_softmax", choices=CRITERIA, doc="confidence used for exit decisions")
    max_accuracy_drop: float = option(0.005, low=0.0, high=1.0, doc="calibration target vs the final exit")
    exit_weight: float = option(1.0, low=0.0, high=100.0, doc="training loss weight of each early exit (final: 1)")
    exit_weights: Dict[str, float] = option({}, low=0.0, high=100.0,
                                            doc="per-exit loss weights by block index, e.g. {'0': 0.3}")


# -- backbones --------------------------------------------------------------------------------------
def segments_of(model: nn.Module) -> Tuple[List[nn.Module], nn.Module]:
    """The ordered blocks and the final head (pool -> flatten -> classifier) of a built-in family.

    cnn: one block per conv (conv, BN, ReLU and its pooling); resnet / mobilenetv2: the stem, then
    every residual block of every stage.
    """
    from automl.arch.cnn import CNN
    from automl.arch.mobilenet import MobileNetV2
    from automl.arch.resnet import ResNet

    if isinstance(model, CNN):
        blocks, current = [], []
        for layer in model.features:
            if isinstance(layer, nn.Conv2d) and current:
                blocks.append(nn.Sequential(*current))
                current = []
            current.append(layer)
        if current:
            blocks.append(nn.Sequential(*current))
    elif isinstance(model, (ResNet, MobileNetV2)):
        blocks = [model.stem] + [block for stage in model.stages for block in stage]
    else:
        raise ConfigError("early exit cannot split this model into blocks", key="early_exit.model",
                          value=type(model).__name__,
                          fix="use a cnn, resnet or mobilenetv2 model, or build EarlyExitModel(blocks, head, "
                              "exits=..., example=...) with your own ordered blocks and final head")
    head = nn.Sequential(model.pool, model.flatten, model.head)
    return blocks, head


def default_positions(n_blocks: int, count: int) -> List[int]:
    """``count`` exit positions spread evenly over blocks 0 .. n_blocks - 2."""
    if not 0 <= count <= n_blocks - 1:
        raise ConfigError(f"this model has {n_blocks} blocks, so at most {n_blocks - 1} early exits",
                          key="early_exit.exits", value=count, fix=f"use 0 .. {max(n_blocks - 1, 0)} exits")
    return [round((j + 1) * n_blocks / (count + 1)) - 1 for j in range(count)]


def parse_positions(positions: Sequence, n_blocks: int) -> List[int]:
    """Block indices from a config (strings or ints), checked against the model."""
    try:
        return [int(p) for p in positions]
    except (TypeError, ValueError):
        raise ConfigError("exit positions are block indices", key="early_exit.positions", value=list(positions),
                          fix=f"write whole numbers between 0 and {n_blocks - 2}") from None


class ExitHead(nn.Module):
    """Average pool to a ``pool`` x ``pool`` grid -> flatten -> [Linear -> ReLU] -> Linear.

    ``pool`` 1 is global pooling; a larger grid keeps where features are, which lets an exit
    after an early, shallow block classify well (small inputs) for a slightly larger Linear.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 0, pool: int = 1,
                 spatial: Tuple[int, int] = (1, 1), vector: bool = False):
        super().__init__()
        self.vector = vector  # fed (N, C) vectors rather than maps; fixed here so forward traces
        grid = (min(pool, spatial[0]), min(pool, spatial[1]))
        features = channels * grid[0] * grid[1]
        # Pooling a map to its own size is a no-op that would still cost graph nodes when deployed.
        pool_layer = nn.Identity() if grid == tuple(spatial) and pool > 1 else nn.AdaptiveAvgPool2d(grid)
        layers: List[nn.Module] = [pool_layer, nn.Flatten()]
        if hidden:
            layers += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden or features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x[:, :, None, None] if self.vector else x)


# -- pure decision helpers ------------------------------------------------------------------------------
def confidence(logits: torch.Tensor, criterion: str = "max_softmax") -> torch.Tensor:
    """Per-sample confidence in [0, 1]."""
    if criterion == "max_softmax":
        return F.softmax(logits, dim=1).amax(dim=1)
    if criterion == "entropy":
        logp = F.log_softmax(logits, dim=1)
        entropy = -(logp.exp() * logp).sum(dim=1)
        return 1.0 - entropy / math.log(logits.shape[1])
    raise ConfigError("unknown exit criterion", key="early_exit.criterion", value=criterion,
                      fix=f"use one of {', '.join(CRITERIA)}")


def check_thresholds(thresholds, n_early: int) -> List[float]:
    """One threshold per early exit (a single number is used for all), each within [0, 1]."""
    if isinstance(thresholds, (int, float)):
        thresholds = [float(thresholds)] * n_early
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != n_early:
        raise ConfigError(f"expected {n_early} thresholds, one per early exit", key="early_exit.thresholds",
                          value=thresholds, fix="give one number per exit, or a single number for all")
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ConfigError("exit thresholds are confidences in [0, 1]", key="early_exit.thresholds",
                              value=t, fix="use e.g. 0.9; 1.0 disables that exit")
    return thresholds


def exit_indices(confidences: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Exit taken per sample from all-exit confidences (exits x samples): first conf > threshold, else last."""
    n_exits = confidences.shape[0]
    taken = torch.full((confidences.shape[1],), n_exits - 1, dtype=torch.long)
    for i in reversed(range(n_exits - 1)):
        taken[confidences[i] > thresholds[i]] = i
    return taken


def expected_cost(segment_costs: Sequence[float], exit_probs: Sequence[float]) -> float:
    """sum_i P(reach segment i) * cost_i, with P(reach i) = 1 - sum_{j<i} P(exit at j).

    ``segment_costs[i]`` covers segment i's blocks and its exit head; ``exit_probs`` sums to 1.
    """
    costs, probs = [float(c) for c in segment_costs], [float(p) for p in exit_probs]
    if len(costs) != len(probs) or not costs:
        raise ConfigError("need one exit probability per segment", key="early_exit.exit_probs",
                          value=(len(costs), len(probs)), fix="pass equal-length, non-empty lists")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError("exit probabilities must be >= 0 and sum to 1", key="early_exit.exit_probs",
                          value=probs, fix="normalise the exit distribution")
    total, reach = 0.0, 1.0
    for cost, p in zip(costs, probs):
        total += reach * cost
        reach -= p
    return total


def early_exit_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor,
                    weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_i w_i * CE(exit_i); equal weights by default."""
    weights = [1.0] * len(outputs) if weights is None else list(weights)
    if len(weights) != len(outputs):
        raise ConfigError(f"expected {len(outputs)} exit weights", key="early_exit.weights", value=weights,
                          fix="give one weight per exit, the final one last")
    return sum(w * F.cross_entropy(o, target) for w, o in zip(weights, outputs))


# -- the model ----------------------------------------------------------------------------------------
class EarlyExitModel(nn.Module):
    """Blocks cut into segments, with an exit head after each chosen block and the final head last.

    ``all_exits`` returns every exit's logits (for joint training); ``infer`` takes exits.
    ``forward`` returns ``all_exits`` while ``joint_output`` is true (the default); a training loop
    that expects one logits tensor sets it false: forward then returns the final exit's logits and,
    in training mode, keeps every exit's logits in ``exit_logits`` for the loss (in eval mode it runs
    the backbone alone: the same model without exits).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, *, exits: Sequence[int],
                 example: torch.Tensor, head_size: int = 0, head_pool: int = 1):
        super().__init__()
        blocks = list(blocks)
        given = parse_positions(exits, len(blocks))
        exits = sorted(set(given))
        if len(blocks) < 2 and exits:
            raise ConfigError("a model with one block has no place for an early exit",
                              key="early_exit.positions", value=given, fix="use a deeper model or no exits")
        if len(exits) != len(given) or any(not 0 <= e < len(blocks) - 1 for e in exits):
            raise ConfigError(f"exit positions are distinct block indices in [0, {len(blocks) - 2}] (the final "
                              "head already follows the last block)", key="early_exit.positions", value=given,
                              fix=f"choose indices between 0 and {len(blocks) - 2}")
        self.exit_after = exits
        bounds = [0] + [e + 1 for e in exits] + [len(blocks)]
        self.segments = nn.ModuleList(nn.Sequential(*blocks[a:b]) for a, b in zip(bounds, bounds[1:]))
        self.blocks_per_segment = [b - a for a, b in zip(bounds, bounds[1:])]
        was_training = any(m.training for m in blocks)
        shapes, h = [], example
        with torch.no_grad():
            for segment in self.segments:
                segment.eval()
                h = segment(h)
                shapes.append(h.shape)
            num_classes = head.eval()(h).shape[1]
        self.exit_heads = nn.ModuleList(
            ExitHead(s[1], num_classes, head_size, head_pool, tuple(s[2:4]) if len(s) == 4 else (1, 1),
                     vector=len(s) != 4)
            for s in shapes[:-1])
        self.exit_heads.append(head)
        self.num_classes = num_classes
        self.train(was_training)
        self.blocks_executed = 0
        self.joint_output = True
        self.exit_logits: List[torch.Tensor] = []

    @classmethod
    def from_model(cls, model: nn.Module, *, exits: Sequence[int], example: torch.Tensor,
                   head_size: int = 0, head_pool: int = 1) -> "EarlyExitModel":
        """Attach exits to a cnn / resnet / mobilenetv2 model (its modules are shared, not copied)."""
        blocks, head = segments_of(model)
        return cls(blocks, head, exits=exits, example=example, head_size=head_size, head_pool=head_pool)

    def __getstate__(self):
        # the last training batch's exit logits hold autograd graphs: never copied or pickled
        state = self.__dict__.copy()
        state["exit_logits"] = []
        return state

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    def reset_counters(self):
        self.blocks_executed = 0

    def _run_segment(self, i: int, h: torch.Tensor) -> torch.Tensor:
        self.blocks_executed += self.blocks_per_segment[i] * h.shape[0]
        return self.segments[i](h)

    def all_exits(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs, h = [], x
        for segment, head in zip(self.segments, self.exit_heads):
            h = segment(h)
            outputs.append(head(h))
        return outputs

    def forward(self, x: torch.Tensor):
        if self.joint_output:
            return self.all_exits(x)
        if self.training:
            self.exit_logits = self.all_exits(x)
            return self.exit_logits[-1]
        for segment in self.segments:  # evaluation: the model without its exits
            x = segment(x)
        return self.exit_heads[-1](x)

    @torch.no_grad()
    def infer(self, x: torch.Tensor, thresholds, criterion: str = "max_softmax"
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, exit index) per sample, in input order, running each block only while needed."""
        thresholds = check_thresholds(thresholds, self.num_exits - 1) + [-1.0]  # the last exit always takes
        confidence(x.new_zeros(1, 2), criterion)  # reject an unknown criterion before any work
        was_training = self.training
        self.eval()
        try:
            if x.shape[0] == 1:
                return self._infer_one(x, thresholds, criterion)
            return self._infer_batch(x, thresholds, criterion)
        finally:
            self.train(was_training)

    def _infer_one(self, x, thresholds, criterion):
        h = x
        for i, head in enumerate(self.exit_heads):
            h = self._run_segment(i, h)
            logits = head(h)
            if i == self.num_exits - 1 or float(confidence(logits, criterion)[0]) > thresholds[i]:
                return logits, torch.tensor([i])

    def _infer_batch(self, x, thresholds, criterion):
        out = x.new_empty(x.shape[0], self.num_classes)
        taken = torch.empty(x.shape[0], dtype=torch.long)
        active = torch.arange(x.shape[0])  # original positions of the samples still running
        h = x
        for i, head in enumerate(self.exit_heads):
            h = self._run_segment(i, h)
            logits = head(h)
            done = confidence(logits, criterion) > thresholds[i]
            if i == self.num_exits - 1:
                done = torch.ones_like(done)
            out[active[done]] = logits[done]
            taken[active[done]] = i
            keep = ~done
            if not bool(keep.any()):
                break
            active, h = active[keep], h[keep]
        return out, taken


def segment_macs(model: EarlyExitModel, example: torch.Tensor) -> List[int]:
    """Dense MACs of each segment including its exit head: the ``segment_costs`` of expected_cost."""
    from automl.modelstats import count_macs

    costs, h, was_training = [], example, model.training
    model.eval()
    for segment, head in zip(model.segments, model.exit_heads):
        # a new Sequential starts in training mode: eval it, or counting would update BN statistics
        costs.append(count_macs(nn.Sequential(segment, head).eval(), h))
        with torch.no_grad():
            h = segment(h)
    model.train(was_training)
    return costs


def early_exit_from_config(config: EarlyExitConfig, model: nn.Module, example: torch.Tensor) -> EarlyExitModel:
    """A built-in family is cut at its blocks; any other model where torch.fx finds a single-tensor cut
    (early_exit.split), its positions then being module names or cut indices."""
    if type(model).__module__.startswith("automl.arch."):  # a built-in family
        blocks, head = segments_of(model)
        given = parse_positions(config.positions, len(blocks)) if config.positions else None
    else:
        from automl.compress.early_exit.split import positions_by_name, split_model

        blocks, head, cuts = split_model(model, example)
        given = positions_by_name(config.positions, cuts) if config.positions else None
    positions = given if given is not None else default_positions(len(blocks), config.exits)
    return EarlyExitModel(blocks, head, exits=positions, example=example, head_size=config.head_size,
                          head_pool=config.head_pool)


__all__ = ["CRITERIA", "EarlyExitConfig", "EarlyExitModel", "ExitHead",
           "check_thresholds", "confidence", "default_positions", "early_exit_from_config", "early_exit_loss",
           "exit_indices", "expected_cost", "parse_positions", "segment_macs", "segments_of"]

"""Layer-wise pruning: whole blocks are bypassed (replaced by nn.Identity) where the graph allows it.

Which blocks may go (:func:`removable_blocks`):

  residual  a submodule (not the root, not a leaf layer) whose forward, traced by torch.fx, is
            ``act(x + g(x))``: the output is an add, optionally behind elementwise activations, and
            one addend is the block's own input, directly or through nn.Identity modules (an identity
            shortcut). A projection shortcut (conv/BN on the skip path) does not qualify. Bypassing
            keeps what the skip path carries, so a block with a small g(x) barely changes the network.
            Targets: ResNet BasicBlocks with an identity shortcut, MobileNetV2 inverted residuals
            with ``residual`` set.
  plain     only with ``plain: true``: three consecutive children of an nn.Sequential, a dense
            (groups=1) Conv2d with stride 1 and in == out channels, a BatchNorm2d and a ReLU/ReLU6.
            Off by default: such a layer is not a perturbation of the identity, so removing it changes
            the function a lot and leans entirely on fine-tuning.

Either kind must keep its input shape on the example input, be called once per forward, and leave
the model runnable (same output shape) when it alone is replaced by identity. A plain block is named
by its conv.

Scores (lowest go first): ``contribution`` sqrt(sum ||f(x) - x||^2 / sum ||x||^2) over calibration
batches in eval mode; ``bn_scale`` mean |gamma| of the block's last registered BatchNorm (the mean,
not the sum, so blocks of different widths compare); ``random``. All chosen blocks are scored once
and removed together at the start epoch (``train.epochs - finetune_epochs``); fine-tuning then
trains the reduced network.
"""
from __future__ import annotations

import difflib
import itertools
import operator
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from automl.compress.base import KEEPS_PRECISION, Method, register_method
from automl.configs import option
from automl.errors import ConfigError, UnknownNameError
from automl.modelstats import count_macs, count_params, forward_batches

CRITERIA = ("contribution", "bn_scale", "random")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity)
ACTIVATION_FUNCS = {F.relu, F.relu6, torch.relu, F.leaky_relu, F.silu, F.gelu, F.hardswish}
ACTIVATION_METHODS = {"relu", "relu_"}
ADDS = {("call_function", operator.add), ("call_function", operator.iadd), ("call_function", torch.add),
        ("call_method", "add"), ("call_method", "add_")}


@dataclass(frozen=True)
class BlockInfo:
    kind: str                  # "residual" | "plain"
    members: Tuple[str, ...]   # module names replaced by nn.Identity
    params: int
    shape: Tuple[int, ...]     # input (= output) shape on the example


# detection -----------------------------------------------------------------------------------------
def _skip(node, gm, keep_going) -> fx.Node:
    while isinstance(node, fx.Node) and keep_going(node, gm):
        node = node.args[0]
    return node


def _is_identity(node, gm) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity)


def _is_activation(node, gm) -> bool:
    return ((node.op == "call_module" and isinstance(gm.get_submodule(node.target), ACTIVATIONS))
            or (node.op == "call_function" and node.target in ACTIVATION_FUNCS)
            or (node.op == "call_method" and node.target in ACTIVATION_METHODS))


def is_residual(module: nn.Module) -> bool:
    """True when ``module.forward`` traces to ``act(x + g(x))`` with an identity skip path."""
    try:
        gm = fx.symbolic_trace(module)
    except Exception:  # untraceable control flow: not provably residual
        return False
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    node = _skip(outputs[0].args[0], gm, _is_activation)
    if not isinstance(node, fx.Node) or (node.op, node.target) not in ADDS or len(node.args) < 2:
        return False
    if not all(isinstance(a, fx.Node) for a in node.args[:2]):  # x + constant is no skip path
        return False
    return any(_skip(a, gm, _is_identity) is inputs[0] for a in node.args[:2])


def _io_shapes(model: nn.Module, example: torch.Tensor) -> Dict[str, list]:
    """{module name: [input shape, output shape, calls]} for modules called on one tensor."""
    seen: Dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                entry = seen.setdefault(name, [tuple(inputs[0].shape), tuple(output.shape), 0])
                entry[2] += 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _plain_triples(prefix: str, seq: nn.Sequential, shapes) -> List[Tuple[str, BlockInfo]]:
    children = list(seq.named_children())
    found = []
    for (cn, conv), (bn_name, bn), (an, act) in zip(children, children[1:], children[2:]):
        name = prefix + cn
        layout = isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, (nn.ReLU, nn.ReLU6))
        if not layout or conv.groups != 1 or any(s != 1 for s in conv.stride) or conv.in_channels != conv.out_channels:
            continue
        if name in shapes and shapes[name][0] == shapes[name][1] and shapes[name][2] == 1:
            members = (name, prefix + bn_name, prefix + an)
            params = sum(p.numel() for m in (conv, bn, act) for p in m.parameters())
            found.append((name, BlockInfo("plain", members, params, shapes[name][0])))
    return found


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _still_runs(model, info: BlockInfo, example, out_shape) -> bool:
    saved = {m: model.get_submodule(m) for m in info.members}
    try:
        for m in info.members:
            _set(model, m, nn.Identity())
        out = model(example)
        return isinstance(out, torch.Tensor) and tuple(out.shape) == out_shape
    except Exception:  # any failure means the graph does not allow the bypass
        return False
    finally:
        for m, module in saved.items():
            _set(model, m, module)


def removable_blocks(model: nn.Module, example: torch.Tensor, *, plain: bool = False
                     ) -> List[Tuple[str, BlockInfo]]:
    """Blocks that can be replaced by identity, in model order (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shapes = _io_shapes(model, example)
            out_shape = tuple(model(example).shape)
            found = []
            for name, module in model.named_modules():
                if plain and isinstance(module, nn.Sequential):
                    found += _plain_triples(f"{name}." if name else "", module, shapes)
                if not name or name not in shapes or not any(True for _ in module.children()):
                    continue
                ins, outs, calls = shapes[name]
                if calls == 1 and ins == outs and any(True for _ in module.parameters()) and is_residual(module):
                    params = sum(p.numel() for p in module.parameters())
                    found.append((name, BlockInfo("residual", (name,), params, ins)))
            order = [n for n, _ in model.named_modules()]
            found.sort(key=lambda item: order.index(item[1].members[0]))
            return [(n, info) for n, info in found if _still_runs(model, info, example, out_shape)]
    finally:
        model.train(was_training)


def remove_blocks(model: nn.Module, blocks: Iterable[Tuple[str, BlockInfo]]) -> int:
    """Replace every member of ``blocks`` by nn.Identity in place; returns the parameters removed."""
    removed = 0
    for _, info in blocks:
        for m in info.members:
            removed += sum(p.numel() for p in model.get_submodule(m).parameters())
            _set(model, m, nn.Identity())
    return removed


# scores and choice ---------------------------------------------------------------------------------
def contribution_scores(model: nn.Module, blocks: Dict[str, BlockInfo], batches: Iterable[torch.Tensor]
                        ) -> Dict[str, float]:
    """||f(x) - x|| / ||x|| per block, norms over all of ``batches`` (eval mode, no grad): how far
    a block is from passing its input through."""
    sums = {n: [0.0, 0.0] for n in blocks}
    held: Dict[str, torch.Tensor] = {}
    handles = []
    for name, info in blocks.items():
        def keep(module, inputs, name=name):  # a clone: later in-place ops must not change it
            held[name] = inputs[0].detach().clone()

        def measure(module, inputs, output, name=name):
            x = held.pop(name)
            sums[name][0] += float((output.detach() - x).pow(2).sum())
            sums[name][1] += float(x.pow(2).sum())
        handles.append(model.get_submodule(info.members[0]).register_forward_pre_hook(keep))
        handles.append(model.get_submodule(info.members[-1]).register_forward_hook(measure))
    forward_batches(model, batches, handles)
    return {n: (num / max(den, 1e-12)) ** 0.5 for n, (num, den) in sums.items()}


def bn_scale_scores(model: nn.Module, blocks: Dict[str, BlockInfo]) -> Dict[str, float]:
    """Mean |gamma| of each block's last registered BatchNorm."""
    scores = {}
    for name, info in blocks.items():
        norms = [m for member in info.members for m in model.get_submodule(member).modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        if not norms:
            raise ConfigError("criterion bn_scale needs an affine BatchNorm in every block", key="criterion",
                              value=name, fix="use criterion: contribution, or restrict `layers`")
        scores[name] = float(norms[-1].weight.detach().abs().mean())
    return scores


def _overlap(a: BlockInfo, b: BlockInfo) -> bool:
    return any(x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a.members for y in b.members)


def choose_blocks(scores: Dict[str, float], count: int, blocks: Dict[str, BlockInfo]) -> List[str]:
    """The ``count`` lowest-scored blocks (ties: model order), skipping blocks nested in a chosen one."""
    order = list(blocks)
    chosen: List[str] = []
    for name in sorted(scores, key=lambda n: (scores[n], order.index(n))):
        if len(chosen) == count:
            break
        if not any(_overlap(blocks[name], blocks[c]) for c in chosen):
            chosen.append(name)
    return [n for n in order if n in chosen]


def blocks_to_remove(blocks: float, candidates: int) -> int:
    """A count (>= 1, whole) or a share of the candidates (< 1, rounded, at least one when > 0)."""
    if blocks >= 1:
        if blocks != int(blocks):
            raise ConfigError("a block count must be a whole number", key="blocks", value=blocks,
                              fix="write a count such as 2, or a share of the candidates below 1 such as 0.25")
        count = int(blocks)
    else:
        count = max(1, round(blocks * candidates)) if blocks > 0 else 0
    if count > candidates:
        raise ConfigError(f"only {candidates} removable blocks match `layers`", key="blocks", value=blocks,
                          fix=f"remove at most {candidates} blocks, or widen `layers`")
    return count


def select_blocks(found: Sequence[Tuple[str, BlockInfo]], patterns: Sequence[str]) -> Dict[str, BlockInfo]:
    """Candidates named exactly or fully matched by a 're:' pattern; a pattern matching none is an error."""
    names = [n for n, _ in found]
    hits = set()
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                rx = re.compile(pattern[3:])
            except re.error as exc:
                raise UnknownNameError(f"invalid regular expression: {exc}", key="layers", value=pattern,
                                       fix="fix the regex after 're:'") from None
            matched = [n for n in names if rx.fullmatch(n)]
        else:
            matched = [n for n in names if n == pattern.removeprefix("module.")]
        if not matched:
            near = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.0)
            raise UnknownNameError("layer pattern matches no removable block", key="layers", value=pattern,
                                   fix=f"nearest block names: {', '.join(near) or '(none)'}; use an exact name "
                                       "or 're:<regex>'")
        hits.update(matched)
    return {n: info for n, info in found if n in hits}


# the method ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPruningConfig:
    blocks: float = option(1.0, low=0.0, doc="blocks to remove: a count (1, 2 ...) or, below 1, a share of "
                           "the candidates")
    criterion: str = option("contribution", choices=CRITERIA, doc="lowest score goes first: "
                            "||f(x)-x||/||x||, mean |gamma| of the last BN, or random")
    finetune_epochs: int = option(2, low=0, high=10_000, doc="epochs trained from the removal on")
    layers: Tuple[str, ...] = option(("re:.*",), doc="block names or 're:' patterns restricting the candidates")
    plain: bool = option(False, doc="also remove Conv-BN-ReLU layers that keep their shape (no skip path)")
    calib_batches: int = option(4, low=1, high=1_000, doc="training batches of 128 for the contribution score")


@register_method("layer", "pruning", LayerPruningConfig)
class LayerPruning(Method):
    """Bypasses the lowest-scored removable blocks at the start epoch; finalize reports what went."""

    profile_precision = KEEPS_PRECISION

    @classmethod
    def deployed_shape(cls, model, example, config, notes):
        from automl.compress.pruning.shapes import layer_shape

        return layer_shape(model, example, config, notes)

    def _prepare(self, model, ctx):
        example = ctx.task.example_input(1)
        found = removable_blocks(model, example, plain=self.config.plain)
        if not found:
            raise ConfigError("the model has no removable block", key="pruning.method", value="layer",
                              fix="use a residual family (resnet, mobilenetv2), set plain: true, "
                                  "or pick a channel pruning method")
        self.candidates = select_blocks(found, self.config.layers)
        self.count = blocks_to_remove(self.config.blocks, len(self.candidates))
        self.before = (count_params(model), count_macs(model, example))
        self.removed, self.scores = None, {}
        return model

    def _on_epoch_start(self, model, epoch, ctx):
        if self.removed is None and epoch >= (self.start_epoch or 0):
            self._remove(model, ctx)

    def _score(self, model, ctx) -> Dict[str, float]:
        if self.config.criterion == "bn_scale":
            return bn_scale_scores(model, self.candidates)
        if self.config.criterion == "random":
            noise = torch.rand(len(self.candidates), generator=torch.Generator().manual_seed(ctx.seed))
            return dict(zip(self.candidates, noise.tolist()))
        loader = ctx.task.train_loader(batch_size=128, seed=ctx.seed)
        batches = (x for x, *_ in itertools.islice(loader, self.config.calib_batches))
        return contribution_scores(model, self.candidates, batches)

    def _remove(self, model, ctx):
        # The optimizer still holds the removed parameters; they get no gradients, so it skips them.
        self.scores = self._score(model, ctx) if self.count else {}
        chosen = choose_blocks(self.scores, self.count, self.candidates)
        if len(chosen) < self.count:
            raise ConfigError("the selected blocks are nested, too few can be removed together", key="blocks",
                              value=self.config.blocks, fix=f"remove at most {len(chosen)} blocks")
        remove_blocks(model, [(n, self.candidates[n]) for n in chosen])
        self.removed = chosen

    def _finalize(self, model, ctx):
        if self.removed is None:
            self._remove(model, ctx)
        example = ctx.task.example_input(1)
        self.stats = {
            "pruned_blocks": len(self.removed), "removed_blocks": ",".join(self.removed),
            "candidate_blocks": len(self.candidates),
            "params_before": self.before[0], "params_after": count_params(model),
            "macs_before": self.before[1], "macs_after": count_macs(model, example),
        }
        return model
